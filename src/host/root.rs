//! The root context: loads the configuration and is the worker that sends
//! provider calls. Callouts go out from here, never from a request's context,
//! so that a client hanging up after its 202 does not lose its job.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType};

use super::http::SpeechHttp;
use super::metrics::SharedMetrics;
use super::shared::EnvoySharedData;
use super::{now_ms, QUEUE_NAME};
use crate::config::Config;
use crate::error::ApiError;
use crate::providers::UpstreamResponse;
use crate::store::Store;
use crate::worker::{self, Attempt, FailReason, Outcome, Progress};

const TICK: Duration = Duration::from_millis(200);
const SWEEP_EVERY_MS: u64 = 1_000;
const SWEEP_KEY: &str = "async-speech/sweep-due";

#[derive(Default)]
pub struct Worker {
    config: Option<Rc<Config>>,
    queue: Rc<Cell<Option<u32>>>,
    cursor: Rc<Cell<u32>>,
    metrics: SharedMetrics,
    in_flight: HashMap<u32, (Attempt, u64)>,
    registered_on_tick: bool,
    /// The job count's CAS and the held jobs the last sweep saw, to repair a
    /// count left wrong by a worker that died between its two writes.
    last_count_check: Option<(u32, u32)>,
}

impl Worker {
    fn register_queue(&self) {
        match hostcalls::register_shared_queue(QUEUE_NAME) {
            Ok(id) => self.queue.set(Some(id)),
            Err(e) => error!("cannot register the job queue: {e:?}"),
        }
    }

    /// Takes queued jobs while there is room for more callouts.
    fn drain(&mut self) {
        let (Some(config), Some(queue)) = (self.config.clone(), self.queue.get()) else {
            return;
        };
        while self.in_flight.len() < config.max_in_flight {
            let id = match hostcalls::dequeue_shared_queue(queue) {
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                Ok(None) => break,
                Err(e) => {
                    warn!("cannot read the job queue: {e:?}");
                    break;
                }
            };
            let store = Store::new(&EnvoySharedData, config.max_jobs);
            let progress = worker::start(&store, &config, &id, now_ms());
            self.follow(&config, progress);
        }
    }

    /// Sends the next attempt, or logs how the job ended.
    fn follow(&mut self, config: &Config, mut progress: Progress) {
        // Each round either sends a callout or fails an attempt, so the chain bounds it.
        for _ in 0..64 {
            match progress {
                Progress::Next(attempt) => {
                    let headers: Vec<(&str, &str)> = attempt
                        .request
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let sent = hostcalls::dispatch_http_call(
                        &attempt.cluster,
                        headers,
                        Some(&attempt.request.body),
                        vec![],
                        Duration::from_millis(attempt.timeout_ms),
                    );
                    match sent {
                        Ok(token) => {
                            info!(
                                "job {} attempt {} sent to provider {} (model {})",
                                attempt.id, attempt.attempt, attempt.provider, attempt.model
                            );
                            self.in_flight.insert(token, (attempt, now_ms()));
                            return;
                        }
                        Err(e) => {
                            warn!(
                                "job {} provider {}: cannot call cluster {}: {e:?}",
                                attempt.id, attempt.provider, attempt.cluster
                            );
                            self.metrics.attempt(&attempt.provider, "unreachable", 0);
                            let error = ApiError::upstream(
                                502,
                                format!("provider {} is unreachable: Envoy cannot call cluster {}", attempt.provider, attempt.cluster),
                            );
                            let store = Store::new(&EnvoySharedData, config.max_jobs);
                            progress = worker::after_failure(&store, config, &attempt, error, now_ms());
                        }
                    }
                }
                Progress::Completed { id } => {
                    info!("job {id} completed");
                    self.metrics.completed();
                    return;
                }
                Progress::Failed { id, status, reason } => {
                    warn!("job {id} failed with status {status} ({})", reason.name());
                    self.metrics.failed(reason);
                    return;
                }
                Progress::Dropped => return,
            }
        }
    }

    /// Envoy always ends a callout by its timeout, but should an answer never
    /// come, its slot must not stay taken: the sweep has ended that attempt.
    fn forget_overdue_callouts(&mut self) {
        let now = now_ms();
        self.in_flight.retain(|_, (attempt, started)| {
            now.saturating_sub(*started) <= attempt.timeout_ms.saturating_add(worker::LEASE_GRACE_MS)
        });
    }

