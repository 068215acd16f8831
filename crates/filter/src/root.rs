//! The root context: loads the configuration and runs the engine. Provider,
//! webhook and store callouts go out from here, never from a request's
//! context, so that a client hanging up after its 202 does not lose its
//! job. Envoy's callbacks become engine calls; its reports are written out.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use async_speech_core::clock::Clock;
use async_speech_core::config::Config;
use async_speech_core::engine::{Cx, Engine};
use async_speech_core::log_escape::escape_for_log as escape;
use async_speech_core::platform::{Host, Queue};
use async_speech_core::store::work::WorkStore;
use async_speech_core::store::{Keys, Store};
use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use crate::envoy::{callout_answer, EnvoyHost, QueueIds};
use crate::http::SpeechHttp;
use crate::metrics::Stats;

const TICK: Duration = Duration::from_millis(200);
/// How often (in ticks) the log level is taken from Envoy again: an operator
/// may change it at run time through the admin's `/logging`.
const LOG_LEVEL_EVERY_TICKS: u32 = 25;

/// What the root shares with the HTTP contexts it creates.
#[derive(Clone)]
pub struct Shared {
    pub config: Rc<Config>,
    pub keys: Rc<Keys>,
    pub host: Rc<EnvoyHost>,
    pub clock: Rc<Clock>,
    pub generation: u32,
    pub stats: Rc<Stats>,
}

#[derive(Default)]
pub struct Root {
    shared: Option<Shared>,
    queues: QueueIds,
    stats: Rc<Stats>,
    engine: Option<Engine>,
    registered_on_tick: Cell<bool>,
    ticks: u32,
    /// `on_done` was called: Envoy waits for `done()`.
    draining: bool,
}

/// Logs at Envoy's level for the `wasm` component, so that lines Envoy would
/// drop are not even formatted.
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
    fn register_queues(&self, host: &EnvoyHost, config: &Config) {
        if let Err(e) = host.register(Queue::all(config)) {
            error!("{e}");
        }
    }

    /// Runs `f` on the engine with the time now, and writes out its reports.
    fn run(&mut self, f: impl FnOnce(&mut Engine, &Cx) -> Vec<async_speech_core::engine::Report>) {
        let (Some(shared), Some(engine)) = (self.shared.clone(), self.engine.as_mut()) else {
            return;
        };
        let now = shared.clock.now_ms(shared.host.as_ref());
        let cx = Cx {
            host: shared.host.as_ref(),
            config: &shared.config,
            now,
        };
        let reports = f(engine, &cx);
        self.stats.write(reports);
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let limit = self.shared.as_ref().map_or(0, |s| answer_limit(&s.config));
        let answer = callout_answer(num_headers, body_size, limit);
        self.run(|engine, cx| engine.answered(cx, token, answer));
    }

    /// The listener this root serves is draining (a configuration push, or
    /// Envoy going away): take nothing new, let the calls out end and the
    /// jobs held finish (the engine hands back what outlives its longest
    /// call), and tell Envoy when done. Until then Envoy keeps the root
    /// alive, ticking and answering its callouts.
    fn on_done(&mut self) -> bool {
        self.draining = true;
        self.run(|engine, cx| engine.drain(cx));
        self.stats.flush();
        let closed = self.engine.as_ref().is_none_or(Engine::is_closed);
        self.draining = !closed;
        closed
    }
}

/// The largest callout answer read: base64 in JSON answers takes 4/3 of the audio.
fn answer_limit(config: &Config) -> usize {
    config.max_audio_bytes.saturating_mul(4) / 3 + 64 * 1024
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
        for warning in config.warnings() {
            warn!("{warning}");
        }
        let namespace = namespace();
        let host = Rc::new(EnvoyHost {
            queues: self.queues.clone(),
            random: RefCell::new(None),
            namespace: namespace.clone().into(),
        });
        let keys = Keys::new(&namespace);
        let generation = Store::prepare(
            host.as_ref(),
            &keys,
            async_speech_core::governance::lanes(&config),
        );
        self.stats.define_all();
        self.register_queues(&host, &config);
        let clock = Rc::new(Clock::default());
        clock.sync(host.as_ref(), &keys.clock());
        let mut random = [0u8; 16];
        let _ = host.random(&mut random);
        let store = WorkStore::for_config(&config, keys.clone(), generation, random);
        self.engine = Some(Engine::new(store));
        self.shared = Some(Shared {
            config: Rc::new(config),
            keys: Rc::new(keys),
            host,
            clock,
            generation,
            stats: self.stats.clone(),
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
            self.register_queues(&shared.host, &shared.config);
        }
        shared
            .clock
            .sync(shared.host.as_ref(), &shared.keys.clock());
        self.run(|engine, cx| engine.tick(cx));
        self.stats.flush();
        if self.draining && self.engine.as_ref().is_none_or(Engine::is_closed) {
            // Envoy deletes this root once told; nothing of it is left to wait for.
            self.draining = false;
            if let Err(e) = hostcalls::done() {
                warn!("cannot tell Envoy the drained root is done: {e:?}");
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if self.queues.borrow().get(&Queue::Ring) == Some(&queue_id) {
            self.run(|engine, cx| engine.work_ready(cx));
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SpeechHttp::new(self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
