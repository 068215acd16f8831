//! The answers the API sends: a submit's 202, a poll's stored bytes, the
//! audio of `/content`, a key's usage, and errors (with the RateLimit fields
//! of a key with window limits, and `Allow` on a 405).

use serde_json::json;

use super::routes::{Route, BASE};
use super::Answer;
use crate::engine::report::Who;
use crate::engine::Report;
use crate::error::ApiError;
use crate::governance::{ratelimit_fields, KeyState, Limits};
use crate::job::{JobRecord, JobStatus};
use crate::store::shared::slot::HeldView;
use crate::time::rfc3339;

/// What a submit's answers say about the job for stats and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitFacts {
    pub model: String,
    pub fallbacks: usize,
    pub ttl_s: u64,
    pub limits: Limits,
    pub local: bool,
    pub who: Who,
    pub chars: u64,
}

impl Answer {
    /// Adds the RateLimit fields of a key with window limits.
    pub fn with_ratelimit(mut self, limits: &Limits, state: &KeyState, now_ms: u64) -> Answer {
        if let Some((policy, now)) = ratelimit_fields(limits, state, now_ms / 1000) {
            self.headers.push(("ratelimit-policy", policy));
            self.headers.push(("ratelimit", now));
        }
        self
    }
}

/// The 202 of an accepted submit.
pub fn submitted(record: &JobRecord, facts: &SubmitFacts) -> Answer {
    let body =
        json!({"id": record.id, "status": "pending", "created_at": rfc3339(record.created_at_ms)});
    let mut answer = Answer::json(202, serde_json::to_vec(&body).unwrap_or_default())
        .with("location", format!("{BASE}/{}", record.id))
        .with("retry-after", "1");
    answer.event = Some(Report::Submitted {
        id: record.id.clone(),
        model: facts.model.clone(),
        fallbacks: facts.fallbacks,
        ttl_s: facts.ttl_s,
        local: facts.local,
        who: facts.who.clone(),
        chars: facts.chars,
    });
    answer
}

/// A poll's answer: the bytes rendered when the job last changed.
pub fn poll_answer(view: &HeldView) -> Answer {
    let answer = Answer::json(view.status.poll_status(), view.body.to_vec());
    if view.status.is_finished() {
        answer
    } else {
        answer.with("retry-after", "1")
    }
}

/// `/content`: the audio itself, the job JSON while unfinished, or the error.
pub fn content_answer(view: &HeldView) -> Result<Answer, ApiError> {
    use base64::Engine;
    match view.status {
        JobStatus::Pending | JobStatus::Processing => {
            Ok(Answer::json(202, view.body.to_vec()).with("retry-after", "1"))
        }
        JobStatus::Failed => {
            let record = view
                .record()
                .ok_or_else(|| ApiError::internal("the job record is unreadable"))?;
            let error = record
                .error
                .unwrap_or_else(|| ApiError::internal("the job failed without an error"));
            Ok(Answer::error(&error))
        }
        JobStatus::Completed => {
            let record = view
                .record()
                .ok_or_else(|| ApiError::internal("the job record is unreadable"))?;
            let format = record
                .result
                .map(|m| m.response_format)
                .ok_or_else(|| ApiError::internal("the job has no result"))?;
            let audio = view
                .audio_base64()
                .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
                .ok_or_else(|| ApiError::internal("the job's audio is missing from the store"))?;
            Ok(Answer {
                status: 200,
                headers: vec![("content-type", format.content_type().into())],
                body: audio,
                event: None,
            })
        }
    }
}

/// The error answer; a refused submit carries its status for stats, and
/// whose it was (as far as known).
pub fn refused(route: &Route, e: &ApiError, who: &Who) -> Answer {
    let mut answer = Answer::error(e);
    if e.status_code == 405 {
        answer = answer.with("allow", route.allowed().join(", "));
    }
    if *route == Route::Submit {
        answer.event = Some(Report::Rejected {
            status: e.status_code,
            kind: e.error.kind.clone().unwrap_or_default(),
            message: e.error.message.clone(),
            full: e.error.code.as_deref() == Some("store_full"),
            who: who.clone(),
        });
    }
    answer
}