    /// One worker at a time sweeps, about once a second.
    fn maybe_sweep(&mut self, config: &Config) {
        let now = now_ms();
        let data = EnvoySharedData;
        let due = match hostcalls::get_shared_data(SWEEP_KEY) {
            Ok((value, cas)) => {
                let due: u64 = value
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                (now >= due).then_some(cas)
            }
            Err(_) => Some(None),
        };
        let Some(cas) = due else { return };
        let next = (now + SWEEP_EVERY_MS).to_string();
        if hostcalls::set_shared_data(SWEEP_KEY, Some(next.as_bytes()), cas).is_err() {
            return; // another worker took this sweep
        }
        let store = Store::new(&data, config.max_jobs);
        let before = store.count_with_cas();
        let report = worker::sweep(&store, config, now);
        for id in &report.expired {
            info!("job {id} expired and was freed");
        }
        self.metrics.expired(report.expired.len());
        for id in &report.deadline_failed {
            warn!("job {id} failed: past its deadline of {} s", config.job_deadline_s);
            self.metrics.failed(FailReason::Deadline);
        }
        for id in &report.lost_failed {
            warn!("job {id} failed: the provider's answer never arrived");
            self.metrics.failed(FailReason::Timeout);
        }
        self.metrics.gauges(report.pending, report.processing, report.held);
        if let Some(queue) = self.queue.get() {
            for id in &report.requeue {
                warn!("job {id}: the provider's answer never arrived; trying its next fallback");
                if let Err(e) = hostcalls::enqueue_shared_queue(queue, Some(id.as_bytes())) {
                    error!("job {id}: cannot queue it again: {e:?}");
                }
            }
        }
        // Repair the count only when nothing moved for two sweeps in a row.
        let after = store.count_with_cas();
        if let (Some((_, cas_before)), Some((count, cas_after))) = (before, after) {
            if cas_before == cas_after {
                if self.last_count_check == Some((cas_after, report.held)) && count != report.held {
                    warn!("job count was {count} but {} jobs are held; repaired", report.held);
                    store.correct_count(report.held, cas_after);
                }
                self.last_count_check = Some((cas_after, report.held));
            } else {
                self.last_count_check = None;
            }
        }
    }
}

impl Context for Worker {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _: usize) {
        let Some(config) = self.config.clone() else { return };
        let Some((attempt, started)) = self.in_flight.remove(&token_id) else {
            return;
        };
        let now = now_ms();
        // A failed callout has no headers, and asking for ":status" then would panic in the SDK.
        let headers = if num_headers > 0 {
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default()
        } else {
            Vec::new()
        };
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse::<u16>().ok());
        let body = if body_size > 0 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let outcome = match status {
            Some(status) => Outcome::Answer(UpstreamResponse { status, headers: &headers, body: &body }),
            None => Outcome::NoAnswer { elapsed_ms: now.saturating_sub(started) },
        };
        let latency = now.saturating_sub(started);
        let how = worker::attempt_outcome(&outcome, &attempt);
        match (how, status) {
            ("success", _) => {}
            ("error", Some(status)) => {
                warn!("job {} provider {} answered {status}", attempt.id, attempt.provider);
            }
            _ => warn!("job {} provider {}: {how} after {latency} ms", attempt.id, attempt.provider),
        }
        self.metrics.attempt(&attempt.provider, how, latency);
        let store = Store::new(&EnvoySharedData, config.max_jobs);
        let progress = worker::finish(&store, &config, &attempt, outcome, started, now);
        self.follow(&config, progress);
        self.drain();
    }
}

impl RootContext for Worker {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match Config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(c) => c,
            Err(e) => {
                error!("async-speech: configuration rejected: {e}");
                return false;
            }
        };
        for p in config.providers.values() {
            if p.api_key.is_none() {
                if let Some(var) = &p.api_key_env {
                    warn!("provider {}: {var} is not set; its attempts will fail until it is", p.name);
                }
            }
        }
        Store::new(&EnvoySharedData, config.max_jobs).init();
        self.metrics.define_all();
        self.config = Some(Rc::new(config));
        self.register_queue();
        if let Err(e) = hostcalls::set_tick_period(TICK) {
            error!("cannot set the tick period: {e:?}");
        }
        info!("async-speech: configured");
        true
    }

    fn on_tick(&mut self) {
        // Register again from a live worker: the VM that registered during
        // configuration may have been the throw-away canary.
        if !self.registered_on_tick {
            self.register_queue();
            self.registered_on_tick = true;
        }
        self.forget_overdue_callouts();
        self.drain();
        if let Some(config) = self.config.clone() {
            self.maybe_sweep(&config);
        }
    }

    fn on_queue_ready(&mut self, _queue_id: u32) {
        self.drain();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SpeechHttp::new(
            self.config.clone(),
            self.queue.clone(),
            self.cursor.clone(),
            self.metrics.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
