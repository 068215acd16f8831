//! The job store as the engine sees it, whichever store runs. Each
//! operation either finishes at once (shared data) or asks for a call to the
//! store first (etcd) and `resume` goes on with its answer, perhaps to
//! another call. What differs between the stores lives behind this:
//!
//! | | shared data | etcd |
//! |---|---|---|
//! | work is found | on the lanes' queues, taken in turn, and the timer wheel | by scanning the queue (in fair order) and the time-ordered indexes |
//! | a job is claimed | by a compare-and-swap of its slot that names the claimer, until a time | by a key under the replica's lease |
//! | a claim lapses | at its time (the claimer refreshes it at every step) | with the replica's lease |
//! | a finished job expires | by a timer that frees its slot | by an etcd lease of its TTL |

use super::etcd::work::{EtcdWait, EtcdWork};
use super::shared::work::SharedWork;
use crate::config::Config;
use crate::governance::Settle;
use crate::job::{JobRecord, JobStatus, Rendered};
use crate::platform::{Callout, Host};

/// Where a job the store offers can be taken from (opaque to the engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ticket {
    /// `lane`: taken from its lane's queue, and counted as running there.
    Shared { id: String, lane: Option<String> },
    Etcd {
        id: String,
        from: super::etcd::work::Source,
    },
}

impl Ticket {
    pub fn id(&self) -> &str {
        match self {
            Ticket::Shared { id, .. } | Ticket::Etcd { id, .. } => id,
        }
    }
}

/// A job the engine has claimed: the record as stored, and a finished job's
/// poll answer (kept when only its webhook state changes).
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// The job as the store now holds it (a store may have marked it
    /// processing with the claim).
    pub record: JobRecord,
    pub body: Option<Rendered>,
    /// Its status before this claim.
    pub was: JobStatus,
}

/// How the engine lets go of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// Finished: kept until it expires.
    Finished,
    /// Finished, its webhook's next attempt due at this time.
    DeliverAt(u64),
    /// Expired while its delivery went on, which has now ended: gone now.
    Forget,
    /// Not finished: pending again, for any worker (this one is going away).
    HandBack,
}

/// A job's state as the engine lets go of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    pub record: JobRecord,
    pub rendered: Rendered,
    pub leave: Leave,
    /// What the job's end settles with its key (nothing when only its
    /// webhook state changes).
    pub settle: Settle,
}

/// What the engine asks of the store.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkOp {
    /// Upkeep (timers, leases) and any work it turns up.
    Upkeep,
    /// Work waiting to be taken, at most `room` jobs.
    Find { room: usize },
    /// Takes the job, holding it `hold_ms` unless shown again before.
    Claim { ticket: Ticket, hold_ms: u64 },
    /// Shows a running job's state to polls and keeps the claim on it for
    /// `hold_ms` more.
    Show {
        record: Box<JobRecord>,
        hold_ms: u64,
    },
    /// Lets go of a job.
    End(Box<Ending>),
    /// Gives back work found but not claimed (the worker is going away).
    Return(Ticket),
}

/// What a finished operation gives back.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkDone {
    /// Jobs to claim, and how many finished jobs expired meanwhile.
    Found {
        tickets: Vec<Ticket>,
        expired: u32,
    },
    /// The job, if this worker now holds it.
    Claimed(Option<Box<Claimed>>),
    Shown,
    Ended(LetGo),
}

/// What became of letting go of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetGo {
    /// Let go of as asked.
    Done,
    /// Not ours any more: the claim had lapsed, or the job was deleted or
    /// expired meanwhile.
    Lost,
    /// The store could not be reached: try again.
    Later,
}

/// Where an operation stands while it waits on a call.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkWait {
    Etcd(Box<EtcdWait>),
}

impl WorkWait {
    /// For stats: which kind of store call.
    pub fn name(&self) -> &'static str {
        match self {
            WorkWait::Etcd(w) => w.name(),
        }
    }
}

/// An operation's next step.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkStep {
    Done(WorkDone),
    /// Make this call, then `resume` with its answer.
    Call(Callout, WorkWait),
}

/// The store the engine runs on.
pub enum WorkStore {
    Shared(SharedWork),
    Etcd(Box<EtcdWork>),
}

/// An answer to a store call: its status and body, or none at all.
pub type StoreAnswer = Option<(u16, Vec<u8>)>;

impl WorkStore {
    /// The store the configuration names, for one engine: `random` names
    /// the engine in its claims.
    pub fn for_config(
        config: &crate::config::Config,
        keys: super::Keys,
        generation: u32,
        random: [u8; 16],
    ) -> WorkStore {
        match &config.store {
            super::etcd::StoreConfig::SharedData => {
                let mut by = [0u8; 8];
                by.iter_mut().zip(random).for_each(|(b, r)| *b = r);
                WorkStore::Shared(SharedWork {
                    keys,
                    max_jobs: config.max_jobs,
                    generation,
                    by: u64::from_le_bytes(by),
                    audit_lane: 0,
                    drained_s: None,
                })
            }
            super::etcd::StoreConfig::Etcd(etcd) => {
                WorkStore::Etcd(Box::new(EtcdWork::new(etcd.clone(), random)))
            }
        }
    }

    /// Whether this store is this Envoy's own (shared data), so that counts
    /// of its jobs describe the whole store.
    pub fn is_local(&self) -> bool {
        matches!(self, WorkStore::Shared(_))
    }

    pub fn begin(&mut self, host: &dyn Host, config: &Config, op: WorkOp, now_ms: u64) -> WorkStep {
        match self {
            WorkStore::Shared(s) => WorkStep::Done(s.run(host, config, op, now_ms)),
            WorkStore::Etcd(e) => e.begin(config, op, now_ms),
        }
    }

    pub fn resume(&mut self, wait: WorkWait, answer: StoreAnswer, now_ms: u64) -> WorkStep {
        match (self, wait) {
            (WorkStore::Etcd(e), WorkWait::Etcd(w)) => e.resume(*w, answer, now_ms),
            // A shared-data operation never waits on a call.
            (WorkStore::Shared(_), _) => WorkStep::Done(WorkDone::Shown),
        }
    }
}
