//! A world for the engine's native tests: Envoys (each its own shared data),
//! workers on them (each a VM's root context: a simulated host and an
//! engine), an etcd for the etcd store, and providers whose answers the test
//! scripts. Time moves in ticks; every callout is answered when it is due.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use serde_json::Value;

use crate::api::{Answer, Api, Decision, RequestHead};
use crate::config::Config;
use crate::engine::{CallAnswer, Cx, Engine, Report};
use crate::platform::{Callout, Host};
use crate::sim::{SimEtcd, SimHost, SimShared};
use crate::store::work::WorkStore;
use crate::store::{Keys, Store};

pub const START: u64 = 1_800_000_000_000;
pub const KEY: &str = "sk-bf-team-a";
pub const KEY_B: &str = "sk-bf-team-b";
pub const TICK_MS: u64 = 200;

/// How a provider (or a webhook receiver) answers a call.
#[derive(Debug, Clone)]
pub enum Reply {
    Audio(Vec<u8>),
    Status(u16, Vec<u8>),
    /// No answer: Envoy gives up at the call's timeout.
    Hang,
    /// This answer, after this long.
    After(u64, Box<Reply>),
}

/// How the test's providers answer.
pub type Provider = Box<dyn FnMut(&Callout) -> Reply>;

pub struct Worker {
    pub host: Rc<SimHost>,
    pub engine: Option<Engine>,
    /// Stopped (SIGSTOP): no ticks, and its answers wait.
    pub paused: bool,
    config: Rc<Config>,
    keys: Keys,
    generation: u32,
}

struct Out {
    worker: usize,
    token: u32,
    callout: Callout,
    due_ms: u64,
    /// `None`: no answer (Envoy's failed callout).
    answer: Option<(u16, Vec<u8>)>,
}

pub struct World {
    pub envoys: Vec<Rc<SimShared>>,
    pub workers: Vec<Worker>,
    pub etcd: SimEtcd,
    /// etcd answers nothing (its calls time out).
    pub etcd_down: Cell<bool>,
    pub provider: RefCell<Provider>,
    pub reports: RefCell<Vec<Report>>,
    /// Provider calls seen, in order.
    pub provider_calls: RefCell<Vec<Callout>>,
    /// The most provider calls in flight at once.
    pub most_at_once: Cell<usize>,
    /// Store round trips of requests (the filter's callouts to etcd).
    pub request_rounds: Cell<u64>,
    outs: RefCell<Vec<Out>>,
    config_json: String,
}

/// The world's configuration: `extra` (`,"setting":value`) adds settings or
/// replaces the defaults of `job_deadline_s`, `max_jobs` and `virtual_keys`.
pub fn config(store: &str, extra: &str) -> String {
    let default = |name: &str, value: &str| {
        if extra.contains(&format!("\"{name}\"")) {
            String::new()
        } else {
            format!(r#","{name}":{value}"#)
        }
    };
    let keys = if extra.contains("\"virtual_keys\"") {
        String::new()
    } else {
        keys("", "")
    };
    format!(
        r#"{{"providers":{{"a":{{"type":"openai","cluster":"ca","timeout_ms":1000,"max_input_chars":10,"max_parallel_chunks":2}},
                           "b":{{"type":"openai","cluster":"cb","timeout_ms":1000}}}},
            "store":{store}{}{}{keys}{extra}}}"#,
        default("job_deadline_s", "30"),
        default("max_jobs", "50"),
    )
}

/// The two keys, team-a's and team-b's settings (`,"limits":{..}` say).
pub fn keys(a: &str, b: &str) -> String {
    format!(
        r#","virtual_keys":[{{"name":"team-a","value":"{KEY}"{a}}},{{"name":"team-b","value":"{KEY_B}"{b}}}]"#
    )
}

pub const SHARED: &str = r#"{"type":"shared_data"}"#;
pub const ETCD: &str = r#"{"type":"etcd","cluster":"etcd","timeout_ms":500}"#;

