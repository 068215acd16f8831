//! Running jobs, free of host calls: claiming a queued job, building each
//! attempt, applying its answer (or its absence), moving through fallbacks,
//! and what a due timer means for a job (expiry, a lost answer, a deadline).
//! The root context only moves these between the store and Envoy.

use crate::config::Config;
use crate::error::{ApiError, ExtraFields};
use crate::job::{Completion, JobRecord, JobStatus, NextStep, ResultMeta};
use crate::platform::{Callout, Host, Queue};
use crate::providers::{for_kind, UpstreamResponse};
use crate::request::SpeechRequest;
use crate::store::{Store, StoreError, Timer, Updated};

/// Time past an attempt's own timeout before its answer counts as lost.
pub const LEASE_GRACE_MS: u64 = 5_000;
/// A job still pending this long after its submit is queued again by the
/// audit (its queue entry may have died with a VM).
pub const PENDING_REQUEUE_MS: u64 = 30_000;

/// One attempt ready to go out, and what is needed to read its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub id: String,
    pub attempt: usize,
    pub provider: String,
    pub model: String,
    pub callout: Callout,
    pub request: SpeechRequest,
}

/// How a callout ended.
pub enum Outcome<'a> {
    Answer(UpstreamResponse<'a>),
    /// No answer at all: Envoy reset the callout or gave up.
    NoAnswer { elapsed_ms: u64 },
    /// The answer's body was larger than `max_audio_bytes` allows; not read.
    TooLarge { bytes: usize },
}

/// Why a job failed, for stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    ProviderError,
    Timeout,
    Unreachable,
    Deadline,
}

impl FailReason {
    pub fn name(self) -> &'static str {
        match self {
            FailReason::ProviderError => "provider_error",
            FailReason::Timeout => "timeout",
            FailReason::Unreachable => "unreachable",
            FailReason::Deadline => "deadline",
        }
    }

    /// The gateway's own 504 and 502 are a timeout and an unreachable provider;
    /// anything else came from the provider.
    pub fn of(error: &ApiError) -> FailReason {
        match (error.is_bifrost_error, error.status_code) {
            (true, 504) => FailReason::Timeout,
            (true, 502) => FailReason::Unreachable,
            _ => FailReason::ProviderError,
        }
    }
}

/// What became of a job after an event, for the root to act on and log.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send this attempt.
    Send(Box<Attempt>),
    Completed { id: String },
    Failed { id: String, status: u16, reason: FailReason },
    /// Its answer never came; queued again for its next fallback.
    Requeued { id: String },
    Expired { id: String },
    /// Deleted, expired, someone else's now, or nothing to do.
    Nothing,
}

fn lease_ms(config: &Config, record: &JobRecord) -> u64 {
    record
        .current()
        .and_then(|step| config.providers.get(&step.provider))
        .map_or(0, |p| p.timeout_ms)
        .saturating_add(LEASE_GRACE_MS)
}

/// Takes a queued job and prepares its current attempt.
pub fn start(store: &Store, config: &Config, id: &str, now_ms: u64) -> Step {
    let claimed = store.update(id, None, &mut |r| {
        let lease = lease_ms(config, r);
        r.claim(now_ms, lease)
    });
    match claimed {
        Ok(Updated::Written(record, epoch)) => {
            if let Some(slot) = crate::ids::slot_of(id) {
                store.schedule(slot, epoch, record.next_timer_ms(), now_ms);
            }
            prepare(store, config, record, now_ms)
        }
        _ => Step::Nothing,
    }
}

/// Builds the request for the record's current attempt. An attempt that
/// cannot even be built (say, a missing API key) fails at once, and the next
/// fallback is tried; the chain bounds the loop.
fn prepare(store: &Store, config: &Config, mut record: JobRecord, now_ms: u64) -> Step {
    for _ in 0..=record.chain.len() {
        let Some(request) = record.request.clone() else {
            return Step::Nothing;
        };
        match build(config, &record, request) {
            Ok(attempt) => return Step::Send(Box::new(attempt)),
            Err(error) => match record_failure(store, config, &record.id, record.attempt, error, now_ms) {
                AfterFailure::Next(next) => record = *next,
                AfterFailure::Done(step) => return step,
            },
        }
    }
    Step::Nothing
}

fn build(config: &Config, record: &JobRecord, request: SpeechRequest) -> Result<Attempt, ApiError> {
    let step = record.current().ok_or_else(|| ApiError::internal("the job has no attempt left"))?;
    let provider = config
        .providers
        .get(&step.provider)
        .ok_or_else(|| ApiError::upstream(502, format!("provider {} is no longer configured", step.provider)))?;
    let upstream = for_kind(provider.kind).build(provider, &step.model, &request)?;
    Ok(Attempt {
        id: record.id.clone(),
        attempt: record.attempt,
        provider: step.provider.clone(),
        model: step.model.clone(),
        callout: Callout {
            cluster: provider.cluster.clone(),
            headers: upstream.headers,
            body: upstream.body,
            timeout_ms: provider.timeout_ms.max(1),
        },
        request,
    })
}

