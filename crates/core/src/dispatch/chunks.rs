//! Long input (SPEC §6): an input longer than the provider takes at once is
//! split, each part is one call with the same options (at most
//! `max_parallel_chunks` of one job at once), the parts wait in the store, and
//! the last one in joins them into one file of the requested format. A part
//! that fails fails the whole attempt, so the next fallback makes every part
//! again: one file never mixes two providers' voices.

use super::{
    attempt_failed, build_call, current_provider, random16, schedule_expiry, webhook, Attempt, Step,
};
use crate::audio::{self, alignment, JoinFormat};
use crate::config::{Config, ProviderConfig};
use crate::error::{ApiError, ExtraFields};
use crate::job::{Completion, JobRecord, PartPlan, ResultMeta};
use crate::providers::{effective_format, for_kind, SpeechAudio};
use crate::speech::SpeechRequest;
use crate::store::parts::Part;
use crate::store::{Store, Updated};

/// Whether this provider takes the request's input in one call.
pub fn needs_parts(provider: &ProviderConfig, request: &SpeechRequest) -> bool {
    request.input.chars().count() > provider.max_input_chars
}

fn texts<'r>(provider: &ProviderConfig, request: &'r SpeechRequest) -> Vec<&'r str> {
    audio::split_text(&request.input, provider.max_input_chars)
}

/// The call for part `index` of the record's current attempt.
pub(super) fn part_attempt(
    config: &Config,
    record: &JobRecord,
    request: &SpeechRequest,
    index: u32,
) -> Result<Attempt, ApiError> {
    let (_, provider) = current_provider(config, record)?;
    let text = texts(provider, request)
        .get(usize::try_from(index).unwrap_or(usize::MAX))
        .map(|t| t.to_string())
        .ok_or_else(|| ApiError::internal("the part is out of range"))?;
    let mut part_request = request.clone();
    part_request.input = text;
    let mut attempt = build_call(config, record, part_request)?;
    // Answers are read with the whole request (format, timestamps); the call carries the part.
    attempt.request = request.clone();
    attempt.part = Some(index);
    Ok(attempt)
}