impl World {
    /// `envoys` Envoys with `workers` workers each, on the store `store`
    /// (`SHARED` or `ETCD`), with more settings in `extra` (`,"k":v`).
    pub fn new(store: &str, extra: &str, envoys: usize, workers: usize) -> World {
        let world = World {
            envoys: (0..envoys).map(|_| SimShared::new(START)).collect(),
            workers: Vec::new(),
            etcd: SimEtcd::new(),
            etcd_down: Cell::new(false),
            provider: RefCell::new(Box::new(|_| Reply::Audio(b"AUDIO".to_vec()))),
            reports: RefCell::new(Vec::new()),
            provider_calls: RefCell::new(Vec::new()),
            most_at_once: Cell::new(0),
            request_rounds: Cell::new(0),
            outs: RefCell::new(Vec::new()),
            config_json: config(store, extra),
        };
        let mut world = world;
        for envoy in 0..envoys {
            for _ in 0..workers {
                world.add_worker(envoy);
            }
        }
        world
    }

    pub fn shared(extra: &str) -> World {
        World::new(SHARED, extra, 1, 2)
    }

    pub fn etcd(extra: &str) -> World {
        World::new(ETCD, extra, 2, 1)
    }

    /// A new VM on `envoy` (a worker started, or a VM reloaded).
    pub fn add_worker(&mut self, envoy: usize) -> usize {
        let seed = u64::try_from(self.workers.len()).unwrap_or(0) + 1;
        let host = Rc::new(SimHost::new(&self.envoys[envoy], seed));
        let config = Rc::new(Config::parse(self.config_json.as_bytes(), &|_| None).unwrap());
        let keys = Keys::new("t");
        let generation = Store::prepare(host.as_ref(), &keys, crate::governance::lanes(&config));
        let mut random = [0u8; 16];
        host.random(&mut random).unwrap();
        let store = WorkStore::for_config(&config, keys.clone(), generation, random);
        self.workers.push(Worker {
            host,
            engine: Some(Engine::new(store)),
            paused: false,
            config,
            keys,
            generation,
        });
        self.workers.len() - 1
    }

    /// The configuration every worker runs.
    pub fn config(&self) -> Config {
        self.workers[0].config.as_ref().clone()
    }

    pub fn is_etcd(&self) -> bool {
        self.config_json.contains(r#""type":"etcd""#)
    }

    /// The worker holding a job now (the only one running any).
    pub fn holder(&self) -> usize {
        let holding: Vec<usize> = (0..self.workers.len())
            .filter(|w| {
                self.workers[*w]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.holding() > 0)
            })
            .collect();
        assert_eq!(holding.len(), 1, "one worker holds the job");
        holding[0]
    }

    pub fn now(&self) -> u64 {
        self.envoys[0].clock.get()
    }

    pub fn set_provider(&self, f: impl FnMut(&Callout) -> Reply + 'static) {
        *self.provider.borrow_mut() = Box::new(f);
    }

    /// The worker's VM dies: its engine and its calls are gone.
    pub fn kill(&mut self, w: usize) {
        self.workers[w].engine = None;
        self.outs.borrow_mut().retain(|o| o.worker != w);
        self.workers[w].host.sent.borrow_mut().clear();
    }

    /// The worker's listener drains: it finishes what it holds, takes nothing new.
    pub fn drain(&mut self, w: usize) {
        self.on_worker(w, |engine, cx| engine.drain(cx));
        self.settle();
    }

    /// Whether the worker has let go of everything since it began to drain.
    pub fn is_closed(&self, w: usize) -> bool {
        self.workers[w]
            .engine
            .as_ref()
            .is_none_or(Engine::is_closed)
    }

    /// The worker is told it goes away now: it hands back.
    pub fn close(&mut self, w: usize) {
        self.on_worker(w, |engine, cx| engine.close(cx));
        self.settle();
    }

    /// One tick of every live worker, then every call that is due answered.
    pub fn tick(&mut self) {
        for w in 0..self.workers.len() {
            if !self.workers[w].paused {
                self.on_worker(w, |engine, cx| engine.tick(cx));
            }
        }
        self.settle();
    }

    /// Ticks for `ms`, time moving on between them.
    pub fn run_for(&mut self, ms: u64) {
        for _ in 0..ms.div_ceil(TICK_MS) {
            self.advance(TICK_MS);
            self.tick();
        }
    }