enum AfterFailure {
    Next(Box<JobRecord>),
    Done(Step),
}

/// Records a failed attempt on the job, if that attempt is still the job's.
fn record_failure(
    store: &Store,
    config: &Config,
    id: &str,
    attempt: usize,
    error: ApiError,
    now_ms: u64,
) -> AfterFailure {
    let mut next = NextStep::Failed;
    let updated = store.update(id, None, &mut |r| {
        if !r.is_running(attempt) {
            return false;
        }
        next = r.record_failure(now_ms, error.clone());
        if next == NextStep::TryNext {
            r.lease_until_ms = Some(now_ms.saturating_add(lease_ms(config, r)));
        }
        true
    });
    match (updated, next) {
        (Ok(Updated::Written(record, _)), NextStep::TryNext) => AfterFailure::Next(Box::new(record)),
        (Ok(Updated::Written(record, epoch)), NextStep::Failed) => {
            schedule_expiry(store, &record, epoch, now_ms);
            let status = record.status_code.unwrap_or(error.status_code);
            AfterFailure::Done(Step::Failed { id: id.to_string(), status, reason: FailReason::of(&error) })
        }
        _ => AfterFailure::Done(Step::Nothing),
    }
}

fn schedule_expiry(store: &Store, record: &JobRecord, epoch: u32, now_ms: u64) {
    if let (Some(slot), Some(at)) = (crate::ids::slot_of(&record.id), record.expires_at_ms()) {
        store.schedule(slot, epoch, at, now_ms);
    }
}

/// After an attempt failed, whether it could not be sent or its answer was an error.
pub fn attempt_failed(store: &Store, config: &Config, attempt: &Attempt, error: ApiError, now_ms: u64) -> Step {
    match record_failure(store, config, &attempt.id, attempt.attempt, error, now_ms) {
        AfterFailure::Next(record) => prepare(store, config, *record, now_ms),
        AfterFailure::Done(step) => step,
    }
}

/// Turns a callout that ended without an answer into the gateway's error.
pub fn no_answer_error(provider: &str, elapsed_ms: u64, timeout_ms: u64) -> ApiError {
    if elapsed_ms.saturating_add(50) >= timeout_ms {
        ApiError::upstream(504, format!("provider {provider} did not answer within {timeout_ms} ms"))
    } else {
        ApiError::upstream(502, format!("provider {provider} is unreachable: the connection failed"))
    }
}

/// Envoy answers for an upstream it could not reach with its own 503 text.
fn envoy_local_reply(response: &UpstreamResponse, attempt: &Attempt) -> Option<ApiError> {
    let body = String::from_utf8_lossy(response.body.get(..256).unwrap_or(response.body));
    let unreachable = ["upstream connect error", "no healthy upstream", "no cluster match"];
    if response.status == 503 && unreachable.iter().any(|p| body.starts_with(p)) {
        return Some(ApiError::upstream(
            502,
            format!("provider {} is unreachable: {}", attempt.provider, body.trim()),
        ));
    }
    if response.status == 504 && body.starts_with("upstream request timeout") {
        return Some(no_answer_error(&attempt.provider, attempt.callout.timeout_ms, attempt.callout.timeout_ms));
    }
    None
}

/// How one attempt went, for stats: success, error, timeout or unreachable.
pub fn attempt_outcome(outcome: &Outcome, attempt: &Attempt) -> &'static str {
    let error = match outcome {
        Outcome::NoAnswer { elapsed_ms } => no_answer_error(&attempt.provider, *elapsed_ms, attempt.callout.timeout_ms),
        Outcome::TooLarge { .. } => return "error",
        Outcome::Answer(response) => match envoy_local_reply(response, attempt) {
            Some(e) => e,
            None if (200..300).contains(&response.status) => return "success",
            None => return "error",
        },
    };
    match FailReason::of(&error) {
        FailReason::Timeout => "timeout",
        _ => "unreachable",
    }
}

pub fn too_large_error(bytes: usize, limit: usize) -> ApiError {
    ApiError::upstream(
        502,
        format!("the provider's answer ({bytes} bytes) is larger than max_audio_bytes ({limit} bytes)"),
    )
}

