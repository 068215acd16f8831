//! The engine's side of the etcd store. Each VM holds an etcd lease, kept
//! alive every few seconds, and scans the pending index for work. It claims
//! a job with a transaction that puts `claims/<id>` under its lease only if no
//! claim exists, reading the job in the same step, and lets go of it with one
//! transaction that holds only while its claim does: the record as it ends
//! (under a lease of its TTL once finished, its audio parts written before
//! under the same lease), the pending entry and the claim removed. A replica
//! that dies takes its lease with it: its claims lapse and another replica
//! takes the jobs over (a late write of the dead claim's is refused).

use super::call::{Answered, EtcdCall};
use super::config::EtcdConfig;
use super::jobs::{self, decode_job, parse_pending, Pending, Release, CLAIM_TTL_S, SCAN_LIMIT};
use super::request::{self as req, Request};
use super::response::{parse_lease_grant, parse_lease_keepalive, parse_range, parse_txn, Kv};
use crate::job::Rendered;
use crate::platform::Callout;
use crate::store::shared::slot::{self, SlotView};
use crate::store::work::{
    Claimed, Ending, Leave, LetGo, StoreAnswer, Ticket, WorkDone, WorkOp, WorkStep, WorkWait,
};

/// Time between scans of the pending index while it has little in it; a scan
/// that came back full is followed by the next at once.
const SCAN_EVERY_MS: u64 = 500;
/// Extra life of a finished job's keys past its TTL (polls answer 404 from the
/// expiry in the record; etcd removes the keys a moment later).
const TTL_MARGIN_S: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    None,
    Granting,
    Held {
        id: i64,
        renew_at_ms: u64,
        renewing: bool,
    },
}

pub struct EtcdWork {
    etcd: EtcdConfig,
    /// This VM's name in its claims.
    owner: Vec<u8>,
    lease: Lease,
    scanning: bool,
    next_scan_ms: u64,
}

/// What a call to etcd was for, and where its operation stands.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdWait {
    call: EtcdCall,
    step: Waiting,
}

#[derive(Debug, Clone, PartialEq)]
enum Waiting {
    Grant,
    KeepAlive,
    Scan,
    Claim,
    Show,
    /// A finished job's TTL lease, its parts, then the release.
    Ttl(Box<Letting>),
    Part(Box<Letting>),
    Release(Box<Letting>),
}

/// A job on its way back into etcd.
#[derive(Debug, Clone, PartialEq)]
struct Letting {
    id: String,
    value: Vec<u8>,
    parts: Vec<Vec<u8>>,
    next_part: usize,
    ttl_lease: Option<i64>,
    leave: Leave,
    remaining_s: u64,
}

impl EtcdWait {
    pub fn name(&self) -> &'static str {
        match self.step {
            Waiting::Grant => "lease_grant",
            Waiting::KeepAlive => "lease_keepalive",
            Waiting::Scan => "scan",
            Waiting::Claim => "claim",
            Waiting::Show => "progress",
            Waiting::Ttl(_) => "ttl_lease",
            Waiting::Part(_) => "put_part",
            Waiting::Release(_) => "finish",
        }
    }
}

/// When to renew a lease of `ttl` seconds: at a third of it.
fn renew_after_ms(ttl: i64) -> u64 {
    u64::try_from(ttl).unwrap_or(0).saturating_mul(1000) / 3
}

impl EtcdWork {
    /// `random` names this VM's claims.
    pub fn new(etcd: EtcdConfig, random: [u8; 16]) -> EtcdWork {
        EtcdWork {
            etcd,
            owner: format!("replica-{}", hex::encode(random)).into_bytes(),
            lease: Lease::None,
            scanning: false,
            next_scan_ms: 0,
        }
    }

    fn call(&self, request: Request, step: Waiting, now_ms: u64) -> WorkStep {
        let (callout, call) = self.etcd.call(request, now_ms);
        WorkStep::Call(callout, WorkWait::Etcd(Box::new(EtcdWait { call, step })))
    }

    fn nothing() -> WorkStep {
        WorkStep::Done(WorkDone::Found {
            tickets: Vec::new(),
            expired: 0,
        })
    }

    pub fn begin(&mut self, op: WorkOp, now_ms: u64) -> WorkStep {
        match op {
            WorkOp::Upkeep => self.upkeep(now_ms),
            WorkOp::Find { .. } => self.scan(now_ms),
            WorkOp::Claim { ticket, .. } => self.claim(&ticket, now_ms),
            WorkOp::Show { record, .. } => self.show(&record, now_ms),
            WorkOp::End(ending) => self.end(*ending, now_ms),
            WorkOp::Return(_) => WorkStep::Done(WorkDone::Shown),
        }
    }

