//! The engine's side of the etcd store. Each engine (one per root context)
//! holds an etcd lease, kept alive, under which it registers as a replica,
//! claims jobs and counts their running keys. A scan finds work in three indexes at once: the queue
//! (in fair-dispatch order), the webhook deliveries due, and the jobs past
//! their deadline. A claim is a transaction that puts `claims/<id>` under the
//! lease only if nobody holds the job (and, for a key that caps its running
//! jobs, a free running slot), reading the job in the same step; letting go
//! is one transaction that holds only while the claim does, and settles the
//! key's counters with it. A replica that dies takes its lease with it: its
//! claims and running keys lapse, and a sweep by any other replica puts the
//! jobs it held back in the queue at their place.

use std::collections::{BTreeSet, HashMap};

use super::call::{Answered, EtcdCall};
use super::config::EtcdConfig;
use super::jobs::{self, decode_job, parse_lane, Letting, Release, CLAIM_TTL_S, SCAN_LIMIT};
use super::request::{self as req, Op, Request, Txn};
use super::response::{parse_lease_grant, parse_lease_keepalive, parse_range, parse_txn, Kv};
use super::wire::ResponseOp;
use crate::config::Config;
use crate::governance::{lane_of, settle, KeyState, Limits, Settle};
use crate::job::{JobRecord, Rendered};
use crate::store::shared::slot::{self, SlotView};
use crate::store::work::{
    Claimed, Ending, Leave, LetGo, StoreAnswer, Ticket, WorkDone, WorkOp, WorkStep, WorkWait,
};

/// Time between scans while they find little; a full one is followed at once.
const SCAN_EVERY_MS: u64 = 500;
/// Time between sweeps for the jobs of replicas that died.
const SWEEP_EVERY_MS: u64 = 2_000;
/// Late jobs and due deliveries one scan looks at.
const DUE_LIMIT: i64 = 64;
/// Extra life of a finished job's keys past its TTL (polls answer 404 from the
/// expiry in the record; etcd removes the keys a moment later).
const TTL_MARGIN_S: u64 = 1;
/// Tries of a release whose key's counters moved meanwhile.
const RELEASE_TRIES: u32 = 12;

/// Where a scan found a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Queue { round: u64, lane: String },
    Deliver(u64),
    Late,
}

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

/// A job this VM holds: its lane and the running key its claim took.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hold {
    running: Option<Vec<u8>>,
}

pub struct EtcdWork {
    etcd: EtcdConfig,
    /// This VM's name as a replica, in its claims.
    replica: String,
    lease: Lease,
    scanning: bool,
    next_scan_ms: u64,
    /// A scan that found only jobs it could not take goes on after this key.
    scan_after: Option<Vec<u8>>,
    sweeping: bool,
    next_sweep_ms: u64,
    holds: HashMap<String, Hold>,
    /// Running slots of capped lanes known taken (refreshed by claims that fail).
    taken: HashMap<String, BTreeSet<u32>>,
    /// The cap of each capped lane seen.
    caps: HashMap<String, u32>,
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
    Register,
    KeepAlive,
    Scan,
    Claim {
        id: String,
        lane: Option<String>,
    },
    Show,
    /// The sweep: replicas listed; a dead one's jobs listed; put back one by one.
    Replicas,
    Actives(String),
    PutBack(Box<Sweep>),
    /// A job's TTL lease, its parts, its lane, then the release.
    Ttl(Box<Parting>),
    Part(Box<Parting>),
    Lane(Box<Parting>),
    Release(Box<Parting>),
    Forget,
}

/// A dead replica's jobs being put back.
#[derive(Debug, Clone, PartialEq)]
struct Sweep {
    dead: String,
    entries: Vec<(String, Vec<u8>)>,
}

