//! The worker's decisions, free of host calls: which attempt to send next, and
//! what an answer (or its absence) does to the job. The root context only
//! moves these between the store and Envoy's callouts.

use crate::config::Config;
use crate::error::{ApiError, ExtraFields};
use crate::job::{AfterFailure, JobRecord, ResultMeta};
use crate::providers::{for_kind, UpstreamRequest, UpstreamResponse};
use crate::request::SpeechRequest;
use crate::store::Store;

/// Time past an attempt's own timeout before the sweep calls its answer lost.
pub const LEASE_GRACE_MS: u64 = 5_000;

/// One attempt ready to go out.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub slot: u32,
    pub id: String,
    pub attempt: usize,
    pub provider: String,
    pub model: String,
    pub cluster: String,
    pub timeout_ms: u64,
    pub request: UpstreamRequest,
}

/// How a callout ended.
pub enum Outcome<'a> {
    Answer(UpstreamResponse<'a>),
    /// No answer at all: Envoy reset the callout or gave up.
    NoAnswer { elapsed_ms: u64 },
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

/// What became of the job after an event, for logs and stats.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Send this next.
    Next(Attempt),
    Completed { id: String },
    Failed { id: String, status: u16, reason: FailReason },
    /// The job was deleted, expired or is someone else's now: nothing to do.
    Dropped,
}

fn lease_ms(config: &Config, record: &JobRecord) -> u64 {
    record
        .current()
        .and_then(|step| config.providers.get(&step.provider))
        .map_or(0, |p| p.timeout_ms)
        .saturating_add(LEASE_GRACE_MS)
}

/// Takes a queued job and prepares its current attempt.
pub fn start(store: &Store, config: &Config, id: &str, now_ms: u64) -> Progress {
    let claimed = store.modify(id, &mut |r| {
        let lease = lease_ms(config, r);
        r.claim(now_ms, lease)
    });
    match claimed {
        Ok(Some(record)) => prepare(store, config, record, now_ms),
        _ => Progress::Dropped,
    }
}

/// Builds the request for the record's current attempt; an attempt that cannot
/// even be built (say, a missing API key) fails at once and the next one is tried.
fn prepare(store: &Store, config: &Config, mut record: JobRecord, now_ms: u64) -> Progress {
    let Some(slot) = crate::ids::slot_of(&record.id) else {
        return Progress::Dropped;
    };
    let request: Option<SpeechRequest> = store
        .request(slot, &record.id)
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    for _ in 0..=record.chain.len() {
        let attempt = record.attempt;
        let built = match (&request, record.current().and_then(|s| config.providers.get(&s.provider).map(|p| (s, p)))) {
            (None, _) => Err(ApiError::internal("the job's request is no longer in the store")),
            (_, None) => Err(ApiError::upstream(502, "provider is no longer configured")),
            (Some(req), Some((step, provider))) => for_kind(provider.kind)
                .build(provider, &step.model, req)
                .map(|upstream| Attempt {
                    slot,
                    id: record.id.clone(),
                    attempt,
                    provider: step.provider.clone(),
                    model: step.model.clone(),
                    cluster: provider.cluster.clone(),
                    timeout_ms: provider.timeout_ms,
                    request: upstream,
                }),
        };
        match built {
            Ok(a) => return Progress::Next(a),
            Err(error) => match fail_attempt(store, config, &record.id, attempt, error, now_ms) {
                AfterAttempt::Retry(next) => record = *next,
                AfterAttempt::Done(progress) => return progress,
            },
        }
    }
    Progress::Dropped
}

/// After a failed attempt: try the next one, or stop here.
enum AfterAttempt {
    Retry(Box<JobRecord>),
    Done(Progress),
}

/// Records a failed attempt on the job, if that attempt is still the job's.
fn fail_attempt(
    store: &Store,
    config: &Config,
    id: &str,
    attempt: usize,
    error: ApiError,
    now_ms: u64,
) -> AfterAttempt {
    let mut after = AfterFailure::Failed;
    let updated = store.modify(id, &mut |r| {
        if !r.is_running(attempt) {
            return false;
        }
        after = r.fail_attempt(now_ms, error.clone());
        if after == AfterFailure::Fallback {
            r.lease_until_ms = Some(now_ms.saturating_add(lease_ms(config, r)));
        }
        true
    });
    match (updated, after) {
        (Ok(Some(record)), AfterFailure::Fallback) => AfterAttempt::Retry(Box::new(record)),
        (Ok(Some(record)), AfterFailure::Failed) => {
            if let Some(slot) = crate::ids::slot_of(id) {
                store.drop_request(slot, id);
            }
            let status = record.status_code.unwrap_or(error.status_code);
            let reason = FailReason::of(&error);
            AfterAttempt::Done(Progress::Failed { id: id.to_string(), status, reason })
        }
        _ => AfterAttempt::Done(Progress::Dropped),
    }
}

