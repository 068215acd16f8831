//! Jobs in etcd: what a job's key holds, and the transactions that move a
//! job from submit to its end (see `keys` for every key).
//!
//! `jobs/<id>` holds `E`, the number of parts (u32), the expiry (ms, u64;
//! 0 while the job runs), the owner (u16 length, bytes) — enough to answer
//! 404s and DELETE without the rest — then, when it fits in one value, the
//! job as a slot holds it (`store::shared::slot`: header, record, rendered
//! poll answer). A larger one lives in `audio/<id>/<n>`.
//!
//! Every write that could race another is a transaction whose compares make
//! it land once: a submit on the key's counters as read, a claim on the
//! claim's absence, a release on the claim still being this replica's.

use super::keys::{split_audio, Keys};
use super::request::{self as req, Compare, Op, Request, Txn};
use crate::governance::{lane_of, KeyState};
use crate::job::JobRecord;

/// How long a replica's claims outlive it (its lease, kept alive every few seconds).
pub const CLAIM_TTL_S: i64 = 10;
/// Queued jobs one scan looks at.
pub const SCAN_LIMIT: i64 = 128;

/// A stored job's head, and where the rest of its bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredJob<'a> {
    pub expires_at_ms: u64,
    pub owner: &'a [u8],
    /// The whole job, or `None` when it is in `parts` parts.
    pub whole: Option<&'a [u8]>,
    pub parts: u32,
}

impl StoredJob<'_> {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && now_ms >= self.expires_at_ms
    }
}

/// The `jobs/<id>` value and the parts, for a job encoded as `payload`.
pub fn encode_job<'p>(
    payload: &'p [u8],
    owner: &[u8],
    expires_at_ms: u64,
    part_bytes: usize,
) -> (Vec<u8>, Vec<&'p [u8]>) {
    let owner_len = u16::try_from(owner.len()).unwrap_or(u16::MAX);
    let owner = owner.get(..usize::from(owner_len)).unwrap_or(owner);
    let head = 1 + 4 + 8 + 2 + owner.len();
    let parts = if head + payload.len() <= part_bytes {
        Vec::new()
    } else {
        split_audio(payload, part_bytes)
    };
    let mut v = Vec::with_capacity(head + if parts.is_empty() { payload.len() } else { 0 });
    v.push(b'E');
    v.extend_from_slice(&u32::try_from(parts.len()).unwrap_or(u32::MAX).to_le_bytes());
    v.extend_from_slice(&expires_at_ms.to_le_bytes());
    v.extend_from_slice(&owner_len.to_le_bytes());
    v.extend_from_slice(owner);
    if parts.is_empty() {
        v.extend_from_slice(payload);
    }
    (v, parts)
}

pub fn decode_job(value: &[u8]) -> Option<StoredJob<'_>> {
    let (tag, rest) = value.split_first()?;
    if *tag != b'E' {
        return None;
    }
    let mut f = crate::bytes::Fields(rest);
    let parts = f.u32()?;
    let expires_at_ms = f.u64()?;
    let owner_len = usize::from(f.u16()?);
    let owner = f.bytes(owner_len)?;
    let payload = f.rest();
    Some(StoredJob {
        expires_at_ms,
        owner,
        whole: (parts == 0).then_some(payload),
        parts,
    })
}

/// The keys of one job besides its record, from the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKeys {
    pub job: Vec<u8>,
    pub audio: Vec<u8>,
    pub claim: Vec<u8>,
    pub queue: Vec<u8>,
    pub deadline: Vec<u8>,
    pub lane: String,
    pub held: Vec<u8>,
}

impl JobKeys {
    pub fn of(keys: &Keys, record: &JobRecord) -> JobKeys {
        let lane = lane_of(&record.owner);
        JobKeys {
            job: keys.job(&record.id),
            audio: keys.audio(&record.id),
            claim: keys.claim(&record.id),
            queue: keys.queue(record.round, &record.id),
            deadline: keys.deadline(record.deadline_ms, &record.id),
            held: keys.held(&lane, &record.id),
            lane,
        }
    }
}

/// What a lane's counters were read at: their state, its revision (0: no
/// key yet), the jobs the lane holds, and the round of the job claimed last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneRead {
    pub state: KeyState,
    pub revision: i64,
    pub held: u32,
    pub running: u32,
    pub round: u64,
}