/// A job on its way back into etcd.
#[derive(Debug, Clone, PartialEq)]
struct Parting {
    record: JobRecord,
    value: Vec<u8>,
    parts: Vec<Vec<u8>>,
    next_part: usize,
    ttl_lease: Option<i64>,
    leave: Leave,
    settle: Settle,
    limits: Limits,
    /// The key's counters as read, and their revision, when they change.
    lane: Option<(KeyState, i64)>,
    tries: u32,
}

impl EtcdWait {
    pub fn name(&self) -> &'static str {
        match self.step {
            Waiting::Grant | Waiting::Register => "lease_grant",
            Waiting::KeepAlive => "lease_keepalive",
            Waiting::Scan => "scan",
            Waiting::Claim { .. } => "claim",
            Waiting::Show => "progress",
            Waiting::Replicas | Waiting::Actives(_) | Waiting::PutBack(_) => "sweep",
            Waiting::Ttl(_) => "ttl_lease",
            Waiting::Part(_) => "put_part",
            Waiting::Lane(_) => "lane",
            Waiting::Release(_) | Waiting::Forget => "finish",
        }
    }
}

/// When to renew a lease of `ttl` seconds: at a third of it.
fn renew_after_ms(ttl: i64) -> u64 {
    u64::try_from(ttl).unwrap_or(0).saturating_mul(1000) / 3
}

fn nothing() -> WorkStep {
    WorkStep::Done(WorkDone::Found {
        tickets: Vec::new(),
        expired: 0,
    })
}

fn limits_of(config: &Config, lane: &str) -> Limits {
    config
        .key(lane)
        .map(|k| k.rules.limits.clone())
        .unwrap_or_default()
}

impl EtcdWork {
    /// `random` names this VM as a replica.
    pub fn new(etcd: EtcdConfig, random: [u8; 16]) -> EtcdWork {
        EtcdWork {
            etcd,
            replica: format!("replica-{}", hex::encode(random)),
            lease: Lease::None,
            scanning: false,
            next_scan_ms: 0,
            scan_after: None,
            sweeping: false,
            next_sweep_ms: 0,
            holds: HashMap::new(),
            taken: HashMap::new(),
            caps: HashMap::new(),
        }
    }

    fn call(&self, request: Request, step: Waiting, now_ms: u64) -> WorkStep {
        let (callout, call) = self.etcd.call(request, now_ms);
        WorkStep::Call(callout, WorkWait::Etcd(Box::new(EtcdWait { call, step })))
    }

    fn lease_id(&self) -> Option<i64> {
        match self.lease {
            Lease::Held { id, .. } => Some(id),
            _ => None,
        }
    }

    pub fn begin(&mut self, config: &Config, op: WorkOp, now_ms: u64) -> WorkStep {
        match op {
            WorkOp::Upkeep => self.upkeep(now_ms),
            WorkOp::Find { .. } => self.scan(now_ms),
            WorkOp::Claim { ticket, .. } => self.claim(config, &ticket, now_ms),
            WorkOp::Show { record, .. } => self.show(&record, now_ms),
            WorkOp::End(ending) => self.end(config, *ending, now_ms),
            WorkOp::Return(_) => WorkStep::Done(WorkDone::Shown),
        }
    }

    /// The lease (granted, then renewed at a third of its life), and the sweep.
    fn upkeep(&mut self, now_ms: u64) -> WorkStep {
        match self.lease {
            Lease::None => {
                self.lease = Lease::Granting;
                return self.call(req::lease_grant(CLAIM_TTL_S), Waiting::Grant, now_ms);
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
                return self.call(req::lease_keepalive(id), Waiting::KeepAlive, now_ms);
            }
            _ => {}
        }
        if self.lease_id().is_some() && !self.sweeping && now_ms >= self.next_sweep_ms {
            self.sweeping = true;
            self.next_sweep_ms = now_ms + SWEEP_EVERY_MS;
            let keys = self.etcd.keys();
            return self.call(jobs::list_replicas(&keys), Waiting::Replicas, now_ms);
        }
        nothing()
    }

