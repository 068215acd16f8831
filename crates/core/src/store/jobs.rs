//! The job store as the API sees it, whichever store runs (SPEC §4): an
//! operation either finishes at once (shared data) or needs a call to etcd
//! first, and `resume` goes on with its answer (perhaps to another call).
//! The API never learns which store it is talking to.

use super::etcd::call::{Answered, EtcdCall};
use super::etcd::jobs::{self as etcd_jobs, decode_job};
use super::etcd::response::{parse_range, parse_txn};
use super::etcd::{request as req, EtcdConfig, StoreConfig};
use super::shared::api::{owned, SharedApi};
use super::shared::slot;
use super::work::StoreAnswer;
use super::{Keys, StoreError};
use crate::config::Config;
use crate::governance::{KeyState, Limits};
use crate::job::{render, JobRecord};
use crate::platform::{Callout, Host};

/// An operation's next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Done(Result<Done, StoreError>),
    /// Make this call, then `resume` with its answer.
    Call(Callout, Wait),
}

/// A call under way for an operation: the call (to make again if it gets no
/// usable answer) and where the operation stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    call: EtcdCall,
    resume: Resume,
}

/// What a finished operation gives back.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The job is stored (and queued to run); its key's counters after it.
    Inserted(Box<JobRecord>, Box<KeyState>),
    /// The job's bytes as a slot holds them; `None` if it is unknown,
    /// expired or someone else's (the one 404).
    Read(Option<Vec<u8>>),
    /// Whether this call deleted it (false: already gone, or not the caller's).
    Deleted(bool),
    /// A key's counters, jobs held and jobs running.
    Usage(Box<KeyState>, u32, u32),
}

/// Where an operation stands while it waits on a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    Insert {
        record: Box<JobRecord>,
        value: Vec<u8>,
    },
    Read {
        id: String,
        owner: Vec<u8>,
    },
    ReadParts {
        id: String,
        parts: u32,
    },
    DeleteRead {
        id: String,
        owner: Vec<u8>,
    },
    Delete {
        id: String,
        owner: Vec<u8>,
        tries: u8,
    },
}

pub struct Jobs<'a> {
    pub host: &'a dyn Host,
    pub keys: &'a Keys,
    pub config: &'a Config,
    pub generation: u32,
    pub now_ms: u64,
}

fn unavailable(why: impl Into<String>) -> StoreError {
    StoreError::Busy(why.into())
}

