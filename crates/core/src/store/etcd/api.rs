//! The API's side of the etcd store: submit (checked and counted against
//! the key's limits in the transaction that stores the job, at its place in
//! the fair queue), poll, delete, usage. Each operation asks for a call and
//! goes on with its answer.

use super::call::{Answered, EtcdCall};
use super::config::EtcdConfig;
use super::jobs::{self, decode_job, parse_lane, LaneRead};
use super::request::{self as req, Request};
use super::response::{parse_range, parse_txn, Kv};
use crate::governance::{check, count, lane_of, KeyState, Limits};
use crate::job::{render, JobRecord};
use crate::store::jobs::{Done, Step, Wait};
use crate::store::shared::api::owned;
use crate::store::shared::slot::{self, SlotView};
use crate::store::work::StoreAnswer;
use crate::store::StoreError;

/// Tries of a submit or delete whose key's counters moved meanwhile (each
/// a round trip; a hot key's submits on many replicas contend).
const TRIES: u32 = 12;

/// Where an operation stands while it waits on etcd.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The key's counters read; then the job written with them.
    Submit(Box<Submit>),
    Read {
        id: String,
        owner: Vec<u8>,
    },
    ReadParts {
        id: String,
        parts: u32,
    },
    /// The job read, then its parts (a large job), then its key's counters,
    /// then the delete.
    Delete(Box<Deleting>),
    Usage,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Submit {
    record: JobRecord,
    limits: Limits,
    /// What was written, once it was: the job's value and the counters.
    written: Option<(Vec<u8>, KeyState)>,
    tries: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Deleting {
    id: String,
    owner: Vec<u8>,
    stage: DeleteStage,
    tries: u32,
}

#[derive(Debug, Clone, PartialEq)]
enum DeleteStage {
    Job,
    Parts {
        kv: Kv,
        parts: u32,
    },
    Lane {
        record: Box<JobRecord>,
        revision: i64,
    },
    Delete(Box<JobRecord>),
}

pub struct EtcdApi<'a> {
    pub etcd: &'a EtcdConfig,
    pub now_ms: u64,
}

fn busy(why: &str) -> Step {
    Step::Done(Err(StoreError::Busy(why.into())))
}