    /// One scan of the queue (in order), the deliveries due and the late jobs.
    fn scan(&mut self, now_ms: u64) -> WorkStep {
        if self.lease_id().is_none() || self.scanning || now_ms < self.next_scan_ms {
            return nothing();
        }
        self.scanning = true;
        self.next_scan_ms = now_ms + SCAN_EVERY_MS;
        // What this replica knew of other replicas' running slots may be old:
        // this scan's claims learn it again.
        if self.scan_after.is_none() {
            self.taken.clear();
        }
        let keys = self.etcd.keys();
        let queue = keys.queue_prefix();
        let start = match &self.scan_after {
            Some(after) => [after.as_slice(), &[0]].concat(),
            None => queue.clone(),
        };
        let (deliver, deadline) = (keys.deliver_prefix(), keys.deadline_prefix());
        let scan = Txn::new()
            .then(Op::range_between(
                &start,
                &req::prefix_end(&queue),
                SCAN_LIMIT,
            ))
            .then(Op::range_between(
                &deliver,
                &keys.by_time(&deliver, now_ms),
                DUE_LIMIT,
            ))
            .then(Op::range_between(
                &deadline,
                &keys.by_time(&deadline, now_ms),
                DUE_LIMIT,
            ));
        self.call(scan.request(), Waiting::Scan, now_ms)
    }

    /// The running key a claim of `lane`'s job takes: a free slot of a
    /// capped lane (none free: the lane is at its cap), else the job's own.
    fn running_key(&mut self, limits: &Limits, lane: &str, id: &str) -> Option<Vec<u8>> {
        let keys = self.etcd.keys();
        let Some(max) = limits.max_running_jobs else {
            return Some(keys.running(lane, id));
        };
        self.caps.insert(lane.to_string(), max);
        let taken = self.taken.get(lane);
        let free = (0..max).find(|n| !taken.is_some_and(|t| t.contains(n)))?;
        Some(keys.running(lane, &format!("s{free}")))
    }

    fn claim(&mut self, config: &Config, ticket: &Ticket, now_ms: u64) -> WorkStep {
        let (Some(lease), Ticket::Etcd { id, from }) = (self.lease_id(), ticket) else {
            return WorkStep::Done(WorkDone::Claimed(None));
        };
        let keys = self.etcd.keys();
        let (from, lane) = match from {
            Source::Queue { round, lane } => {
                let limits = limits_of(config, lane);
                let Some(running) = self.running_key(&limits, lane, id) else {
                    return WorkStep::Done(WorkDone::Claimed(None));
                };
                let from = jobs::From::Queue {
                    round: *round,
                    lane: lane.clone(),
                    running,
                };
                (from, limits.max_running_jobs.map(|_| lane.clone()))
            }
            Source::Deliver(due) => (jobs::From::Deliver(*due), None),
            Source::Late => (jobs::From::Late, None),
        };
        // A failed claim of a capped lane's job also says which running slots are taken.
        let slots = lane.as_ref().map(|l| keys.running_of(l));
        let claim = jobs::claim(&keys, id, &from, &self.replica, lease, slots.as_deref());
        if let (jobs::From::Queue { running, .. }, Some(lane)) = (&from, &lane) {
            // Taken as asked, until the claim says otherwise: the next claim picks another.
            if let Some(n) = keys
                .last(running)
                .and_then(|n| n.strip_prefix('s')?.parse().ok())
            {
                self.taken.entry(lane.clone()).or_default().insert(n);
            }
        }
        if let jobs::From::Queue { running, .. } = &from {
            self.holds.insert(
                id.clone(),
                Hold {
                    running: Some(running.clone()),
                },
            );
        }
        let step = Waiting::Claim {
            id: id.clone(),
            lane,
        };
        self.call(claim, step, now_ms)
    }