/// Reads a lane's counters, its held and running jobs, and the round.
pub fn read_lane(keys: &Keys, lane: &str) -> Request {
    lane_reads(Txn::new(), keys, lane, true).request()
}

/// The reads of `read_lane`, as success (or, `fail`, failure) operations.
fn lane_reads(txn: Txn, keys: &Keys, lane: &str, success: bool) -> Txn {
    let ops = [
        Op::range(&keys.lane(lane)),
        Op::count_prefix(&keys.held_of(lane)),
        Op::count_prefix(&keys.running_of(lane)),
        Op::range(&keys.round()),
    ];
    ops.into_iter().fold(txn, |t, op| match success {
        true => t.then(op),
        false => t.otherwise(op),
    })
}

/// The lane as the four reads of `lane_reads` (from `at` on) found it.
pub fn parse_lane(txn: &super::TxnResponse, at: usize) -> LaneRead {
    let count = |i: usize| match txn.responses.get(at + i) {
        Some(super::wire::ResponseOp::ResponseRange(r)) => {
            u32::try_from(r.count).unwrap_or(u32::MAX)
        }
        _ => 0,
    };
    let lane = txn.range_kv(at);
    LaneRead {
        state: lane
            .map(|kv| KeyState::decode(&kv.value))
            .unwrap_or_default(),
        revision: lane.map_or(0, |kv| kv.mod_revision),
        held: count(1),
        running: count(2),
        round: txn
            .range_kv(at + 3)
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok())
            .unwrap_or(0),
    }
}

/// A new job, stored only if no job has its id (and, for a key whose limits
/// count, only if its counters are as read: `revision`): the record, its
/// place in the queue, its deadline, its key's counters and its entry among
/// the key's held jobs. A key without limits keeps only its place, which two
/// submits at once may both take: they tie, as fair as can be. When it
/// fails, the lane and the job are read back (after the four lane reads, the job).
pub fn submit(
    keys: &Keys,
    record: &JobRecord,
    value: &[u8],
    lane: &KeyState,
    revision: Option<i64>,
) -> Request {
    let k = JobKeys::of(keys, record);
    let mut txn = Txn::new().when(Compare::absent(&k.job));
    if let Some(revision) = revision {
        txn = txn.when(Compare::unchanged(&keys.lane(&k.lane), revision));
    }
    let txn = txn
        .then(Op::put(&k.job, value, None))
        .then(Op::put(&k.queue, k.lane.as_bytes(), None))
        .then(Op::put(&k.deadline, b"", None))
        .then(Op::put(&k.held, b"", None))
        .then(Op::put(&keys.lane(&k.lane), &lane.encode(), None));
    lane_reads(txn, keys, &k.lane, false)
        .otherwise(Op::range(&k.job))
        .request()
}

/// Where a claim takes a job from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    /// The queue of `lane`, at this round; counted running under `running`.
    Queue {
        round: u64,
        lane: String,
        running: Vec<u8>,
    },
    /// The deliveries due, at this time.
    Deliver(u64),
    /// Past its deadline, wherever it is.
    Late,
}

/// Claims a job for `replica` under its lease, and reads the job in the same
/// step — only while it is where the scan found it and no one holds it
/// (nor, for a queued job, the running slot). When it fails, the claim and
/// the job are read back: a claim already this replica's (an earlier try
/// that landed) holds.
/// A claim of a capped lane's job also reads that lane's running keys back
/// (`slots`) when it fails, to learn which slots are taken.
pub fn claim(
    keys: &Keys,
    id: &str,
    from: &From,
    replica: &str,
    lease: i64,
    slots: Option<&[u8]>,
) -> Request {
    let claim = keys.claim(id);
    let mut txn = Txn::new()
        .when(Compare::absent(&claim))
        .when(Compare::present(&keys.job(id)))
        .then(Op::put(&claim, replica.as_bytes(), Some(lease)))
        .then(Op::range(&keys.job(id)));
    let back = match from {
        From::Queue {
            round,
            lane,
            running,
        } => {
            let queued = keys.queue(*round, id);
            txn = txn
                .when(Compare::present(&queued))
                .when(Compare::absent(running))
                .then(Op::delete(&queued))
                .then(Op::put(running, id.as_bytes(), Some(lease)))
                .then(Op::put(&keys.round(), round.to_string().as_bytes(), None));
            Some(active_value(&queued, lane))
        }
        From::Deliver(due) => {
            let due = keys.deliver(*due, id);
            txn = txn.when(Compare::present(&due)).then(Op::delete(&due));
            Some(active_value(&due, ""))
        }
        From::Late => None,
    };
    if let Some(back) = back {
        txn = txn.then(Op::put(&keys.active(replica, id), &back, None));
    }
    txn = txn
        .otherwise(Op::range(&claim))
        .otherwise(Op::range(&keys.job(id)));
    if let Some(slots) = slots {
        txn = txn.otherwise(Op::range_prefix(slots, 0));
    }
    txn.request()
}

