//! The job store over shared data: every operation costs a small, fixed
//! number of host calls, whatever `max_jobs` and however many jobs are held.
//!
//! - **Slots.** Envoy never deletes a shared-data key, so a job lives in one of
//!   at most `max_jobs` reusable slots, one key each (`slot`). The job id
//!   carries its slot, so a lookup is one read.
//! - **Free list.** Freed slots go on a shared queue (`Queue::Free`) as
//!   `(slot, epoch)`; a submit takes the first whose slot is still free in that
//!   epoch (stale or duplicate entries are skipped), or makes a new slot by
//!   moving the high-water mark, until `max_jobs` slots exist. Capacity is
//!   exactly the slots: there is no job counter to drift.
//! - **Timers.** Expiry, claims that may lapse and deadlines are timers on a wheel of shared
//!   queues (`wheel`), drained a bounded amount per tick.
//! - **Audit.** A shared cursor walks a few slots per tick (`audit_step`):
//!   the backstop for what a VM that died between two writes left behind.
//! - **Lanes** (`lanes`): each key's queue of pending jobs and its counters,
//!   and the ring that takes the lanes in turn (fair dispatch).
//! - `api` is the API's side (submit, poll, delete, usage), `work` the
//!   engine's (find, claim, show, let go, upkeep).
//!
//! Every change of a slot is a compare-and-swap, so any number of workers
//! share the store; writes that span keys are ordered so that a crash between
//! them leaves something the audit repairs, never a slot held by two jobs.

pub(crate) mod api;
pub(crate) mod lanes;
pub(crate) mod slot;
pub(crate) mod wheel;
pub(crate) mod work;

use super::StoreError;
use crate::ids;
use crate::job::{render, Completion, JobRecord, JobStatus};
use crate::platform::{Host, Queue, SetError};
use slot::{Free, HeldView, SlotView};
pub use wheel::Timer;

/// CAS retries before an operation gives up as contended.
const RETRIES: usize = 16;
/// Stale free-list entries one submit skips before it looks elsewhere.
const FREE_SKIPS: usize = 32;

/// Shared-data key names, under one prefix per filter (`root_id`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Keys {
        Keys {
            prefix: format!("async-speech/{namespace}/"),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn slot(&self, n: u32) -> String {
        format!("{}s/{n}", self.prefix)
    }
    fn hwm(&self) -> String {
        format!("{}hwm", self.prefix)
    }
    fn generation(&self) -> String {
        format!("{}gen", self.prefix)
    }
    fn audit(&self) -> String {
        format!("{}audit", self.prefix)
    }
    pub fn clock(&self) -> String {
        format!("{}clock", self.prefix)
    }
}

fn read_u32(host: &dyn Host, key: &str) -> Result<(u32, Option<u32>), StoreError> {
    match host.get(key).map_err(StoreError::Busy)? {
        Some((v, cas)) => Ok((crate::bytes::le_u32(&v, 0).unwrap_or(0), Some(cas))),
        None => Ok((0, None)),
    }
}

/// A held job as read, with what is needed to change it.
pub struct Loaded {
    pub slot: u32,
    pub value: Vec<u8>,
    pub cas: u32,
}

impl Loaded {
    pub fn view(&self) -> Option<HeldView<'_>> {
        match slot::decode(&self.value) {
            SlotView::Held(v) => Some(v),
            _ => None,
        }
    }
}

/// What `update` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Updated {
    /// The change was written; the record as stored, and the slot's epoch.
    Written(JobRecord, u32),
    /// The change function left the record alone.
    Unchanged(JobRecord),
    /// No such job (deleted, expired, or the id never existed).
    Gone,
}

pub struct Store<'h> {
    host: &'h dyn Host,
    keys: &'h Keys,
    max_jobs: u32,
    /// This VM's generation (`start_generation`), written into free markers.
    gen: u32,
}

