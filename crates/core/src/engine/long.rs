//! Long input: an input longer than the provider takes at once is split at
//! sentence ends, each part is one call with the same options (at most
//! `max_parallel_chunks` of one job at once), the parts wait in the engine's
//! memory, and the last one in joins them into one file of the requested
//! format. A part that fails fails the whole attempt, so the next fallback
//! makes every part again: one file never mixes two providers' voices.

use std::collections::BTreeMap;

use serde_json::Value;

use super::attempt::{build_call, current_provider, Attempt};
use crate::audio::{self, alignment, JoinFormat};
use crate::config::{Config, ProviderConfig};
use crate::error::{ApiError, ExtraFields};
use crate::job::{Completion, JobRecord, PartPlan, ResultMeta};
use crate::providers::{effective_format, for_kind, SpeechAudio};
use crate::speech::SpeechRequest;

/// One part's audio and, with timestamps, its alignments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Part {
    pub audio: Vec<u8>,
    pub alignment: Option<Value>,
    pub normalized_alignment: Option<Value>,
}

impl From<SpeechAudio> for Part {
    fn from(speech: SpeechAudio) -> Part {
        Part {
            audio: speech.audio,
            alignment: speech.alignment,
            normalized_alignment: speech.normalized_alignment,
        }
    }
}

/// The parts of a long input's attempt that have come back.
#[derive(Debug, Default)]
pub struct Parts {
    pub attempt: usize,
    pub done: BTreeMap<u32, Part>,
}

/// Whether this provider needs the request's input in parts.
pub fn needs_parts(provider: &ProviderConfig, request: &SpeechRequest) -> bool {
    request.input.chars().count() > provider.max_input_chars
}

/// The plan of a long attempt: how many parts, and how many go out at first.
pub fn plan(provider: &ProviderConfig, request: &SpeechRequest, attempt: usize) -> PartPlan {
    let total = u32::try_from(audio::split_text(&request.input, provider.max_input_chars).len())
        .unwrap_or(u32::MAX);
    let first = total.min(
        u32::try_from(provider.max_parallel_chunks)
            .unwrap_or(1)
            .max(1),
    );
    PartPlan {
        attempt,
        total,
        done: Vec::new(),
        next: first,
    }
}

/// The call for part `index` of the record's current step.
pub fn part_attempt(
    config: &Config,
    record: &JobRecord,
    request: &SpeechRequest,
    index: u32,
) -> Result<Attempt, ApiError> {
    let (_, provider) = current_provider(config, record)?;
    let text = audio::split_text(&request.input, provider.max_input_chars)
        .get(usize::try_from(index).unwrap_or(usize::MAX))
        .map(|t| t.to_string())
        .ok_or_else(|| ApiError::internal("the part is out of range"))?;
    let mut part_request = request.clone();
    part_request.input = text;
    let mut attempt = build_call(config, record, part_request)?;
    attempt.request = request.clone();
    attempt.part = Some(index);
    Ok(attempt)
}

/// The parts of a long input as one completion: one file of the requested
/// format, the alignments joined with each part's time offset.
pub fn join_parts(
    config: &Config,
    attempt: &Attempt,
    parts: &[Part],
    started_ms: u64,
    now_ms: u64,
) -> Result<Completion, ApiError> {
    let provider = config
        .providers
        .get(&attempt.provider)
        .ok_or_else(|| ApiError::upstream(502, "provider is no longer configured"))?;
    let kind = for_kind(provider.kind);
    let format = effective_format(kind, &attempt.request);
    let f = JoinFormat::from_response_format(format.name())
        .ok_or_else(|| ApiError::upstream(502, format!("{} cannot be joined", format.name())))?;
    let audios: Vec<Vec<u8>> = parts.iter().map(|p| p.audio.clone()).collect();
    let audio = audio::join(f, &audios, config.max_audio_bytes)
        .map_err(|e| ApiError::upstream(502, format!("the parts could not be joined: {e}")))?;
    let durations: Vec<f64> = parts
        .iter()
        .map(|p| audio::duration_seconds(f, &p.audio, kind.pcm_sample_rate()).unwrap_or(0.0))
        .collect();
    let offsets = alignment::offsets_from_durations(&durations);
    let alignment = join_alignments(parts, &offsets, |p| p.alignment.as_ref())?;
    let normalized_alignment =
        join_alignments(parts, &offsets, |p| p.normalized_alignment.as_ref())?;
    let mut extra = ExtraFields::speech(&attempt.provider, &attempt.model);
    extra.latency = Some(now_ms.saturating_sub(started_ms));
    Ok(Completion {
        meta: ResultMeta {
            response_format: format,
            extra_fields: extra,
        },
        audio,
        alignment,
        normalized_alignment,
    })
}

fn join_alignments(
    parts: &[Part],
    offsets: &[f64],
    pick: impl Fn(&Part) -> Option<&Value>,
) -> Result<Option<Value>, ApiError> {
    if parts.iter().all(|p| pick(p).is_none()) {
        return Ok(None);
    }
    let all: Vec<Value> = parts
        .iter()
        .map(|p| pick(p).cloned().unwrap_or(Value::Null))
        .collect();
    alignment::join_alignments(&all, offsets)
        .map(Some)
        .map_err(|e| ApiError::upstream(502, format!("the alignments could not be joined: {e}")))
}