    /// A running job's state for polls on any replica (best effort).
    fn show(&mut self, record: &JobRecord, now_ms: u64) -> WorkStep {
        let rendered = crate::job::render(record, None);
        let Some(payload) = slot::encode_held(0, record, &rendered) else {
            return WorkStep::Done(WorkDone::Shown);
        };
        let (value, parts) =
            jobs::encode_job(&payload, record.owner.as_bytes(), 0, self.etcd.part_bytes());
        if !parts.is_empty() {
            return WorkStep::Done(WorkDone::Shown);
        }
        let write = jobs::show_running(&self.etcd.keys(), &record.id, &self.replica, &value);
        self.call(write, Waiting::Show, now_ms)
    }

    /// Lets go of a job: its TTL lease (finished for good), its parts, its
    /// key's counters (when they change), then the release.
    fn end(&mut self, config: &Config, ending: Ending, now_ms: u64) -> WorkStep {
        let Ending {
            record,
            rendered,
            leave,
            settle,
        } = ending;
        let Some(payload) = slot::encode_held(0, &record, &rendered) else {
            return WorkStep::Done(WorkDone::Ended(LetGo::Lost));
        };
        let expires = match record.status.is_finished() {
            true => record.expires_at_ms().unwrap_or(0),
            false => 0,
        };
        let (value, parts) = jobs::encode_job(
            &payload,
            record.owner.as_bytes(),
            expires,
            self.etcd.part_bytes(),
        );
        let letting = Parting {
            limits: limits_of(config, &lane_of(&record.owner)),
            parts: parts.into_iter().map(<[u8]>::to_vec).collect(),
            value,
            next_part: 0,
            ttl_lease: None,
            leave,
            settle,
            lane: None,
            tries: 0,
            record,
        };
        self.next_letting(letting, now_ms)
    }

    fn next_letting(&self, mut letting: Parting, now_ms: u64) -> WorkStep {
        let keys = self.etcd.keys();
        if letting.leave == Leave::Finished && letting.ttl_lease.is_none() {
            let remaining_s = letting
                .record
                .expires_at_ms()
                .unwrap_or(now_ms)
                .saturating_sub(now_ms)
                .div_ceil(1000);
            let ttl = i64::try_from(remaining_s.saturating_add(TTL_MARGIN_S)).unwrap_or(i64::MAX);
            return self.call(
                req::lease_grant(ttl),
                Waiting::Ttl(Box::new(letting)),
                now_ms,
            );
        }
        let writes_parts = !matches!(letting.leave, Leave::Forget | Leave::HandBack);
        if let (Some(part), true) = (letting.parts.get(letting.next_part), writes_parts) {
            let n = u32::try_from(letting.next_part).unwrap_or(u32::MAX);
            let put = jobs::put_part(&keys, &letting.record.id, n, part, letting.ttl_lease);
            return self.call(put, Waiting::Part(Box::new(letting)), now_ms);
        }
        if letting.settle.changes(&letting.limits) && letting.lane.is_none() {
            let read = jobs::read_lane(&keys, &lane_of(&letting.record.owner));
            return self.call(read, Waiting::Lane(Box::new(letting)), now_ms);
        }
        letting.tries += 1;
        let how = match letting.leave {
            Leave::Forget => Release::Forget,
            Leave::HandBack => Release::HandBack,
            Leave::DeliverAt(due) => Release::DeliverAt(due),
            Leave::Finished => Release::Done {
                ttl_lease: letting.ttl_lease.unwrap_or(0),
            },
        };
        let running = self
            .holds
            .get(&letting.record.id)
            .and_then(|h| h.running.clone());
        let release = jobs::release(
            &keys,
            &self.replica,
            &Letting {
                record: &letting.record,
                value: &letting.value,
                how,
                running: running.as_deref(),
                lane: letting.lane.as_ref().map(|(s, r)| (s, *r)),
            },
        );
        self.call(release, Waiting::Release(Box::new(letting)), now_ms)
    }

