//! The API's side of the shared-data store: submit (checked and counted
//! against the key's limits, queued on its lane), poll, delete, usage.

use super::lanes;
use super::{Keys, Store};
use crate::governance::{check, count, lane_of, KeyState, Limits};
use crate::job::JobRecord;
use crate::platform::Host;
use crate::store::jobs::Done;
use crate::store::shared::slot::{self, SlotView};
use crate::store::StoreError;

pub struct SharedApi<'a> {
    pub host: &'a dyn Host,
    pub keys: &'a Keys,
    pub max_jobs: u32,
    pub generation: u32,
    pub now_ms: u64,
}

/// The job's bytes if it is `owner`'s and unexpired.
pub fn owned(payload: Vec<u8>, owner: &[u8], now_ms: u64) -> Option<Vec<u8>> {
    match slot::decode(&payload) {
        SlotView::Held(v) if v.owner == owner && !v.is_expired(now_ms) => Some(payload),
        _ => None,
    }
}

impl SharedApi<'_> {
    fn store(&self) -> Store<'_> {
        Store::new(self.host, self.keys, self.max_jobs, self.generation)
    }

    /// Stores a new job if the key's limits allow it, counts it, and queues
    /// it on its lane. Nothing is held or counted for a refusal.
    pub fn insert(
        &self,
        make: &dyn Fn(u32) -> JobRecord,
        owner: &str,
        limits: &Limits,
        chars: u64,
    ) -> Result<Done, StoreError> {
        let lane = lane_of(owner);
        let now_s = self.now_ms / 1000;
        let busy = StoreError::Busy;
        let (state, cas) = lanes::read(self.host, self.keys, &lane).map_err(busy)?;
        if let Some(refused) = check(limits, &state, state.held, chars, now_s) {
            return Err(StoreError::Refused(refused, Box::new(state)));
        }
        let window_s = limits.characters.as_ref().map(|l| l.window.start(now_s));
        let store = self.store();
        let record = store
            .insert(&|slot| {
                let mut r = make(slot);
                r.chars = chars;
                r.chars_window_s = window_s;
                r
            })
            .map_err(|e| match e {
                StoreError::Full(_) => StoreError::Full(Some(Box::new(state.clone()))),
                other => other,
            })?;
        // Counted only if the limits still allow it as the count now stands.
        let mut refused = None;
        let before = Some((state.clone(), cas));
        let counted = lanes::update_from(self.host, self.keys, &lane, limits, before, |s| {
            refused = check(limits, s, s.held, chars, now_s);
            if refused.is_some() {
                return false;
            }
            count(limits, s, chars, now_s);
            s.queued = s.queued.saturating_add(1);
            true
        });
        let state = match counted {
            Ok(Some(state)) => state,
            not => {
                self.forget(&record.id);
                return Err(match (not, refused) {
                    (_, Some(r)) => {
                        let now =
                            lanes::read(self.host, self.keys, &lane).map_or(state, |(s, _)| s);
                        StoreError::Refused(r, Box::new(now))
                    }
                    (Err(e), None) => StoreError::Busy(e),
                    (Ok(_), None) => StoreError::Busy("the key's counters are contended".into()),
                });
            }
        };
        lanes::enqueue_job(self.host, &lane, &record.id).map_err(busy)?;
        Ok(Done::Inserted(Box::new(record), Box::new(state)))
    }

    /// Frees a job that never counted.
    fn forget(&self, id: &str) {
        let store = self.store();
        if let Ok(Some(loaded)) = store.load(id) {
            let _ = store.free(loaded, &|_| true);
        }
    }

    pub fn read(&self, id: &str, owner: &[u8]) -> Result<Done, StoreError> {
        let loaded = self.store().load(id)?;
        Ok(Done::Read(
            loaded.and_then(|l| owned(l.value, owner, self.now_ms)),
        ))
    }

    /// Deletes the job if it is `owner`'s and unexpired; a job that had not
    /// finished gives its characters back.
    pub fn delete(&self, id: &str, owner: &[u8], limits: &Limits) -> Result<Done, StoreError> {
        let store = self.store();
        let Some(loaded) = store.load(id)? else {
            return Ok(Done::Deleted(None));
        };
        let Some(record) = loaded
            .view()
            .filter(|v| v.owner == owner && !v.is_expired(self.now_ms))
            .and_then(|v| v.record())
        else {
            return Ok(Done::Deleted(None));
        };
        let id = id.as_bytes().to_vec();
        if !store.free(loaded, &|v| v.id == id.as_slice())? {
            return Ok(Done::Deleted(None));
        }
        let give_back = (!record.status.is_finished())
            .then_some(())
            .and(record.chars_window_s);
        released(self.host, self.keys, &record, limits, give_back);
        Ok(Done::Deleted(Some(Box::new(record))))
    }

    pub fn usage(&self, owner: &str) -> Result<Done, StoreError> {
        let (state, _) =
            lanes::read(self.host, self.keys, &lane_of(owner)).map_err(StoreError::Busy)?;
        let (held, running) = (state.held, state.running);
        Ok(Done::Usage(Box::new(state), held, running))
    }
}

/// A freed job leaves its lane's count of held jobs (and gives its characters
/// back, counted in window `give_back`, if it made no audio).
pub fn released(
    host: &dyn Host,
    keys: &Keys,
    record: &JobRecord,
    limits: &Limits,
    give_back: Option<u64>,
) {
    let _ = lanes::update(
        host,
        keys,
        &lane_of(&record.owner),
        limits,
        |s: &mut KeyState| {
            s.held = s.held.saturating_sub(1);
            if let Some(window_s) = give_back {
                s.characters.take_back(window_s, record.chars);
            }
            true
        },
    );
}
