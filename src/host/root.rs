//! The root context: loads the configuration and runs jobs. Provider callouts
//! go out from here, never from a request's context, so that a client hanging
//! up after its 202 does not lose its job. Each tick it also drains the timer
//! wheel and walks a few slots of the audit.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType};

use super::envoy::{EnvoyHost, QueueIds};
use super::http::SpeechHttp;
use super::metrics::SharedMetrics;
use crate::clock::Clock;
use crate::config::Config;
use crate::dispatch::etcd::{Action as EtcdAction, EtcdRunner, Tag as EtcdTag};
use crate::dispatch::{self, Attempt, DeliveryResult, FailReason, Outcome, Step, WebhookCall};
use crate::error::ApiError;
use crate::log_escape::escape_for_log as escape;
use crate::platform::{Host, Queue};
use crate::providers::UpstreamResponse;
use crate::store::etcd::StoreConfig;
use crate::store::{wheel, Keys, Store};
use crate::webhooks::AttemptOutcome;

const TICK: Duration = Duration::from_millis(200);
/// Due timers one tick handles at most; the rest wait for the next tick.
const TIMERS_PER_TICK: usize = 2_000;
/// Slots the audit looks at per tick.
const AUDIT_PER_TICK: u32 = 64;

/// A callout under way: a provider attempt or a webhook delivery.
enum InFlight {
    Speech(Attempt),
    Webhook(WebhookCall),
    /// A call to etcd for the etcd runner.
    Store(EtcdTag, u64),
}

impl InFlight {
    fn timeout_ms(&self) -> u64 {
        match self {
            InFlight::Speech(a) => a.callout.timeout_ms,
            InFlight::Webhook(w) => w.callout.timeout_ms,
            InFlight::Store(_, timeout_ms) => *timeout_ms,
        }
    }
}

/// What the root shares with the HTTP contexts it creates.
#[derive(Clone)]
pub struct Shared {
    pub config: Rc<Config>,
    pub keys: Rc<Keys>,
    pub host: Rc<EnvoyHost>,
    pub clock: Rc<Clock>,
    pub generation: u32,
    pub metrics: SharedMetrics,
}

#[derive(Default)]
pub struct Root {
    shared: Option<Shared>,
    queues: QueueIds,
    metrics: SharedMetrics,
    in_flight: HashMap<u32, (InFlight, u64)>,
    registered_on_tick: Cell<bool>,
    /// With the etcd store: what this VM runs of the jobs in etcd.
    etcd: Option<EtcdRunner>,
}

