//! The job store, over Envoy's shared data (or any `SharedData`).
//!
//! Envoy never deletes a shared-data key, so jobs live in a fixed set of
//! slots that are reused: slot `n` has three keys — the job record, the
//! request and the audio — and a slot is free when its record is empty. Slots
//! are created on demand up to `max_jobs` (the high-water mark `hwm`), so the
//! number of keys is at most `3 * max_jobs + 2` for the life of the process.
//! Every change is a compare-and-swap with bounded retries, so several workers
//! can share the store.
//!
//! Envoy has no create-if-absent (a CAS write to a missing key succeeds), so a
//! missing slot key is never written by a racing writer: only the allocator
//! that moved `hwm` past a slot creates it.

use crate::job::JobRecord;

/// A shared-data value and its CAS version (0 when the key does not exist).
pub type Versioned = (Vec<u8>, u32);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    /// Someone changed the value since it was read.
    CasMismatch,
    /// The host refused for another reason.
    Host(String),
}

/// The host's key-value store: Envoy shared data in the filter, a map in tests.
pub trait SharedData {
    /// A missing key reads as an empty value with CAS 0.
    fn get(&self, key: &str) -> Result<Versioned, String>;
    /// `cas` 0 writes unconditionally.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
}

const COUNT_KEY: &str = "async-speech/count";
const HWM_KEY: &str = "async-speech/hwm";
const RETRIES: usize = 32;

fn meta_key(slot: u32) -> String {
    format!("async-speech/job/{slot}")
}
fn request_key(slot: u32) -> String {
    format!("async-speech/request/{slot}")
}
fn audio_key(slot: u32) -> String {
    format!("async-speech/audio/{slot}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// `max_jobs` jobs are held already.
    Full,
    /// Contention or a host failure that bounded retries did not overcome.
    Busy(String),
}

pub struct Store<'a> {
    data: &'a dyn SharedData,
    max_jobs: u32,
}

/// A value tagged with the job it belongs to: `id '\n' payload`.
fn tag(id: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(id.len() + 1 + payload.len());
    v.extend_from_slice(id.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(payload);
    v
}

fn untag<'v>(id: &str, value: &'v [u8]) -> Option<&'v [u8]> {
    let rest = value.strip_prefix(id.as_bytes())?;
    rest.strip_prefix(b"\n")
}

impl<'a> Store<'a> {
    pub fn new(data: &'a dyn SharedData, max_jobs: u32) -> Store<'a> {
        Store { data, max_jobs }
    }

    fn read_number(&self, key: &str) -> Result<(u32, u32), StoreError> {
        let (value, cas) = self.data.get(key).map_err(StoreError::Busy)?;
        let n = std::str::from_utf8(&value)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        Ok((n, cas))
    }

    /// Adds `delta` to a counter within `0..=limit`; returns the new value, or
    /// `None` when it would leave that range.
    fn bump(&self, key: &str, delta: i64, limit: u32) -> Result<Option<u32>, StoreError> {
        for _ in 0..RETRIES {
            let (n, cas) = self.read_number(key)?;
            let next = i64::from(n) + delta;
            if next < 0 || next > i64::from(limit) {
                return Ok(None);
            }
            let next = next as u32;
            match self.data.set(key, next.to_string().as_bytes(), cas) {
                Ok(()) => return Ok(Some(next)),
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host(e)) => return Err(StoreError::Busy(e)),
            }
        }
        Err(StoreError::Busy(format!("{key} is contended")))
    }

    /// Jobs held now (pending, processing, finished and not yet freed).
    pub fn count(&self) -> u32 {
        self.read_number(COUNT_KEY).map_or(0, |(n, _)| n)
    }

    /// Slots created so far.
    pub fn slots(&self) -> u32 {
        self.read_number(HWM_KEY).map_or(0, |(n, _)| n).min(self.max_jobs)
    }

    /// Creates the two counters if they are missing. Run at configure time, before
    /// the VM takes traffic, since a racing first write could otherwise reset them.
    pub fn init(&self) {
        for key in [COUNT_KEY, HWM_KEY] {
            if let Ok((value, 0)) = self.data.get(key) {
                if value.is_empty() {
                    let _ = self.data.set(key, b"0", 0);
                }
            }
        }
    }

    /// Stores a new job with its request. `make` builds the record once the slot
    /// (and so the id) is known. `cursor` is where this worker starts looking.
    pub fn insert(
        &self,
        cursor: &mut u32,
        make: &dyn Fn(u32) -> JobRecord,
        request_json: &[u8],
    ) -> Result<JobRecord, StoreError> {
        if self.bump(COUNT_KEY, 1, self.max_jobs)?.is_none() {
            return Err(StoreError::Full);
        }
        match self.place(cursor, make) {
            Ok((slot, record)) => {
                // The slot is ours now; its request key is written by no one else.
                let key = request_key(slot);
                let cas = self.data.get(&key).map(|(_, c)| c).unwrap_or(0);
                if let Err(e) = self.data.set(&key, &tag(&record.id, request_json), cas) {
                    let _ = self.remove(slot, &record.id);
                    return Err(StoreError::Busy(format!("cannot store the request: {e:?}")));
                }
                Ok(record)
            }
            Err(e) => {
                let _ = self.bump(COUNT_KEY, -1, u32::MAX);
                Err(e)
            }
        }
    }

