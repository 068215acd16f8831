//! An in-memory `Host` with Envoy's semantics, for native tests and benchmarks.
//!
//! `SimShared` is one Envoy process: shared data (values with CAS versions;
//! a CAS write to a missing key succeeds, as in Envoy) and FIFO queues.
//! `SimHost` is one worker on it, with its own view of the clock. A test can
//! hook every host call of a worker (`on_call`) to run another worker's steps
//! in between, which interleaves two workers at the finest grain there is.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::platform::{Callout, Host, Queue, SetError};

pub mod etcd;
pub use etcd::SimEtcd;

#[derive(Default)]
pub struct SimShared {
    pub data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    pub queues: RefCell<HashMap<Queue, VecDeque<Vec<u8>>>>,
    next_cas: Cell<u32>,
    /// Wall clock of the whole process, in ms.
    pub clock: Cell<u64>,
    /// Callouts sent by any worker, in order.
    pub callouts: RefCell<Vec<(u32, Callout)>>,
    next_token: Cell<u32>,
}

impl SimShared {
    pub fn new(now_ms: u64) -> Rc<SimShared> {
        let s = SimShared::default();
        s.clock.set(now_ms);
        Rc::new(s)
    }

    pub fn advance(&self, ms: u64) {
        self.clock.set(self.clock.get() + ms);
    }

    pub fn keys(&self) -> usize {
        self.data.borrow().len()
    }

    pub fn queue_len(&self, q: &Queue) -> usize {
        self.queues.borrow().get(q).map_or(0, VecDeque::len)
    }

    pub fn queued_total(&self) -> usize {
        self.queues.borrow().values().map(VecDeque::len).sum()
    }
}

type Hook = Box<dyn FnMut(u64)>;

pub struct SimHost {
    pub shared: Rc<SimShared>,
    calls: Cell<u64>,
    hook: RefCell<Option<Hook>>,
    rng: Cell<u64>,
    /// Make every `set` fail with a host error (a broken store).
    pub fail_sets: Cell<bool>,
    /// Make `dispatch` to this cluster fail, as Envoy does for an unknown cluster.
    pub refuse_cluster: RefCell<Option<String>>,
    /// This worker's callouts, in order, until taken by the test.
    pub sent: RefCell<Vec<(u32, Callout)>>,
}

impl SimHost {
    pub fn new(shared: &Rc<SimShared>, seed: u64) -> SimHost {
        SimHost {
            shared: shared.clone(),
            calls: Cell::new(0),
            hook: RefCell::new(None),
            rng: Cell::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            fail_sets: Cell::new(false),
            refuse_cluster: RefCell::new(None),
            sent: RefCell::new(Vec::new()),
        }
    }

    /// Runs `hook(n)` before this worker's n-th host call (counted from 0).
    pub fn on_call(&self, hook: impl FnMut(u64) + 'static) {
        self.calls.set(0);
        *self.hook.borrow_mut() = Some(Box::new(hook));
    }

    pub fn clear_hook(&self) {
        *self.hook.borrow_mut() = None;
    }

    /// Host calls made so far (since the last `on_call`).
    pub fn calls(&self) -> u64 {
        self.calls.get()
    }

    fn step(&self) {
        let n = self.calls.get();
        self.calls.set(n + 1);
        // Take the hook out while it runs: it may use other workers freely.
        let hook = self.hook.borrow_mut().take();
        if let Some(mut hook) = hook {
            hook(n);
            let mut slot = self.hook.borrow_mut();
            if slot.is_none() {
                *slot = Some(hook);
            }
        }
    }
}

impl Host for SimHost {
    fn wall_ms(&self) -> u64 {
        self.shared.clock.get()
    }

    fn random(&self, buf: &mut [u8]) -> Result<(), String> {
        for b in buf.iter_mut() {
            // xorshift64*: deterministic per seed, plenty for tests.
            let mut x = self.rng.get();
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.rng.set(x);
            *b = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8;
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
        self.step();
        Ok(self.shared.data.borrow().get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        self.step();
        if self.fail_sets.get() {
            return Err(SetError::Host("simulated failure".into()));
        }
        let mut data = self.shared.data.borrow_mut();
        if let (Some(cas), Some((_, current))) = (cas, data.get(key)) {
            if cas != *current {
                return Err(SetError::CasMismatch);
            }
        }
        let next = self.shared.next_cas.get().wrapping_add(1).max(1);
        self.shared.next_cas.set(next);
        data.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }

    fn enqueue(&self, queue: &Queue, item: &[u8]) -> Result<(), String> {
        self.step();
        self.shared
            .queues
            .borrow_mut()
            .entry(queue.clone())
            .or_default()
            .push_back(item.to_vec());
        Ok(())
    }

    fn dequeue(&self, queue: &Queue) -> Result<Option<Vec<u8>>, String> {
        self.step();
        Ok(self
            .shared
            .queues
            .borrow_mut()
            .get_mut(queue)
            .and_then(VecDeque::pop_front))
    }

    fn dispatch(&self, call: &Callout) -> Result<u32, String> {
        self.step();
        if self.refuse_cluster.borrow().as_deref() == Some(call.cluster.as_str()) {
            return Err("BadArgument".into());
        }
        let token = self.shared.next_token.get() + 1;
        self.shared.next_token.set(token);
        self.shared
            .callouts
            .borrow_mut()
            .push((token, call.clone()));
        self.sent.borrow_mut().push((token, call.clone()));
        Ok(token)
    }
}
