//! The per-request context: reads the client's request, asks the core what to
//! answer, and sends it. Submitted jobs are handed to the workers by queue.

use std::cell::Cell;
use std::rc::Rc;

use log::{error, info};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use serde_json::json;

use super::metrics::SharedMetrics;
use super::shared::EnvoySharedData;
use super::now_ms;
use crate::auth::{authenticate, ClaimValue};
use crate::config::Config;
use crate::error::ApiError;
use crate::ids::make_id;
use crate::job::{JobRecord, JobStatus};
use crate::request::{is_json_content_type, parse_speech_request, parse_ttl, TTL_HEADER};
use crate::routes::{route, Route, BASE};
use crate::store::{Store, StoreError};
use crate::time::rfc3339;

enum State {
    /// Not an API request, or already answered.
    Idle,
    /// A submit whose body is being buffered.
    Submit { owner: String, ttl_s: u64 },
}

pub struct SpeechHttp {
    config: Option<Rc<Config>>,
    queue: Rc<Cell<Option<u32>>>,
    cursor: Rc<Cell<u32>>,
    metrics: SharedMetrics,
    state: State,
}

fn header(name: &str) -> Option<Vec<u8>> {
    // The bytes variant: a client may send a header that is not UTF-8.
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

fn respond(status: u16, headers: &[(&str, &str)], body: &[u8]) {
    if let Err(e) = hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body)) {
        error!("cannot send the {status} answer: {e:?}");
    }
}

fn respond_json(status: u16, extra: &[(&str, &str)], body: &[u8]) {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    respond(status, &headers, body);
}

fn respond_error(e: &ApiError) {
    let retry = e.retry_after_s.map(|s| s.to_string());
    let mut extra = Vec::new();
    if let Some(r) = &retry {
        extra.push(("retry-after", r.as_str()));
    }
    respond_json(e.status_code, &extra, &e.to_json());
}

impl SpeechHttp {
    pub fn new(
        config: Option<Rc<Config>>,
        queue: Rc<Cell<Option<u32>>>,
        cursor: Rc<Cell<u32>>,
        metrics: SharedMetrics,
    ) -> Self {
        SpeechHttp { config, queue, cursor, metrics, state: State::Idle }
    }

    /// Answers an error; a refused submit is counted by its reason.
    fn refuse(&mut self, route: &Route, e: &ApiError) {
        if *route == Route::Submit {
            self.metrics.rejected(e.status_code);
        }
        self.state = State::Idle;
        respond_error(e);
    }