    fn place(&self, cursor: &mut u32, make: &dyn Fn(u32) -> JobRecord) -> Result<(u32, JobRecord), StoreError> {
        for _ in 0..RETRIES {
            let slots = self.slots();
            // Look through the existing slots for a free one, starting at the cursor.
            if slots > 0 {
                for step in 0..slots {
                    let slot = (cursor.wrapping_add(step)) % slots;
                    let (value, cas) = self.data.get(&meta_key(slot)).map_err(StoreError::Busy)?;
                    if !value.is_empty() || cas == 0 {
                        continue; // taken, or not created yet by its allocator
                    }
                    let record = make(slot);
                    let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Busy(e.to_string()))?;
                    match self.data.set(&meta_key(slot), &bytes, cas) {
                        Ok(()) => {
                            *cursor = slot.wrapping_add(1);
                            return Ok((slot, record));
                        }
                        Err(SetError::CasMismatch) => continue,
                        Err(SetError::Host(e)) => return Err(StoreError::Busy(e)),
                    }
                }
            }
            // All slots busy: create one. Whoever moves hwm from n to n+1 owns slot n.
            if let Some(next) = self.bump(HWM_KEY, 1, self.max_jobs)? {
                let slot = next - 1;
                let record = make(slot);
                let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Busy(e.to_string()))?;
                self.data.set(&meta_key(slot), &bytes, 0).map_err(|e| StoreError::Busy(format!("{e:?}")))?;
                return Ok((slot, record));
            }
            // hwm is at max_jobs and every slot looked busy: frees are racing us; look again.
        }
        Err(StoreError::Busy("no free slot found".into()))
    }

    /// The record in `slot`, with its CAS; `None` when the slot is free.
    pub fn load(&self, slot: u32) -> Option<(JobRecord, u32)> {
        if slot >= self.max_jobs {
            return None;
        }
        let (value, cas) = self.data.get(&meta_key(slot)).ok()?;
        if value.is_empty() {
            return None;
        }
        let record: JobRecord = serde_json::from_slice(&value).ok()?;
        Some((record, cas))
    }

    /// The job with this id, if it is still held.
    pub fn find(&self, id: &str) -> Option<(u32, JobRecord, u32)> {
        let slot = crate::ids::slot_of(id)?;
        let (record, cas) = self.load(slot)?;
        (record.id == id).then_some((slot, record, cas))
    }

    /// Applies `change` to the job with this id under CAS, retrying on contention.
    /// `change` returns false to leave the record as it is. Returns the record as
    /// stored after the change, or `None` when the job is gone or was left alone.
    pub fn modify(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut JobRecord) -> bool,
    ) -> Result<Option<JobRecord>, StoreError> {
        for _ in 0..RETRIES {
            let Some((slot, mut record, cas)) = self.find(id) else {
                return Ok(None);
            };
            if !change(&mut record) {
                return Ok(None);
            }
            let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Busy(e.to_string()))?;
            match self.data.set(&meta_key(slot), &bytes, cas) {
                Ok(()) => return Ok(Some(record)),
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host(e)) => return Err(StoreError::Busy(e)),
            }
        }
        Err(StoreError::Busy(format!("job {id} is contended")))
    }

    /// Forgets a job: its audio, request and record, and frees its slot.
    /// Returns false when the job was already gone.
    pub fn remove(&self, slot: u32, id: &str) -> bool {
        for _ in 0..RETRIES {
            self.clear_tagged(&audio_key(slot), id);
            self.clear_tagged(&request_key(slot), id);
            let Some((record, cas)) = self.load(slot) else { return false };
            if record.id != id {
                return false;
            }
            match self.data.set(&meta_key(slot), b"", cas) {
                Ok(()) => {
                    let _ = self.bump(COUNT_KEY, -1, u32::MAX);
                    return true;
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host(_)) => return false,
            }
        }
        false
    }

    /// Empties a tagged value if it still belongs to `id`.
    fn clear_tagged(&self, key: &str, id: &str) {
        if let Ok((value, cas)) = self.data.get(key) {
            if cas != 0 && untag(id, &value).is_some() {
                let _ = self.data.set(key, b"", cas);
            }
        }
    }

    pub fn request(&self, slot: u32, id: &str) -> Option<Vec<u8>> {
        let (value, _) = self.data.get(&request_key(slot)).ok()?;
        untag(id, &value).map(<[u8]>::to_vec)
    }

    /// Drops the request once the job no longer needs it.
    pub fn drop_request(&self, slot: u32, id: &str) {
        self.clear_tagged(&request_key(slot), id);
    }

    pub fn put_audio(&self, slot: u32, id: &str, audio: &[u8]) -> Result<(), StoreError> {
        let key = audio_key(slot);
        let (_, cas) = self.data.get(&key).map_err(StoreError::Busy)?;
        self.data
            .set(&key, &tag(id, audio), cas)
            .map_err(|e| StoreError::Busy(format!("cannot store audio: {e:?}")))
    }

    /// Removes audio written for a job whose record then could not be completed.
    pub fn discard_audio(&self, slot: u32, id: &str) {
        self.clear_tagged(&audio_key(slot), id);
    }

    pub fn audio(&self, slot: u32, id: &str) -> Option<Vec<u8>> {
        let (value, _) = self.data.get(&audio_key(slot)).ok()?;
        untag(id, &value).map(<[u8]>::to_vec)
    }

    /// Every held job, slot by slot (for the sweep).
    pub fn scan(&self) -> impl Iterator<Item = (u32, JobRecord)> + '_ {
        (0..self.slots()).filter_map(|slot| self.load(slot).map(|(r, _)| (slot, r)))
    }

    /// Sets the job count to what a sweep saw, unless anything moved since `seen_cas`.
    pub fn count_with_cas(&self) -> Option<(u32, u32)> {
        self.read_number(COUNT_KEY).ok()
    }

    pub fn correct_count(&self, observed: u32, seen_cas: u32) -> bool {
        self.data
            .set(COUNT_KEY, observed.to_string().as_bytes(), seen_cas)
            .is_ok()
    }
}