/// The filter's namespace in shared data: its root id, so that two filters
/// sharing a `vm_id` with different configurations keep apart.
fn namespace() -> String {
    hostcalls::get_property(vec!["plugin_root_id"])
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

impl Root {
    fn register_queues(&self, host: &EnvoyHost) {
        let all = [Queue::Free]
            .into_iter()
            .chain(wheel::all_buckets())
            .chain([Queue::Jobs]);
        if let Err(e) = host.register(all) {
            error!("{e}");
        }
    }

    fn store<'a>(shared: &'a Shared) -> Store<'a> {
        Store::new(
            shared.host.as_ref(),
            &shared.keys,
            shared.config.max_jobs,
            shared.generation,
        )
    }

    /// Takes queued jobs while there is room for more callouts.
    fn drain(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        while self.in_flight.len() < shared.config.max_in_flight {
            let id = match shared.host.dequeue(Queue::Jobs) {
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                Ok(None) => break,
                Err(e) => {
                    warn!("cannot read the job queue: {e}");
                    break;
                }
            };
            let now = shared.clock.now_ms(shared.host.as_ref());
            let step = dispatch::start(&Self::store(&shared), &shared.config, &id, now);
            if step != Step::Nothing {
                self.metrics.pending(-1);
            }
            self.follow(&shared, step);
        }
    }

    /// Sends the next attempt, or logs and counts how the job ended.
    fn follow(&mut self, shared: &Shared, step: Step) {
        let mut pending = vec![step];
        // Each round sends a call or fails an attempt, so the chains bound it.
        for _ in 0..256 {
            let Some(step) = pending.pop() else { return };
            match step {
                Step::Send(attempt) => {
                    if let Some(next) = self.send(shared, *attempt) {
                        pending.push(next);
                    }
                }
                Step::SendAll(attempts) => {
                    for attempt in attempts {
                        if let Some(next) = self.send(shared, attempt) {
                            // One part could not go: the attempt has failed; the rest are stale.
                            pending.push(next);
                            break;
                        }
                    }
                }
                Step::Deliver(call) => self.deliver(shared, *call),
                other => self.report(shared, other),
            }
        }
    }

    /// Sends one provider call; if Envoy refuses it, what comes of the failed attempt.
    fn send(&mut self, shared: &Shared, attempt: Attempt) -> Option<Step> {
        let now = shared.clock.now_ms(shared.host.as_ref());
        match shared.host.dispatch(&attempt.callout) {
            Ok(token) => {
                let part = attempt
                    .part
                    .map(|p| format!(" part {p}"))
                    .unwrap_or_default();
                info!(
                    "job {} attempt {}{part} sent to provider {} (model {})",
                    attempt.id,
                    attempt.attempt,
                    attempt.provider,
                    escape(&attempt.model)
                );
                self.in_flight
                    .insert(token, (InFlight::Speech(attempt), now));
                self.metrics.in_flight(1);
                None
            }
            Err(e) => {
                warn!(
                    "job {} provider {}: cannot call cluster {}: {e}",
                    attempt.id, attempt.provider, attempt.callout.cluster
                );
                self.metrics.attempt(&attempt.provider, "unreachable", 0);
                let error = ApiError::upstream(
                    502,
                    format!(
                        "provider {} is unreachable: Envoy cannot call cluster {}",
                        attempt.provider, attempt.callout.cluster
                    ),
                );
                Some(dispatch::attempt_failed(
                    &Self::store(shared),
                    &shared.config,
                    &attempt,
                    error,
                    now,
                ))
            }
        }
    }

    fn report(&self, shared: &Shared, step: Step) {
        match step {
            Step::Completed { id } => {
                info!("job {id} completed");
                self.metrics.completed();
            }
            Step::Failed { id, status, reason } => {
                match reason {
                    FailReason::Deadline => warn!(
                        "job {id} failed: past its deadline of {} s",
                        shared.config.job_deadline_s
                    ),
                    _ => warn!("job {id} failed with status {status} ({})", reason.name()),
                }
                self.metrics.failed(reason);
            }
            Step::Requeued { id } => {
                self.metrics.pending(1);
                warn!("job {id}: queued again (its answer never arrived, or its queue entry was lost)");
            }
            Step::Expired { id } => {
                info!("job {id} expired and was freed");
                self.metrics.expired();
                self.metrics.held(-1);
            }
            Step::Send(_) | Step::SendAll(_) | Step::Deliver(_) | Step::Nothing => {}
        }
    }

    /// Timers that are due, then a few slots of the audit walk.
    fn run_timers(&mut self, shared: &Shared) {
        let store = Self::store(shared);
        let now = shared.clock.now_ms(shared.host.as_ref());
        let mut timers = store.due_timers(now, TIMERS_PER_TICK);
        timers.extend(store.audit_step(AUDIT_PER_TICK));
        for timer in timers {
            let step = dispatch::on_timer(shared.host.as_ref(), &store, &shared.config, timer, now);
            self.follow(shared, step);
        }
    }

    /// Carries out what the etcd runner asks for.
    fn act(&mut self, shared: &Shared, actions: Vec<EtcdAction>) {
        let mut pending = actions;
        // Each round sends a call or records a failure; a job's chain bounds it.
        for _ in 0..1024 {
            let Some(action) = pending.pop() else { return };
            let now = shared.clock.now_ms(shared.host.as_ref());
            match action {
                EtcdAction::Store(tag, callout) => match shared.host.dispatch(&callout) {
                    Ok(token) => {
                        self.in_flight
                            .insert(token, (InFlight::Store(tag, callout.timeout_ms), now));
                        self.metrics.in_flight(1);
                    }
                    Err(e) => {
                        warn!("cannot call the job store ({}): {e}", tag.name());
                        self.metrics.store_call(tag.name(), false, 0);
                        if let (Some(runner), StoreConfig::Etcd(etcd)) =
                            (self.etcd.as_mut(), &shared.config.store)
                        {
                            pending.extend(runner.on_store_answer(
                                etcd,
                                &shared.config,
                                tag,
                                None,
                                now,
                            ));
                        }
                    }
                },
                EtcdAction::Send(attempt) => match shared.host.dispatch(&attempt.callout) {
                    Ok(token) => {
                        info!(
                            "job {} attempt {} sent to provider {}",
                            attempt.id, attempt.attempt, attempt.provider
                        );
                        self.in_flight
                            .insert(token, (InFlight::Speech(*attempt), now));
                        self.metrics.in_flight(1);
                    }
                    Err(e) => {
                        warn!(
                            "job {} provider {}: cannot call cluster {}: {e}",
                            attempt.id, attempt.provider, attempt.callout.cluster
                        );
                        if let (Some(runner), StoreConfig::Etcd(etcd)) =
                            (self.etcd.as_mut(), &shared.config.store)
                        {
                            let outcome = Outcome::NoAnswer { elapsed_ms: 0 };
                            pending.extend(runner.on_provider_answer(
                                etcd,
                                &shared.config,
                                &attempt,
                                outcome,
                                now,
                            ));
                        }
                    }
                },
                EtcdAction::Report(step) => self.report(shared, step),
            }
        }
    }

    fn deliver(&mut self, shared: &Shared, call: WebhookCall) {
        let now = shared.clock.now_ms(shared.host.as_ref());
        match shared.host.dispatch(&call.callout) {
            Ok(token) => {
                info!(
                    "job {} webhook {} sent to endpoint {}",
                    call.id, call.webhook_id, call.endpoint
                );
                self.in_flight.insert(token, (InFlight::Webhook(call), now));
                self.metrics.in_flight(1);
            }
            Err(e) => {
                warn!(
                    "job {} webhook to {}: cannot call cluster {}: {e}",
                    call.id, call.endpoint, call.callout.cluster
                );
                self.webhook_answered(shared, &call, AttemptOutcome::Unreachable, now);
            }
        }
    }

    fn webhook_answered(
        &mut self,
        shared: &Shared,
        call: &WebhookCall,
        outcome: AttemptOutcome,
        now: u64,
    ) {
        // Jitter lengthens a retry's wait by up to a second, never shortens it.
        let mut random = [0u8; 2];
        let _ = shared.host.random(&mut random);
        let jitter = u64::from(u16::from_le_bytes(random)) % 1000;
        let result = dispatch::webhook::answered(
            &Self::store(shared),
            &shared.config,
            call,
            outcome,
            jitter,
            now,
        );
        match result {
            Some(DeliveryResult::Delivered) => {
                info!(
                    "job {} webhook {} delivered to {}",
                    call.id, call.webhook_id, call.endpoint
                );
                self.metrics.webhook("delivered");
            }
            Some(DeliveryResult::Retrying) => {
                warn!(
                    "job {} webhook {} to {}: {outcome:?}; will retry",
                    call.id, call.webhook_id, call.endpoint
                );
                self.metrics.webhook("retried");
            }
            Some(DeliveryResult::Failed) => {
                warn!(
                    "job {} webhook {} to {}: {outcome:?}; given up",
                    call.id, call.webhook_id, call.endpoint
                );
                self.metrics.webhook("failed");
            }
            None => {}
        }
    }

    /// Envoy ends every callout by its timeout; should an answer still never
    /// come, the lease timer has ended that attempt and its room is freed here.
    fn forget_overdue_callouts(&mut self, now: u64) {
        let before = self.in_flight.len();
        self.in_flight.retain(|_, (call, started)| {
            now.saturating_sub(*started)
                <= call.timeout_ms().saturating_add(dispatch::LEASE_GRACE_MS)
        });
        let forgotten = before - self.in_flight.len();
        if forgotten > 0 {
            self.metrics.in_flight(-(forgotten as i64));
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Some((call, started)) = self.in_flight.remove(&token_id) else {
            return;
        };
        self.metrics.in_flight(-1);
        let now = shared.clock.now_ms(shared.host.as_ref());
        // A failed callout has no headers; asking for ":status" then would panic in the SDK.
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
        // Bounded before it is read: base64 in JSON answers takes 4/3 of the audio.
        let limit = shared.config.max_audio_bytes.saturating_mul(4) / 3 + 64 * 1024;
        let body = if body_size > 0 && body_size <= limit {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let attempt = match call {
            InFlight::Speech(attempt) => attempt,
            InFlight::Webhook(call) => {
                let outcome = dispatch::webhook::outcome(
                    status,
                    &body,
                    now.saturating_sub(started),
                    call.callout.timeout_ms,
                );
                self.webhook_answered(&shared, &call, outcome, now);
                return self.drain();
            }
            InFlight::Store(tag, _) => {
                let ok = status.is_some_and(|s| (200..300).contains(&s));
                self.metrics
                    .store_call(tag.name(), ok, now.saturating_sub(started));
                let answer = status.map(|s| (s, body));
                if let (Some(runner), StoreConfig::Etcd(etcd)) =
                    (self.etcd.as_mut(), &shared.config.store)
                {
                    let actions = runner.on_store_answer(etcd, &shared.config, tag, answer, now);
                    self.act(&shared, actions);
                }
                return;
            }
        };
        let outcome = match status {
            Some(_) if body_size > limit => Outcome::TooLarge { bytes: body_size },
            Some(status) => Outcome::Answer(UpstreamResponse {
                status,
                headers: &headers,
                body: &body,
            }),
            None => Outcome::NoAnswer {
                elapsed_ms: now.saturating_sub(started),
            },
        };
        let latency = now.saturating_sub(started);
        let how = dispatch::attempt_outcome(&outcome, &attempt);
        match (how, status) {
            ("success", _) => {}
            ("error", Some(status)) => warn!(
                "job {} provider {} answered {status}",
                attempt.id, attempt.provider
            ),
            _ => warn!(
                "job {} provider {}: {how} after {latency} ms",
                attempt.id, attempt.provider
            ),
        }
        self.metrics.attempt(&attempt.provider, how, latency);
        if let (Some(runner), StoreConfig::Etcd(etcd)) = (self.etcd.as_mut(), &shared.config.store)
        {
            let actions = runner.on_provider_answer(etcd, &shared.config, &attempt, outcome, now);
            return self.act(&shared, actions);
        }
        let step = dispatch::finish(
            &Self::store(&shared),
            &shared.config,
            &attempt,
            outcome,
            started,
            now,
        );
        self.follow(&shared, step);
        self.drain();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match Config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(c) => c,
            Err(e) => {
                error!("async-speech: configuration rejected: {}", escape(&e));
                return false;
            }
        };
        for p in config.providers.values() {
            if let (None, Some(var)) = (&p.api_key, &p.api_key_env) {
                warn!(
                    "provider {}: {var} is not set; its attempts will fail until it is",
                    p.name
                );
            }
        }
        let namespace = namespace();
        let host = Rc::new(EnvoyHost {
            queues: self.queues.clone(),
            namespace: namespace.clone().into(),
        });
        let keys = Rc::new(Keys::new(&namespace));
        let generation = Store::start_generation(host.as_ref(), &keys);
        self.metrics.define_all();
        self.register_queues(&host);
        let clock = Rc::new(Clock::default());
        clock.sync(host.as_ref(), &keys.clock());
        if let StoreConfig::Etcd(_) = config.store {
            let mut random = [0u8; 16];
            let _ = host.random(&mut random);
            self.etcd = Some(EtcdRunner::new(random));
        }
        self.shared = Some(Shared {
            config: Rc::new(config),
            keys,
            host,
            clock,
            generation,
            metrics: self.metrics.clone(),
        });
        if let Err(e) = hostcalls::set_tick_period(TICK) {
            error!("cannot set the tick period: {e:?}");
        }
        info!(
            "async-speech: configured (namespace {}, generation {generation})",
            escape(&namespace)
        );
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        // Register again from a live worker: the VM that registered during
        // configuration may have been the throw-away canary.
        if !self.registered_on_tick.replace(true) {
            self.register_queues(&shared.host);
        }
        shared
            .clock
            .sync(shared.host.as_ref(), &shared.keys.clock());
        let now = shared.clock.now_ms(shared.host.as_ref());
        self.forget_overdue_callouts(now);
        if let (Some(runner), StoreConfig::Etcd(etcd)) = (self.etcd.as_mut(), &shared.config.store)
        {
            let actions = runner.tick(etcd, &shared.config, now);
            return self.act(&shared, actions);
        }
        self.drain();
        self.run_timers(&shared);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if self.queues.borrow().get(&Queue::Jobs) == Some(&queue_id) {
            self.drain();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SpeechHttp::new(self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
