//! The job store as the API sees it, whichever store runs (SPEC §4): an
//! operation either finishes at once (shared data) or needs a call to etcd
//! first, and `resume` goes on with its answer (perhaps to another call).
//! The API never learns which store it is talking to.

use super::etcd::jobs::{self as etcd_jobs, decode_job};
use super::etcd::response::{check_status, parse_range, parse_txn};
use super::etcd::{request as req, EtcdConfig, StoreAnswer, StoreConfig};
use super::slot::{self, SlotView};
use super::{Keys, Store, StoreError};
use crate::job::{render, JobRecord};
use crate::platform::{Callout, Host, Queue};

/// An operation's next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Done(Result<Done, StoreError>),
    /// Make this call, then `resume` with its answer.
    Call(Callout, Resume),
}

/// What a finished operation gives back.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The job is stored (and queued to run).
    Inserted(Box<JobRecord>),
    /// The job's bytes as a slot holds them; `None` if it is unknown,
    /// expired or someone else's (the one 404).
    Read(Option<Vec<u8>>),
    /// Whether this call deleted it (false: already gone, or not the caller's).
    Deleted(bool),
}

/// Where an operation stands while it waits on a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    Insert(Box<JobRecord>),
    Read { id: String, owner: Vec<u8> },
    ReadParts { id: String, parts: u32 },
    DeleteRead { id: String, owner: Vec<u8> },
    Delete,
}

pub struct Jobs<'a> {
    pub host: &'a dyn Host,
    pub keys: &'a Keys,
    pub store: &'a StoreConfig,
    pub max_jobs: u32,
    pub generation: u32,
    pub now_ms: u64,
}

fn unavailable(why: impl Into<String>) -> StoreError {
    StoreError::Busy(why.into())
}

/// The job's bytes if it is `owner`'s and unexpired.
fn owned(payload: Vec<u8>, owner: &[u8], now_ms: u64) -> Option<Vec<u8>> {
    match slot::decode(&payload) {
        SlotView::Held(v) if v.owner == owner && !v.is_expired(now_ms) => Some(payload),
        _ => None,
    }
}

