//! The HTTP API: which route a request is for, who sends it, what its key
//! may do, and the answer. Pure over `Host`: the host's HTTP context hands
//! it headers and the body and sends back what it decides.

mod answers;
pub mod routes;

use crate::auth::authenticate;
use crate::config::Config;
use crate::engine::report::Who;
use crate::engine::Report;
use crate::error::ApiError;
use crate::governance::{self, refusal_error, KeyState, Rules};
use crate::ids::make_id;
use crate::job::{JobRecord, WebhookJob};
use crate::platform::Host;
use crate::request::{is_json_content_type, parse_speech_request, parse_ttl, TTL_HEADER};
use crate::speech::SpeechRequest;
use crate::store::etcd::StoreConfig;
use crate::store::jobs::{Done, Jobs, Step, Wait};
use crate::store::shared::slot::{self, SlotView};
use crate::store::{Keys, StoreError};
use crate::webhooks::{endpoint_for_submit, WEBHOOK_HEADER};
use answers::{content_answer, poll_answer, refused, submitted, SubmitFacts};
use routes::{route, Route};

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
    pub paused: Paused,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Paused {
    intent: Intent,
    wait: Wait,
}

/// What the request asks for.
#[derive(Debug, Clone, PartialEq)]
enum Intent {
    Submit(Box<SubmitFacts>),
    Poll,
    Content,
    Delete { id: String },
    Usage { owner: String },
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
            // A refusal after authentication counts against the owner's key.
            Err((e, owner)) => {
                Decision::Respond(refused(&route, &e, &Who::of(self.config, &owner, "")))
            }
        }
    }

    /// The rules of the owner's virtual key, if it has one.
    fn rules(&self, owner: &str) -> Option<&Rules> {
        let name = owner.strip_prefix("vk:")?;
        self.config.key(name).map(|k| &k.rules)
    }

    /// The decision, or the refusal with its owner ("" before authentication).
    fn route(
        &self,
        route: &Route,
        head: &RequestHead,
        end_of_stream: bool,
    ) -> Result<Decision, (ApiError, String)> {
        let method = (head.header)(":method").unwrap_or_default();
        let method = String::from_utf8_lossy(&method);
        let owner = check_method(route, &method)
            .and_then(|()| authenticate(self.config, head.header, head.jwt_claim.as_ref()))
            .map_err(|e| (e, String::new()))?;
        self.route_owned(route, head, end_of_stream, &method, owner.clone())
            .map_err(|e| (e, owner))
    }

    fn route_owned(
        &self,
        route: &Route,
        head: &RequestHead,
        end_of_stream: bool,
        method: &str,
        owner: String,
    ) -> Result<Decision, ApiError> {
        if self
            .rules(&owner)
            .is_some_and(|r| r.is_expired(self.now_ms))
        {
            return Err(ApiError::forbidden(
                "virtual_key_blocked",
                "the virtual key has expired",
                None,
            ));
        }
        let jobs = self.jobs();
        Ok(match route {
            Route::Submit => {
                let pending = self.submit_headers(head, owner)?;
                if !end_of_stream {
                    return Ok(Decision::ReadBody(pending));
                }
                self.on_submit_body(&pending, &[])
            }
            Route::Job(id) if method == "DELETE" => self.follow(
                jobs.delete(id, owner.as_bytes()),
                Intent::Delete { id: id.clone() },
            ),
            Route::Job(id) => self.follow(jobs.read(id, owner.as_bytes()), Intent::Poll),
            Route::Content(id) => self.follow(jobs.read(id, owner.as_bytes()), Intent::Content),
            Route::Usage if owner.starts_with("vk:") => {
                self.follow(jobs.usage(&owner), Intent::Usage { owner })
            }
            // An owner without a virtual key has no limits, and no usage of its own.
            Route::Usage => Decision::Respond(Answer::json(
                200,
                br#"{"virtual_key":null,"limits":{}}"#.to_vec(),
            )),
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

    /// The submit's body has arrived: one parse, the key's checks, one write
    /// of the job with its counters, one enqueue.
    pub fn on_submit_body(&self, pending: &PendingSubmit, body: &[u8]) -> Decision {
        match self.submit(pending, body) {
            Ok(decision) => decision,
            Err((e, model)) => {
                let who = Who::of(self.config, &pending.owner, &model);
                Decision::Respond(refused(&Route::Submit, &e, &who))
            }
        }
    }

    /// Every model of the chain must be one the key may use.
    fn check_models(&self, owner: &str, request: &SpeechRequest) -> Result<(), ApiError> {
        let Some(rules) = self.rules(owner) else {
            return Ok(());
        };
        for (i, m) in request.chain.iter().enumerate() {
            let model = format!("{}/{}", m.provider, m.model);
            if !rules.allows(&model) {
                let param = match i {
                    0 => "model".to_string(),
                    n => format!("fallbacks[{}]", n - 1),
                };
                return Err(ApiError::forbidden(
                    "model_blocked",
                    format!("the virtual key may not use {model}"),
                    Some(&param),
                ));
            }
        }
        Ok(())
    }

    /// A submit's body: the decision, or the refusal and the model it named.
    fn submit(&self, pending: &PendingSubmit, body: &[u8]) -> Result<Decision, (ApiError, String)> {
        let no_model = |e| (e, String::new());
        if body.len() > self.config.max_body_bytes {
            return Err(no_model(ApiError::payload_too_large(
                self.config.max_body_bytes,
            )));
        }
        let request = parse_speech_request(body, self.config).map_err(no_model)?;
        let model = request
            .chain
            .first()
            .map(|m| format!("{}/{}", m.provider, m.model))
            .unwrap_or_default();
        let with_model = |e| (e, model.clone());
        self.check_models(&pending.owner, &request)
            .map_err(with_model)?;
        let mut random = [0u8; 16];
        self.host
            .random(&mut random)
            .map_err(|e| with_model(ApiError::internal(format!("no secure random source: {e}"))))?;
        let chars = u64::try_from(request.input.chars().count()).unwrap_or(u64::MAX);
        let facts = SubmitFacts {
            who: Who::of(self.config, &pending.owner, &model),
            chars,
            model: model.clone(),
            fallbacks: request.chain.len().saturating_sub(1),
            ttl_s: pending.ttl_s,
            limits: self
                .rules(&pending.owner)
                .map(|r| r.limits.clone())
                .unwrap_or_default(),
            local: self.config.store == StoreConfig::SharedData,
        };
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
        let step = self.jobs().insert(&make, &pending.owner, chars);
        Ok(self.follow(step, Intent::Submit(Box::new(facts))))
    }

    fn jobs(&self) -> Jobs<'_> {
        Jobs {
            host: self.host,
            keys: self.keys,
            config: self.config,
            generation: self.generation,
            now_ms: self.now_ms,
        }
    }

    /// Goes on with a request once the store's call has been answered.
    pub fn on_store_answer(
        &self,
        paused: Paused,
        answer: crate::store::work::StoreAnswer,
    ) -> Decision {
        self.follow(self.jobs().resume(paused.wait, answer), paused.intent)
    }

    /// The store's next step: a call to make, or the answer.
    fn follow(&self, step: Step, intent: Intent) -> Decision {
        match step {
            Step::Call(callout, wait) => Decision::Call(Box::new(StoreCall {
                callout,
                paused: Paused { intent, wait },
            })),
            Step::Done(done) => Decision::Respond(self.answer(intent, done)),
        }
    }

    fn answer(&self, intent: Intent, done: Result<Done, StoreError>) -> Answer {
        let done = match (done, &intent) {
            (Ok(done), _) => done,
            (Err(e), Intent::Submit(facts)) => return self.submit_refused(e, facts),
            (Err(e), _) => {
                return refused(
                    &Route::Unknown,
                    &self.store_error(e),
                    &Who::of(self.config, "", ""),
                )
            }
        };
        let found = match (intent, done) {
            (Intent::Submit(facts), Done::Inserted(record, state)) => {
                Ok(submitted(&record, &facts).with_ratelimit(&facts.limits, &state, self.now_ms))
            }
            (Intent::Poll, Done::Read(Some(bytes))) => match slot::decode(&bytes) {
                SlotView::Held(view) => Ok(poll_answer(&view)),
                _ => Err(ApiError::job_not_found()),
            },
            (Intent::Content, Done::Read(Some(bytes))) => match slot::decode(&bytes) {
                SlotView::Held(view) => content_answer(&view),
                _ => Err(ApiError::job_not_found()),
            },
            (Intent::Delete { id }, Done::Deleted(Some(record))) => Ok(Answer {
                status: 204,
                headers: vec![],
                body: vec![],
                event: Some(Report::Deleted {
                    id,
                    local: self.config.store == StoreConfig::SharedData,
                    who: Who::of(self.config, &record.owner, &record.first_model()),
                    // A job that made no audio gives its characters back (a
                    // failed one did when it failed).
                    returned: if record.status.is_finished() {
                        0
                    } else {
                        record.chars
                    },
                }),
            }),
            (Intent::Usage { owner }, Done::Usage(state, held, running)) => {
                Ok(self.usage(&owner, &state, held, running))
            }
            // Unknown, expired, someone else's, or freed by someone else since it was read.
            _ => Err(ApiError::job_not_found()),
        };
        found.unwrap_or_else(|e| refused(&Route::Unknown, &e, &Who::of(self.config, "", "")))
    }

    /// A submit the store refused: a key's limit, a full store, or a store
    /// away; with the RateLimit fields of a key with window limits.
    fn submit_refused(&self, e: StoreError, facts: &SubmitFacts) -> Answer {
        let state = match &e {
            StoreError::Refused(_, state) | StoreError::Full(Some(state)) => {
                Some(state.as_ref().clone())
            }
            _ => None,
        };
        let error = match e {
            StoreError::Refused(refusal, _) => {
                refusal_error(refusal, &facts.limits, self.now_ms / 1000)
            }
            other => self.store_error(other),
        };
        let answer = refused(&Route::Submit, &error, &facts.who);
        match state {
            Some(state) => answer.with_ratelimit(&facts.limits, &state, self.now_ms),
            None => answer,
        }
    }

    fn usage(&self, owner: &str, state: &KeyState, held: u32, running: u32) -> Answer {
        let name = owner.strip_prefix("vk:").unwrap_or(owner);
        let default = Rules::default();
        let rules = self.rules(owner).unwrap_or(&default);
        let body = governance::usage(name, rules, state, held, running, self.now_ms);
        Answer::json(200, serde_json::to_vec(&body).unwrap_or_default())
    }

    fn store_error(&self, e: StoreError) -> ApiError {
        match e {
            StoreError::Full(_) => ApiError::store_full(self.config.max_jobs),
            StoreError::TooLarge => ApiError::payload_too_large(self.config.max_body_bytes),
            StoreError::Busy(_) => ApiError::unavailable("job store unavailable"),
            // Only a submit is refused by a key's limits; answered above.
            StoreError::Refused(..) => ApiError::unavailable("job store unavailable"),
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