impl Jobs<'_> {
    fn shared(&self) -> SharedApi<'_> {
        SharedApi {
            host: self.host,
            keys: self.keys,
            max_jobs: self.config.max_jobs,
            generation: self.generation,
            now_ms: self.now_ms,
        }
    }

    /// The limits of the owner's key (none for an owner without one).
    fn limits(&self, owner: &str) -> Limits {
        owner
            .strip_prefix("vk:")
            .and_then(|name| self.config.key(name))
            .map(|k| k.rules.limits.clone())
            .unwrap_or_default()
    }

    /// Stores a new job of `chars` input characters and queues it to run, if
    /// its key's limits allow. `make` builds the record once its slot (and so
    /// its id) is known.
    pub fn insert(&self, make: &dyn Fn(u32) -> JobRecord, owner: &str, chars: u64) -> Step {
        let limits = self.limits(owner);
        match &self.config.store {
            StoreConfig::SharedData => {
                Step::Done(self.shared().insert(make, owner, &limits, chars))
            }
            StoreConfig::Etcd(etcd) => {
                let mut record = make(0);
                record.chars = chars;
                let Some(payload) = slot::encode_held(0, &record, &render(&record, None)) else {
                    return Step::Done(Err(unavailable("the job record does not fit")));
                };
                let (value, parts) =
                    etcd_jobs::encode_job(&payload, record.owner.as_bytes(), 0, etcd.part_bytes());
                if !parts.is_empty() {
                    return Step::Done(Err(StoreError::TooLarge));
                }
                let submit =
                    etcd_jobs::submit(&etcd.keys(), &record.id, &value, record.deadline_ms);
                self.call(
                    etcd,
                    submit,
                    Resume::Insert {
                        record: Box::new(record),
                        value,
                    },
                )
            }
        }
    }

    /// The owner's key's counters.
    pub fn usage(&self, owner: &str) -> Step {
        match &self.config.store {
            StoreConfig::SharedData => Step::Done(self.shared().usage(owner)),
            StoreConfig::Etcd(_) => Step::Done(Ok(Done::Usage(Box::default(), 0, 0))),
        }
    }

    /// The job's bytes, if it is `owner`'s and unexpired.
    pub fn read(&self, id: &str, owner: &[u8]) -> Step {
        match &self.config.store {
            StoreConfig::SharedData => Step::Done(self.shared().read(id, owner)),
            StoreConfig::Etcd(etcd) => {
                let resume = Resume::Read {
                    id: id.to_string(),
                    owner: owner.to_vec(),
                };
                self.call(etcd, req::range(&etcd.keys().job(id)), resume)
            }
        }
    }

    /// Deletes the job if it is `owner`'s and unexpired.
    pub fn delete(&self, id: &str, owner: &[u8]) -> Step {
        match &self.config.store {
            StoreConfig::SharedData => {
                let limits = self.limits(&String::from_utf8_lossy(owner));
                Step::Done(self.shared().delete(id, owner, &limits))
            }
            StoreConfig::Etcd(etcd) => {
                let resume = Resume::DeleteRead {
                    id: id.to_string(),
                    owner: owner.to_vec(),
                };
                self.call(etcd, req::range(&etcd.keys().job(id)), resume)
            }
        }
    }

    fn call(&self, etcd: &EtcdConfig, request: req::Request, resume: Resume) -> Step {
        let (callout, call) = etcd.call(request, self.now_ms);
        Step::Call(callout, Wait { call, resume })
    }

    /// Goes on with an operation once etcd has answered.
    pub fn resume(&self, wait: Wait, answer: StoreAnswer) -> Step {
        let StoreConfig::Etcd(etcd) = &self.config.store else {
            return Step::Done(Err(unavailable("no call was expected")));
        };
        let Wait { call, resume } = wait;
        match etcd.answered(call, &answer, self.now_ms) {
            Answered::Body(body) => self.resume_etcd(etcd, resume, body),
            Answered::Again(callout, call) => Step::Call(callout, Wait { call, resume }),
            Answered::Failed(_) => Step::Done(Err(unavailable("etcd did not answer"))),
        }
    }

    /// Deletes the job as read (`kv`) if it is the owner's and unexpired.
    fn delete_kv(
        &self,
        etcd: &EtcdConfig,
        id: String,
        owner: Vec<u8>,
        kv: Option<&super::etcd::Kv>,
        tries: u8,
    ) -> Step {
        let Some(kv) = kv else {
            return Step::Done(Ok(Done::Deleted(false)));
        };
        let owned = decode_job(&kv.value)
            .is_some_and(|job| job.owner == owner.as_slice() && !job.is_expired(self.now_ms));
        if !owned || tries >= 3 {
            return Step::Done(Ok(Done::Deleted(false)));
        }
        let delete = etcd_jobs::delete(&etcd.keys(), &id, kv.mod_revision);
        self.call(etcd, delete, Resume::Delete { id, owner, tries })
    }

    fn resume_etcd(&self, etcd: &EtcdConfig, resume: Resume, body: &[u8]) -> Step {
        let keys = etcd.keys();
        let bad = |_| Step::Done(Err(unavailable("etcd's answer is unreadable")));
        match resume {
            Resume::Insert { record, value } => match parse_txn(body) {
                Ok(txn) if txn.succeeded => Step::Done(Ok(Done::Inserted(record, Box::default()))),
                // An earlier try of this very submit landed.
                Ok(txn) if txn.range_kv(0).is_some_and(|kv| kv.value == value) => {
                    Step::Done(Ok(Done::Inserted(record, Box::default())))
                }
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
                    None => self.call(
                        etcd,
                        req::range_prefix(&keys.audio(&id), 0),
                        Resume::ReadParts {
                            id,
                            parts: job.parts,
                        },
                    ),
                }
            }
            Resume::ReadParts { id, parts } => match parse_range(body) {
                Ok(range) => Step::Done(Ok(Done::Read(
                    keys.join_audio(&id, &range.kvs, parts).ok(),
                ))),
                Err(e) => bad(e),
            },
            Resume::DeleteRead { id, owner } => match parse_range(body) {
                Ok(range) => self.delete_kv(etcd, id, owner, range.kvs.first(), 0),
                Err(e) => bad(e),
            },
            // Gone after a failed compare: an earlier try of this delete landed,
            // or the job expired meanwhile. Changed (it progressed or finished
            // since it was read): deleted as it now is, if still the caller's.
            Resume::Delete { id, owner, tries } => match parse_txn(body) {
                Ok(txn) if txn.succeeded => Step::Done(Ok(Done::Deleted(true))),
                Ok(txn) => match txn.range_kv(0) {
                    None => Step::Done(Ok(Done::Deleted(true))),
                    kv => self.delete_kv(etcd, id, owner, kv, tries.saturating_add(1)),
                },
                Err(e) => bad(e),
            },
        }
    }
}
