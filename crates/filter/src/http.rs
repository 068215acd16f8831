//! The per-request context: hands the request to the API core and sends what
//! it decides. A submit's body (and trailers) is held here until complete, so
//! nothing of an intercepted request ever goes upstream.

use log::{error, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::envoy::{all_headers, callout_answer};
use crate::root::Shared;
use async_speech_core::api::routes::{route, Route};
use async_speech_core::api::{Answer, Api, Decision, Paused, PendingSubmit, RequestHead};
use async_speech_core::auth::ClaimValue;
use async_speech_core::engine::Report;
use async_speech_core::error::ApiError;
use async_speech_core::platform::Host;

enum State {
    /// Not ours: everything passes.
    PassThrough,
    /// Ours and answered (or being answered): nothing more goes upstream.
    Answered,
    /// A submit whose body is being buffered.
    Reading(PendingSubmit),
    /// Waiting on the store's (etcd's) answer to this callout.
    Waiting {
        token: u32,
        paused: Paused,
        started_ms: u64,
    },
}

pub struct SpeechHttp {
    shared: Option<Shared>,
    state: State,
}

impl SpeechHttp {
    pub fn new(shared: Option<Shared>) -> Self {
        SpeechHttp {
            shared,
            state: State::PassThrough,
        }
    }

    fn api<'a>(shared: &'a Shared) -> Api<'a> {
        Api {
            host: shared.host.as_ref(),
            config: &shared.config,
            keys: &shared.keys,
            generation: shared.generation,
            now_ms: shared.clock.now_ms(shared.host.as_ref()),
        }
    }

    fn send(&mut self, answer: Answer) -> Action {
        self.state = State::Answered;
        if let (Some(shared), Some(report)) = (&self.shared, answer.event.clone()) {
            shared.stats.write(vec![report]);
        }
        let headers: Vec<(&str, &str)> = answer
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        if let Err(e) =
            hostcalls::send_http_response(u32::from(answer.status), headers, Some(&answer.body))
        {
            error!("cannot send the {} answer: {e:?}", answer.status);
        }
        Action::Pause
    }

    /// The whole submit body is here (at its end of stream or its trailers).
    fn submit(&mut self, body_size: usize) -> Action {
        let (Some(shared), State::Reading(pending)) = (self.shared.clone(), &self.state) else {
            return Action::Pause;
        };
        let pending = pending.clone();
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let decision = Self::api(&shared).on_submit_body(&pending, &body);
        self.decide(&shared, decision)
    }

    fn decide(&mut self, shared: &Shared, decision: Decision) -> Action {
        match decision {
            Decision::PassThrough => Action::Continue,
            Decision::Respond(answer) => self.send(answer),
            Decision::ReadBody(pending) => {
                self.state = State::Reading(pending);
                Action::Pause
            }
            // Waits the client shares (an etcd read for a poll): a callout from this context.
            Decision::Call(call) => match shared.host.dispatch(&call.callout) {
                Ok(token) => {
                    let started_ms = shared.clock.now_ms(shared.host.as_ref());
                    self.state = State::Waiting {
                        token,
                        paused: call.paused,
                        started_ms,
                    };
                    Action::Pause
                }
                Err(e) => {
                    warn!("cannot call the job store: {e}");
                    self.send(Answer::error(&ApiError::unavailable(
                        "job store unavailable",
                    )))
                }
            },
        }
    }
}

impl Context for SpeechHttp {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let (
            Some(shared),
            State::Waiting {
                token,
                paused,
                started_ms,
            },
        ) = (self.shared.clone(), &self.state)
        else {
            return;
        };
        if *token != token_id {
            return;
        }
        let (paused, started_ms) = (paused.clone(), *started_ms);
        self.state = State::Answered;
        // The store's answer in full (a job with its audio can be large).
        let read = callout_answer(num_headers, body_size, usize::MAX);
        let answer = read.status.map(|status| (status, read.body));
        let latency = shared
            .clock
            .now_ms(shared.host.as_ref())
            .saturating_sub(started_ms);
        let ok = answer.as_ref().is_some_and(|(s, _)| (200..300).contains(s));
        shared.stats.write(vec![Report::StoreCall {
            op: "api",
            ok,
            latency_ms: latency,
        }]);
        let decision = Self::api(&shared).on_store_answer(paused, answer);
        self.decide(&shared, decision);
    }
}

impl HttpContext for SpeechHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Every header in one host call (names come lower-case from Envoy);
        // other traffic passes at the cost of that one read.
        let headers = all_headers(MapType::HttpRequestHeaders);
        let read = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.as_slice() == name.as_bytes())
                .map(|(_, v)| v.clone())
        };
        if route(&read(":path").unwrap_or_default()) == Route::PassThrough {
            return Action::Continue;
        }
        let Some(shared) = self.shared.clone() else {
            return self.send(Answer::error(&ApiError::internal(
                "the async speech filter has no configuration",
            )));
        };
        // The whole dynamic metadata, typed (see ClaimValue::from_metadata).
        let claim = shared.config.jwt_owner.as_ref().and_then(|j| {
            let metadata = hostcalls::get_property(vec!["metadata"]).ok().flatten()?;
            ClaimValue::from_metadata(&metadata, j)
        });
        let head = RequestHead {
            header: &read,
            jwt_claim: claim,
        };
        let decision = Self::api(&shared).on_headers(&head, end_of_stream);
        self.decide(&shared, decision)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &self.state {
            State::PassThrough => Action::Continue,
            State::Answered | State::Waiting { .. } => Action::Pause,
            State::Reading(_) => {
                let limit = self.shared.as_ref().map_or(0, |s| s.config.max_body_bytes);
                if body_size > limit {
                    return self.send(Answer::error(&ApiError::payload_too_large(limit)));
                }
                if end_of_stream {
                    self.submit(body_size)
                } else {
                    Action::Pause
                }
            }
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match &self.state {
            State::PassThrough => Action::Continue,
            State::Answered | State::Waiting { .. } => Action::Pause,
            State::Reading(_) => {
                // Trailers end the stream: the body is complete.
                let size = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)
                    .ok()
                    .flatten()
                    .map_or(0, |b| b.len());
                warn!("a submit ended with trailers; treated as the end of its body");
                self.submit(size)
            }
        }
    }
}
