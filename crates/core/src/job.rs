//! A job and its life: pending → processing → completed | failed, as pure
//! transitions on the record kept in the store, and the answer a poll gets,
//! rendered once per change of state (never per poll).

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ApiError, AttemptSummary, ExtraFields};
use crate::speech::{AudioFormat, ModelRef, SpeechRequest};
use crate::time::rfc3339;
use crate::webhooks::{Delivery, DeliveryStatus};

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

    /// The HTTP status of a poll: 202 until the job ends, then 200.
    pub fn poll_status(self) -> u16 {
        if self.is_finished() {
            200
        } else {
            202
        }
    }

    pub fn code(self) -> u8 {
        match self {
            JobStatus::Pending => 0,
            JobStatus::Processing => 1,
            JobStatus::Completed => 2,
            JobStatus::Failed => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<JobStatus> {
        match code {
            0 => Some(JobStatus::Pending),
            1 => Some(JobStatus::Processing),
            2 => Some(JobStatus::Completed),
            3 => Some(JobStatus::Failed),
            _ => None,
        }
    }
}

/// What a completed job says about its audio besides the bytes themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    pub response_format: AudioFormat,
    pub extra_fields: ExtraFields,
}

/// What a successful attempt hands to the job.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub meta: ResultMeta,
    pub audio: Vec<u8>,
    pub alignment: Option<Value>,
    pub normalized_alignment: Option<Value>,
}

/// The job as the store keeps it. The request stays only while the job runs;
/// audio lives only in the rendered answer.
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
    /// Index in `chain` of the attempt under way (or the last one made).
    pub attempt: usize,
    /// Who works on the job now, until when (shared data; with etcd a
    /// claim is a key under the replica's lease instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    #[serde(default)]
    pub attempts: Vec<AttemptSummary>,
    #[serde(default)]
    pub status_code: Option<u16>,
    #[serde(default)]
    pub result: Option<ResultMeta>,
    #[serde(default)]
    pub error: Option<ApiError>,
    #[serde(default)]
    pub request: Option<SpeechRequest>,
    /// The webhook the client asked for, and its delivery once the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookJob>,
    /// A long input's parts for the attempt under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<PartPlan>,
    /// Expired, but kept (without its audio) until its webhook delivery ends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub result_dropped: bool,
    /// Input characters, as counted against the key and priced.
    #[serde(default)]
    pub chars: u64,
    /// The start of the characters window they were counted in, if the key
    /// counts them (they are given back if the job makes no audio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chars_window_s: Option<u64>,
    /// Counted among its lane's running jobs (shared data).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub counted_running: bool,
    /// Its place in fair dispatch (etcd).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub round: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A worker's hold on a job (shared data): its name, and when the hold
/// lapses unless the worker renews it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub by: u64,
    pub until_ms: u64,
}

/// How far a long input's attempt is: its parts, those done, the next to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartPlan {
    pub attempt: usize,
    pub total: u32,
    pub done: Vec<u32>,
    pub next: u32,
}

impl PartPlan {
    pub fn is_complete(&self) -> bool {
        u32::try_from(self.done.len()).unwrap_or(u32::MAX) >= self.total
    }
}

/// A job's webhook: which endpoint, and once the job ended, the
/// delivery's state and the body made for it (made once, sent on every
/// attempt before the job expires).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookJob {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl JobRecord {
    /// The model the job named first (its primary), as `provider/model`.
    pub fn first_model(&self) -> String {
        self.chain
            .first()
            .map(|m| format!("{}/{}", m.provider, m.model))
            .unwrap_or_default()
    }

    /// The delivery still to be made, if any.
    pub fn pending_delivery(&self) -> Option<&Delivery> {
        self.webhook
            .as_ref()
            .and_then(|w| w.delivery.as_ref())
            .filter(|d| d.status == DeliveryStatus::Pending)
    }
}

/// Where a job goes after one of its attempts failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// Try `chain[attempt]` next.
    TryNext,
    /// No attempts left: the job has failed.
    Failed,
}

impl JobRecord {
    pub fn new(
        id: String,
        owner: String,
        now_ms: u64,
        ttl_s: u64,
        deadline_s: u64,
        request: SpeechRequest,
    ) -> JobRecord {
        JobRecord {
            id,
            owner,
            status: JobStatus::Pending,
            created_at_ms: now_ms,
            completed_at_ms: None,
            ttl_s,
            deadline_ms: now_ms.saturating_add(deadline_s.saturating_mul(1000)),
            chain: request.chain.clone(),
            attempt: 0,
            claim: None,
            attempts: Vec::new(),
            status_code: None,
            result: None,
            error: None,
            request: Some(request),
            webhook: None,
            parts: None,
            result_dropped: false,
            chars: 0,
            chars_window_s: None,
            counted_running: false,
            round: 0,
        }
    }