/// How a job's keys are left when its holder lets go of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Finished for good: its keys under the lease of its TTL.
    Done { ttl_lease: i64 },
    /// Finished, its webhook still to deliver at this time: no lease yet.
    DeliverAt(u64),
    /// Expired while its delivery went on, which has now ended: every key goes.
    Forget,
    /// Not finished: back in the queue at its place, for any replica to claim.
    HandBack,
}

/// A release: the job as it ends, and what it leaves.
pub struct Letting<'a> {
    pub record: &'a JobRecord,
    pub value: &'a [u8],
    pub how: Release,
    /// The running key this replica's claim took, if any.
    pub running: Option<&'a [u8]>,
    /// The key's counters to write, and the revision they were read at.
    pub lane: Option<(&'a KeyState, i64)>,
}

/// Lets go of a job, only while `replica` still holds the claim (and the
/// key's counters are as read, when they change). When it fails, the job,
/// then the claim, then the lane are read back.
pub fn release(keys: &Keys, replica: &str, letting: &Letting) -> Request {
    let record = letting.record;
    let k = JobKeys::of(keys, record);
    let mut txn = Txn::new()
        .when(Compare::holds(&k.claim, replica.as_bytes()))
        .then(Op::delete(&k.claim))
        .then(Op::delete(&keys.active(replica, &record.id)));
    if let Some(running) = letting.running {
        txn = txn.then(Op::delete(running));
    }
    if let Some((state, revision)) = letting.lane {
        txn = txn
            .when(Compare::unchanged(&keys.lane(&k.lane), revision))
            .then(Op::put(&keys.lane(&k.lane), &state.encode(), None));
    }
    txn = match letting.how {
        Release::Done { ttl_lease } => txn
            .then(Op::put(&k.job, letting.value, Some(ttl_lease)))
            .then(Op::put(&k.held, b"", Some(ttl_lease)))
            .then(Op::delete(&k.queue))
            .then(Op::delete(&k.deadline)),
        Release::DeliverAt(due_ms) => txn
            .then(Op::put(&k.job, letting.value, None))
            .then(Op::put(&keys.deliver(due_ms, &record.id), b"", None))
            .then(Op::delete(&k.queue))
            .then(Op::delete(&k.deadline)),
        Release::Forget => txn
            .then(Op::delete(&k.job))
            .then(Op::delete_prefix(&k.audio))
            .then(Op::delete(&k.held))
            .then(Op::delete(&k.queue))
            .then(Op::delete(&k.deadline)),
        Release::HandBack => txn.then(Op::put(&k.job, letting.value, None)).then(Op::put(
            &k.queue,
            k.lane.as_bytes(),
            None,
        )),
    };
    txn.otherwise(Op::range(&k.job))
        .otherwise(Op::range(&k.claim))
        .otherwise(Op::range(&keys.lane(&k.lane)))
        .request()
}

/// After a claim was lost (the job deleted, or taken over): what this
/// replica's claim had put under its name.
pub fn forget_claim(keys: &Keys, replica: &str, id: &str, running: Option<&[u8]>) -> Request {
    let txn = Txn::new().then(Op::delete(&keys.active(replica, id)));
    match running {
        Some(r) => txn.then(Op::delete(r)),
        None => txn,
    }
    .request()
}

/// A running job's record as it now stands (`processing`, its progress),
/// written only while `replica` holds the claim; best effort.
pub fn show_running(keys: &Keys, id: &str, replica: &str, job_value: &[u8]) -> Request {
    Txn::new()
        .when(Compare::holds(&keys.claim(id), replica.as_bytes()))
        .then(Op::put(&keys.job(id), job_value, None))
        .request()
}