impl EtcdApi<'_> {
    fn call(&self, request: Request, resume: Resume) -> Step {
        let (callout, call) = self.etcd.call(request, self.now_ms);
        Step::Call(callout, Wait::etcd(call, resume))
    }

    /// A new job of `chars` characters: its key's counters are read first.
    pub fn insert(&self, record: JobRecord, limits: &Limits) -> Step {
        let read = jobs::read_lane(&self.etcd.keys(), &lane_of(&record.owner));
        let submit = Submit {
            record,
            limits: limits.clone(),
            written: None,
            tries: 0,
        };
        self.call(read, Resume::Submit(Box::new(submit)))
    }

    pub fn read(&self, id: &str, owner: &[u8]) -> Step {
        let resume = Resume::Read {
            id: id.to_string(),
            owner: owner.to_vec(),
        };
        self.call(req::range(&self.etcd.keys().job(id)), resume)
    }

    pub fn delete(&self, id: &str, owner: &[u8]) -> Step {
        let deleting = Deleting {
            id: id.to_string(),
            owner: owner.to_vec(),
            stage: DeleteStage::Job,
            tries: 0,
        };
        self.call(
            req::range(&self.etcd.keys().job(id)),
            Resume::Delete(Box::new(deleting)),
        )
    }

    pub fn usage(&self, owner: &str) -> Step {
        self.call(
            jobs::read_lane(&self.etcd.keys(), &lane_of(owner)),
            Resume::Usage,
        )
    }

    /// Goes on with an operation once etcd has answered.
    pub fn resume(&self, call: EtcdCall, resume: Resume, answer: StoreAnswer) -> Step {
        let body = match self.etcd.answered(call, &answer, self.now_ms) {
            Answered::Body(body) => body,
            Answered::Again(callout, call) => return Step::Call(callout, Wait::etcd(call, resume)),
            Answered::Failed(_) => return busy("etcd did not answer"),
        };
        match resume {
            Resume::Submit(submit) => self.submit_answered(*submit, body),
            Resume::Read { id, owner } => self.read_answered(id, owner, body),
            Resume::ReadParts { id, parts } => match parse_range(body) {
                Ok(range) => Step::Done(Ok(Done::Read(
                    self.etcd.keys().join_audio(&id, &range.kvs, parts).ok(),
                ))),
                Err(_) => busy("etcd's answer is unreadable"),
            },
            Resume::Delete(deleting) => self.delete_answered(*deleting, body),
            Resume::Usage => match parse_txn(body) {
                Ok(txn) => {
                    let read = parse_lane(&txn, 0);
                    Step::Done(Ok(Done::Usage(
                        Box::new(read.state),
                        read.held,
                        read.running,
                    )))
                }
                Err(_) => busy("etcd's answer is unreadable"),
            },
        }
    }

    fn submit_answered(&self, submit: Submit, body: &[u8]) -> Step {
        let Ok(txn) = parse_txn(body) else {
            return busy("etcd's answer is unreadable");
        };
        match submit.written {
            None => self.write_job(submit, parse_lane(&txn, 0)),
            Some((_, state)) if txn.succeeded => {
                Step::Done(Ok(Done::Inserted(Box::new(submit.record), Box::new(state))))
            }
            // An earlier try of this very write landed.
            Some((value, state)) if txn.range_kv(4).is_some_and(|kv| kv.value == value) => {
                Step::Done(Ok(Done::Inserted(Box::new(submit.record), Box::new(state))))
            }
            // The key's counters moved: checked and counted again as they now stand.
            Some(_) if submit.tries < TRIES => self.write_job(submit, parse_lane(&txn, 0)),
            Some(_) => busy("the key's counters are contended"),
        }
    }

    /// Checks the key's limits as read, counts the job, gives it its place
    /// (after the key's last, and not before the job claimed last), and
    /// writes it, only if the counters are still as read.
    fn write_job(&self, mut submit: Submit, read: LaneRead) -> Step {
        let now_s = self.now_ms / 1000;
        let chars = submit.record.chars;
        if let Some(refused) = check(&submit.limits, &read.state, read.held, chars, now_s) {
            return Step::Done(Err(StoreError::Refused(refused, Box::new(read.state))));
        }
        let mut state = read.state;
        count(&submit.limits, &mut state, chars, now_s);
        state.round = state.round.max(read.round) + 1;
        submit.record.round = state.round;
        let record = &submit.record;
        let Some(payload) = slot::encode_held(0, record, &render(record, None)) else {
            return busy("the job record does not fit");
        };
        let (value, parts) =
            jobs::encode_job(&payload, record.owner.as_bytes(), 0, self.etcd.part_bytes());
        if !parts.is_empty() {
            return Step::Done(Err(StoreError::TooLarge));
        }
        // Counts must be exact where the key has limits that count.
        let l = &submit.limits;
        let counts = l.has_windows() || l.max_held_jobs.is_some();
        let revision = counts.then_some(read.revision);
        let write = jobs::submit(&self.etcd.keys(), record, &value, &state, revision);
        submit.tries += 1;
        submit.written = Some((value, state));
        self.call(write, Resume::Submit(Box::new(submit)))
    }

    fn read_answered(&self, id: String, owner: Vec<u8>, body: &[u8]) -> Step {
        let Ok(range) = parse_range(body) else {
            return busy("etcd's answer is unreadable");
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
                req::range_prefix(&self.etcd.keys().audio(&id), 0),
                Resume::ReadParts {
                    id,
                    parts: job.parts,
                },
            ),
        }
    }

    fn delete_answered(&self, mut d: Deleting, body: &[u8]) -> Step {
        let keys = self.etcd.keys();
        match std::mem::replace(&mut d.stage, DeleteStage::Job) {
            DeleteStage::Job => match parse_range(body) {
                Ok(range) => self.delete_job(d, range.kvs.first().cloned()),
                Err(_) => busy("etcd's answer is unreadable"),
            },
            DeleteStage::Parts { kv, parts } => {
                let Ok(range) = parse_range(body) else {
                    return busy("etcd's answer is unreadable");
                };
                match keys.join_audio(&d.id, &range.kvs, parts) {
                    Ok(payload) => self.delete_record(d, &payload, kv.mod_revision),
                    Err(_) => Step::Done(Ok(Done::Deleted(None))),
                }
            }
            DeleteStage::Lane { record, revision } => match parse_txn(body) {
                Ok(txn) => {
                    let mut state = parse_lane(&txn, 0).state;
                    let lane_revision = txn.range_kv(0).map_or(0, |kv| kv.mod_revision);
                    // A job that had not finished gives its characters back.
                    if let (false, Some(w)) = (record.status.is_finished(), record.chars_window_s) {
                        state.characters.take_back(w, record.chars);
                    }
                    let delete = jobs::delete(&keys, &record, revision, (&state, lane_revision));
                    d.stage = DeleteStage::Delete(record);
                    self.call(delete, Resume::Delete(Box::new(d)))
                }
                Err(_) => busy("etcd's answer is unreadable"),
            },
            // Gone after a failed compare: an earlier try landed, or it expired
            // meanwhile. Changed (it progressed, or its key's counters moved):
            // read and deleted again as it now is.
            DeleteStage::Delete(record) => match parse_txn(body) {
                Ok(txn) if txn.succeeded => Step::Done(Ok(Done::Deleted(Some(record)))),
                Ok(txn) => match txn.range_kv(0) {
                    None => Step::Done(Ok(Done::Deleted(Some(record)))),
                    Some(_) if d.tries < TRIES => {
                        d.tries += 1;
                        d.stage = DeleteStage::Job;
                        self.call(req::range(&keys.job(&d.id)), Resume::Delete(Box::new(d)))
                    }
                    Some(_) => busy("the job is contended"),
                },
                Err(_) => busy("etcd's answer is unreadable"),
            },
        }
    }

    /// The job as read: deleted if it is the caller's and unexpired (its
    /// parts read first, for a large one).
    fn delete_job(&self, mut d: Deleting, kv: Option<Kv>) -> Step {
        let Some(kv) = kv else {
            return Step::Done(Ok(Done::Deleted(None)));
        };
        let Some(job) = decode_job(&kv.value) else {
            return Step::Done(Ok(Done::Deleted(None)));
        };
        if job.owner != d.owner.as_slice() || job.is_expired(self.now_ms) {
            return Step::Done(Ok(Done::Deleted(None)));
        }
        match job.whole {
            Some(payload) => {
                let payload = payload.to_vec();
                self.delete_record(d, &payload, kv.mod_revision)
            }
            None => {
                let parts = job.parts;
                let audio = req::range_prefix(&self.etcd.keys().audio(&d.id), 0);
                d.stage = DeleteStage::Parts { kv, parts };
                self.call(audio, Resume::Delete(Box::new(d)))
            }
        }
    }

    fn delete_record(&self, mut d: Deleting, payload: &[u8], revision: i64) -> Step {
        let SlotView::Held(view) = slot::decode(payload) else {
            return Step::Done(Ok(Done::Deleted(None)));
        };
        let Some(record) = view.record() else {
            return Step::Done(Ok(Done::Deleted(None)));
        };
        let read = jobs::read_lane(&self.etcd.keys(), &lane_of(&record.owner));
        d.stage = DeleteStage::Lane {
            record: Box::new(record),
            revision,
        };
        self.call(read, Resume::Delete(Box::new(d)))
    }
}