    pub fn resume(&mut self, wait: EtcdWait, answer: StoreAnswer, now_ms: u64) -> WorkStep {
        let EtcdWait { call, step } = wait;
        let body = match self.etcd.answered(call, &answer, now_ms) {
            Answered::Body(body) => Some(body),
            Answered::Again(callout, call) => {
                return WorkStep::Call(callout, WorkWait::Etcd(Box::new(EtcdWait { call, step })))
            }
            Answered::Failed(_) => None,
        };
        match step {
            Waiting::Grant => self.granted(body, now_ms),
            Waiting::Register => nothing(),
            Waiting::Show => WorkStep::Done(WorkDone::Shown),
            Waiting::PutBack(sweep) => self.put_back(*sweep, now_ms),
            Waiting::KeepAlive => self.kept_alive(body, now_ms),
            Waiting::Scan => self.scanned(body, now_ms),
            Waiting::Claim { id, lane } => self.claimed(&id, lane.as_deref(), body),
            Waiting::Replicas => self.replicas(body, now_ms),
            Waiting::Actives(dead) => self.actives(&dead, body, now_ms),
            Waiting::Forget => WorkStep::Done(WorkDone::Ended(LetGo::Lost)),
            Waiting::Ttl(letting) => self.ttl_granted(*letting, body, now_ms),
            Waiting::Part(mut letting) => match body {
                Some(_) => {
                    letting.next_part += 1;
                    self.next_letting(*letting, now_ms)
                }
                None => WorkStep::Done(WorkDone::Ended(LetGo::Later)),
            },
            Waiting::Lane(letting) => self.lane_read(*letting, body, now_ms),
            Waiting::Release(letting) => self.released(*letting, body, now_ms),
        }
    }
}

impl EtcdWork {
    /// The lease is granted: this VM registers as a replica under it.
    fn granted(&mut self, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        let Some(grant) = body.and_then(|b| parse_lease_grant(b).ok()) else {
            self.lease = Lease::None;
            return nothing();
        };
        self.lease = Lease::Held {
            id: grant.id,
            renew_at_ms: now_ms + renew_after_ms(grant.ttl),
            renewing: false,
        };
        let register = jobs::register(&self.etcd.keys(), &self.replica, grant.id);
        self.call(register, Waiting::Register, now_ms)
    }

    fn kept_alive(&mut self, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        if let Lease::Held { id, .. } = self.lease {
            self.lease = match body.map(parse_lease_keepalive) {
                Some(Ok(Some(ttl))) => Lease::Held {
                    id,
                    renew_at_ms: now_ms + renew_after_ms(ttl),
                    renewing: false,
                },
                // The lease is gone (etcd forgot it, or this replica stalled
                // past it): so are its claims. A new name, and a new lease.
                Some(Ok(None)) => {
                    let mut random = [0u8; 16];
                    random
                        .iter_mut()
                        .zip(crate::config::sha256_of(self.replica.as_bytes()))
                        .for_each(|(r, d)| *r = d);
                    self.replica = format!("replica-{}", hex::encode(random));
                    self.holds.clear();
                    Lease::None
                }
                // No answer: try again on the next upkeep.
                _ => Lease::Held {
                    id,
                    renew_at_ms: now_ms,
                    renewing: false,
                },
            };
        }
        nothing()
    }

