//! The API over the etcd store (SPEC §4): submit, poll, `/content` and DELETE
//! wait on etcd, from the request's own context, and answer only once etcd
//! has: a 202 means the job is stored. An etcd that does not answer within
//! the store's `timeout_ms` (or answers an error) is a 503 `job store
//! unavailable` with `Retry-After`.

use super::{check_owned, content_answer, poll_answer, refused, Answer, Api, Decision, Event};
use crate::api::routes::Route;
use crate::error::ApiError;
use crate::job::{render, JobRecord};
use crate::platform::Callout;
use crate::store::etcd::jobs::{self, decode_job};
use crate::store::etcd::response::{check_status, parse_range, parse_txn};
use crate::store::etcd::{request as req, EtcdConfig, StoreAnswer, StoreConfig};
use crate::store::slot::{self, SlotView};

/// What a read of a job is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Poll,
    Content,
    Delete,
}

impl Want {
    /// The read a route needs; `None` for a submit.
    pub fn of(route: &Route, method: &str) -> Option<Want> {
        match route {
            Route::Job(_) if method == "DELETE" => Some(Want::Delete),
            Route::Job(_) => Some(Want::Poll),
            Route::Content(_) => Some(Want::Content),
            Route::Submit | Route::PassThrough | Route::Unknown => None,
        }
    }
}

/// A call to etcd the request waits on, and what to do with its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreCall {
    pub callout: Callout,
    pub then: Then,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Then {
    /// The submit was stored: answer this 202.
    Submitted(Box<Answer>),
    /// The job's record was read.
    Read {
        id: String,
        owner: String,
        want: Want,
    },
    /// A large job's parts were read.
    ReadParts {
        id: String,
        owner: String,
        want: Want,
        parts: u32,
    },
    /// The job was deleted (if it was still as read).
    Deleted { id: String },
}

fn unavailable() -> ApiError {
    ApiError::unavailable("job store unavailable")
}

fn call(etcd: &EtcdConfig, request: &req::Request, then: Then) -> Decision {
    Decision::Call(Box::new(StoreCall {
        callout: etcd.callout(request),
        then,
    }))
}

impl Api<'_> {
    pub(super) fn etcd(&self) -> Option<&EtcdConfig> {
        match &self.config.store {
            StoreConfig::Etcd(etcd) => Some(etcd),
            StoreConfig::SharedData => None,
        }
    }

    pub(super) fn etcd_read(
        &self,
        etcd: &EtcdConfig,
        id: &str,
        owner: String,
        want: Want,
    ) -> Decision {
        let then = Then::Read {
            id: id.to_string(),
            owner,
            want,
        };
        call(etcd, &req::range(&etcd.layout().job(id)), then)
    }

    /// Stores a new job: its record and its entry in the pending index, in one
    /// transaction.
    pub(super) fn etcd_submit(
        &self,
        etcd: &EtcdConfig,
        record: &JobRecord,
        answer: Answer,
    ) -> Result<Decision, ApiError> {
        let payload = slot::encode_held(0, record, &render(record, None))
            .ok_or_else(|| ApiError::internal("the job record does not fit"))?;
        let (value, parts) =
            jobs::encode_job(&payload, record.owner.as_bytes(), 0, etcd.part_bytes());
        if !parts.is_empty() {
            return Err(ApiError::payload_too_large(etcd.part_bytes()));
        }
        let deadline = record.deadline_ms;
        Ok(call(
            etcd,
            &jobs::submit(&etcd.layout(), &record.id, &value, deadline),
            Then::Submitted(Box::new(answer)),
        ))
    }

    /// Goes on with a request once etcd has answered.
    pub fn on_store_answer(&self, then: Then, answer: StoreAnswer) -> Decision {
        let Some(etcd) = self.etcd() else {
            return Decision::Respond(Answer::error(&unavailable()));
        };
        let body = match answer
            .as_ref()
            .map(|(status, body)| check_status(*status, body))
        {
            Some(Ok(body)) => body,
            _ => return self.store_failed(&then),
        };
        match self.continue_with(etcd, then.clone(), body) {
            Ok(decision) => decision,
            Err(e) if e.status_code == 503 => self.store_failed(&then),
            Err(e) => Decision::Respond(Answer::error(&e)),
        }
    }

    fn store_failed(&self, then: &Then) -> Decision {
        let route = if matches!(then, Then::Submitted(_)) {
            Route::Submit
        } else {
            Route::Unknown
        };
        Decision::Respond(refused(&route, &unavailable()))
    }

    fn continue_with(
        &self,
        etcd: &EtcdConfig,
        then: Then,
        body: &[u8],
    ) -> Result<Decision, ApiError> {
        let layout = etcd.layout();
        match then {
            Then::Submitted(answer) => {
                let txn = parse_txn(body).map_err(|_| unavailable())?;
                if !txn.succeeded {
                    return Err(unavailable());
                }
                Ok(Decision::Respond(*answer))
            }
            Then::Read { id, owner, want } => {
                let range = parse_range(body).map_err(|_| unavailable())?;
                let kv = range.kvs.first().ok_or_else(ApiError::job_not_found)?;
                let job = decode_job(&kv.value).ok_or_else(ApiError::job_not_found)?;
                if job.owner != owner.as_bytes() || job.is_expired(self.now_ms) {
                    return Err(ApiError::job_not_found());
                }
                match (want, job.whole) {
                    (Want::Delete, _) => Ok(call(
                        etcd,
                        &jobs::delete(&layout, &id, kv.mod_revision),
                        Then::Deleted { id },
                    )),
                    (_, Some(payload)) => self.answer(payload, &owner, want),
                    (_, None) => {
                        let then = Then::ReadParts {
                            id: id.clone(),
                            owner,
                            want,
                            parts: job.parts,
                        };
                        Ok(call(etcd, &req::range_prefix(&layout.audio(&id), 0), then))
                    }
                }
            }
            Then::ReadParts {
                id,
                owner,
                want,
                parts,
            } => {
                let range = parse_range(body).map_err(|_| unavailable())?;
                let payload = layout
                    .join_audio(&id, &range.kvs, parts)
                    .map_err(|_| ApiError::job_not_found())?;
                self.answer(&payload, &owner, want)
            }
            Then::Deleted { id } => {
                let txn = parse_txn(body).map_err(|_| unavailable())?;
                if !txn.succeeded {
                    // Changed or gone since it was read (it finished, or expired).
                    return Err(ApiError::job_not_found());
                }
                Ok(Decision::Respond(Answer {
                    status: 204,
                    headers: vec![],
                    body: vec![],
                    event: Event::Deleted { id },
                }))
            }
        }
    }

    fn answer(&self, payload: &[u8], owner: &str, want: Want) -> Result<Decision, ApiError> {
        let SlotView::Held(view) = slot::decode(payload) else {
            return Err(ApiError::job_not_found());
        };
        check_owned(&view, owner, self.now_ms)?;
        let answer = match want {
            Want::Content => content_answer(&view)?,
            Want::Poll | Want::Delete => poll_answer(&view),
        };
        Ok(Decision::Respond(answer))
    }
}