    pub fn current(&self) -> Option<&ModelRef> {
        self.chain.get(self.attempt)
    }

    /// Whether a worker holds the job at `now_ms`.
    pub fn is_claimed(&self, now_ms: u64) -> bool {
        self.claim.is_some_and(|c| now_ms < c.until_ms)
    }

    /// Is this record still waiting on exactly this attempt?
    pub fn is_running(&self, attempt: usize) -> bool {
        self.status == JobStatus::Processing && self.attempt == attempt
    }

    pub fn complete(&mut self, now_ms: u64, meta: ResultMeta) {
        self.parts = None;
        self.status = JobStatus::Completed;
        self.completed_at_ms = Some(now_ms);
        self.status_code = Some(200);
        self.result = Some(meta);
        self.error = None;
        self.request = None;
    }

    /// Records the failure of the current attempt and moves on to the next
    /// fallback, or fails the job when none is left.
    pub fn record_failure(&mut self, now_ms: u64, error: ApiError) -> NextStep {
        if let Some(step) = self.current() {
            self.attempts.push(AttemptSummary {
                provider: step.provider.clone(),
                model: step.model.clone(),
                status_code: error.status_code,
            });
        }
        // Every part again on the next fallback: one file never mixes two voices.
        self.parts = None;
        if self.attempt + 1 < self.chain.len() {
            self.attempt += 1;
            return NextStep::TryNext;
        }
        self.fail(now_ms, error);
        NextStep::Failed
    }

    /// Ends the job as failed with `error`, naming the last attempt made (not
    /// an untried fallback).
    pub fn fail(&mut self, now_ms: u64, mut error: ApiError) {
        let last = match self.attempts.last() {
            Some(a) => Some((a.provider.clone(), a.model.clone())),
            None => self
                .chain
                .first()
                .map(|m| (m.provider.clone(), m.model.clone())),
        };
        let mut extra = match last {
            Some((provider, model)) => ExtraFields::speech(&provider, &model),
            None => ExtraFields::default(),
        };
        extra.attempts = Some(self.attempts.clone());
        error.extra_fields = Some(extra);
        self.status = JobStatus::Failed;
        self.completed_at_ms = Some(now_ms);
        self.status_code = Some(error.status_code);
        self.result = None;
        self.error = Some(error);
        self.request = None;
    }

    /// Fails an unfinished job that ran out of time: the attempt under way
    /// (if any) is recorded first, so the error names the last attempt made.
    pub fn fail_past_deadline(&mut self, now_ms: u64, deadline_s: u64) {
        let error = ApiError::upstream(
            504,
            format!("the job did not finish within its deadline of {deadline_s} s"),
        );
        if self.status == JobStatus::Processing {
            if let Some(step) = self.current() {
                self.attempts.push(AttemptSummary {
                    provider: step.provider.clone(),
                    model: step.model.clone(),
                    status_code: 504,
                });
            }
        }
        self.fail(now_ms, error);
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

    /// When this job next needs a look from the timer wheel: its expiry (or
    /// its webhook's next attempt) once finished, else its deadline; and
    /// when its claim lapses, if that is sooner.
    pub fn next_timer_ms(&self) -> u64 {
        let delivery = self
            .pending_delivery()
            .map_or(u64::MAX, |d| d.next_attempt_at_ms);
        let own = match self.expires_at_ms() {
            Some(at) => at.min(delivery),
            None => self.deadline_ms,
        };
        self.claim.map_or(own, |c| own.min(c.until_ms))
    }
}

/// A stretch of bytes: where it starts, and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub at: u32,
    pub len: u32,
}

/// A poll's answer body, with where the base64 audio sits in it (so that
/// `/content` can decode it without parsing the JSON).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rendered {
    pub body: Vec<u8>,
    /// Where the base64 audio sits in the body, if the job completed.
    pub audio: Option<Span>,
    /// Where the part that changes after the job ended (`webhook`) begins.
    pub tail_at: u32,
}

