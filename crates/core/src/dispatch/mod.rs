//! Running jobs, free of host calls: claiming a queued job, building each
//! attempt, applying its answer (or its absence), moving through fallbacks,
//! and what a due timer means for a job (expiry, a lost answer, a deadline).
//! The root context only moves these between the store and Envoy.

use crate::config::Config;
use crate::error::{ApiError, ExtraFields};
use crate::job::{Completion, JobRecord, JobStatus, NextStep, ResultMeta};
use crate::platform::{Callout, Host, Queue};
use crate::providers::{for_kind, SpeechAudio, UpstreamResponse};
use crate::speech::SpeechRequest;
use crate::store::{Store, StoreError, Timer, Updated};

pub mod chunks;
pub mod etcd;
pub mod webhook;
pub use webhook::{DeliveryResult, WebhookCall};

/// 16 random bytes for a webhook id (zeros if the host has none: the id
/// only needs to be the same on every attempt).
fn random16(store: &Store) -> [u8; 16] {
    let mut out = [0u8; 16];
    let _ = store.host().random(&mut out);
    out
}

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
    /// For a long input, which part this call makes (SPEC §6).
    pub part: Option<u32>,
}

/// How a callout ended.
pub enum Outcome<'a> {
    Answer(UpstreamResponse<'a>),
    /// No answer at all: Envoy reset the callout or gave up.
    NoAnswer {
        elapsed_ms: u64,
    },
    /// The answer's body was larger than `max_audio_bytes` allows; not read.
    TooLarge {
        bytes: usize,
    },
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
    /// Send these calls (the first parts of a long input).
    SendAll(Vec<Attempt>),
    Completed {
        id: String,
    },
    Failed {
        id: String,
        status: u16,
        reason: FailReason,
    },
    /// Its answer never came; queued again for its next fallback.
    Requeued {
        id: String,
    },
    Expired {
        id: String,
    },
    /// Send this webhook delivery attempt.
    Deliver(Box<WebhookCall>),
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
        match build(store, config, &record, request) {
            Ok(step) => return step,
            Err(error) => {
                match save_failure(store, config, &record.id, record.attempt, error, now_ms) {
                    Saved::Next(next) => record = *next,
                    Saved::Done(step) => return step,
                }
            }
        }
    }
    Step::Nothing
}

/// The record's current attempt: one call, or the first parts of a long input.
fn build(
    store: &Store,
    config: &Config,
    record: &JobRecord,
    request: SpeechRequest,
) -> Result<Step, ApiError> {
    if let Some(provider) = record
        .current()
        .and_then(|step| config.providers.get(&step.provider))
    {
        if chunks::needs_parts(provider, &request) {
            return chunks::begin(store, config, record, &request, provider);
        }
    }
    build_call(config, record, request).map(|a| Step::Send(Box::new(a)))
}

/// The model and provider of the record's current attempt.
fn current_provider<'c, 'r>(
    config: &'c Config,
    record: &'r JobRecord,
) -> Result<
    (
        &'r crate::speech::ModelRef,
        &'c crate::config::ProviderConfig,
    ),
    ApiError,
> {
    let step = record
        .current()
        .ok_or_else(|| ApiError::internal("the job has no attempt left"))?;
    let provider = config.providers.get(&step.provider).ok_or_else(|| {
        ApiError::upstream(
            502,
            format!("provider {} is no longer configured", step.provider),
        )
    })?;
    Ok((step, provider))
}

/// One call of the record's current attempt with this request.
fn build_call(
    config: &Config,
    record: &JobRecord,
    request: SpeechRequest,
) -> Result<Attempt, ApiError> {
    let (step, provider) = current_provider(config, record)?;
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
        part: None,
    })
}

/// What became of a failed attempt once it was saved on the job.
enum Saved {
    Next(Box<JobRecord>),
    Done(Step),
}

