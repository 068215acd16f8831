//! Joining ElevenLabs alignments (`with_timestamps`):
//! `{"characters":[...],"character_start_times_seconds":[...],"character_end_times_seconds":[...]}`.
//!
//! Characters are concatenated in order; every time of part `i` is shifted by `offsets[i]`
//! seconds (the duration of the audio before it, which the caller measures). A `null` part
//! (ElevenLabs sends one for a chunk without characters) counts as empty. Times are rounded
//! to the microsecond to keep float noise out of the JSON.

use serde_json::{Map, Value};

use super::JoinError;

pub const CHARACTERS: &str = "characters";
pub const STARTS: &str = "character_start_times_seconds";
pub const ENDS: &str = "character_end_times_seconds";

fn bad(detail: String) -> JoinError {
    JoinError::Alignment(detail)
}

/// The offsets of parts lasting `durations` seconds: 0, d0, d0+d1, ...
pub fn offsets_from_durations(durations: &[f64]) -> Vec<f64> {
    durations
        .iter()
        .scan(0.0, |sum, d| {
            let start = *sum;
            *sum += d;
            Some(start)
        })
        .collect()
}

fn array<'a>(
    part: &'a Map<String, Value>,
    key: &str,
    index: usize,
) -> Result<&'a Vec<Value>, JoinError> {
    part.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("alignment {} has no {key} array", index + 1)))
}

fn shifted(times: &[Value], offset: f64, key: &str, index: usize) -> Result<Vec<Value>, JoinError> {
    times
        .iter()
        .map(|t| {
            let t = t
                .as_f64()
                .ok_or_else(|| bad(format!("alignment {} has a non-number in {key}", index + 1)))?;
            let shifted = ((t + offset) * 1e6).round() / 1e6;
            serde_json::Number::from_f64(shifted)
                .map(Value::Number)
                .ok_or_else(|| {
                    bad(format!(
                        "alignment {} has a time that is not finite",
                        index + 1
                    ))
                })
        })
        .collect()
}

/// Joins the alignments of the parts, shifting part `i`'s times by `offsets_seconds[i]`.
pub fn join_alignments(parts: &[Value], offsets_seconds: &[f64]) -> Result<Value, JoinError> {
    if parts.len() != offsets_seconds.len() {
        return Err(bad(format!(
            "{} alignments but {} offsets",
            parts.len(),
            offsets_seconds.len()
        )));
    }
    let mut characters = Vec::new();
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for (index, (part, offset)) in parts.iter().zip(offsets_seconds).enumerate() {
        if part.is_null() {
            continue;
        }
        if !offset.is_finite() {
            return Err(bad(format!(
                "the offset of alignment {} is not finite",
                index + 1
            )));
        }
        let object = part
            .as_object()
            .ok_or_else(|| bad(format!("alignment {} is not an object", index + 1)))?;
        let chars = array(object, CHARACTERS, index)?;
        let part_starts = array(object, STARTS, index)?;
        let part_ends = array(object, ENDS, index)?;
        if chars.len() != part_starts.len() || chars.len() != part_ends.len() {
            return Err(bad(format!(
                "alignment {} has {} characters, {} start times and {} end times",
                index + 1,
                chars.len(),
                part_starts.len(),
                part_ends.len()
            )));
        }
        if let Some(_not_string) = chars.iter().find(|c| !c.is_string()) {
            return Err(bad(format!(
                "alignment {} has a character that is not a string",
                index + 1
            )));
        }
        characters.extend(chars.iter().cloned());
        starts.extend(shifted(part_starts, *offset, STARTS, index)?);
        ends.extend(shifted(part_ends, *offset, ENDS, index)?);
    }
    let mut out = Map::new();
    out.insert(CHARACTERS.to_string(), Value::Array(characters));
    out.insert(STARTS.to_string(), Value::Array(starts));
    out.insert(ENDS.to_string(), Value::Array(ends));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn joins_in_order_with_offsets() {
        let a = json!({"characters": ["H", "i"], "character_start_times_seconds": [0.0, 0.1], "character_end_times_seconds": [0.1, 0.2]});
        let b = json!({"characters": [" ", "y", "o"], "character_start_times_seconds": [0.0, 0.05, 0.1], "character_end_times_seconds": [0.05, 0.1, 0.3]});
        let joined = join_alignments(
            &[a, Value::Null, b],
            &offsets_from_durations(&[0.25, 0.0, 0.4]),
        )
        .unwrap();
        assert_eq!(
            joined,
            json!({
                "characters": ["H", "i", " ", "y", "o"],
                "character_start_times_seconds": [0.0, 0.1, 0.25, 0.3, 0.35],
                "character_end_times_seconds": [0.1, 0.2, 0.3, 0.35, 0.55]
            })
        );
    }

    #[test]
    fn offsets_accumulate() {
        assert_eq!(
            offsets_from_durations(&[1.0, 2.0, 3.0]),
            vec![0.0, 1.0, 3.0]
        );
        assert_eq!(offsets_from_durations(&[]), Vec::<f64>::new());
    }

    #[test]
    fn malformed_alignments_are_clear_errors() {
        let ok = json!({"characters": ["a"], "character_start_times_seconds": [0], "character_end_times_seconds": [1]});
        let cases = [
            (json!([1, 2]), "not an object"),
            (
                json!({"characters": ["a"], "character_start_times_seconds": [0]}),
                "character_end_times_seconds",
            ),
            (
                json!({"characters": ["a", "b"], "character_start_times_seconds": [0], "character_end_times_seconds": [1]}),
                "2 characters",
            ),
            (
                json!({"characters": [1], "character_start_times_seconds": [0], "character_end_times_seconds": [1]}),
                "not a string",
            ),
            (
                json!({"characters": ["a"], "character_start_times_seconds": ["x"], "character_end_times_seconds": [1]}),
                "non-number",
            ),
        ];
        for (part, message) in cases {
            let err = join_alignments(&[ok.clone(), part], &[0.0, 1.0]).unwrap_err();
            assert!(err.to_string().contains(message), "{err}");
            assert!(err.to_string().contains("alignment 2"), "{err}");
        }
        assert!(join_alignments(std::slice::from_ref(&ok), &[])
            .unwrap_err()
            .to_string()
            .contains("offsets"));
        assert!(join_alignments(&[ok], &[f64::NAN]).is_err());
    }
}
