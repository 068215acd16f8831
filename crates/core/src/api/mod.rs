//! The HTTP API of SPEC §1: which route a request is for, who sends it, and
//! the answer. Pure over `Host`: the host's HTTP context hands it headers and
//! the body and sends back what it decides.

pub mod routes;

use serde_json::json;

use crate::auth::authenticate;
use crate::config::Config;
use crate::engine::Report;
use crate::error::ApiError;
use crate::ids::make_id;
use crate::job::{JobRecord, JobStatus, WebhookJob};
use crate::platform::Host;
use crate::request::{is_json_content_type, parse_speech_request, parse_ttl, TTL_HEADER};
use crate::store::etcd::StoreConfig;
use crate::store::jobs::{Done, Jobs, Step, Wait};
use crate::store::shared::slot::{self, HeldView, SlotView};
use crate::store::{Keys, StoreError};
use crate::time::rfc3339;
use crate::webhooks::{endpoint_for_submit, WEBHOOK_HEADER};
use routes::{route, Route, BASE};

/// An answer to send to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// What happened, for stats and logs.
    pub event: Option<Report>,
}

impl Answer {
    fn json(status: u16, body: Vec<u8>) -> Answer {
        Answer {
            status,
            headers: vec![("content-type", "application/json".into())],
            body,
            event: None,
        }
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Answer {
        self.headers.push((name, value.into()));
        self
    }

    pub fn error(e: &ApiError) -> Answer {
        let answer = Answer::json(e.status_code, e.to_json());
        match e.retry_after_s {
            Some(s) => answer.with("retry-after", s.to_string()),
            None => answer,
        }
    }
}

/// A submit whose body is still to come.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingSubmit {
    pub owner: String,
    pub ttl_s: u64,
    /// The webhook endpoint asked for (`x-bf-async-webhook`), checked.
    pub webhook: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not ours: the rest of the filter chain handles it.
    PassThrough,
    Respond(Answer),
    /// A submit: buffer the body, then call `on_submit_body`.
    ReadBody(PendingSubmit),
    /// Make this call for the store, then call `on_store_answer` with its answer.
    Call(Box<StoreCall>),
}

/// A call the store needs before the request can be answered, and where the
/// request stands meanwhile.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreCall {
    pub callout: crate::platform::Callout,
    pub then: Then,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Then {
    op: Op,
    wait: Wait,
}

/// What the request is doing.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Submit {
        model: String,
        fallbacks: usize,
        ttl_s: u64,
    },
    Poll,
    Content,
    Delete {
        id: String,
    },
}

/// What a request shows the API: its headers by lower-case name (raw bytes,
/// as a client may send any), and the claim of a verified JWT if configured.
pub struct RequestHead<'a> {
    pub header: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    pub jwt_claim: Option<crate::auth::ClaimValue>,
}

/// Everything the API needs for one request.
pub struct Api<'a> {
    pub host: &'a dyn Host,
    pub config: &'a Config,
    pub keys: &'a Keys,
    pub generation: u32,
    pub now_ms: u64,
}