impl Jobs<'_> {
    fn shared(&self) -> Store<'_> {
        Store::new(self.host, self.keys, self.max_jobs, self.generation)
    }

    /// Stores a new job and queues it to run. `make` builds the record once
    /// its slot (and so its id) is known.
    pub fn insert(&self, make: &dyn Fn(u32) -> JobRecord) -> Step {
        match self.store {
            StoreConfig::SharedData => Step::Done(self.insert_shared(make)),
            StoreConfig::Etcd(etcd) => {
                let record = make(0);
                let Some(payload) = slot::encode_held(0, &record, &render(&record, None)) else {
                    return Step::Done(Err(unavailable("the job record does not fit")));
                };
                let (value, parts) =
                    etcd_jobs::encode_job(&payload, record.owner.as_bytes(), 0, etcd.part_bytes());
                if !parts.is_empty() {
                    return Step::Done(Err(StoreError::TooLarge));
                }
                let submit =
                    etcd_jobs::submit(&etcd.layout(), &record.id, &value, record.deadline_ms);
                Step::Call(etcd.callout(&submit), Resume::Insert(Box::new(record)))
            }
        }
    }

    fn insert_shared(&self, make: &dyn Fn(u32) -> JobRecord) -> Result<Done, StoreError> {
        let store = self.shared();
        let record = store.insert(make)?;
        if self
            .host
            .enqueue(Queue::Jobs, record.id.as_bytes())
            .is_err()
        {
            // Give the slot back; the job never existed for the client.
            if let Ok(Some(loaded)) = store.load(&record.id) {
                let _ = store.free(loaded, &|_| true);
            }
            return Err(unavailable("the job queue is full"));
        }
        Ok(Done::Inserted(Box::new(record)))
    }

    /// The job's bytes, if it is `owner`'s and unexpired.
    pub fn read(&self, id: &str, owner: &[u8]) -> Step {
        match self.store {
            StoreConfig::SharedData => {
                Step::Done(self.shared().load(id).map(|loaded| {
                    Done::Read(loaded.and_then(|l| owned(l.value, owner, self.now_ms)))
                }))
            }
            StoreConfig::Etcd(etcd) => {
                let resume = Resume::Read {
                    id: id.to_string(),
                    owner: owner.to_vec(),
                };
                Step::Call(etcd.callout(&req::range(&etcd.layout().job(id))), resume)
            }
        }
    }

    /// Deletes the job if it is `owner`'s and unexpired.
    pub fn delete(&self, id: &str, owner: &[u8]) -> Step {
        match self.store {
            StoreConfig::SharedData => {
                let store = self.shared();
                let loaded = match store.load(id) {
                    Ok(Some(loaded)) => loaded,
                    Ok(None) => return Step::Done(Ok(Done::Deleted(false))),
                    Err(e) => return Step::Done(Err(e)),
                };
                let ok = loaded
                    .view()
                    .is_some_and(|v| v.owner == owner && !v.is_expired(self.now_ms));
                if !ok {
                    return Step::Done(Ok(Done::Deleted(false)));
                }
                let id = id.as_bytes().to_vec();
                Step::Done(
                    store
                        .free(loaded, &|v| v.id == id.as_slice())
                        .map(Done::Deleted),
                )
            }
            StoreConfig::Etcd(etcd) => {
                let resume = Resume::DeleteRead {
                    id: id.to_string(),
                    owner: owner.to_vec(),
                };
                Step::Call(etcd.callout(&req::range(&etcd.layout().job(id))), resume)
            }
        }
    }

    /// Goes on with an operation once etcd has answered.
    pub fn resume(&self, resume: Resume, answer: StoreAnswer) -> Step {
        let StoreConfig::Etcd(etcd) = self.store else {
            return Step::Done(Err(unavailable("no call was expected")));
        };
        let body = match answer
            .as_ref()
            .map(|(status, body)| check_status(*status, body))
        {
            Some(Ok(body)) => body,
            _ => return Step::Done(Err(unavailable("etcd did not answer"))),
        };
        self.resume_etcd(etcd, resume, body)
    }

    fn resume_etcd(&self, etcd: &EtcdConfig, resume: Resume, body: &[u8]) -> Step {
        let layout = etcd.layout();
        let bad = |_| Step::Done(Err(unavailable("etcd's answer is unreadable")));
        match resume {
            Resume::Insert(record) => match parse_txn(body) {
                Ok(txn) if txn.succeeded => Step::Done(Ok(Done::Inserted(record))),
                Ok(_) => Step::Done(Err(unavailable("the job id is taken"))),
                Err(e) => bad(e),
            },
            Resume::Read { id, owner } => {
                let range = match parse_range(body) {
                    Ok(r) => r,
                    Err(e) => return bad(e),
                };
                let Some(job) = range.kvs.first().and_then(|kv| decode_job(&kv.value)) else {
                    return Step::Done(Ok(Done::Read(None)));
                };
                if job.owner != owner.as_slice() || job.is_expired(self.now_ms) {
                    return Step::Done(Ok(Done::Read(None)));
                }
                match job.whole {
                    Some(payload) => {
                        Step::Done(Ok(Done::Read(owned(payload.to_vec(), &owner, self.now_ms))))
                    }
                    None => {
                        let call = etcd.callout(&req::range_prefix(&layout.audio(&id), 0));
                        Step::Call(
                            call,
                            Resume::ReadParts {
                                id,
                                parts: job.parts,
                            },
                        )
                    }
                }
            }
            Resume::ReadParts { id, parts } => match parse_range(body) {
                Ok(range) => Step::Done(Ok(Done::Read(
                    layout.join_audio(&id, &range.kvs, parts).ok(),
                ))),
                Err(e) => bad(e),
            },
            Resume::DeleteRead { id, owner } => {
                let range = match parse_range(body) {
                    Ok(r) => r,
                    Err(e) => return bad(e),
                };
                let Some(kv) = range.kvs.first() else {
                    return Step::Done(Ok(Done::Deleted(false)));
                };
                match decode_job(&kv.value) {
                    Some(job) if job.owner == owner.as_slice() && !job.is_expired(self.now_ms) => {
                        Step::Call(
                            etcd.callout(&etcd_jobs::delete(&layout, &id, kv.mod_revision)),
                            Resume::Delete,
                        )
                    }
                    _ => Step::Done(Ok(Done::Deleted(false))),
                }
            }
            // Changed or gone since it was read (it finished, or expired): not deleted.
            Resume::Delete => match parse_txn(body) {
                Ok(txn) => Step::Done(Ok(Done::Deleted(txn.succeeded))),
                Err(e) => bad(e),
            },
        }
    }
}
