//! A job and its life: pending → processing → completed | failed, as pure
//! transitions on the record kept in the store, and the JSON a poll shows.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{ApiError, AttemptSummary, ExtraFields};
use crate::request::{AudioFormat, ModelRef};
use crate::time::rfc3339;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Processing,
    Completed,
    Failed,
}

impl JobStatus {
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed)
    }
}

/// What a completed job shows besides its audio (the audio has its own key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    pub response_format: AudioFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alignment: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalized_alignment: Option<Value>,
    pub extra_fields: ExtraFields,
}

/// The job as the store keeps it (small: no request text, no audio).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub owner: String,
    pub status: JobStatus,
    pub created_at_ms: u64,
    #[serde(default)]
    pub completed_at_ms: Option<u64>,
    pub ttl_s: u64,
    pub deadline_ms: u64,
    /// Primary model first, then the fallbacks.
    pub chain: Vec<ModelRef>,
    /// Index in `chain` of the attempt under way (or the last one).
    pub attempt: usize,
    /// While processing: when the attempt's answer is overdue.
    #[serde(default)]
    pub lease_until_ms: Option<u64>,
    #[serde(default)]
    pub attempts: Vec<AttemptSummary>,
    #[serde(default)]
    pub status_code: Option<u16>,
    #[serde(default)]
    pub result: Option<ResultMeta>,
    #[serde(default)]
    pub error: Option<ApiError>,
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// Try `chain[attempt]` next.
    Fallback,
    /// No attempts left: the job is failed.
    Failed,
}

impl JobRecord {
    pub fn new(
        id: String,
        owner: String,
        now_ms: u64,
        ttl_s: u64,
        deadline_s: u64,
        chain: Vec<ModelRef>,
    ) -> JobRecord {
        JobRecord {
            id,
            owner,
            status: JobStatus::Pending,
            created_at_ms: now_ms,
            completed_at_ms: None,
            ttl_s,
            deadline_ms: now_ms.saturating_add(deadline_s.saturating_mul(1000)),
            chain,
            attempt: 0,
            lease_until_ms: None,
            attempts: Vec::new(),
            status_code: None,
            result: None,
            error: None,
        }
    }

    pub fn current(&self) -> Option<&ModelRef> {
        self.chain.get(self.attempt)
    }

    /// A worker takes a pending job; false if someone else has it or it ended.
    pub fn claim(&mut self, now_ms: u64, lease_ms: u64) -> bool {
        if self.status != JobStatus::Pending {
            return false;
        }
        self.status = JobStatus::Processing;
        self.lease_until_ms = Some(now_ms.saturating_add(lease_ms));
        true
    }

    /// Is this record still waiting on exactly this attempt?
    pub fn is_running(&self, attempt: usize) -> bool {
        self.status == JobStatus::Processing && self.attempt == attempt
    }

    pub fn complete(&mut self, now_ms: u64, result: ResultMeta) {
        self.status = JobStatus::Completed;
        self.completed_at_ms = Some(now_ms);
        self.lease_until_ms = None;
        self.status_code = Some(200);
        self.result = Some(result);
        self.error = None;
    }

    /// Records the failure of the current attempt and moves on to the next
    /// fallback, or fails the job when none is left.
    pub fn fail_attempt(&mut self, now_ms: u64, error: ApiError) -> AfterFailure {
        if let Some(step) = self.current() {
            self.attempts.push(AttemptSummary {
                provider: step.provider.clone(),
                model: step.model.clone(),
                status_code: error.status_code,
            });
        }
        if self.attempt + 1 < self.chain.len() {
            self.attempt += 1;
            self.lease_until_ms = None;
            return AfterFailure::Fallback;
        }
        self.fail(now_ms, error);
        AfterFailure::Failed
    }

    /// Ends the job as failed with `error`, naming the last attempt.
    pub fn fail(&mut self, now_ms: u64, mut error: ApiError) {
        let mut extra = match self.current() {
            Some(step) => ExtraFields::speech(&step.provider, &step.model),
            None => ExtraFields::default(),
        };
        extra.attempts = Some(self.attempts.clone());
        error.extra_fields = Some(extra);
        self.status = JobStatus::Failed;
        self.completed_at_ms = Some(now_ms);
        self.lease_until_ms = None;
        self.status_code = Some(error.status_code);
        self.result = None;
        self.error = Some(error);
    }

    pub fn expires_at_ms(&self) -> Option<u64> {
        self.completed_at_ms
            .map(|done| done.saturating_add(self.ttl_s.saturating_mul(1000)))
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms().is_some_and(|at| now_ms >= at)
    }

    pub fn is_past_deadline(&self, now_ms: u64) -> bool {
        !self.status.is_finished() && now_ms >= self.deadline_ms
    }

    pub fn is_lease_expired(&self, now_ms: u64) -> bool {
        self.status == JobStatus::Processing && self.lease_until_ms.is_some_and(|at| now_ms >= at)
    }

    /// The HTTP status of a poll: 202 until the job ends, then 200.
    pub fn poll_status(&self) -> u16 {
        if self.status.is_finished() {
            200
        } else {
            202
        }
    }