impl Api<'_> {
    /// Decides on a request from its headers alone (all but submit bodies).
    pub fn on_headers(&self, head: &RequestHead, end_of_stream: bool) -> Decision {
        let path = (head.header)(":path").unwrap_or_default();
        let route = route(&path);
        if route == Route::PassThrough {
            return Decision::PassThrough;
        }
        match self.route(&route, head, end_of_stream) {
            Ok(decision) => decision,
            Err(e) => Decision::Respond(refused(&route, &e)),
        }
    }

    fn route(
        &self,
        route: &Route,
        head: &RequestHead,
        end_of_stream: bool,
    ) -> Result<Decision, ApiError> {
        let method = (head.header)(":method").unwrap_or_default();
        let method = String::from_utf8_lossy(&method);
        check_method(route, &method)?;
        let owner = authenticate(self.config, head.header, head.jwt_claim.as_ref())?;
        Ok(match route {
            Route::Submit => {
                let pending = self.submit_headers(head, owner)?;
                if !end_of_stream {
                    return Ok(Decision::ReadBody(pending));
                }
                self.on_submit_body(&pending, &[])
            }
            Route::Job(id) if method == "DELETE" => self.follow(
                self.jobs().delete(id, owner.as_bytes()),
                Op::Delete { id: id.clone() },
            ),
            Route::Job(id) => self.follow(self.jobs().read(id, owner.as_bytes()), Op::Poll),
            Route::Content(id) => self.follow(self.jobs().read(id, owner.as_bytes()), Op::Content),
            Route::PassThrough | Route::Unknown => return Err(ApiError::job_not_found()),
        })
    }

    fn submit_headers(&self, head: &RequestHead, owner: String) -> Result<PendingSubmit, ApiError> {
        let ttl_s = parse_ttl((head.header)(TTL_HEADER).as_deref(), self.config)?;
        if !is_json_content_type((head.header)("content-type").as_deref()) {
            return Err(ApiError::unsupported_media_type());
        }
        let declared: Option<usize> = (head.header)("content-length")
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.trim().parse().ok());
        if declared.is_some_and(|n| n > self.config.max_body_bytes) {
            return Err(ApiError::payload_too_large(self.config.max_body_bytes));
        }
        let key_name = owner.strip_prefix("vk:");
        let webhook = endpoint_for_submit(
            &self.config.webhooks,
            (head.header)(WEBHOOK_HEADER).as_deref(),
            key_name,
        )
        .map_err(|message| ApiError::invalid(WEBHOOK_HEADER, message))?
        .map(|endpoint| endpoint.name.clone());
        Ok(PendingSubmit {
            owner,
            ttl_s,
            webhook,
        })
    }

    /// The submit's body has arrived: one parse, one write of the job, one enqueue.
    pub fn on_submit_body(&self, pending: &PendingSubmit, body: &[u8]) -> Decision {
        match self.submit(pending, body) {
            Ok(decision) => decision,
            Err(e) => Decision::Respond(refused(&Route::Submit, &e)),
        }
    }

    fn submit(&self, pending: &PendingSubmit, body: &[u8]) -> Result<Decision, ApiError> {
        if body.len() > self.config.max_body_bytes {
            return Err(ApiError::payload_too_large(self.config.max_body_bytes));
        }
        let request = parse_speech_request(body, self.config)?;
        let mut random = [0u8; 16];
        self.host
            .random(&mut random)
            .map_err(|e| ApiError::internal(format!("no secure random source: {e}")))?;
        let (model, fallbacks) = (
            request
                .chain
                .first()
                .map(|m| format!("{}/{}", m.provider, m.model))
                .unwrap_or_default(),
            request.chain.len().saturating_sub(1),
        );
        let make = |slot: u32| {
            let mut record = JobRecord::new(
                make_id(random, slot),
                pending.owner.clone(),
                self.now_ms,
                pending.ttl_s,
                self.config.job_deadline_s,
                request.clone(),
            );
            record.webhook = pending.webhook.as_ref().map(|endpoint| WebhookJob {
                endpoint: endpoint.clone(),
                delivery: None,
                body: None,
            });
            record
        };
        let op = Op::Submit {
            model,
            fallbacks,
            ttl_s: pending.ttl_s,
        };
        Ok(self.follow(self.jobs().insert(&make), op))
    }

    fn jobs(&self) -> Jobs<'_> {
        Jobs {
            host: self.host,
            keys: self.keys,
            store: &self.config.store,
            max_jobs: self.config.max_jobs,
            generation: self.generation,
            now_ms: self.now_ms,
        }
    }

    /// Goes on with a request once the store's call has been answered.
    pub fn on_store_answer(&self, then: Then, answer: crate::store::work::StoreAnswer) -> Decision {
        self.follow(self.jobs().resume(then.wait, answer), then.op)
    }

    /// The store's next step: a call to make, or the answer.
    fn follow(&self, step: Step, op: Op) -> Decision {
        match step {
            Step::Call(callout, wait) => Decision::Call(Box::new(StoreCall {
                callout,
                then: Then { op, wait },
            })),
            Step::Done(done) => {
                let route = if matches!(op, Op::Submit { .. }) {
                    Route::Submit
                } else {
                    Route::Unknown
                };
                match self.answer(op, done) {
                    Ok(answer) => Decision::Respond(answer),
                    Err(e) => Decision::Respond(refused(&route, &e)),
                }
            }
        }
    }

    fn answer(&self, op: Op, done: Result<Done, StoreError>) -> Result<Answer, ApiError> {
        match (op, done.map_err(|e| self.store_error(e))?) {
            (
                Op::Submit {
                    model,
                    fallbacks,
                    ttl_s,
                },
                Done::Inserted(record),
            ) => Ok(submitted(
                &record,
                model,
                fallbacks,
                ttl_s,
                self.config.store == StoreConfig::SharedData,
            )),
            (Op::Poll, Done::Read(Some(bytes))) => match slot::decode(&bytes) {
                SlotView::Held(view) => Ok(poll_answer(&view)),
                _ => Err(ApiError::job_not_found()),
            },
            (Op::Content, Done::Read(Some(bytes))) => match slot::decode(&bytes) {
                SlotView::Held(view) => content_answer(&view),
                _ => Err(ApiError::job_not_found()),
            },
            (Op::Delete { id }, Done::Deleted(true)) => Ok(Answer {
                status: 204,
                headers: vec![],
                body: vec![],
                event: Some(Report::Deleted {
                    id,
                    local: self.config.store == StoreConfig::SharedData,
                }),
            }),
            // Unknown, expired, someone else's, or freed by someone else since it was read.
            _ => Err(ApiError::job_not_found()),
        }
    }

    fn store_error(&self, e: StoreError) -> ApiError {
        match e {
            StoreError::Full => ApiError::store_full(self.config.max_jobs),
            StoreError::TooLarge => ApiError::payload_too_large(self.config.max_body_bytes),
            StoreError::Busy(_) => ApiError::unavailable("job store unavailable"),
        }
    }
}