/// After an attempt failed, whether it could not be sent or its answer was an error.
pub fn after_failure(store: &Store, config: &Config, attempt: &Attempt, error: ApiError, now_ms: u64) -> Progress {
    match fail_attempt(store, config, &attempt.id, attempt.attempt, error, now_ms) {
        AfterAttempt::Retry(record) => prepare(store, config, *record, now_ms),
        AfterAttempt::Done(progress) => progress,
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

/// How one attempt went, for stats: success, error, timeout or unreachable.
pub fn attempt_outcome(outcome: &Outcome, attempt: &Attempt) -> &'static str {
    match outcome {
        Outcome::NoAnswer { elapsed_ms } => {
            match FailReason::of(&no_answer_error(&attempt.provider, *elapsed_ms, attempt.timeout_ms)) {
                FailReason::Timeout => "timeout",
                _ => "unreachable",
            }
        }
        Outcome::Answer(response) => match envoy_local_reply(response, attempt).map(|e| FailReason::of(&e)) {
            Some(FailReason::Timeout) => "timeout",
            Some(_) => "unreachable",
            None if (200..300).contains(&response.status) => "success",
            None => "error",
        },
    }
}

/// Envoy answers for an upstream it could not reach with its own 503 text.
fn envoy_local_reply(response: &UpstreamResponse, attempt: &Attempt) -> Option<ApiError> {
    let body = String::from_utf8_lossy(response.body);
    let unreachable = ["upstream connect error", "no healthy upstream", "no cluster match"];
    if response.status == 503 && unreachable.iter().any(|p| body.starts_with(p)) {
        return Some(ApiError::upstream(
            502,
            format!("provider {} is unreachable: {}", attempt.provider, body.trim()),
        ));
    }
    if response.status == 504 && body.starts_with("upstream request timeout") {
        return Some(no_answer_error(&attempt.provider, attempt.timeout_ms, attempt.timeout_ms));
    }
    None
}

/// Applies the answer to `attempt` to its job.
pub fn finish(
    store: &Store,
    config: &Config,
    attempt: &Attempt,
    outcome: Outcome,
    started_ms: u64,
    now_ms: u64,
) -> Progress {
    let response = match outcome {
        Outcome::NoAnswer { elapsed_ms } => {
            let error = no_answer_error(&attempt.provider, elapsed_ms, attempt.timeout_ms);
            return after_failure(store, config, attempt, error, now_ms);
        }
        Outcome::Answer(response) => response,
    };
    if let Some(error) = envoy_local_reply(&response, attempt) {
        return after_failure(store, config, attempt, error, now_ms);
    }
    let Some(provider) = config.providers.get(&attempt.provider) else {
        return after_failure(store, config, attempt, ApiError::upstream(502, "provider is no longer configured"), now_ms);
    };
    let request: Option<SpeechRequest> = store
        .request(attempt.slot, &attempt.id)
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let Some(request) = request else {
        return Progress::Dropped; // deleted while the call ran
    };
    match for_kind(provider.kind).parse(provider, &request, &response) {
        Err(error) => after_failure(store, config, attempt, error, now_ms),
        Ok(speech) => {
            if store.put_audio(attempt.slot, &attempt.id, &speech.audio).is_err() {
                let error = ApiError::internal("the gateway could not store the audio");
                return after_failure(store, config, attempt, error, now_ms);
            }
            let mut extra = ExtraFields::speech(&attempt.provider, &attempt.model);
            extra.latency = Some(now_ms.saturating_sub(started_ms));
            let meta = ResultMeta {
                response_format: speech.format,
                alignment: speech.alignment,
                normalized_alignment: speech.normalized_alignment,
                extra_fields: extra,
            };
            let done = store.modify(&attempt.id, &mut |r| {
                if !r.is_running(attempt.attempt) {
                    return false;
                }
                r.complete(now_ms, meta.clone());
                true
            });
            if let Ok(Some(_)) = done {
                store.drop_request(attempt.slot, &attempt.id);
                Progress::Completed { id: attempt.id.clone() }
            } else {
                store.discard_audio(attempt.slot, &attempt.id);
                Progress::Dropped
            }
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sweep {
    pub expired: Vec<String>,
    pub deadline_failed: Vec<String>,
    /// Jobs whose attempt's answer never came and that go on with a fallback:
    /// to be queued again.
    pub requeue: Vec<String>,
    /// Jobs that ended as failed because an answer never came.
    pub lost_failed: Vec<String>,
    /// Jobs held after the sweep, and how many of them wait or run.
    pub held: u32,
    pub pending: u32,
    pub processing: u32,
}

/// Frees expired jobs, fails jobs past their deadline, and takes back attempts
/// whose answer is overdue (their worker's VM may be gone).
pub fn sweep(store: &Store, config: &Config, now_ms: u64) -> Sweep {
    let mut report = Sweep::default();
    let jobs: Vec<(u32, JobRecord)> = store.scan().collect();
    for (slot, record) in jobs {
        report.held += 1;
        match record.status {
            crate::job::JobStatus::Pending => report.pending += 1,
            crate::job::JobStatus::Processing => report.processing += 1,
            _ => {}
        }
        if record.is_expired(now_ms) {
            if store.remove(slot, &record.id) {
                report.expired.push(record.id);
                report.held -= 1;
            }
            continue;
        }
        if record.is_past_deadline(now_ms) {
            let deadline_s = config.job_deadline_s;
            let changed = store.modify(&record.id, &mut |r| {
                if !r.is_past_deadline(now_ms) {
                    return false;
                }
                let error = ApiError::upstream(
                    504,
                    format!("the job did not finish within its deadline of {deadline_s} s"),
                );
                if r.status == crate::job::JobStatus::Processing {
                    r.fail_attempt(now_ms, error.clone());
                }
                if !r.status.is_finished() {
                    r.fail(now_ms, error);
                }
                true
            });
            if let Ok(Some(_)) = changed {
                store.drop_request(slot, &record.id);
                match record.status {
                    crate::job::JobStatus::Pending => report.pending -= 1,
                    _ => report.processing -= 1,
                }
                report.deadline_failed.push(record.id);
            }
            continue;
        }
        if record.is_lease_expired(now_ms) {
            let mut after = AfterFailure::Failed;
            let changed = store.modify(&record.id, &mut |r| {
                if !r.is_lease_expired(now_ms) {
                    return false;
                }
                let error = ApiError::upstream(
                    504,
                    "no answer from the provider arrived in time; the worker holding the call may have been replaced",
                );
                after = r.fail_attempt(now_ms, error);
                if after == AfterFailure::Fallback {
                    // Back to the queue: any live worker takes the next attempt.
                    r.status = crate::job::JobStatus::Pending;
                }
                true
            });
            if let Ok(Some(_)) = changed {
                match after {
                    AfterFailure::Fallback => {
                        report.processing -= 1;
                        report.pending += 1;
                        report.requeue.push(record.id);
                    }
                    AfterFailure::Failed => {
                        store.drop_request(slot, &record.id);
                        report.processing -= 1;
                        report.lost_failed.push(record.id);
                    }
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::make_id;
    use crate::job::JobStatus;
    use crate::request::parse_speech_request;
    use crate::store::memory::MemoryData;

    fn config() -> Config {
        Config::parse(
            br#"{"providers":{"a":{"type":"openai","cluster":"ca","timeout_ms":1000},
                              "b":{"type":"openai","cluster":"cb","timeout_ms":1000}},
                 "allow_unauthenticated":true,"max_jobs":4,"job_deadline_s":60}"#,
            &|_| None,
        )
        .unwrap()
    }

    fn submit(store: &Store, config: &Config, body: &str, now: u64) -> String {
        let request = parse_speech_request(body.as_bytes(), config).unwrap();
        let json = serde_json::to_vec(&request).unwrap();
        let make = |slot| JobRecord::new(make_id([9; 16], slot), String::new(), now, 1, config.job_deadline_s, request.chain.clone());
        store.insert(&mut 0, &make, &json).unwrap().id
    }

    fn next(p: Progress) -> Attempt {
        match p {
            Progress::Next(a) => a,
            other => panic!("expected an attempt, got {other:?}"),
        }
    }

    #[test]
    fn an_answer_completes_the_job_once() {
        let (data, config) = (MemoryData::default(), config());
        let store = Store::new(&data, config.max_jobs);
        let id = submit(&store, &config, r#"{"model":"a/m","input":"hi","voice":"v"}"#, 0);
        let attempt = next(start(&store, &config, &id, 10));
        assert_eq!((attempt.cluster.as_str(), attempt.attempt), ("ca", 0));
        assert_eq!(start(&store, &config, &id, 10), Progress::Dropped, "a job is claimed once");
        let ok = UpstreamResponse { status: 200, headers: &[], body: b"AUDIO" };
        assert_eq!(finish(&store, &config, &attempt, Outcome::Answer(ok), 10, 30), Progress::Completed { id: id.clone() });
        let (slot, record, _) = store.find(&id).unwrap();
        assert_eq!(record.status, JobStatus::Completed);
        assert_eq!(record.result.unwrap().extra_fields.latency, Some(20));
        assert_eq!(store.audio(slot, &id).unwrap(), b"AUDIO");
        assert_eq!(store.request(slot, &id), None, "the request is dropped once done");
        // A second (late, duplicate) answer changes nothing.
        let again = UpstreamResponse { status: 200, headers: &[], body: b"OTHER" };
        assert_eq!(finish(&store, &config, &attempt, Outcome::Answer(again), 10, 40), Progress::Dropped);
        assert_eq!(store.audio(slot, &id).unwrap(), b"AUDIO");
    }

    #[test]
    fn failures_move_through_the_fallbacks_then_fail() {
        let (data, config) = (MemoryData::default(), config());
        let store = Store::new(&data, config.max_jobs);
        let id = submit(&store, &config, r#"{"model":"a/m","input":"hi","voice":"v","fallbacks":["b/n"]}"#, 0);
        let first = next(start(&store, &config, &id, 0));
        let second = next(finish(&store, &config, &first, Outcome::NoAnswer { elapsed_ms: 5 }, 0, 5));
        assert_eq!((second.provider.as_str(), second.model.as_str(), second.attempt), ("b", "n", 1));
        let err = UpstreamResponse { status: 429, headers: &[], body: br#"{"error":{"message":"slow"}}"# };
        match finish(&store, &config, &second, Outcome::Answer(err), 5, 9) {
            Progress::Failed { status: 429, reason: FailReason::ProviderError, .. } => {}
            other => panic!("{other:?}"),
        }
        let (_, record, _) = store.find(&id).unwrap();
        assert_eq!(record.attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(), vec![502, 429]);
    }

    #[test]
    fn the_sweep_takes_back_lost_attempts_fails_late_jobs_and_frees_expired_ones() {
        let (data, config) = (MemoryData::default(), config());
        let store = Store::new(&data, config.max_jobs);
        let lost = submit(&store, &config, r#"{"model":"a/m","input":"x","voice":"v","fallbacks":["b/n"]}"#, 0);
        let late = submit(&store, &config, r#"{"model":"a/m","input":"x","voice":"v"}"#, 0);
        let done = submit(&store, &config, r#"{"model":"a/m","input":"x","voice":"v"}"#, 0);
        let _ = next(start(&store, &config, &lost, 0)); // its answer never comes
        let a = next(start(&store, &config, &done, 0));
        let ok = UpstreamResponse { status: 200, headers: &[], body: b"x" };
        finish(&store, &config, &a, Outcome::Answer(ok), 0, 0);

        // After the lease (1000 ms + grace): the lost attempt goes back to the queue
        // for its fallback; the completed job (ttl 1 s) has expired.
        let report = sweep(&store, &config, 1000 + LEASE_GRACE_MS);
        assert_eq!(report.requeue, vec![lost.clone()]);
        assert_eq!(report.expired, vec![done.clone()]);
        assert!(store.find(&done).is_none());
        let (_, record, _) = store.find(&lost).unwrap();
        assert_eq!((record.status, record.attempt), (JobStatus::Pending, 1));
        assert_eq!(record.attempts[0].status_code, 504);
        assert_eq!((report.pending, report.processing, report.held), (2, 0, 2));
        let retry = next(start(&store, &config, &lost, 6_001));
        assert_eq!(retry.provider, "b");

        // Past the deadline, whatever has not ended fails with 504.
        let report = sweep(&store, &config, 60_000);
        let mut failed = report.deadline_failed.clone();
        failed.sort();
        let mut expected = vec![lost.clone(), late.clone()];
        expected.sort();
        assert_eq!(failed, expected);
        let (_, record, _) = store.find(&late).unwrap();
        assert_eq!(record.status_code, Some(504));
        assert!(record.error.unwrap().error.message.contains("deadline of 60 s"));
        assert_eq!(store.count(), 2);
    }
}