/// Saves a failed attempt on the job, if that attempt is still the job's.
fn save_failure(
    store: &Store,
    config: &Config,
    id: &str,
    attempt: usize,
    error: ApiError,
    now_ms: u64,
) -> Saved {
    let mut next = NextStep::Failed;
    let mut dropped = None;
    let random = random16(store);
    let updated = store.update(id, None, &mut |r| {
        if !r.is_running(attempt) {
            return false;
        }
        dropped = r.parts.clone();
        next = r.record_failure(now_ms, error.clone());
        match next {
            NextStep::TryNext => {
                r.lease_until_ms = Some(now_ms.saturating_add(lease_ms(config, r)))
            }
            NextStep::Failed => webhook::on_job_end(config, r, None, random, now_ms),
        }
        true
    });
    if let (Ok(Updated::Written(..)), Some(plan)) = (&updated, &dropped) {
        clear_parts(store, id, plan);
    }
    match (updated, next) {
        (Ok(Updated::Written(record, _)), NextStep::TryNext) => Saved::Next(Box::new(record)),
        (Ok(Updated::Written(record, epoch)), NextStep::Failed) => {
            schedule_expiry(store, &record, epoch, now_ms);
            let status = record.status_code.unwrap_or(error.status_code);
            Saved::Done(Step::Failed {
                id: id.to_string(),
                status,
                reason: FailReason::of(&error),
            })
        }
        _ => Saved::Done(Step::Nothing),
    }
}

fn clear_parts(store: &Store, id: &str, plan: &crate::job::PartPlan) {
    if let Some(slot) = crate::ids::slot_of(id) {
        store.clear_parts(slot, id, plan.total);
    }
}

/// After a job ended: its next look is its expiry, or its webhook's first attempt.
fn schedule_expiry(store: &Store, record: &JobRecord, epoch: u32, now_ms: u64) {
    if let Some(slot) = crate::ids::slot_of(&record.id) {
        store.schedule(slot, epoch, record.next_timer_ms(), now_ms);
    }
}

/// After an attempt failed, whether it could not be sent or its answer was an error.
pub fn attempt_failed(
    store: &Store,
    config: &Config,
    attempt: &Attempt,
    error: ApiError,
    now_ms: u64,
) -> Step {
    match save_failure(store, config, &attempt.id, attempt.attempt, error, now_ms) {
        Saved::Next(record) => prepare(store, config, *record, now_ms),
        Saved::Done(step) => step,
    }
}

/// Turns a callout that ended without an answer into the gateway's error.
pub fn no_answer_error(provider: &str, elapsed_ms: u64, timeout_ms: u64) -> ApiError {
    if elapsed_ms.saturating_add(50) >= timeout_ms {
        ApiError::upstream(
            504,
            format!("provider {provider} did not answer within {timeout_ms} ms"),
        )
    } else {
        ApiError::upstream(
            502,
            format!("provider {provider} is unreachable: the connection failed"),
        )
    }
}

/// Envoy answers for an upstream it could not reach with its own 503 text.
fn envoy_local_reply(response: &UpstreamResponse, attempt: &Attempt) -> Option<ApiError> {
    let body = String::from_utf8_lossy(response.body.get(..256).unwrap_or(response.body));
    let unreachable = [
        "upstream connect error",
        "no healthy upstream",
        "no cluster match",
    ];
    if response.status == 503 && unreachable.iter().any(|p| body.starts_with(p)) {
        return Some(ApiError::upstream(
            502,
            format!(
                "provider {} is unreachable: {}",
                attempt.provider,
                body.trim()
            ),
        ));
    }
    if response.status == 504 && body.starts_with("upstream request timeout") {
        return Some(no_answer_error(
            &attempt.provider,
            attempt.callout.timeout_ms,
            attempt.callout.timeout_ms,
        ));
    }
    None
}

/// How one attempt went, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    Success,
    /// The provider answered an error (or an answer the gateway refused).
    Error,
    Timeout,
    Unreachable,
}