/// The 202 of an accepted submit.
fn submitted(
    record: &JobRecord,
    model: String,
    fallbacks: usize,
    ttl_s: u64,
    local: bool,
) -> Answer {
    let body =
        json!({"id": record.id, "status": "pending", "created_at": rfc3339(record.created_at_ms)});
    let mut answer = Answer::json(202, serde_json::to_vec(&body).unwrap_or_default())
        .with("location", format!("{BASE}/{}", record.id))
        .with("retry-after", "1");
    answer.event = Some(Report::Submitted {
        id: record.id.clone(),
        model,
        fallbacks,
        ttl_s,
        local,
    });
    answer
}

/// A poll's answer: the bytes rendered when the job last changed.
fn poll_answer(view: &HeldView) -> Answer {
    let answer = Answer::json(view.status.poll_status(), view.body.to_vec());
    if view.status.is_finished() {
        answer
    } else {
        answer.with("retry-after", "1")
    }
}

/// `/content`: the audio itself, the job JSON while unfinished, or the error.
fn content_answer(view: &HeldView) -> Result<Answer, ApiError> {
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

fn check_method(route: &Route, method: &str) -> Result<(), ApiError> {
    let allowed = route.allowed();
    if allowed.contains(&method) {
        return Ok(());
    }
    if *route == Route::Unknown {
        return Err(ApiError::job_not_found());
    }
    Err(ApiError::method_not_allowed(method, &allowed.join(", ")))
}

/// The error answer; a refused submit carries its status for stats.
fn refused(route: &Route, e: &ApiError) -> Answer {
    let mut answer = Answer::error(e);
    if e.status_code == 405 {
        answer = answer.with("allow", route.allowed().join(", "));
    }
    if *route == Route::Submit {
        answer.event = Some(Report::Rejected {
            status: e.status_code,
            message: e.error.message.clone(),
            full: e.error.code.as_deref() == Some("store_full"),
        });
    }
    answer
}
