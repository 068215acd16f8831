//! The job store as the API sees it, whichever store runs: an operation
//! either finishes at once (shared data, `shared::api`) or needs a call to
//! etcd first (`etcd::api`), and `resume` goes on with its answer (perhaps
//! to another call). The API never learns which store it is talking to.

use super::etcd::api::{EtcdApi, Resume};
use super::etcd::call::EtcdCall;
use super::etcd::StoreConfig;
use super::shared::api::SharedApi;
use super::work::StoreAnswer;
use super::{Keys, StoreError};
use crate::config::Config;
use crate::governance::{KeyState, Limits};
use crate::job::JobRecord;
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

impl Wait {
    pub(crate) fn etcd(call: EtcdCall, resume: Resume) -> Wait {
        Wait { call, resume }
    }
}

/// What a finished operation gives back.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The job is stored (and queued to run); its key's counters after it.
    Inserted(Box<JobRecord>, Box<KeyState>),
    /// The job's bytes as a slot holds them; `None` if it is unknown,
    /// expired or someone else's (the one 404).
    Read(Option<Vec<u8>>),
    /// The job this call deleted (none: already gone, or not the caller's).
    Deleted(Option<Box<JobRecord>>),
    /// A key's counters, jobs held and jobs running.
    Usage(Box<KeyState>, u32, u32),
}

pub struct Jobs<'a> {
    pub host: &'a dyn Host,
    pub keys: &'a Keys,
    pub config: &'a Config,
    pub generation: u32,
    pub now_ms: u64,
}

/// Which store an operation runs on.
enum On<'a> {
    Shared(SharedApi<'a>),
    Etcd(EtcdApi<'a>),
}

impl Jobs<'_> {
    fn on(&self) -> On<'_> {
        match &self.config.store {
            StoreConfig::SharedData => On::Shared(SharedApi {
                host: self.host,
                keys: self.keys,
                max_jobs: self.config.max_jobs,
                generation: self.generation,
                now_ms: self.now_ms,
            }),
            StoreConfig::Etcd(etcd) => On::Etcd(EtcdApi {
                etcd,
                now_ms: self.now_ms,
            }),
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
        match self.on() {
            On::Shared(s) => Step::Done(s.insert(make, owner, &limits, chars)),
            On::Etcd(e) => {
                let mut record = make(0);
                record.chars = chars;
                record.chars_window_s = limits
                    .characters
                    .as_ref()
                    .map(|l| l.window.start(self.now_ms / 1000));
                e.insert(record, &limits)
            }
        }
    }

    /// The job's bytes, if it is `owner`'s and unexpired.
    pub fn read(&self, id: &str, owner: &[u8]) -> Step {
        match self.on() {
            On::Shared(s) => Step::Done(s.read(id, owner)),
            On::Etcd(e) => e.read(id, owner),
        }
    }

    /// Deletes the job if it is `owner`'s and unexpired.
    pub fn delete(&self, id: &str, owner: &[u8]) -> Step {
        match self.on() {
            On::Shared(s) => {
                let limits = self.limits(&String::from_utf8_lossy(owner));
                Step::Done(s.delete(id, owner, &limits))
            }
            On::Etcd(e) => e.delete(id, owner),
        }
    }

    /// The owner's key's counters.
    pub fn usage(&self, owner: &str) -> Step {
        match self.on() {
            On::Shared(s) => Step::Done(s.usage(owner)),
            On::Etcd(e) => e.usage(owner),
        }
    }

    /// Goes on with an operation once etcd has answered.
    pub fn resume(&self, wait: Wait, answer: StoreAnswer) -> Step {
        match self.on() {
            On::Etcd(e) => e.resume(wait.call, wait.resume, answer),
            On::Shared(_) => Step::Done(Err(StoreError::Busy("no call was expected".into()))),
        }
    }
}