/// Applies the answer to `attempt` to its job.
pub fn finish(
    store: &Store,
    config: &Config,
    attempt: &Attempt,
    outcome: Outcome,
    started_ms: u64,
    now_ms: u64,
) -> Step {
    let response = match outcome {
        Outcome::NoAnswer { elapsed_ms } => {
            let error = no_answer_error(&attempt.provider, elapsed_ms, attempt.callout.timeout_ms);
            return attempt_failed(store, config, attempt, error, now_ms);
        }
        Outcome::TooLarge { bytes } => {
            let error = too_large_error(bytes, config.max_audio_bytes);
            return attempt_failed(store, config, attempt, error, now_ms);
        }
        Outcome::Answer(response) => response,
    };
    if let Some(error) = envoy_local_reply(&response, attempt) {
        return attempt_failed(store, config, attempt, error, now_ms);
    }
    let Some(provider) = config.providers.get(&attempt.provider) else {
        let error = ApiError::upstream(502, "provider is no longer configured");
        return attempt_failed(store, config, attempt, error, now_ms);
    };
    let speech = match for_kind(provider.kind).parse(provider, &attempt.request, &response) {
        Ok(speech) if speech.audio.len() > config.max_audio_bytes => {
            Err(too_large_error(speech.audio.len(), config.max_audio_bytes))
        }
        other => other,
    };
    let speech = match speech {
        Ok(speech) => speech,
        Err(error) => return attempt_failed(store, config, attempt, error, now_ms),
    };
    let mut extra = ExtraFields::speech(&attempt.provider, &attempt.model);
    extra.latency = Some(now_ms.saturating_sub(started_ms));
    let completion = Completion {
        meta: ResultMeta { response_format: speech.format, extra_fields: extra },
        audio: speech.audio,
        alignment: speech.alignment,
        normalized_alignment: speech.normalized_alignment,
    };
    let done = store.update(&attempt.id, Some(&completion), &mut |r| {
        if !r.is_running(attempt.attempt) {
            return false;
        }
        r.complete(now_ms, completion.meta.clone());
        true
    });
    match done {
        Ok(Updated::Written(record, epoch)) => {
            schedule_expiry(store, &record, epoch, now_ms);
            Step::Completed { id: attempt.id.clone() }
        }
        Err(StoreError::Busy(why)) => {
            // The answer could not be stored (e.g. shared data refused its size).
            let error = ApiError::internal(format!("the gateway could not store the audio: {why}"));
            attempt_failed(store, config, attempt, error, now_ms)
        }
        _ => Step::Nothing, // deleted, expired or re-tried while the call ran
    }
}

/// What a due timer (or the audit) means for the job in its slot.
pub fn on_timer(host: &dyn Host, store: &Store, config: &Config, timer: Timer, now_ms: u64) -> Step {
    let from_audit = timer.due_s == 0;
    let Ok(Some(loaded)) = store.load_for_timer(timer) else { return Step::Nothing };
    let Some(view) = loaded.view() else { return Step::Nothing };
    if view.status.is_finished() {
        if !view.is_expired(now_ms) {
            if !from_audit {
                store.schedule(timer.slot, timer.epoch, view.expires_at_ms, now_ms);
            }
            return Step::Nothing;
        }
        let id = String::from_utf8_lossy(view.id).into_owned();
        return match store.free(loaded, &|v| v.is_expired(now_ms)) {
            Ok(true) => Step::Expired { id },
            _ => Step::Nothing,
        };
    }
    let Some(record) = view.record() else { return Step::Nothing };
    if record.is_past_deadline(now_ms) {
        return fail_past_deadline(store, config, &record.id, now_ms);
    }
    if record.is_lease_expired(now_ms) {
        return take_back_lost_attempt(host, store, config, &record.id, now_ms);
    }
    if from_audit {
        if record.status == JobStatus::Pending && now_ms.saturating_sub(record.created_at_ms) > PENDING_REQUEUE_MS {
            let _ = host.enqueue(Queue::Jobs, record.id.as_bytes());
            return Step::Requeued { id: record.id };
        }
        return Step::Nothing;
    }
    store.schedule(timer.slot, timer.epoch, record.next_timer_ms(), now_ms);
    Step::Nothing
}

fn fail_past_deadline(store: &Store, config: &Config, id: &str, now_ms: u64) -> Step {
    let deadline_s = config.job_deadline_s;
    match store.update(id, None, &mut |r| {
        if !r.is_past_deadline(now_ms) {
            return false;
        }
        r.fail_past_deadline(now_ms, deadline_s);
        true
    }) {
        Ok(Updated::Written(record, epoch)) => {
            schedule_expiry(store, &record, epoch, now_ms);
            Step::Failed { id: id.to_string(), status: 504, reason: FailReason::Deadline }
        }
        _ => Step::Nothing,
    }
}

/// The attempt's answer is overdue (its worker's VM may be gone): the attempt
/// fails with 504, and the job goes back to the queue for its next fallback,
/// which any live worker takes, or fails.
fn take_back_lost_attempt(host: &dyn Host, store: &Store, config: &Config, id: &str, now_ms: u64) -> Step {
    let mut next = NextStep::Failed;
    let error = ApiError::upstream(
        504,
        "no answer from the provider arrived in time; the worker holding the call may have been replaced",
    );
    let updated = store.update(id, None, &mut |r| {
        if !r.is_lease_expired(now_ms) {
            return false;
        }
        next = r.record_failure(now_ms, error.clone());
        if next == NextStep::TryNext {
            r.status = JobStatus::Pending;
        }
        true
    });
    match (updated, next) {
        (Ok(Updated::Written(record, _)), NextStep::TryNext) => {
            let _ = host.enqueue(Queue::Jobs, record.id.as_bytes());
            Step::Requeued { id: id.to_string() }
        }
        (Ok(Updated::Written(record, epoch)), NextStep::Failed) => {
            schedule_expiry(store, &record, epoch, now_ms);
            let _ = config;
            Step::Failed { id: id.to_string(), status: 504, reason: FailReason::Timeout }
        }
        _ => Step::Nothing,
    }
}
