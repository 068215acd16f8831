//! Raw PCM: parts are concatenated as they are; every part must hold whole sample frames.

use super::JoinError;

const FORMAT: &str = "pcm";

/// Checks that `bytes` holds whole sample frames of `block_bytes` bytes.
fn check_blocks(bytes: &[u8], block_bytes: usize) -> Result<(), JoinError> {
    if block_bytes == 0 {
        return Err(JoinError::malformed(
            FORMAT,
            "the sample frame size is 0 bytes",
        ));
    }
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(JoinError::malformed(
            FORMAT,
            format!(
                "{} bytes is not a whole number of {block_bytes}-byte sample frames",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Concatenates PCM parts whose lengths are all multiples of `block_bytes` (bytes per sample
/// frame: sample width times channels).
pub fn join(parts: &[Vec<u8>], block_bytes: usize) -> Result<Vec<u8>, JoinError> {
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for (i, part) in parts.iter().enumerate() {
        check_blocks(part, block_bytes).map_err(|e| e.in_part(i))?;
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// Seconds of PCM in `bytes`: `block_bytes` bytes per sample frame at `sample_rate` Hz.
pub fn duration_seconds(
    bytes: &[u8],
    block_bytes: usize,
    sample_rate: u32,
) -> Result<f64, JoinError> {
    check_blocks(bytes, block_bytes)?;
    if sample_rate == 0 {
        return Err(JoinError::malformed(FORMAT, "the sample rate is 0"));
    }
    Ok((bytes.len() / block_bytes) as f64 / f64::from(sample_rate))
}

#[cfg(test)]
mod tests {
    use super::super::{testutil, wav};
    use super::*;

    #[test]
    fn concatenates_whole_frames() {
        assert_eq!(
            join(&[vec![1, 2], vec![3, 4, 5, 6]], 2).unwrap(),
            vec![1, 2, 3, 4, 5, 6]
        );
        assert_eq!(join(&[vec![]], 2).unwrap(), Vec::<u8>::new());
        let err = join(&[vec![1, 2], vec![3]], 2).unwrap_err();
        assert!(err.to_string().contains("part 2"), "{err}");
        assert!(join(&[vec![1]], 0).is_err());
    }

    #[test]
    fn duration() {
        assert_eq!(duration_seconds(&[0; 48_000], 2, 24_000).unwrap(), 1.0);
        assert!(duration_seconds(&[0; 3], 2, 24_000).is_err());
        assert!(duration_seconds(&[0; 4], 2, 0).is_err());
    }

    #[test]
    fn real_speech_joins_and_decodes() {
        let parts: Vec<Vec<u8>> = [
            &include_bytes!("../../../../tests/fixtures/audio/part1.wav")[..],
            &include_bytes!("../../../../tests/fixtures/audio/part2.wav")[..],
            &include_bytes!("../../../../tests/fixtures/audio/part3.wav")[..],
        ]
        .iter()
        .map(|w| wav::parse(w).unwrap().data.to_vec())
        .collect();
        let joined = join(&parts, 2).unwrap();
        let expected: f64 = parts
            .iter()
            .map(|p| duration_seconds(p, 2, 8000).unwrap())
            .sum();
        assert_eq!(duration_seconds(&joined, 2, 8000).unwrap(), expected);
        let args = ["-f", "s16le", "-sample_rate", "8000", "-ch_layout", "mono"];
        if let Some(decoded) = testutil::ffmpeg_check(&joined, "pcm", &args) {
            testutil::assert_close(decoded, expected, "pcm duration");
        }
    }
}