    /// The job as a poll shows it; `audio` is the completed job's audio.
    pub fn to_json(&self, audio: Option<&[u8]>) -> Value {
        let mut job = Map::new();
        job.insert("id".into(), json!(self.id));
        job.insert("status".into(), json!(self.status.name()));
        job.insert("created_at".into(), json!(rfc3339(self.created_at_ms)));
        if !self.status.is_finished() {
            return Value::Object(job);
        }
        if let Some(done) = self.completed_at_ms {
            job.insert("completed_at".into(), json!(rfc3339(done)));
        }
        if let Some(at) = self.expires_at_ms() {
            job.insert("expires_at".into(), json!(rfc3339(at)));
        }
        if let Some(code) = self.status_code {
            job.insert("status_code".into(), json!(code));
        }
        let result = match &self.result {
            Some(meta) => {
                let mut r = Map::new();
                let encoded = base64::engine::general_purpose::STANDARD.encode(audio.unwrap_or_default());
                r.insert("audio".into(), json!(encoded));
                r.insert("response_format".into(), json!(meta.response_format.name()));
                r.insert("content_type".into(), json!(meta.response_format.content_type()));
                if let Some(a) = &meta.alignment {
                    r.insert("alignment".into(), a.clone());
                }
                if let Some(a) = &meta.normalized_alignment {
                    r.insert("normalized_alignment".into(), a.clone());
                }
                r.insert("extra_fields".into(), json!(meta.extra_fields));
                Value::Object(r)
            }
            None => Value::Null,
        };
        job.insert("result".into(), result);
        job.insert(
            "error".into(),
            self.error.as_ref().map_or(Value::Null, |e| json!(e)),
        );
        Value::Object(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<ModelRef> {
        (0..n)
            .map(|i| ModelRef { provider: format!("p{i}"), model: format!("m{i}") })
            .collect()
    }

    fn job(n: usize) -> JobRecord {
        JobRecord::new("id-1".into(), "team".into(), 1_000, 60, 300, chain(n))
    }

    #[test]
    fn happy_path() {
        let mut j = job(1);
        assert_eq!(j.to_json(None), json!({"id":"id-1","status":"pending","created_at":"1970-01-01T00:00:01.000Z"}));
        assert!(j.claim(2_000, 5_000));
        assert!(!j.claim(2_000, 5_000), "a job is claimed once");
        assert!(j.is_running(0));
        assert!(!j.is_lease_expired(6_999));
        assert!(j.is_lease_expired(7_000));
        let mut extra = ExtraFields::speech("p0", "m0");
        extra.latency = Some(12);
        j.complete(3_000, ResultMeta { response_format: AudioFormat::Wav, alignment: None, normalized_alignment: None, extra_fields: extra });
        assert_eq!(j.poll_status(), 200);
        let v = j.to_json(Some(&[0xff, 0, 1]));
        assert_eq!(v["status"], "completed");
        assert_eq!(v["status_code"], 200);
        assert_eq!(v["completed_at"], "1970-01-01T00:00:03.000Z");
        assert_eq!(v["expires_at"], "1970-01-01T00:01:03.000Z");
        assert_eq!(v["result"]["audio"], "/wAB");
        assert_eq!(v["result"]["content_type"], "audio/wav");
        assert_eq!(v["result"]["extra_fields"], json!({"provider":"p0","model_requested":"m0","request_type":"speech","latency":12}));
        assert_eq!(v["error"], Value::Null);
        assert!(!j.is_expired(62_999));
        assert!(j.is_expired(63_000));
    }

    #[test]
    fn fallbacks_then_failure_lists_every_attempt() {
        let mut j = job(2);
        j.claim(1_000, 10);
        assert_eq!(j.fail_attempt(1_500, ApiError::upstream(504, "timed out")), AfterFailure::Fallback);
        assert!(j.is_running(1));
        assert!(!j.is_running(0), "a late answer to the first attempt is stale");
        assert_eq!(j.current().unwrap().provider, "p1");
        let last = ApiError::provider(429, None, None, "slow down".into(), None);
        assert_eq!(j.fail_attempt(2_000, last), AfterFailure::Failed);
        let v = j.to_json(None);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["status_code"], 429);
        assert_eq!(v["result"], Value::Null);
        assert_eq!(v["error"]["error"]["message"], "slow down");
        assert_eq!(v["error"]["extra_fields"]["provider"], "p1");
        assert_eq!(v["error"]["extra_fields"]["model_requested"], "m1");
        assert_eq!(
            v["error"]["extra_fields"]["attempts"],
            json!([{"provider":"p0","model":"m0","status_code":504},{"provider":"p1","model":"m1","status_code":429}])
        );
    }

    #[test]
    fn deadline_applies_only_to_unfinished_jobs() {
        let mut j = job(1);
        assert!(!j.is_past_deadline(300_999));
        assert!(j.is_past_deadline(301_000));
        j.fail(2_000, ApiError::upstream(504, "x"));
        assert!(!j.is_past_deadline(400_000));
    }

    #[test]
    fn records_round_trip_through_json() {
        let mut j = job(2);
        j.claim(1, 1);
        j.fail_attempt(2, ApiError::upstream(502, "down"));
        let back: JobRecord = serde_json::from_slice(&serde_json::to_vec(&j).unwrap()).unwrap();
        assert_eq!(back, j);
    }
}