impl AttemptResult {
    pub fn name(self) -> &'static str {
        match self {
            AttemptResult::Success => "success",
            AttemptResult::Error => "error",
            AttemptResult::Timeout => "timeout",
            AttemptResult::Unreachable => "unreachable",
        }
    }
}

pub fn attempt_result(outcome: &Outcome, attempt: &Attempt) -> AttemptResult {
    let error = match outcome {
        Outcome::NoAnswer { elapsed_ms } => {
            no_answer_error(&attempt.provider, *elapsed_ms, attempt.callout.timeout_ms)
        }
        Outcome::TooLarge { .. } => return AttemptResult::Error,
        Outcome::Answer(response) => match envoy_local_reply(response, attempt) {
            Some(e) => e,
            None if (200..300).contains(&response.status) => return AttemptResult::Success,
            None => return AttemptResult::Error,
        },
    };
    match FailReason::of(&error) {
        FailReason::Timeout => AttemptResult::Timeout,
        _ => AttemptResult::Unreachable,
    }
}

pub fn too_large_error(bytes: usize, limit: usize) -> ApiError {
    ApiError::upstream(
        502,
        format!(
            "the provider's answer ({bytes} bytes) is larger than max_audio_bytes ({limit} bytes)"
        ),
    )
}

/// An attempt's answer as audio, or the error that fails the attempt.
pub fn read_answer(
    config: &Config,
    attempt: &Attempt,
    outcome: Outcome,
) -> Result<SpeechAudio, ApiError> {
    let response = match outcome {
        Outcome::NoAnswer { elapsed_ms } => {
            return Err(no_answer_error(
                &attempt.provider,
                elapsed_ms,
                attempt.callout.timeout_ms,
            ))
        }
        Outcome::TooLarge { bytes } => return Err(too_large_error(bytes, config.max_audio_bytes)),
        Outcome::Answer(response) => response,
    };
    if let Some(error) = envoy_local_reply(&response, attempt) {
        return Err(error);
    }
    let provider = config
        .providers
        .get(&attempt.provider)
        .ok_or_else(|| ApiError::upstream(502, "provider is no longer configured"))?;
    let speech = for_kind(provider.kind).parse(provider, &attempt.request, &response)?;
    if speech.audio.len() > config.max_audio_bytes {
        return Err(too_large_error(speech.audio.len(), config.max_audio_bytes));
    }
    Ok(speech)
}