/// An in-memory `SharedData` with Envoy's semantics, for tests and benchmarks.
#[cfg(test)]
pub mod memory {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    pub struct MemoryData {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: RefCell<u32>,
    }

    impl SharedData for MemoryData {
        fn get(&self, key: &str) -> Result<Versioned, String> {
            Ok(self.map.borrow().get(key).cloned().unwrap_or((Vec::new(), 0)))
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            let mut map = self.map.borrow_mut();
            if let Some((_, current)) = map.get(key) {
                if cas != 0 && cas != *current {
                    return Err(SetError::CasMismatch);
                }
            }
            let mut next = self.next_cas.borrow_mut();
            *next += 1;
            map.insert(key.to_string(), (value.to_vec(), *next));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryData;
    use super::*;
    use crate::ids::make_id;

    fn maker(seed: u8) -> impl Fn(u32) -> JobRecord {
        move |slot| JobRecord::new(make_id([seed; 16], slot), "o".into(), 0, 1, 10, vec![])
    }

    #[test]
    fn keys_stay_bounded_however_many_jobs_pass() {
        let data = MemoryData::default();
        let store = Store::new(&data, 5);
        store.init();
        let mut cursor = 0;
        for round in 0..200u32 {
            let mut held = Vec::new();
            for j in 0..5u8 {
                let r = store.insert(&mut cursor, &maker(j.wrapping_add(round as u8)), b"{}").unwrap();
                held.push(r.id);
            }
            assert_eq!(store.insert(&mut cursor, &maker(9), b"{}"), Err(StoreError::Full));
            for id in held {
                let (slot, _, _) = store.find(&id).unwrap();
                store.put_audio(slot, &id, b"audio").unwrap();
                assert!(store.remove(slot, &id));
                assert!(!store.remove(slot, &id), "removing twice is a no-op");
            }
            assert_eq!(store.count(), 0);
        }
        assert_eq!(store.slots(), 5);
        assert!(data.map.borrow().len() <= 3 * 5 + 2, "{} keys", data.map.borrow().len());
    }

    #[test]
    fn requests_and_audio_belong_to_their_job() {
        let data = MemoryData::default();
        let store = Store::new(&data, 2);
        store.init();
        let mut cursor = 0;
        let a = store.insert(&mut cursor, &maker(1), b"{\"a\":1}").unwrap();
        let (slot, _, _) = store.find(&a.id).unwrap();
        assert_eq!(store.request(slot, &a.id).unwrap(), b"{\"a\":1}");
        store.put_audio(slot, &a.id, &[0, 1, 2]).unwrap();
        assert_eq!(store.audio(slot, &a.id).unwrap(), vec![0, 1, 2]);
        assert!(store.remove(slot, &a.id));
        // A new job in the same slot sees none of the old one's data.
        let b = store.insert(&mut cursor, &maker(2), b"{}").unwrap();
        let (slot_b, _, _) = store.find(&b.id).unwrap();
        assert_eq!(slot_b, slot);
        assert_eq!(store.audio(slot, &b.id), None);
        assert!(store.find(&a.id).is_none(), "the old id no longer resolves");
    }

    #[test]
    fn modify_is_compare_and_swap() {
        let data = MemoryData::default();
        let store = Store::new(&data, 2);
        store.init();
        let a = store.insert(&mut 0, &maker(1), b"{}").unwrap();
        let claimed = store.modify(&a.id, &mut |r| r.claim(0, 10)).unwrap();
        assert!(claimed.is_some());
        let again = store.modify(&a.id, &mut |r| r.claim(0, 10)).unwrap();
        assert!(again.is_none(), "the second claim changes nothing");
        assert!(store.modify("00000000-0000-4000-8000-000000000000", &mut |_| true).unwrap().is_none());
    }
}