fn offset(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The end of a poll answer: the webhook's state, if any, and the closing brace.
fn push_tail(out: &mut Vec<u8>, record: &JobRecord) {
    match &record.webhook {
        Some(WebhookJob {
            delivery: Some(delivery),
            ..
        }) => push_field(out, "webhook", &delivery.view()),
        // Asked for; nothing sent before the job ends.
        Some(WebhookJob {
            endpoint,
            delivery: None,
            ..
        }) if !record.status.is_finished() => push_field(
            out,
            "webhook",
            &serde_json::json!({"endpoint": endpoint, "status": "pending", "attempts": 0}),
        ),
        _ => {}
    }
    out.push(b'}');
}

/// A finished job's answer with a new tail, the rest (audio included) kept as it is.
pub fn with_new_tail(
    body: &[u8],
    audio: Option<Span>,
    tail_at: u32,
    record: &JobRecord,
) -> Rendered {
    let keep = body.get(..tail_at as usize).unwrap_or(body);
    let mut out = Vec::with_capacity(keep.len() + 128);
    out.extend_from_slice(keep);
    let tail_at = offset(out.len());
    push_tail(&mut out, record);
    Rendered {
        body: out,
        audio,
        tail_at,
    }
}

fn push_json(out: &mut Vec<u8>, value: &impl Serialize) {
    // Serializing plain data into a Vec cannot fail; "null" keeps the JSON valid if it ever did.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &impl Serialize) {
    out.push(b',');
    push_json(out, &name);
    out.push(b':');
    push_json(out, value);
}

/// The job as a poll shows it. A finished job's body carries everything,
/// audio included, so a poll serves it as stored.
pub fn render(record: &JobRecord, completion: Option<&Completion>) -> Rendered {
    let mut out = Vec::with_capacity(256 + completion.map_or(0, |c| c.audio.len() / 3 * 4 + 4));
    out.extend_from_slice(b"{\"id\":");
    push_json(&mut out, &record.id);
    push_field(&mut out, "status", &record.status.name());
    push_field(&mut out, "created_at", &rfc3339(record.created_at_ms));
    if !record.status.is_finished() {
        if let Some(plan) = &record.parts {
            let progress =
                serde_json::json!({"chunks_done": plan.done.len(), "chunks_total": plan.total});
            push_field(&mut out, "progress", &progress);
        }
        let tail_at = offset(out.len());
        push_tail(&mut out, record);
        return Rendered {
            body: out,
            audio: None,
            tail_at,
        };
    }
    if let Some(done) = record.completed_at_ms {
        push_field(&mut out, "completed_at", &rfc3339(done));
    }
    if let Some(at) = record.expires_at_ms() {
        push_field(&mut out, "expires_at", &rfc3339(at));
    }
    if let Some(code) = record.status_code {
        push_field(&mut out, "status_code", &code);
    }
    let mut audio = None;
    match (&record.result, completion) {
        (Some(meta), Some(c)) => {
            out.extend_from_slice(b",\"result\":");
            let (at, len) = push_result(&mut out, meta, c);
            audio = Some(Span {
                at: offset(at),
                len: offset(len),
            });
        }
        _ => out.extend_from_slice(b",\"result\":null"),
    }
    match &record.error {
        Some(e) => push_field(&mut out, "error", e),
        None => out.extend_from_slice(b",\"error\":null"),
    }
    let tail_at = offset(out.len());
    push_tail(&mut out, record);
    Rendered {
        body: out,
        audio,
        tail_at,
    }
}

/// A completed job's `result` object; returns where its base64 audio sits in `out`.
pub fn push_result(out: &mut Vec<u8>, meta: &ResultMeta, c: &Completion) -> (usize, usize) {
    out.extend_from_slice(b"{\"audio\":\"");
    let start = out.len();
    let len = append_base64(out, &c.audio);
    out.push(b'"');
    push_field(out, "response_format", &meta.response_format.name());
    push_field(out, "content_type", &meta.response_format.content_type());
    if let Some(a) = &c.alignment {
        push_field(out, "alignment", a);
    }
    if let Some(a) = &c.normalized_alignment {
        push_field(out, "normalized_alignment", a);
    }
    push_field(out, "extra_fields", &meta.extra_fields);
    out.push(b'}');
    (start, len)
}

/// Appends the standard base64 of `bytes`; returns how many bytes it wrote.
fn append_base64(out: &mut Vec<u8>, bytes: &[u8]) -> usize {
    let engine = &base64::engine::general_purpose::STANDARD;
    let len = base64::encoded_len(bytes.len(), true).unwrap_or(0);
    let start = out.len();
    out.resize(start + len, 0);
    match out
        .get_mut(start..)
        .map(|tail| engine.encode_slice(bytes, tail))
    {
        Some(Ok(written)) => {
            out.truncate(start + written);
            written
        }
        _ => {
            out.truncate(start);
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: usize) -> SpeechRequest {
        let names: Vec<(String, String)> =
            (0..n).map(|i| (format!("p{i}"), format!("m{i}"))).collect();
        let chain: Vec<(&str, &str)> = names
            .iter()
            .map(|(p, m)| (p.as_str(), m.as_str()))
            .collect();
        crate::speech::sample_request(&chain)
    }

    fn job(n: usize) -> JobRecord {
        JobRecord::new("id-1".into(), "team".into(), 1_000, 60, 300, request(n))
    }

    fn json(r: &Rendered) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn happy_path_renders_once_with_the_audio_in_place() {
        let mut j = job(1);
        assert_eq!(
            json(&render(&j, None)),
            serde_json::json!({"id":"id-1","status":"pending","created_at":"1970-01-01T00:00:01.000Z"})
        );
        j.status = JobStatus::Processing;
        j.claim = Some(Claim {
            by: 1,
            until_ms: 7_000,
        });
        assert!(j.is_running(0));
        assert!(j.is_claimed(6_999));
        assert!(!j.is_claimed(7_000));
        assert_eq!(j.next_timer_ms(), 7_000);
        j.claim = None;
        let mut extra = ExtraFields::speech("p0", "m0");
        extra.latency = Some(12);
        let meta = ResultMeta {
            response_format: AudioFormat::Wav,
            extra_fields: extra,
        };
        j.complete(3_000, meta.clone());
        assert!(j.request.is_none(), "the request is dropped once done");
        let done = Completion {
            meta,
            audio: vec![0xff, 0, 1],
            alignment: None,
            normalized_alignment: None,
        };
        let r = render(&j, Some(&done));
        let Span { at, len } = r.audio.unwrap();
        assert_eq!(&r.body[at as usize..(at + len) as usize], b"/wAB");
        let v = json(&r);
        assert_eq!(v["status"], "completed");
        assert_eq!(v["status_code"], 200);
        assert_eq!(v["completed_at"], "1970-01-01T00:00:03.000Z");
        assert_eq!(v["expires_at"], "1970-01-01T00:01:03.000Z");
        assert_eq!(v["result"]["audio"], "/wAB");
        assert_eq!(v["result"]["content_type"], "audio/wav");
        assert_eq!(
            v["result"]["extra_fields"],
            serde_json::json!({"provider":"p0","model_requested":"m0","request_type":"speech","latency":12})
        );
        assert_eq!(v["error"], Value::Null);
        assert_eq!(j.next_timer_ms(), 63_000);
        assert!(!j.is_expired(62_999));
        assert!(j.is_expired(63_000));
    }

    #[test]
    fn fallbacks_then_failure_lists_every_attempt() {
        let mut j = job(2);
        j.status = JobStatus::Processing;
        assert_eq!(
            j.record_failure(1_500, ApiError::upstream(504, "timed out")),
            NextStep::TryNext
        );
        assert!(j.is_running(1));
        assert!(
            !j.is_running(0),
            "a late answer to the first attempt is stale"
        );
        let last = ApiError::provider(429, None, None, "slow down".into(), None);
        assert_eq!(j.record_failure(2_000, last), NextStep::Failed);
        let v = json(&render(&j, None));
        assert_eq!(v["status"], "failed");
        assert_eq!(v["status_code"], 429);
        assert_eq!(v["result"], Value::Null);
        assert_eq!(v["error"]["error"]["message"], "slow down");
        assert_eq!(v["error"]["extra_fields"]["provider"], "p1");
        assert_eq!(v["error"]["extra_fields"]["model_requested"], "m1");
        assert_eq!(
            v["error"]["extra_fields"]["attempts"],
            serde_json::json!([{"provider":"p0","model":"m0","status_code":504},{"provider":"p1","model":"m1","status_code":429}])
        );
    }

    #[test]
    fn a_deadline_failure_names_the_last_attempt_not_an_untried_fallback() {
        let mut j = job(3);
        j.status = JobStatus::Processing;
        j.fail_past_deadline(301_000, 300);
        let e = j.error.clone().unwrap();
        assert_eq!(e.status_code, 504);
        assert!(e.error.message.contains("deadline of 300 s"));
        let extra = e.extra_fields.unwrap();
        assert_eq!(
            extra.provider.as_deref(),
            Some("p0"),
            "p1 and p2 were never tried"
        );
        // A pending job that never got an attempt names its primary.
        let mut k = job(3);
        k.fail_past_deadline(301_000, 300);
        assert_eq!(
            k.error.unwrap().extra_fields.unwrap().provider.as_deref(),
            Some("p0")
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
        j.status = JobStatus::Processing;
        j.record_failure(2, ApiError::upstream(502, "down"));
        let back: JobRecord = serde_json::from_slice(&serde_json::to_vec(&j).unwrap()).unwrap();
        assert_eq!(back, j);
    }
}