    /// What a scan found: queued jobs in order, deliveries due, late jobs.
    fn scanned(&mut self, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        self.scanning = false;
        let Some(txn) = body.and_then(|b| parse_txn(b).ok()) else {
            return nothing();
        };
        let keys = self.etcd.keys();
        let range = |i: usize| match txn.responses.get(i) {
            Some(ResponseOp::ResponseRange(r)) => r.kvs.as_slice(),
            _ => &[],
        };
        let queued = range(0);
        let mut tickets: Vec<Ticket> = queued
            .iter()
            .filter_map(|kv| {
                let id = keys.last(&kv.key)?.to_string();
                let round = keys.number_of(&kv.key)?;
                let lane = String::from_utf8_lossy(&kv.value).into_owned();
                Some(Ticket::Etcd {
                    id,
                    from: Source::Queue { round, lane },
                })
            })
            .collect();
        // A full page of lanes all at their running caps goes on from where it
        // ended, at once; anything else starts over from the head next time.
        let full = i64::try_from(queued.len()).unwrap_or(0) >= SCAN_LIMIT;
        let all_capped = tickets.iter().all(|t| match t {
            Ticket::Etcd {
                from: Source::Queue { lane, .. },
                ..
            } => self.is_capped(lane),
            _ => false,
        });
        self.scan_after = (full && all_capped)
            .then(|| queued.last().map(|kv| kv.key.clone()))
            .flatten();
        if self.scan_after.is_some() {
            self.next_scan_ms = now_ms;
        }
        tickets.extend(range(1).iter().filter_map(|kv| {
            Some(Ticket::Etcd {
                id: keys.last(&kv.key)?.to_string(),
                from: Source::Deliver(keys.number_of(&kv.key)?),
            })
        }));
        tickets.extend(range(2).iter().filter_map(|kv| {
            Some(Ticket::Etcd {
                id: keys.last(&kv.key)?.to_string(),
                from: Source::Late,
            })
        }));
        WorkStep::Done(WorkDone::Found {
            tickets,
            expired: 0,
        })
    }

    /// Whether a lane is known to be at its running cap.
    fn is_capped(&self, lane: &str) -> bool {
        match (self.caps.get(lane), self.taken.get(lane)) {
            (Some(max), Some(taken)) => taken.len() >= *max as usize,
            _ => false,
        }
    }

    /// A claim's answer: the job, if this VM now holds it. A capped lane
    /// whose slot was taken learns which are.
    fn claimed(&mut self, id: &str, lane: Option<&str>, body: Option<&[u8]>) -> WorkStep {
        let txn = body.and_then(|b| parse_txn(b).ok());
        let kv = match &txn {
            Some(t) if t.succeeded => t.range_kv(1),
            // An earlier try of this very claim may have landed.
            Some(t)
                if t.range_kv(0)
                    .is_some_and(|c| c.value == self.replica.as_bytes()) =>
            {
                t.range_kv(1)
            }
            _ => None,
        };
        let claimed = kv.and_then(claimed_job);
        if claimed.is_none() {
            self.holds.remove(id);
            if let (Some(lane), Some(t)) = (lane, &txn) {
                if let Some(ResponseOp::ResponseRange(r)) = t.responses.get(2) {
                    let slots = r.kvs.iter().filter_map(|kv| {
                        let name = self
                            .etcd
                            .keys()
                            .last(&kv.key)?
                            .strip_prefix('s')?
                            .parse()
                            .ok()?;
                        Some(name)
                    });
                    self.taken.insert(lane.to_string(), slots.collect());
                }
            }
        }
        WorkStep::Done(WorkDone::Claimed(claimed.map(Box::new)))
    }