    /// Ticks until `done` holds, at most `ms`; the time it took.
    pub fn run_until(&mut self, ms: u64, mut done: impl FnMut(&World) -> bool) -> Option<u64> {
        let start = self.now();
        for _ in 0..ms.div_ceil(TICK_MS) {
            if done(self) {
                return Some(self.now() - start);
            }
            self.advance(TICK_MS);
            self.tick();
        }
        done(self).then(|| self.now() - start)
    }

    pub fn advance(&self, ms: u64) {
        for envoy in &self.envoys {
            envoy.advance(ms);
        }
    }

    fn on_worker(&mut self, w: usize, f: impl FnOnce(&mut Engine, &Cx) -> Vec<Report>) {
        let now = self.now();
        let worker = &mut self.workers[w];
        let Some(engine) = worker.engine.as_mut() else {
            return;
        };
        let cx = Cx {
            host: worker.host.as_ref(),
            config: &worker.config,
            now,
        };
        let reports = f(engine, &cx);
        if std::env::var("WORLD_TRACE").is_ok() {
            for r in &reports {
                eprintln!("t={} w={w} {r:?}", now - START);
            }
        }
        self.reports.borrow_mut().extend(reports);
    }

    /// Takes every new callout, then answers every due one, until none is due.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            self.collect();
            let now = self.now();
            let due = {
                let mut outs = self.outs.borrow_mut();
                let live = |o: &Out| !self.workers[o.worker].paused;
                match outs.iter().position(|o| o.due_ms <= now && live(o)) {
                    Some(i) => outs.remove(i),
                    None => return,
                }
            };
            let answer = CallAnswer {
                status: due.answer.as_ref().map(|(s, _)| *s),
                body_size: due.answer.as_ref().map_or(0, |(_, b)| b.len()),
                body: due.answer.map(|(_, b)| b).unwrap_or_default(),
                too_large: false,
            };
            // An etcd call is answered as etcd stands when the answer leaves it.
            let answer = match (due.callout.cluster.as_str(), answer.status) {
                ("etcd", Some(_)) => {
                    let (status, body) = self.etcd.answer(&due.callout, now);
                    CallAnswer {
                        status: Some(status),
                        body_size: body.len(),
                        body,
                        ..answer
                    }
                }
                _ => answer,
            };
            let token = due.token;
            self.on_worker(due.worker, |engine, cx| engine.answered(cx, token, answer));
        }
        panic!("the world did not settle");
    }

    fn collect(&self) {
        let now = self.now();
        for (w, worker) in self.workers.iter().enumerate() {
            let sent: Vec<(u32, Callout)> = worker.host.sent.borrow_mut().drain(..).collect();
            for (token, callout) in sent {
                let out = self.out_for(w, token, callout, now);
                self.outs.borrow_mut().push(out);
            }
        }
        let at_once = self
            .outs
            .borrow()
            .iter()
            .filter(|o| o.callout.cluster.starts_with('c'))
            .count();
        self.most_at_once.set(self.most_at_once.get().max(at_once));
    }

    fn out_for(&self, worker: usize, token: u32, callout: Callout, now: u64) -> Out {
        let hang = now + callout.timeout_ms;
        let (due_ms, answer) = if callout.cluster == "etcd" {
            match self.etcd_down.get() {
                true => (hang, None),
                false => (now, Some((0, Vec::new()))),
            }
        } else {
            if callout.cluster.starts_with('c') {
                self.provider_calls.borrow_mut().push(callout.clone());
            }
            let reply = (self.provider.borrow_mut())(&callout);
            resolve(reply, now, hang)
        };
        Out {
            worker,
            token,
            callout,
            due_ms,
            answer,
        }
    }

    /// A request through worker `w`'s API, every store call answered.
    pub fn request(&self, w: usize, method: &str, path: &str, body: Option<&str>) -> Answer {
        self.request_with(w, method, path, body, &[])
    }

    /// A request with more headers (lower-case names).
    pub fn request_with(
        &self,
        w: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
        more: &[(&str, &str)],
    ) -> Answer {
        self.request_between(w, method, path, body, more, usize::MAX, &mut || {})
    }

    /// A request whose `at`-th store call is answered only after `between` ran.
    #[allow(clippy::too_many_arguments)]
    pub fn request_between(
        &self,
        w: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
        more: &[(&str, &str)],
        at: usize,
        between: &mut dyn FnMut(),
    ) -> Answer {
        let key = more
            .iter()
            .find(|(k, _)| *k == "key")
            .map_or(KEY, |(_, v)| *v);
        let worker = &self.workers[w];
        let api = Api {
            host: worker.host.as_ref(),
            config: &worker.config,
            keys: &worker.keys,
            generation: worker.generation,
            now_ms: self.now(),
        };
        let header = |name: &str| -> Option<Vec<u8>> {
            match name {
                ":path" => Some(path.as_bytes().to_vec()),
                ":method" => Some(method.as_bytes().to_vec()),
                "authorization" => Some(format!("Bearer {key}").into_bytes()),
                "content-type" => Some(b"application/json".to_vec()),
                _ => more
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.as_bytes().to_vec()),
            }
        };
        let head = RequestHead {
            header: &header,
            jwt_claim: None,
        };
        let mut decision = api.on_headers(&head, body.is_none());
        let mut calls = 0;
        for _ in 0..16 {
            decision = match decision {
                Decision::Respond(answer) => {
                    self.reports.borrow_mut().extend(answer.event.clone());
                    return answer;
                }
                Decision::ReadBody(pending) => {
                    api.on_submit_body(&pending, body.unwrap_or("").as_bytes())
                }
                Decision::Call(call) => {
                    if calls == at {
                        between();
                    }
                    calls += 1;
                    self.request_rounds.set(self.request_rounds.get() + 1);
                    let answer = (!self.etcd_down.get())
                        .then(|| self.etcd.answer(&call.callout, self.now()));
                    api.on_store_answer(call.paused, answer)
                }
                Decision::PassThrough => panic!("{path} passed through"),
            };
        }
        panic!("{method} {path} never answered");
    }

    /// Submits with `key` through worker `w`.
    pub fn submit_as(&self, w: usize, key: &str, body: &str) -> Answer {
        self.request_with(
            w,
            "POST",
            "/v1/async/audio/speech",
            Some(body),
            &[("key", key)],
        )
    }

    /// Submits through worker `w`; the job's id.
    pub fn submit(&self, w: usize, body: &str) -> String {
        let answer = self.request(w, "POST", "/v1/async/audio/speech", Some(body));
        assert_eq!(
            answer.status,
            202,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        json(&answer.body)["id"].as_str().unwrap().to_string()
    }

    /// A poll through worker `w`: its status and body.
    pub fn poll(&self, w: usize, id: &str) -> (u16, Value) {
        let answer = self.request(w, "GET", &format!("/v1/async/audio/speech/{id}"), None);
        let body = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        (answer.status, body)
    }

    /// The job's status as any worker's poll sees it.
    pub fn status(&self, id: &str) -> String {
        self.status_as(KEY, id)
    }

    /// The status of a job of `key`'s.
    pub fn status_as(&self, key: &str, id: &str) -> String {
        let path = format!("/v1/async/audio/speech/{id}");
        let answer = self.request_with(0, "GET", &path, None, &[("key", key)]);
        json(&answer.body)["status"]
            .as_str()
            .unwrap_or("gone")
            .to_string()
    }

    /// Ticks until the job has ended; its last poll.
    pub fn wait(&mut self, id: &str, ms: u64) -> Value {
        let id = id.to_string();
        let took = self.run_until(ms, |w| {
            matches!(w.status(&id).as_str(), "completed" | "failed")
        });
        assert!(
            took.is_some(),
            "job {id} did not end: {}",
            self.poll(0, &id).1
        );
        self.poll(0, &id).1
    }

    /// Reports of this kind so far.
    pub fn count(&self, pick: impl Fn(&Report) -> bool) -> usize {
        self.reports.borrow().iter().filter(|r| pick(r)).count()
    }
}

fn resolve(reply: Reply, now: u64, hang: u64) -> (u64, Option<(u16, Vec<u8>)>) {
    match reply {
        Reply::Audio(audio) => (now, Some((200, audio))),
        Reply::Status(status, body) => (now, Some((status, body))),
        Reply::Hang => (hang, None),
        Reply::After(ms, reply) => {
            let (_, answer) = resolve(*reply, now, hang);
            (now + ms, answer)
        }
    }
}

pub fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

/// A speech request body.
pub fn speech(extra: &str) -> String {
    format!(r#"{{"model":"a/m","input":"hi","voice":"v","response_format":"pcm"{extra}}}"#)
}