/// Starts a long attempt: records its plan and sends the first parts.
pub fn begin(
    store: &Store,
    config: &Config,
    record: &JobRecord,
    request: &SpeechRequest,
    provider: &ProviderConfig,
) -> Result<Step, ApiError> {
    let total = u32::try_from(texts(provider, request).len()).unwrap_or(u32::MAX);
    let first = total.min(
        u32::try_from(provider.max_parallel_chunks)
            .unwrap_or(1)
            .max(1),
    );
    let attempt = record.attempt;
    let updated = store
        .update(&record.id, None, &mut |r| {
            if !r.is_running(attempt) {
                return false;
            }
            r.parts = Some(PartPlan {
                attempt,
                total,
                done: Vec::new(),
                next: first,
            });
            true
        })
        .map_err(|e| ApiError::internal(format!("cannot record the parts: {e:?}")))?;
    let Updated::Written(record, _) = updated else {
        return Ok(Step::Nothing);
    };
    let calls = (0..first)
        .map(|i| part_attempt(config, &record, request, i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Step::SendAll(calls))
}

/// A part's answer was audio: store it, send the next part, or join them all.
pub fn part_done(
    store: &Store,
    config: &Config,
    attempt: &Attempt,
    index: u32,
    speech: SpeechAudio,
    started_ms: u64,
    now_ms: u64,
) -> Step {
    let Some(slot) = crate::ids::slot_of(&attempt.id) else {
        return Step::Nothing;
    };
    let part = Part {
        audio: speech.audio,
        alignment: speech.alignment,
        normalized_alignment: speech.normalized_alignment,
    };
    let still_ours = || matches!(store.load(&attempt.id), Ok(Some(l)) if l.view().and_then(|v| v.record()).is_some_and(|r| r.is_running(attempt.attempt)));
    match store.put_part(
        slot,
        &attempt.id,
        attempt.attempt,
        index,
        &part,
        &still_ours,
    ) {
        Ok(true) => {}
        Ok(false) => return Step::Nothing,
        Err(e) => {
            return attempt_failed(
                store,
                config,
                attempt,
                ApiError::internal(format!("cannot store a part: {e:?}")),
                now_ms,
            )
        }
    }
    let lease = config
        .providers
        .get(&attempt.provider)
        .map_or(0, |p| p.timeout_ms)
        .saturating_add(super::LEASE_GRACE_MS);
    let mut send = None;
    let updated = store.update(&attempt.id, None, &mut |r| {
        send = None;
        if !r.is_running(attempt.attempt) {
            return false;
        }
        let Some(plan) = r.parts.as_mut().filter(|p| p.attempt == attempt.attempt) else {
            return false;
        };
        if !plan.done.contains(&index) {
            plan.done.push(index);
        }
        if plan.next < plan.total {
            send = Some(plan.next);
            plan.next += 1;
        }
        r.lease_until_ms = Some(now_ms.saturating_add(lease));
        true
    });
    let Ok(Updated::Written(record, _)) = updated else {
        return Step::Nothing;
    };
    let Some(request) = record.request.clone() else {
        return Step::Nothing;
    };
    if let Some(next) = send {
        return match part_attempt(config, &record, &request, next) {
            Ok(call) => Step::Send(Box::new(call)),
            Err(error) => attempt_failed(store, config, attempt, error, now_ms),
        };
    }
    match record.parts.as_ref() {
        Some(plan) if plan.is_complete() => join(
            store, config, attempt, &request, plan.total, started_ms, now_ms,
        ),
        _ => Step::Nothing,
    }
}

/// The parts of a long input as one completion: one file of the requested
/// format, the alignments joined with each part's time offset.
pub fn join_parts(
    config: &Config,
    attempt: &Attempt,
    request: &SpeechRequest,
    parts: &[Part],
    started_ms: u64,
    now_ms: u64,
) -> Result<Completion, ApiError> {
    let provider = config
        .providers
        .get(&attempt.provider)
        .ok_or_else(|| ApiError::upstream(502, "provider is no longer configured"))?;
    let kind = for_kind(provider.kind);
    let format = effective_format(kind, request);
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
    let join_alignments = |pick: &dyn Fn(&Part) -> Option<serde_json::Value>| -> Result<Option<serde_json::Value>, ApiError> {
        if parts.iter().all(|p| pick(p).is_none()) {
            return Ok(None);
        }
        let all: Vec<serde_json::Value> = parts.iter().map(|p| pick(p).unwrap_or(serde_json::Value::Null)).collect();
        alignment::join_alignments(&all, &offsets)
            .map(Some)
            .map_err(|e| ApiError::upstream(502, format!("the alignments could not be joined: {e}")))
    };
    let alignment = join_alignments(&|p: &Part| p.alignment.clone())?;
    let normalized_alignment = join_alignments(&|p: &Part| p.normalized_alignment.clone())?;
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

/// Every part is in: one file, the alignments joined, the job completed.
fn join(
    store: &Store,
    config: &Config,
    attempt: &Attempt,
    request: &SpeechRequest,
    total: u32,
    started_ms: u64,
    now_ms: u64,
) -> Step {
    let Some(slot) = crate::ids::slot_of(&attempt.id) else {
        return Step::Nothing;
    };
    let parts = match store.parts(slot, &attempt.id, attempt.attempt, total) {
        Ok(Some(parts)) => parts,
        Ok(None) => {
            return attempt_failed(
                store,
                config,
                attempt,
                ApiError::internal("a part is missing from the store"),
                now_ms,
            )
        }
        Err(e) => {
            return attempt_failed(
                store,
                config,
                attempt,
                ApiError::internal(format!("cannot read the parts: {e:?}")),
                now_ms,
            )
        }
    };
    let completion = match join_parts(config, attempt, request, &parts, started_ms, now_ms) {
        Ok(c) => c,
        Err(error) => return attempt_failed(store, config, attempt, error, now_ms),
    };
    let random = random16(store);
    let done = store.update(&attempt.id, Some(&completion), &mut |r| {
        if !r.is_running(attempt.attempt) {
            return false;
        }
        r.complete(now_ms, completion.meta.clone());
        webhook::on_job_end(config, r, Some(&completion), random, now_ms);
        true
    });
    store.clear_parts(slot, &attempt.id, total);
    match done {
        Ok(Updated::Written(record, epoch)) => {
            schedule_expiry(store, &record, epoch, now_ms);
            Step::Completed {
                id: attempt.id.clone(),
            }
        }
        _ => Step::Nothing,
    }
}