/// The completion of an attempt whose answer was `speech`.
pub fn completion(
    attempt: &Attempt,
    speech: SpeechAudio,
    started_ms: u64,
    now_ms: u64,
) -> Completion {
    let mut extra = ExtraFields::speech(&attempt.provider, &attempt.model);
    extra.latency = Some(now_ms.saturating_sub(started_ms));
    Completion {
        meta: ResultMeta {
            response_format: speech.format,
            extra_fields: extra,
        },
        audio: speech.audio,
        alignment: speech.alignment,
        normalized_alignment: speech.normalized_alignment,
    }
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
    let speech = match read_answer(config, attempt, outcome) {
        Ok(speech) => speech,
        Err(error) => return attempt_failed(store, config, attempt, error, now_ms),
    };
    if let Some(index) = attempt.part {
        return chunks::part_done(store, config, attempt, index, speech, started_ms, now_ms);
    }
    let completion = completion(attempt, speech, started_ms, now_ms);
    let random = random16(store);
    let done = store.update(&attempt.id, Some(&completion), &mut |r| {
        if !r.is_running(attempt.attempt) {
            return false;
        }
        r.complete(now_ms, completion.meta.clone());
        webhook::on_job_end(config, r, Some(&completion), random, now_ms);
        true
    });
    match done {
        Ok(Updated::Written(record, epoch)) => {
            schedule_expiry(store, &record, epoch, now_ms);
            Step::Completed {
                id: attempt.id.clone(),
            }
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
pub fn on_timer(
    host: &dyn Host,
    store: &Store,
    config: &Config,
    timer: Timer,
    now_ms: u64,
) -> Step {
    let from_audit = timer.due_s == 0;
    let Ok(Some(loaded)) = store.load_for_timer(timer) else {
        return Step::Nothing;
    };
    let Some(view) = loaded.view() else {
        return Step::Nothing;
    };
    let Some(record) = view.record() else {
        return Step::Nothing;
    };
    if view.status.is_finished() {
        return on_finished_timer(store, config, loaded, &record, from_audit, now_ms);
    }
    if record.is_past_deadline(now_ms) {
        return fail_past_deadline(store, config, &record.id, now_ms);
    }
    if record.is_lease_expired(now_ms) {
        return take_back_lost_attempt(host, store, config, &record.id, now_ms);
    }
    if from_audit {
        if record.status == JobStatus::Pending
            && now_ms.saturating_sub(record.created_at_ms) > PENDING_REQUEUE_MS
        {
            let _ = host.enqueue(Queue::Jobs, record.id.as_bytes());
            return Step::Requeued { id: record.id };
        }
        return Step::Nothing;
    }
    store.schedule(timer.slot, timer.epoch, record.next_timer_ms(), now_ms);
    Step::Nothing
}

/// A finished job's timer: a webhook attempt that is due, or its expiry
/// (kept, without its audio, while its delivery goes on).
fn on_finished_timer(
    store: &Store,
    config: &Config,
    loaded: crate::store::Loaded,
    record: &JobRecord,
    from_audit: bool,
    now_ms: u64,
) -> Step {
    let Some(view) = loaded.view() else {
        return Step::Nothing;
    };
    let (slot, epoch, expired) = (loaded.slot, view.epoch, view.is_expired(now_ms));
    if let Some(delivery) = record.pending_delivery() {
        if delivery.due(now_ms) {
            return match webhook::begin(store, config, &loaded, now_ms) {
                Some(call) => Step::Deliver(Box::new(call)),
                None => Step::Nothing,
            };
        }
        if expired && !record.result_dropped {
            // Past its TTL: the audio goes now; the record stays for the delivery.
            if let Ok(Updated::Written(r, e)) = store.update(&record.id, None, &mut |r| {
                r.result_dropped = true;
                true
            }) {
                store.schedule(slot, e, r.next_timer_ms(), now_ms);
            }
        } else if !from_audit {
            store.schedule(slot, epoch, record.next_timer_ms(), now_ms);
        }
        return Step::Nothing;
    }
    if !expired {
        if !from_audit {
            store.schedule(slot, epoch, view.expires_at_ms, now_ms);
        }
        return Step::Nothing;
    }
    let id = record.id.clone();
    match store.free(loaded, &|v| v.is_expired(now_ms)) {
        Ok(true) => Step::Expired { id },
        _ => Step::Nothing,
    }
}

fn fail_past_deadline(store: &Store, config: &Config, id: &str, now_ms: u64) -> Step {
    let deadline_s = config.job_deadline_s;
    let mut dropped = None;
    let random = random16(store);
    match store.update(id, None, &mut |r| {
        if !r.is_past_deadline(now_ms) {
            return false;
        }
        dropped = r.parts.take();
        r.fail_past_deadline(now_ms, deadline_s);
        webhook::on_job_end(config, r, None, random, now_ms);
        true
    }) {
        Ok(Updated::Written(record, epoch)) => {
            if let Some(plan) = &dropped {
                clear_parts(store, id, plan);
            }
            schedule_expiry(store, &record, epoch, now_ms);
            Step::Failed {
                id: id.to_string(),
                status: 504,
                reason: FailReason::Deadline,
            }
        }
        _ => Step::Nothing,
    }
}

/// The attempt's answer is overdue (its worker's VM may be gone): the attempt
/// fails with 504, and the job goes back to the queue for its next fallback,
/// which any live worker takes, or fails.
fn take_back_lost_attempt(
    host: &dyn Host,
    store: &Store,
    config: &Config,
    id: &str,
    now_ms: u64,
) -> Step {
    let mut next = NextStep::Failed;
    let error = ApiError::upstream(
        504,
        "no answer from the provider arrived in time; the worker holding the call may have been replaced",
    );
    let mut dropped = None;
    let random = random16(store);
    let updated = store.update(id, None, &mut |r| {
        if !r.is_lease_expired(now_ms) {
            return false;
        }
        dropped = r.parts.clone();
        next = r.record_failure(now_ms, error.clone());
        match next {
            NextStep::TryNext => r.status = JobStatus::Pending,
            NextStep::Failed => webhook::on_job_end(config, r, None, random, now_ms),
        }
        true
    });
    if let (Ok(Updated::Written(..)), Some(plan)) = (&updated, &dropped) {
        clear_parts(store, id, plan);
    }
    match (updated, next) {
        (Ok(Updated::Written(record, _)), NextStep::TryNext) => {
            let _ = host.enqueue(Queue::Jobs, record.id.as_bytes());
            Step::Requeued { id: id.to_string() }
        }
        (Ok(Updated::Written(record, epoch)), NextStep::Failed) => {
            schedule_expiry(store, &record, epoch, now_ms);
            Step::Failed {
                id: id.to_string(),
                status: 504,
                reason: FailReason::Timeout,
            }
        }
        _ => Step::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::make_id;
    use crate::request::parse_speech_request;
    use crate::sim::{SimHost, SimShared};
    use crate::store::Keys;
    use std::rc::Rc;

    fn config() -> Config {
        Config::parse(
            br#"{"providers":{"a":{"type":"openai","cluster":"ca","timeout_ms":1000},
                              "b":{"type":"openai","cluster":"cb","timeout_ms":1000}},
                 "allow_unauthenticated":true,"max_jobs":4,"job_deadline_s":60}"#,
            &|_| None,
        )
        .unwrap()
    }

    const START: u64 = 1_800_000_000_000;

    struct World {
        shared: Rc<SimShared>,
        host: SimHost,
        keys: Keys,
        config: Config,
    }

    impl World {
        fn new() -> World {
            let shared = SimShared::new(START);
            let host = SimHost::new(&shared, 7);
            World {
                shared,
                host,
                keys: Keys::new("t"),
                config: config(),
            }
        }
        fn store(&self) -> Store<'_> {
            Store::new(&self.host, &self.keys, self.config.max_jobs, 1)
        }
        fn now(&self) -> u64 {
            self.shared.clock.get()
        }
        fn submit(&self, body: &str, ttl_s: u64) -> String {
            let request = parse_speech_request(body.as_bytes(), &self.config).unwrap();
            let now = self.now();
            let record = self
                .store()
                .insert(&|slot| {
                    JobRecord::new(
                        make_id([9; 16], slot),
                        String::new(),
                        now,
                        ttl_s,
                        60,
                        request.clone(),
                    )
                })
                .unwrap();
            record.id
        }
        fn record(&self, id: &str) -> Option<JobRecord> {
            self.store()
                .load(id)
                .unwrap()
                .and_then(|l| l.view().and_then(|v| v.record()))
        }
        /// One tick: due timers (and the audit), as the root runs them.
        fn tick(&self) -> Vec<Step> {
            let store = self.store();
            let now = self.now();
            let mut timers = store.due_timers(now, 100);
            timers.extend(store.audit_step(64));
            timers
                .into_iter()
                .map(|t| on_timer(&self.host, &store, &self.config, t, now))
                .filter(|s| *s != Step::Nothing)
                .collect()
        }
    }

    fn send(step: Step) -> Attempt {
        match step {
            Step::Send(a) => *a,
            other => panic!("expected an attempt, got {other:?}"),
        }
    }

    fn ok(body: &[u8]) -> Outcome<'_> {
        Outcome::Answer(UpstreamResponse {
            status: 200,
            headers: &[],
            body,
        })
    }

    #[test]
    fn an_answer_completes_the_job_once_and_the_poll_answer_is_rendered() {
        let w = World::new();
        let id = w.submit(r#"{"model":"a/m","input":"hi","voice":"v"}"#, 60);
        let attempt = send(start(&w.store(), &w.config, &id, w.now()));
        assert_eq!(
            (attempt.callout.cluster.as_str(), attempt.attempt),
            ("ca", 0)
        );
        assert_eq!(
            start(&w.store(), &w.config, &id, w.now()),
            Step::Nothing,
            "a job is claimed once"
        );
        let now = w.now() + 20;
        assert_eq!(
            finish(&w.store(), &w.config, &attempt, ok(b"AUDIO"), w.now(), now),
            Step::Completed { id: id.clone() }
        );
        let loaded = w.store().load(&id).unwrap().unwrap();
        let view = loaded.view().unwrap();
        let body: serde_json::Value = serde_json::from_slice(view.body).unwrap();
        assert_eq!(body["result"]["audio"], "QVVESU8=");
        assert_eq!(body["result"]["extra_fields"]["latency"], 20);
        assert!(
            view.record().unwrap().request.is_none(),
            "the request is dropped once done"
        );
        // A late duplicate answer changes nothing.
        assert_eq!(
            finish(&w.store(), &w.config, &attempt, ok(b"OTHER"), w.now(), now),
            Step::Nothing
        );
    }

    #[test]
    fn failures_move_through_the_fallbacks_then_fail() {
        let w = World::new();
        let id = w.submit(
            r#"{"model":"a/m","input":"hi","voice":"v","fallbacks":["b/n"]}"#,
            60,
        );
        let first = send(start(&w.store(), &w.config, &id, w.now()));
        let second = send(finish(
            &w.store(),
            &w.config,
            &first,
            Outcome::NoAnswer { elapsed_ms: 5 },
            0,
            w.now(),
        ));
        assert_eq!(
            (
                second.provider.as_str(),
                second.model.as_str(),
                second.attempt
            ),
            ("b", "n", 1)
        );
        let err = Outcome::Answer(UpstreamResponse {
            status: 429,
            headers: &[],
            body: br#"{"error":{"message":"slow"}}"#,
        });
        match finish(&w.store(), &w.config, &second, err, 0, w.now()) {
            Step::Failed {
                status: 429,
                reason: FailReason::ProviderError,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        let record = w.record(&id).unwrap();
        assert_eq!(
            record
                .attempts
                .iter()
                .map(|a| a.status_code)
                .collect::<Vec<_>>(),
            vec![502, 429]
        );
    }

    #[test]
    fn an_answer_over_max_audio_bytes_fails_the_attempt_naming_the_limit() {
        let w = World::new();
        let id = w.submit(r#"{"model":"a/m","input":"hi","voice":"v"}"#, 60);
        let a = send(start(&w.store(), &w.config, &id, w.now()));
        match finish(
            &w.store(),
            &w.config,
            &a,
            Outcome::TooLarge { bytes: 99_999_999 },
            0,
            w.now(),
        ) {
            Step::Failed { status: 502, .. } => {}
            other => panic!("{other:?}"),
        }
        let e = w.record(&id).unwrap().error.unwrap();
        assert!(
            e.error.message.contains("max_audio_bytes"),
            "{}",
            e.error.message
        );
    }

    #[test]
    fn finished_jobs_expire_on_time_by_timer_with_nobody_polling() {
        let w = World::new();
        let id = w.submit(r#"{"model":"a/m","input":"hi","voice":"v"}"#, 3);
        let a = send(start(&w.store(), &w.config, &id, w.now()));
        let done_at = w.now() + 250;
        finish(&w.store(), &w.config, &a, ok(b"x"), w.now(), done_at);
        let mut expired_at = None;
        for _ in 0..50 {
            w.shared.advance(200);
            if w.tick().contains(&Step::Expired { id: id.clone() }) {
                expired_at = Some(w.now());
                break;
            }
        }
        let at = expired_at.expect("never expired");
        assert!(
            at >= done_at + 3_000 && at <= done_at + 3_000 + 1_200,
            "expired {} ms after completion",
            at - done_at
        );
        assert!(w.store().load(&id).unwrap().is_none());
    }

    #[test]
    fn a_lost_answer_goes_to_the_next_fallback_then_the_deadline_fails_the_job() {
        let w = World::new();
        let id = w.submit(
            r#"{"model":"a/m","input":"hi","voice":"v","fallbacks":["b/n","a/z"]}"#,
            60,
        );
        let _lost = send(start(&w.store(), &w.config, &id, w.now())); // its VM dies
        let mut steps = Vec::new();
        while steps.is_empty() {
            w.shared.advance(200);
            steps = w.tick();
        }
        assert_eq!(steps, vec![Step::Requeued { id: id.clone() }]);
        let lease_end = w.now();
        assert!(
            lease_end - START >= 1_000 + LEASE_GRACE_MS
                && lease_end - START <= 1_000 + LEASE_GRACE_MS + 1_200
        );
        assert_eq!(w.host.dequeue(Queue::Jobs).unwrap().unwrap(), id.as_bytes());
        let retry = send(start(&w.store(), &w.config, &id, w.now()));
        assert_eq!(retry.provider, "b");
        // That one never answers either, and the third is never sent: the deadline ends it.
        let mut failed = None;
        for _ in 0..400 {
            w.shared.advance(200);
            for s in w.tick() {
                if let Step::Failed { status, reason, .. } = s {
                    failed = Some((status, reason, w.now()));
                }
                if let Step::Requeued { .. } = s {
                    // Requeued for the last fallback: nobody takes it.
                    let _ = w.host.dequeue(Queue::Jobs);
                }
            }
            if failed.is_some() {
                break;
            }
        }
        let (status, reason, at) = failed.expect("the deadline never failed the job");
        assert_eq!((status, reason), (504, FailReason::Deadline));
        assert!(
            at - START <= 61_200,
            "failed {} ms after submit",
            at - START
        );
        let e = w.record(&id).unwrap().error.unwrap();
        assert_eq!(
            e.extra_fields.unwrap().provider.as_deref(),
            Some("b"),
            "names the last attempt made"
        );
    }

    fn long_config() -> Config {
        Config::parse(
            br#"{"providers":{"a":{"type":"openai","cluster":"ca","timeout_ms":1000,"max_input_chars":10,"max_parallel_chunks":2},
                              "b":{"type":"openai","cluster":"cb","timeout_ms":1000,"max_input_chars":20}},
                 "allow_unauthenticated":true,"max_jobs":4,"job_deadline_s":60}"#,
            &|_| None,
        )
        .unwrap()
    }

    fn sends(step: Step) -> Vec<Attempt> {
        match step {
            Step::SendAll(calls) => calls,
            Step::Send(call) => vec![*call],
            other => panic!("expected calls, got {other:?}"),
        }
    }

    fn sent_input(a: &Attempt) -> String {
        serde_json::from_slice::<serde_json::Value>(&a.callout.body).unwrap()["input"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn a_long_input_goes_in_parts_at_most_n_at_once_and_comes_back_as_one_file() {
        let mut w = World::new();
        w.config = long_config();
        let input = "One two. Three four five. Six seven eight nine.";
        let id = w.submit(
            &format!(r#"{{"model":"a/m","input":"{input}","voice":"v","response_format":"pcm"}}"#),
            60,
        );
        let parts = crate::audio::split_text(input, 10);
        let body = |id: &str| -> serde_json::Value {
            serde_json::from_slice(w.store().load(id).unwrap().unwrap().view().unwrap().body)
                .unwrap()
        };
        let mut out = sends(start(&w.store(), &w.config, &id, w.now()));
        assert_eq!(out.len(), 2, "max_parallel_chunks");
        assert_eq!(
            body(&id)["progress"],
            serde_json::json!({"chunks_done": 0, "chunks_total": parts.len()})
        );
        let mut sent = out
            .iter()
            .map(|a| (a.part.unwrap(), sent_input(a)))
            .collect::<Vec<_>>();
        let mut last = Step::Nothing;
        // Answer the newest call first, so parts finish out of order.
        while let Some(call) = out.pop() {
            assert!(out.len() < 2, "never more than 2 parts out at once");
            let index = call.part.unwrap() as u8;
            last = finish(&w.store(), &w.config, &call, ok(&[index; 4]), 0, w.now());
            if let Step::Send(next) = &last {
                sent.push((next.part.unwrap(), sent_input(next)));
                out.insert(0, (**next).clone());
            }
        }
        assert_eq!(last, Step::Completed { id: id.clone() });
        sent.sort();
        assert_eq!(
            sent.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
            parts,
            "each part once, at its boundaries"
        );
        let done = body(&id);
        let audio = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            done["result"]["audio"].as_str().unwrap(),
        )
        .unwrap();
        let expected: Vec<u8> = (0..parts.len() as u8).flat_map(|i| [i; 4]).collect();
        assert_eq!(audio, expected, "parts joined in order");
        assert!(done.get("progress").is_none());
        let part_keys = w
            .shared
            .data
            .borrow()
            .iter()
            .filter(|(k, v)| k.contains("/p/") && !v.0.is_empty())
            .count();
        assert_eq!(part_keys, 0, "the parts are freed once joined");
    }

    #[test]
    fn a_failed_part_sends_the_whole_job_to_the_next_fallback() {
        let mut w = World::new();
        w.config = long_config();
        let input = "aaaa bbbb cccc dddd eeee ffff";
        let id = w.submit(&format!(r#"{{"model":"a/m","input":"{input}","voice":"v","response_format":"pcm","fallbacks":["b/n"]}}"#), 60);
        let first = sends(start(&w.store(), &w.config, &id, w.now()));
        finish(&w.store(), &w.config, &first[0], ok(b"xx"), 0, w.now());
        let err = Outcome::Answer(UpstreamResponse {
            status: 500,
            headers: &[],
            body: b"{}",
        });
        let again = sends(finish(&w.store(), &w.config, &first[1], err, 0, w.now()));
        assert_eq!(again[0].provider, "b");
        assert_eq!(
            again.iter().map(sent_input).collect::<Vec<_>>(),
            crate::audio::split_text(input, 20)[..again.len()].to_vec(),
            "every part again"
        );
        // A late answer of the failed attempt changes nothing.
        assert_eq!(
            finish(&w.store(), &w.config, &first[0], ok(b"late"), 0, w.now()),
            Step::Nothing
        );
    }

    #[test]
    fn expiry_keeps_working_when_the_host_clock_steps_back() {
        let w = World::new();
        let clock = crate::clock::Clock::default();
        clock.sync(&w.host, &w.keys.clock());
        let id = w.submit(r#"{"model":"a/m","input":"hi","voice":"v"}"#, 2);
        let a = send(start(&w.store(), &w.config, &id, clock.now_ms(&w.host)));
        finish(
            &w.store(),
            &w.config,
            &a,
            ok(b"x"),
            0,
            clock.now_ms(&w.host),
        );
        w.shared.clock.set(w.now() - 3_600_000); // an hour back
        let mut gone = false;
        for _ in 0..20 {
            w.shared.advance(200);
            clock.sync(&w.host, &w.keys.clock());
            let now = clock.now_ms(&w.host);
            let store = w.store();
            for t in store.due_timers(now, 100) {
                gone |= matches!(
                    on_timer(&w.host, &store, &w.config, t, now),
                    Step::Expired { .. }
                );
            }
        }
        assert!(
            gone,
            "the job expired within 4 s of store time despite the clock going back an hour"
        );
    }
}