impl<'h> Store<'h> {
    pub fn new(host: &'h dyn Host, keys: &'h Keys, max_jobs: u32, gen: u32) -> Store<'h> {
        Store {
            host,
            keys,
            max_jobs,
            gen,
        }
    }

    /// Readies the store for a VM with this configuration and counts the VM
    /// (its generation). Keys that are changed by compare-and-swap are made
    /// here when missing, before any request: Envoy has no create-if-absent,
    /// and a compare-and-swap write to a missing key always succeeds.
    pub fn prepare(host: &dyn Host, keys: &Keys, lanes: impl Iterator<Item = String>) -> u32 {
        let missing = |key: &str| matches!(host.get(key), Ok(None));
        if missing(&keys.hwm()) {
            let _ = host.set(&keys.hwm(), &0u32.to_le_bytes(), None);
        }
        for lane in lanes {
            let key = keys.lane(&lane);
            if missing(&key) {
                let _ = host.set(&key, &lanes::encode(&Default::default()), None);
            }
        }
        Store::start_generation(host, keys)
    }

    /// Counts a new VM: its generation. The audit puts back on the free list
    /// any free slot marked by an older generation, since a VM that died may
    /// have taken it off the list and never used it.
    pub fn start_generation(host: &dyn Host, keys: &Keys) -> u32 {
        for _ in 0..RETRIES {
            let Ok((n, cas)) = read_u32(host, &keys.generation()) else {
                return 0;
            };
            let next = n.wrapping_add(1);
            match host.set(&keys.generation(), &next.to_le_bytes(), cas) {
                Ok(()) => return next,
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host(_)) => return 0,
            }
        }
        0
    }

    pub fn host(&self) -> &'h dyn Host {
        self.host
    }

    pub fn keys(&self) -> &'h Keys {
        self.keys
    }

    /// Slots made so far.
    pub fn slots(&self) -> u32 {
        read_u32(self.host, &self.keys.hwm()).map_or(0, |(n, _)| n)
    }

    /// Stores a new job. `make` builds the record once its slot (and so its id)
    /// is known. Cost: one dequeue and two reads/writes in the common case.
    pub fn insert(&self, make: &dyn Fn(u32) -> JobRecord) -> Result<JobRecord, StoreError> {
        for _ in 0..RETRIES {
            let (slot, epoch, cas) = match self.take_free()? {
                Some(found) => found,
                None => (self.grow()?, 0, None),
            };
            let record = make(slot);
            let value = slot::encode_held(epoch, &record, &render(&record, None))
                .ok_or_else(|| StoreError::Busy("the job record does not fit a slot".into()))?;
            match self.host.set(&self.keys.slot(slot), &value, cas) {
                Ok(()) => return Ok(record),
                // The audit moved the slot on meanwhile; it is queued again.
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host(e)) => {
                    self.put_back(slot, epoch);
                    return Err(StoreError::Busy(e));
                }
            }
        }
        Err(StoreError::Busy("no free slot could be taken".into()))
    }

    /// The first free-list entry whose slot is still free in that epoch.
    fn take_free(&self) -> Result<Option<(u32, u32, Option<u32>)>, StoreError> {
        for _ in 0..FREE_SKIPS {
            let Some(item) = self.host.dequeue(&Queue::Free).map_err(StoreError::Busy)? else {
                return Ok(None);
            };
            let Some((slot, epoch)) = decode_free_entry(&item) else {
                continue;
            };
            if slot >= self.max_jobs {
                continue; // retired: max_jobs was lowered
            }
            if let Some((value, cas)) = self
                .host
                .get(&self.keys.slot(slot))
                .map_err(StoreError::Busy)?
            {
                if let SlotView::Free(f) = slot::decode(&value) {
                    if f.epoch == epoch {
                        return Ok(Some((slot, epoch, Some(cas))));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Makes a new slot: whoever moves the high-water mark from n to n+1 owns slot n.
    fn grow(&self) -> Result<u32, StoreError> {
        for _ in 0..RETRIES {
            let (n, cas) = read_u32(self.host, &self.keys.hwm())?;
            if n >= self.max_jobs {
                return Err(StoreError::Full(None));
            }
            match self.host.set(&self.keys.hwm(), &(n + 1).to_le_bytes(), cas) {
                Ok(()) => return Ok(n),
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host(e)) => return Err(StoreError::Busy(e)),
            }
        }
        Err(StoreError::Busy("the slot count is contended".into()))
    }

    /// Marks a slot we hold (or took off the free list) free in the next epoch
    /// and queues it. Best effort: should it fail, the audit finds the slot.
    fn put_back(&self, slot: u32, epoch: u32) {
        let key = self.keys.slot(slot);
        let Ok(Some((_, cas))) = self.host.get(&key) else {
            return;
        };
        let next = epoch.wrapping_add(1);
        let marker = Free {
            epoch: next,
            gen: self.gen,
        }
        .encode();
        if self.host.set(&key, &marker, Some(cas)).is_ok() {
            self.enqueue_free(slot, next);
        }
    }

    fn enqueue_free(&self, slot: u32, epoch: u32) {
        if slot < self.max_jobs {
            let _ = self
                .host
                .enqueue(&Queue::Free, &encode_free_entry(slot, epoch));
        }
    }

    /// The slot's value, if it holds the job with this id.
    pub fn load(&self, id: &str) -> Result<Option<Loaded>, StoreError> {
        let Some(slot) = ids::slot_of(id) else {
            return Ok(None);
        };
        self.load_slot(slot, |v| v.id == id.as_bytes())
    }

    fn load_slot(
        &self,
        slot: u32,
        wanted: impl Fn(&HeldView) -> bool,
    ) -> Result<Option<Loaded>, StoreError> {
        let Some((value, cas)) = self
            .host
            .get(&self.keys.slot(slot))
            .map_err(StoreError::Busy)?
        else {
            return Ok(None);
        };
        let loaded = Loaded { slot, value, cas };
        Ok(loaded.view().is_some_and(|v| wanted(&v)).then_some(loaded))
    }

    /// Applies `change` to the job under CAS, retrying on contention. `change`
    /// returns false to leave the record alone. A job that finishes here gets
    /// its poll answer rendered with `completion` (its audio); a finished job
    /// keeps the answer it has.
    pub fn update(
        &self,
        id: &str,
        completion: Option<&Completion>,
        change: &mut dyn FnMut(&mut JobRecord) -> bool,
    ) -> Result<Updated, StoreError> {
        for _ in 0..RETRIES {
            let Some(loaded) = self.load(id)? else {
                return Ok(Updated::Gone);
            };
            let Some(view) = loaded.view() else {
                return Ok(Updated::Gone);
            };
            let Some(mut record) = view.record() else {
                return Ok(Updated::Gone);
            };
            let was_finished = record.status.is_finished();
            if !change(&mut record) {
                return Ok(Updated::Unchanged(record));
            }
            let value = if was_finished {
                let kept = if record.result_dropped {
                    crate::job::Rendered {
                        body: b"{}".to_vec(),
                        audio: None,
                        tail_at: 1,
                    }
                } else {
                    crate::job::with_new_tail(view.body, view.audio, view.tail_at, &record)
                };
                slot::encode_held(view.epoch, &record, &kept)
            } else {
                let done = completion.filter(|_| record.status == JobStatus::Completed);
                slot::encode_held(view.epoch, &record, &render(&record, done))
            }
            .ok_or_else(|| StoreError::Busy("the job record does not fit a slot".into()))?;
            let epoch = view.epoch;
            match self
                .host
                .set(&self.keys.slot(loaded.slot), &value, Some(loaded.cas))
            {
                Ok(()) => return Ok(Updated::Written(record, epoch)),
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host(e)) => return Err(StoreError::Busy(e)),
            }
        }
        Err(StoreError::Busy(format!("job {id} is contended")))
    }

    /// Frees the job's slot if it still holds this job and `still(view)` holds.
    /// Returns whether this call freed it; exactly one of several racing
    /// callers (DELETE, expiry, audit) does.
    pub fn free(
        &self,
        loaded: Loaded,
        still: &dyn Fn(&HeldView) -> bool,
    ) -> Result<bool, StoreError> {
        let mut loaded = loaded;
        for _ in 0..RETRIES {
            let Some(view) = loaded.view() else {
                return Ok(false);
            };
            if !still(&view) {
                return Ok(false);
            }
            let next = view.epoch.wrapping_add(1);
            let id = view.id.to_vec();
            let marker = Free {
                epoch: next,
                gen: self.gen,
            }
            .encode();
            match self
                .host
                .set(&self.keys.slot(loaded.slot), &marker, Some(loaded.cas))
            {
                Ok(()) => {
                    self.enqueue_free(loaded.slot, next);
                    return Ok(true);
                }
                Err(SetError::CasMismatch) => {
                    match self.load_slot(loaded.slot, |v| v.id == id.as_slice())? {
                        Some(again) => loaded = again,
                        None => return Ok(false),
                    }
                }
                Err(SetError::Host(e)) => return Err(StoreError::Busy(e)),
            }
        }
        Err(StoreError::Busy("the job is contended".into()))
    }

    /// Puts a timer on the wheel for this job's slot.
    pub fn schedule(&self, slot: u32, epoch: u32, due_ms: u64, now_ms: u64) {
        let timer = Timer {
            slot,
            epoch,
            due_s: due_ms.div_ceil(1000),
        };
        let _ = wheel::schedule(self.host, timer, now_ms / 1000);
    }

    /// Up to `cap` timers that are due, from the buckets due since `since_s`
    /// (the second of the last complete drain); and whether this one was.
    pub fn due_timers(&self, now_ms: u64, since_s: Option<u64>, cap: usize) -> (Vec<Timer>, bool) {
        wheel::take_due(self.host, now_ms / 1000, since_s, cap)
    }

    /// The slot a timer names, if it is still held in the timer's epoch.
    pub fn load_for_timer(&self, timer: Timer) -> Result<Option<Loaded>, StoreError> {
        self.load_slot(timer.slot, |v| v.epoch == timer.epoch)
    }

    /// One step of the audit walk: the next `n` slots (round-robin over the
    /// slots made). Free slots of an older VM generation are queued again
    /// (in a new epoch, so any old entry for them goes stale); held slots come
    /// back, as read, for the caller to look at as if they were due.
    /// Also the newest generation, for the caller's own free markers: a
    /// worker that marks with an older one than it knows would have every
    /// slot it frees queued twice.
    pub fn audit_step(&self, n: u32) -> (Vec<Loaded>, u32) {
        let Ok((current_gen, _)) = read_u32(self.host, &self.keys.generation()) else {
            return (Vec::new(), self.gen);
        };
        let nothing = (Vec::new(), current_gen.max(self.gen));
        let slots = self.slots().min(self.max_jobs);
        if slots == 0 {
            return nothing;
        }
        let Ok((start, cas)) = read_u32(self.host, &self.keys.audit()) else {
            return nothing;
        };
        let start = start % slots;
        let end = start.saturating_add(n.min(slots));
        // Claim the range; if another worker moved the cursor, it walks it.
        if self
            .host
            .set(&self.keys.audit(), &(end % slots).to_le_bytes(), cas)
            .is_err()
        {
            return nothing;
        }
        let mut out = Vec::new();
        for i in start..end {
            let slot = i % slots;
            let Ok(Some((value, cas))) = self.host.get(&self.keys.slot(slot)) else {
                continue;
            };
            match slot::decode(&value) {
                SlotView::Free(f) if f.gen != current_gen && f.gen < current_gen => {
                    let next = f.epoch.wrapping_add(1);
                    let marker = Free {
                        epoch: next,
                        gen: current_gen,
                    }
                    .encode();
                    if self
                        .host
                        .set(&self.keys.slot(slot), &marker, Some(cas))
                        .is_ok()
                    {
                        self.enqueue_free(slot, next);
                    }
                }
                SlotView::Held(_) => out.push(Loaded { slot, value, cas }),
                _ => {}
            }
        }
        (out, nothing.1)
    }
}

fn encode_free_entry(slot: u32, epoch: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&slot.to_le_bytes());
    out[4..].copy_from_slice(&epoch.to_le_bytes());
    out
}

fn decode_free_entry(bytes: &[u8]) -> Option<(u32, u32)> {
    let mut f = crate::bytes::Fields(bytes);
    Some((f.u32()?, f.u32()?))
}

#[cfg(test)]
mod tests;
