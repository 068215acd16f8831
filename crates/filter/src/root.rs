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

use crate::envoy::{EnvoyHost, QueueIds};
use crate::http::SpeechHttp;
use crate::metrics::SharedMetrics;
use async_speech_core::clock::Clock;
use async_speech_core::config::Config;
use async_speech_core::dispatch::etcd::{EtcdRunner, Tag as EtcdTag};
use async_speech_core::dispatch::{Attempt, WebhookCall};
use async_speech_core::log_escape::escape_for_log as escape;
use async_speech_core::platform::{Host, Queue};
use async_speech_core::store::etcd::StoreConfig;
use async_speech_core::store::{wheel, Keys, Store};

mod runner;

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
    /// Ticks since the log level was last taken from Envoy.
    ticks: u32,
    /// With the etcd store: what this VM runs of the jobs in etcd.
    etcd: Option<EtcdRunner>,
}

/// How often (in ticks) the log level is taken from Envoy again: an operator
/// may change it at run time through the admin's `/logging`.
const LOG_LEVEL_EVERY_TICKS: u32 = 25;

/// Logs at Envoy's level for the `wasm` component, so that lines Envoy would
/// drop are not even formatted (four info lines per job otherwise).
fn follow_envoy_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
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
        // Bounded before it is read: base64 in JSON answers takes 4/3 of the audio.
        let limit = shared.config.max_audio_bytes.saturating_mul(4) / 3 + 64 * 1024;
        let answer = read_callout_answer(num_headers, body_size, limit);
        self.answered(&shared, call, answer, started);
    }
}

/// A callout's answer: its status (none if it failed), headers and body (not
/// read when larger than `limit`).
pub struct CalloutAnswer {
    pub status: Option<u16>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub body_size: usize,
    pub too_large: bool,
}

fn read_callout_answer(num_headers: usize, body_size: usize, limit: usize) -> CalloutAnswer {
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
    let too_large = body_size > limit;
    let body = if body_size > 0 && !too_large {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    CalloutAnswer {
        status,
        headers,
        body,
        body_size,
        too_large,
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_envoy_log_level();
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
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(LOG_LEVEL_EVERY_TICKS) {
            follow_envoy_log_level();
        }
        // Register again from a live worker: the VM that registered during
        // configuration may have been the throw-away canary.
        if !self.registered_on_tick.replace(true) {
            self.register_queues(&shared.host);
        }
        shared
            .clock
            .sync(shared.host.as_ref(), &shared.keys.clock());
        let now = shared.clock.now_ms(shared.host.as_ref());
        self.forget_overdue_callouts(&shared, now);
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