    /// The lease: granted once, renewed at a third of its life.
    fn upkeep(&mut self, now_ms: u64) -> WorkStep {
        match self.lease {
            Lease::None => {
                self.lease = Lease::Granting;
                self.call(req::lease_grant(CLAIM_TTL_S), Waiting::Grant, now_ms)
            }
            Lease::Held {
                id,
                renew_at_ms,
                renewing: false,
            } if now_ms >= renew_at_ms => {
                self.lease = Lease::Held {
                    id,
                    renew_at_ms,
                    renewing: true,
                };
                self.call(req::lease_keepalive(id), Waiting::KeepAlive, now_ms)
            }
            _ => Self::nothing(),
        }
    }

    fn scan(&mut self, now_ms: u64) -> WorkStep {
        let Lease::Held { .. } = self.lease else {
            return Self::nothing();
        };
        if self.scanning || now_ms < self.next_scan_ms {
            return Self::nothing();
        }
        self.scanning = true;
        self.next_scan_ms = now_ms + SCAN_EVERY_MS;
        let scan = req::range_prefix(&self.etcd.keys().pending_prefix(), SCAN_LIMIT);
        self.call(scan, Waiting::Scan, now_ms)
    }

    fn claim(&mut self, ticket: &Ticket, now_ms: u64) -> WorkStep {
        let Lease::Held { id: lease, .. } = self.lease else {
            return WorkStep::Done(WorkDone::Claimed(None));
        };
        let keys = self.etcd.keys();
        let claim = jobs::claim(&keys, ticket.id(), &self.owner, lease);
        self.call(claim, Waiting::Claim, now_ms)
    }

    /// A running job's state for polls on any replica (best effort).
    fn show(&mut self, record: &crate::job::JobRecord, now_ms: u64) -> WorkStep {
        let rendered = crate::job::render(record, None);
        let Some(payload) = slot::encode_held(0, record, &rendered) else {
            return WorkStep::Done(WorkDone::Shown);
        };
        let (value, parts) =
            jobs::encode_job(&payload, record.owner.as_bytes(), 0, self.etcd.part_bytes());
        if !parts.is_empty() {
            return WorkStep::Done(WorkDone::Shown);
        }
        let keys = self.etcd.keys();
        let write = jobs::show_running(&keys, &record.id, &self.owner, &value);
        self.call(write, Waiting::Show, now_ms)
    }

    /// Lets go of a job: its TTL lease (finished for good), its parts, then
    /// the transaction that releases it.
    fn end(&mut self, ending: Ending, now_ms: u64) -> WorkStep {
        let Ending {
            record,
            rendered,
            leave,
            ..
        } = ending;
        let Some(payload) = slot::encode_held(0, &record, &rendered) else {
            return WorkStep::Done(WorkDone::Ended(LetGo::Lost));
        };
        let expires = if record.status.is_finished() {
            record.expires_at_ms().unwrap_or(0)
        } else {
            0
        };
        let (value, parts) = jobs::encode_job(
            &payload,
            record.owner.as_bytes(),
            expires,
            self.etcd.part_bytes(),
        );
        let remaining_s = record
            .expires_at_ms()
            .unwrap_or(now_ms)
            .saturating_sub(now_ms)
            .div_ceil(1000);
        let letting = Letting {
            id: record.id.clone(),
            parts: parts.into_iter().map(<[u8]>::to_vec).collect(),
            value,
            next_part: 0,
            ttl_lease: None,
            leave,
            remaining_s,
        };
        self.next_letting(letting, now_ms)
    }

    fn next_letting(&self, letting: Letting, now_ms: u64) -> WorkStep {
        let keys = self.etcd.keys();
        let release = match letting.leave {
            Leave::Forget => Release::Forget,
            Leave::HandBack => Release::HandBack,
            Leave::DeliverAt(due) => Release::DeliverAt(due),
            Leave::Finished => match letting.ttl_lease {
                Some(ttl_lease) => Release::Done { ttl_lease },
                None => {
                    let ttl = letting.remaining_s.saturating_add(TTL_MARGIN_S);
                    let grant = req::lease_grant(i64::try_from(ttl).unwrap_or(i64::MAX));
                    return self.call(grant, Waiting::Ttl(Box::new(letting)), now_ms);
                }
            },
        };
        if let (Some(part), false) = (
            letting.parts.get(letting.next_part),
            matches!(letting.leave, Leave::Forget | Leave::HandBack),
        ) {
            let n = u32::try_from(letting.next_part).unwrap_or(u32::MAX);
            let put = jobs::put_part(&keys, &letting.id, n, part, letting.ttl_lease);
            return self.call(put, Waiting::Part(Box::new(letting)), now_ms);
        }
        let finish = jobs::release(&keys, &letting.id, &self.owner, &letting.value, release);
        self.call(finish, Waiting::Release(Box::new(letting)), now_ms)
    }