    /// The sweep found the replicas: the first dead one's jobs are listed.
    fn replicas(&mut self, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        let keys = self.etcd.keys();
        let Some(txn) = body.and_then(|b| parse_txn(b).ok()) else {
            self.sweeping = false;
            return nothing();
        };
        let names = |i: usize| -> Vec<String> {
            match txn.responses.get(i) {
                Some(ResponseOp::ResponseRange(r)) => r
                    .kvs
                    .iter()
                    .filter_map(|kv| keys.last(&kv.key).map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let alive = names(1);
        let dead = names(0)
            .into_iter()
            .find(|r| *r != self.replica && !alive.contains(r));
        match dead {
            Some(dead) => {
                let list = req::range_prefix(&keys.active_of(&dead), DUE_LIMIT);
                self.call(list, Waiting::Actives(dead), now_ms)
            }
            None => {
                self.sweeping = false;
                nothing()
            }
        }
    }

    /// A dead replica's jobs: put back one by one, or the replica forgotten
    /// once it holds none.
    fn actives(&mut self, dead: &str, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        let keys = self.etcd.keys();
        let Some(range) = body.and_then(|b| parse_range(b).ok()) else {
            self.sweeping = false;
            return nothing();
        };
        if range.kvs.is_empty() {
            self.sweeping = false;
            return self.call(jobs::forget_replica(&keys, dead), Waiting::Register, now_ms);
        }
        let entries = range
            .kvs
            .iter()
            .filter_map(|kv| Some((keys.last(&kv.key)?.to_string(), kv.value.clone())))
            .collect();
        let sweep = Sweep {
            dead: dead.to_string(),
            entries,
        };
        self.put_back(sweep, now_ms)
    }

    fn put_back(&mut self, mut sweep: Sweep, now_ms: u64) -> WorkStep {
        let Some((id, value)) = sweep.entries.pop() else {
            self.sweeping = false;
            return nothing();
        };
        let back = jobs::put_back(&self.etcd.keys(), &sweep.dead, &id, &value);
        self.call(back, Waiting::PutBack(Box::new(sweep)), now_ms)
    }

    fn ttl_granted(&mut self, mut letting: Parting, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        match body.and_then(|b| parse_lease_grant(b).ok()) {
            Some(grant) => letting.ttl_lease = Some(grant.id),
            None => return WorkStep::Done(WorkDone::Ended(LetGo::Later)),
        }
        self.next_letting(letting, now_ms)
    }

    /// The key's counters are read: settled with what the job owes, then released.
    fn lane_read(&mut self, mut letting: Parting, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        let Some(txn) = body.and_then(|b| parse_txn(b).ok()) else {
            return WorkStep::Done(WorkDone::Ended(LetGo::Later));
        };
        let read = parse_lane(&txn, 0);
        let mut state = read.state;
        settle(&letting.limits, &mut state, &letting.settle, now_ms / 1000);
        letting.lane = Some((state, read.revision));
        self.next_letting(letting, now_ms)
    }

    /// A release's answer: done (or an earlier try was), lost (another
    /// replica holds the job, or it is gone), or the key's counters moved
    /// (read again and tried again).
    fn released(&mut self, mut letting: Parting, body: Option<&[u8]>, now_ms: u64) -> WorkStep {
        let Some(txn) = body.and_then(|b| parse_txn(b).ok()) else {
            return WorkStep::Done(WorkDone::Ended(LetGo::Later));
        };
        let id = letting.record.id.clone();
        let landed = txn.succeeded
            || match (txn.range_kv(0), letting.leave) {
                (None, Leave::Forget) => true,
                (Some(kv), _) => kv.value == letting.value,
                (None, _) => false,
            };
        if landed {
            self.holds.remove(&id);
            return WorkStep::Done(WorkDone::Ended(LetGo::Done));
        }
        let still_ours = txn
            .range_kv(1)
            .is_some_and(|c| c.value == self.replica.as_bytes());
        if still_ours && letting.lane.is_some() {
            // The key's counters moved: read again, or, contended for long,
            // let the engine try the whole release again on a later tick.
            if letting.tries >= RELEASE_TRIES {
                return WorkStep::Done(WorkDone::Ended(LetGo::Later));
            }
            letting.lane = None;
            return self.next_letting(letting, now_ms);
        }
        // Lost: what this replica's claim put under its name goes.
        let running = self.holds.remove(&id).and_then(|h| h.running);
        let forget = jobs::forget_claim(&self.etcd.keys(), &self.replica, &id, running.as_deref());
        self.call(forget, Waiting::Forget, now_ms)
    }
}

fn claimed_job(kv: &Kv) -> Option<Claimed> {
    let payload = decode_job(&kv.value)?.whole?;
    let SlotView::Held(view) = slot::decode(payload) else {
        return None;
    };
    let record = view.record()?;
    let body = Rendered {
        body: view.body.to_vec(),
        audio: view.audio,
        tail_at: view.tail_at,
    };
    Some(Claimed {
        was: record.status,
        record,
        body: Some(body),
    })
}