    fn on_headers(&mut self, config: &Config, route: Route, end_of_stream: bool) -> Result<Action, ApiError> {
        let method = header(":method").unwrap_or_default();
        let method = String::from_utf8_lossy(&method).into_owned();
        let allowed = route.allowed();
        if !allowed.contains(&method.as_str()) {
            if route == Route::Unknown {
                return Err(ApiError::job_not_found());
            }
            let allow = allowed.join(", ");
            let e = ApiError::method_not_allowed(&method, &allow);
            respond_json(405, &[("allow", allow.as_str())], &e.to_json());
            return Ok(Action::Pause);
        }
        // The whole dynamic metadata, typed (see ClaimValue::from_metadata).
        let claim = config.jwt_owner.as_ref().and_then(|j| {
            let metadata = hostcalls::get_property(vec!["metadata"]).ok().flatten()?;
            ClaimValue::from_metadata(&metadata, j)
        });
        let owner = authenticate(config, &header, claim.as_ref())?;
        match route {
            Route::Submit => {
                let ttl_s = parse_ttl(header(TTL_HEADER).as_deref(), config)?;
                if !is_json_content_type(header("content-type").as_deref()) {
                    return Err(ApiError::unsupported_media_type());
                }
                let declared: Option<usize> = header("content-length")
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|s| s.trim().parse().ok());
                if declared.is_some_and(|n| n > config.max_body_bytes) {
                    return Err(ApiError::payload_too_large(config.max_body_bytes));
                }
                if end_of_stream {
                    self.submit(config, &owner, ttl_s, &[])?;
                    return Ok(Action::Pause);
                }
                self.state = State::Submit { owner, ttl_s };
                Ok(Action::Pause)
            }
            Route::Job(id) if method == "DELETE" => {
                let store = Store::new(&EnvoySharedData, config.max_jobs);
                let (slot, _, _) = find_owned(&store, &id, &owner, &self.metrics)?;
                if store.remove(slot, &id) {
                    info!("job {id} deleted by its owner");
                    self.metrics.deleted();
                }
                respond(204, &[], &[]);
                Ok(Action::Pause)
            }
            Route::Job(id) => {
                let store = Store::new(&EnvoySharedData, config.max_jobs);
                let (slot, record, _) = find_owned(&store, &id, &owner, &self.metrics)?;
                let audio = if record.status == JobStatus::Completed {
                    store.audio(slot, &id)
                } else {
                    None
                };
                let body = serde_json::to_vec(&record.to_json(audio.as_deref())).unwrap_or_default();
                let extra: &[(&str, &str)] = if record.status.is_finished() { &[] } else { &[("retry-after", "1")] };
                respond_json(record.poll_status(), extra, &body);
                Ok(Action::Pause)
            }
            Route::Content(id) => {
                let store = Store::new(&EnvoySharedData, config.max_jobs);
                let (slot, record, _) = find_owned(&store, &id, &owner, &self.metrics)?;
                match (&record.status, &record.result, &record.error) {
                    (JobStatus::Completed, Some(meta), _) => {
                        let audio = store
                            .audio(slot, &id)
                            .ok_or_else(|| ApiError::internal("the job's audio is missing from the store"))?;
                        respond(200, &[("content-type", meta.response_format.content_type())], &audio);
                    }
                    (JobStatus::Failed, _, Some(e)) => respond_error(e),
                    _ => {
                        let body = serde_json::to_vec(&record.to_json(None)).unwrap_or_default();
                        respond_json(202, &[("retry-after", "1")], &body);
                    }
                }
                Ok(Action::Pause)
            }
            Route::PassThrough | Route::Unknown => Err(ApiError::job_not_found()),
        }
    }

    fn submit(&self, config: &Config, owner: &str, ttl_s: u64, body: &[u8]) -> Result<(), ApiError> {
        let request = parse_speech_request(body, config)?;
        let request_json = serde_json::to_vec(&request)
            .map_err(|e| ApiError::internal(format!("cannot encode the request: {e}")))?;
        let mut random = [0u8; 16];
        getrandom::fill(&mut random)
            .map_err(|e| ApiError::internal(format!("no secure random source: {e}")))?;
        let queue = self
            .queue
            .get()
            .ok_or_else(|| ApiError::internal("the job queue is not available"))?;
        let now = now_ms();
        let make = |slot: u32| {
            JobRecord::new(
                make_id(random, slot),
                owner.to_string(),
                now,
                ttl_s,
                config.job_deadline_s,
                request.chain.clone(),
            )
        };
        let store = Store::new(&EnvoySharedData, config.max_jobs);
        let mut cursor = self.cursor.get();
        let record = store.insert(&mut cursor, &make, &request_json).map_err(|e| match e {
            StoreError::Full => ApiError::store_full(config.max_jobs),
            StoreError::Busy(why) => {
                error!("cannot store a new job: {why}");
                let mut e = ApiError::upstream(503, "the job store is busy; retry later");
                e.retry_after_s = Some(1);
                e
            }
        })?;
        self.cursor.set(cursor);
        if let Err(e) = hostcalls::enqueue_shared_queue(queue, Some(record.id.as_bytes())) {
            error!("job {}: cannot queue it: {e:?}", record.id);
            if let Some(slot) = crate::ids::slot_of(&record.id) {
                store.remove(slot, &record.id);
            }
            return Err(ApiError::internal("the job could not be queued"));
        }
        let first = record.chain.first().map(|m| format!("{}/{}", m.provider, m.model)).unwrap_or_default();
        self.metrics.submitted();
        info!("job {} submitted: model {first}, {} fallbacks, ttl {ttl_s} s", record.id, record.chain.len().saturating_sub(1));
        let body = json!({"id": record.id, "status": "pending", "created_at": rfc3339(record.created_at_ms)});
        let location = format!("{BASE}/{}", record.id);
        respond_json(
            202,
            &[("location", location.as_str()), ("retry-after", "1")],
            &serde_json::to_vec(&body).unwrap_or_default(),
        );
        Ok(())
    }
}

/// The job, if it exists, is unexpired and belongs to `owner`; else the one 404.
fn find_owned(
    store: &Store,
    id: &str,
    owner: &str,
    metrics: &SharedMetrics,
) -> Result<(u32, JobRecord, u32), ApiError> {
    let (slot, record, cas) = store.find(id).ok_or_else(ApiError::job_not_found)?;
    if record.owner != owner {
        return Err(ApiError::job_not_found());
    }
    if record.is_expired(now_ms()) {
        if store.remove(slot, id) {
            info!("job {id} expired and was freed");
            metrics.expired(1);
        }
        return Err(ApiError::job_not_found());
    }
    Ok((slot, record, cas))
}

impl Context for SpeechHttp {}

impl HttpContext for SpeechHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let path = header(":path").unwrap_or_default();
        let route = route(&path);
        if route == Route::PassThrough {
            return Action::Continue;
        }
        let Some(config) = self.config.clone() else {
            respond_error(&ApiError::internal("the async speech filter has no configuration"));
            return Action::Pause;
        };
        match self.on_headers(&config, route.clone(), end_of_stream) {
            Ok(action) => action,
            Err(e) => {
                self.refuse(&route, &e);
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let State::Submit { owner, ttl_s } = &self.state else {
            return Action::Continue;
        };
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        if body_size > config.max_body_bytes {
            self.refuse(&Route::Submit, &ApiError::payload_too_large(config.max_body_bytes));
            return Action::Pause;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let (owner, ttl_s) = (owner.clone(), *ttl_s);
        self.state = State::Idle;
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        if let Err(e) = self.submit(&config, &owner, ttl_s, &body) {
            self.refuse(&Route::Submit, &e);
        }
        Action::Pause
    }
}