    pub fn resume(&mut self, wait: EtcdWait, answer: StoreAnswer, now_ms: u64) -> WorkStep {
        let EtcdWait { call, step } = wait;
        let body = match self.etcd.answered(call, &answer, now_ms) {
            Answered::Body(body) => Some(body),
            Answered::Again(callout, call) => return again(callout, call, step),
            Answered::Failed(_) => None,
        };
        match step {
            Waiting::Grant => self.granted(body, now_ms),
            Waiting::KeepAlive => self.kept_alive(body, now_ms),
            Waiting::Scan => self.scanned(body, now_ms),
            Waiting::Claim => WorkStep::Done(WorkDone::Claimed(self.claimed(body).map(Box::new))),
            Waiting::Show => WorkStep::Done(WorkDone::Shown),
            Waiting::Ttl(mut letting) => {
                match body.and_then(|b| parse_lease_grant(b).ok()) {
                    Some(grant) => letting.ttl_lease = Some(grant.id),
                    None => return WorkStep::Done(WorkDone::Ended(LetGo::Later)),
                }
                self.next_letting(*letting, now_ms)
            }
            Waiting::Part(mut letting) => {
                if body.is_none() {
                    return WorkStep::Done(WorkDone::Ended(LetGo::Later));
                }
                letting.next_part += 1;
                self.next_letting(*letting, now_ms)
            }
            Waiting::Release(letting) => WorkStep::Done(WorkDone::Ended(released(body, &letting))),
        }
    }

    fn granted(&mut self, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        self.lease = match body.and_then(|b| parse_lease_grant(b).ok()) {
            Some(grant) => Lease::Held {
                id: grant.id,
                renew_at_ms: now_ms + renew_after_ms(grant.ttl),
                renewing: false,
            },
            None => Lease::None,
        };
        Self::nothing()
    }

    fn kept_alive(&mut self, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        if let Lease::Held { id, .. } = self.lease {
            self.lease = match body.map(parse_lease_keepalive) {
                Some(Ok(Some(ttl))) => Lease::Held {
                    id,
                    renew_at_ms: now_ms + renew_after_ms(ttl),
                    renewing: false,
                },
                // The lease is gone (etcd forgot it): our claims with it.
                Some(Ok(None)) => Lease::None,
                // No answer: try again on the next upkeep.
                _ => Lease::Held {
                    id,
                    renew_at_ms: now_ms,
                    renewing: false,
                },
            };
        }
        Self::nothing()
    }

    /// The pending jobs a scan found (a webhook delivery only once it is due).
    fn scanned(&mut self, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        self.scanning = false;
        let Some(range) = body.and_then(|b| parse_range(b).ok()) else {
            return Self::nothing();
        };
        if range.more || i64::try_from(range.kvs.len()).unwrap_or(0) >= SCAN_LIMIT {
            self.next_scan_ms = now_ms;
        }
        let keys = self.etcd.keys();
        let tickets = range
            .kvs
            .iter()
            .filter(|kv| match parse_pending(&kv.value) {
                Some((Pending::Deliver, due_ms)) => due_ms <= now_ms,
                _ => true,
            })
            .filter_map(|kv| keys.id_of(&kv.key))
            .map(|id| Ticket::Etcd { id: id.to_string() })
            .collect();
        WorkStep::Done(WorkDone::Found {
            tickets,
            expired: 0,
        })
    }

    /// A claim's answer: the job, if this VM now holds it.
    fn claimed(&self, body: Option<&[u8]>) -> Option<Claimed> {
        let txn = parse_txn(body?).ok()?;
        let kv = if txn.succeeded {
            txn.range_kv(1)?
        } else {
            // An earlier try of this very claim may have landed.
            let claim = txn.range_kv(0)?;
            if claim.value != self.owner {
                return None;
            }
            txn.range_kv(1)?
        };
        claimed_job(kv)
    }
}

fn again(callout: Callout, call: EtcdCall, step: Waiting) -> WorkStep {
    WorkStep::Call(callout, WorkWait::Etcd(Box::new(EtcdWait { call, step })))
}

fn claimed_job(kv: &Kv) -> Option<Claimed> {
    let payload = decode_job(&kv.value)?.whole?;
    let SlotView::Held(view) = slot::decode(payload) else {
        return None;
    };
    let record = view.record()?;
    let body = Rendered {
        body: view.body.to_vec(),
        audio_at: view.audio_at,
        tail_at: view.tail_at,
    };
    Some(Claimed {
        record,
        body: Some(body),
    })
}

/// Whether a release took: it succeeded, or an earlier try of it did (the
/// job reads back as written); or it lost its compare (another replica holds
/// the job now, or it is gone); or etcd could not be reached.
fn released(body: Option<&[u8]>, letting: &Letting) -> LetGo {
    let Some(txn) = body.and_then(|b| parse_txn(b).ok()) else {
        return LetGo::Later;
    };
    let landed = match (txn.range_kv(0), letting.leave) {
        _ if txn.succeeded => true,
        (None, Leave::Forget) => true,
        (Some(kv), _) => kv.value == letting.value,
        (None, _) => false,
    };
    match landed {
        true => LetGo::Done,
        false => LetGo::Lost,
    }
}