/// Forgets a job if it is still as read (`mod_revision`), with every key it
/// has but those a holder's claim made (the holder cleans them when its
/// release finds the claim gone); the key's counters written as given. When
/// it fails, the job, then the lane are read back.
pub fn delete(
    keys: &Keys,
    record: &JobRecord,
    mod_revision: i64,
    lane: (&KeyState, i64),
) -> Request {
    let k = JobKeys::of(keys, record);
    let mut txn = Txn::new()
        .when(Compare::unchanged(&k.job, mod_revision))
        .when(Compare::unchanged(&keys.lane(&k.lane), lane.1))
        .then(Op::delete(&k.job))
        .then(Op::delete_prefix(&k.audio))
        .then(Op::delete(&k.claim))
        .then(Op::delete(&k.queue))
        .then(Op::delete(&k.deadline))
        .then(Op::delete(&k.held))
        .then(Op::put(&keys.lane(&k.lane), &lane.0.encode(), None));
    if let Some(d) = record.pending_delivery() {
        txn = txn.then(Op::delete(&keys.deliver(d.next_attempt_at_ms, &record.id)));
    }
    txn.otherwise(Op::range(&k.job))
        .otherwise(Op::range(&keys.lane(&k.lane)))
        .request()
}

/// Registers a replica for the sweep that puts back what a dead one held.
pub fn register(keys: &Keys, replica: &str, lease: i64) -> Request {
    Txn::new()
        .then(Op::put(&keys.replica(replica), b"", None))
        .then(Op::put(&keys.alive(replica), b"", Some(lease)))
        .request()
}

/// The replicas that may hold jobs, and those alive.
pub fn list_replicas(keys: &Keys) -> Request {
    Txn::new()
        .then(Op::range_prefix(&keys.replicas(), 0))
        .then(Op::range_prefix(&keys.alives(), 0))
        .request()
}

/// An active entry: the key to put back, and the value it had (a queue
/// entry's lane).
fn active_value(back: &[u8], value: &str) -> Vec<u8> {
    let mut out = back.to_vec();
    out.push(0);
    out.extend_from_slice(value.as_bytes());
    out
}

/// Puts a dead replica's job back where its claim took it from, once: only
/// while the active entry is as listed (`active`) and nobody claims the job;
/// a job gone meanwhile just loses its entry.
pub fn put_back(keys: &Keys, replica: &str, id: &str, active: &[u8]) -> Request {
    let entry = keys.active(replica, id);
    let mut parts = active.splitn(2, |b| *b == 0);
    let (back, value) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    Txn::new()
        .when(Compare::holds(&entry, active))
        .when(Compare::absent(&keys.claim(id)))
        .when(Compare::present(&keys.job(id)))
        .then(Op::delete(&entry))
        .then(Op::put(back, value, None))
        .otherwise(Op::delete(&entry))
        .request()
}

/// Forgets a dead replica that holds nothing any more.
pub fn forget_replica(keys: &Keys, replica: &str) -> Request {
    Op::delete(&keys.replica(replica)).request()
}

/// One part of a large job, under the job's TTL lease once it has one.
pub fn put_part(keys: &Keys, id: &str, n: u32, part: &[u8], lease: Option<i64>) -> Request {
    req::put(&keys.audio_part(id, n), part, lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_jobs_are_whole_and_large_ones_in_parts() {
        let (v, parts) = encode_job(b"abc", b"vk:a", 0, 100);
        assert!(parts.is_empty());
        let job = decode_job(&v).unwrap();
        assert_eq!(
            (job.whole, job.owner, job.parts),
            (Some(&b"abc"[..]), &b"vk:a"[..], 0)
        );
        let big = vec![7u8; 250];
        let (v, parts) = encode_job(&big, b"vk:a", 99, 100);
        assert_eq!(parts.len(), 3);
        let job = decode_job(&v).unwrap();
        assert_eq!((job.whole, job.parts, job.expires_at_ms), (None, 3, 99));
        assert!(job.is_expired(99) && !job.is_expired(98));
        assert_eq!(parts.concat(), big);
        assert_eq!(decode_job(b"X"), None);
    }
}
