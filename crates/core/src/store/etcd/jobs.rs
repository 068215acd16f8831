//! Jobs in etcd (SPEC §4): what each key holds, and the transactions that
//! move a job from submit to its end.
//!
//! - `jobs/<id>`: `E`, the number of parts (u32), the expiry (ms, u64; 0 while
//!   the job runs), the owner (u16 length, bytes) — enough to answer 404s and
//!   DELETE without the rest — then, when it fits in one value, the job as a
//!   slot holds it (`store::slot`: header, record, rendered poll answer). A
//!   larger one lives in `audio/<id>/<n>`.
//! - `pending/<id>`: work for any replica, found by scanning this index: `J`
//!   and the job's deadline (ms, u64) for a job to run, or `D` and when its
//!   webhook's next attempt is due, for a finished job whose delivery goes on.
//! - `claims/<id>`: the replica running the job, under that replica's lease:
//!   when the replica dies, the lease lapses, the claim goes, and another
//!   replica takes the job.
//!
//! A finished job's keys carry a lease of its TTL, so etcd removes them when
//! it expires. Every key lives under the configured prefix.

use super::keys::{split_audio, Keys};
use super::request::{self as req, Compare, Op, Request, Txn};

/// How long a replica's claims outlive it (its lease, kept alive every few seconds).
pub const CLAIM_TTL_S: i64 = 10;
/// Pending jobs one scan looks at.
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
    let parts = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    let expires_at_ms = u64::from_le_bytes(rest.get(4..12)?.try_into().ok()?);
    let owner_len = usize::from(u16::from_le_bytes(rest.get(12..14)?.try_into().ok()?));
    let (owner, payload) = rest.get(14..)?.split_at_checked(owner_len)?;
    Some(StoredJob {
        expires_at_ms,
        owner,
        whole: (parts == 0).then_some(payload),
        parts,
    })
}

/// A new job, stored only if no job has that id: the record and its pending entry.
pub fn submit(keys: &Keys, id: &str, job_value: &[u8], deadline_ms: u64) -> Request {
    Txn::new()
        .when(Compare::absent(&keys.job(id)))
        .then(Op::put(&keys.job(id), job_value, None))
        .then(Op::put(
            &keys.pending(id),
            &pending(Pending::Run, deadline_ms),
            None,
        ))
        // When it fails, the job is read back: as written, an earlier try landed.
        .otherwise(Op::range(&keys.job(id)))
        .request()
}

/// What a pending entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// A job to run; the time is its deadline.
    Run,
    /// A finished job's webhook; the time is when its next attempt is due.
    Deliver,
}

pub fn pending(kind: Pending, at_ms: u64) -> Vec<u8> {
    let mut v = vec![match kind {
        Pending::Run => b'J',
        Pending::Deliver => b'D',
    }];
    v.extend_from_slice(&at_ms.to_le_bytes());
    v
}

pub fn parse_pending(value: &[u8]) -> Option<(Pending, u64)> {
    let (tag, rest) = value.split_first()?;
    let kind = match tag {
        b'J' => Pending::Run,
        b'D' => Pending::Deliver,
        _ => return None,
    };
    Some((kind, u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)))
}

/// Forgets a job if it is still as read (`mod_revision`): every key it has.
pub fn delete(keys: &Keys, id: &str, mod_revision: i64) -> Request {
    Txn::new()
        .when(Compare::unchanged(&keys.job(id), mod_revision))
        .then(Op::delete(&keys.job(id)))
        .then(Op::delete_prefix(&keys.audio(id)))
        .then(Op::delete(&keys.pending(id)))
        .then(Op::delete(&keys.claim(id)))
        // When it fails, the job is read back: gone, an earlier try landed.
        .otherwise(Op::range(&keys.job(id)))
        .request()
}

/// Claims a job for `owner` under its lease, and reads the job in the same
/// step — only while it is still pending (a scan may be older than the job's
/// end) and no one else holds it. When it fails, the claim and the job are
/// read back: a claim already `owner`'s (an earlier try that landed) holds.
pub fn claim(keys: &Keys, id: &str, owner: &[u8], lease: i64) -> Request {
    Txn::new()
        .when(Compare::absent(&keys.claim(id)))
        .when(Compare::present(&keys.pending(id)))
        .then(Op::put(&keys.claim(id), owner, Some(lease)))
        .then(Op::range(&keys.job(id)))
        .otherwise(Op::range(&keys.claim(id)))
        .otherwise(Op::range(&keys.job(id)))
        .request()
}

/// How a job's keys are left when its holder lets go of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Finished for good: its keys under the lease of its TTL.
    Done { ttl_lease: i64 },
    /// Finished, its webhook still to deliver: no lease yet, and pending
    /// again for whoever is first when the next attempt is due.
    DeliverAt(u64),
    /// Expired while its delivery went on, which has now ended: every key goes.
    Forget,
    /// Not finished: pending again (its entry stays), for any replica to claim.
    HandBack,
}

/// Lets go of a job, only while `owner` still holds the claim: the record
/// as it now stands (its parts were written before), the pending entry, and
/// the claim released.
pub fn release(keys: &Keys, id: &str, owner: &[u8], job_value: &[u8], how: Release) -> Request {
    let txn = Txn::new().when(Compare::holds(&keys.claim(id), owner));
    let txn = match how {
        Release::Done { ttl_lease } => txn
            .then(Op::put(&keys.job(id), job_value, Some(ttl_lease)))
            .then(Op::delete(&keys.pending(id))),
        Release::DeliverAt(due_ms) => {
            txn.then(Op::put(&keys.job(id), job_value, None))
                .then(Op::put(
                    &keys.pending(id),
                    &pending(Pending::Deliver, due_ms),
                    None,
                ))
        }
        Release::Forget => txn
            .then(Op::delete(&keys.job(id)))
            .then(Op::delete_prefix(&keys.audio(id)))
            .then(Op::delete(&keys.pending(id))),
        Release::HandBack => txn.then(Op::put(&keys.job(id), job_value, None)),
    };
    // When it fails, the job is read back: as written, an earlier try landed.
    txn.then(Op::delete(&keys.claim(id)))
        .otherwise(Op::range(&keys.job(id)))
        .request()
}

/// A running job's record as it now stands (`processing`, its progress),
/// written only while `owner` holds the claim; best effort.
pub fn show_running(keys: &Keys, id: &str, owner: &[u8], job_value: &[u8]) -> Request {
    Txn::new()
        .when(Compare::holds(&keys.claim(id), owner))
        .then(Op::put(&keys.job(id), job_value, None))
        .request()
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
        assert_eq!(
            parse_pending(&pending(Pending::Deliver, 42)),
            Some((Pending::Deliver, 42))
        );
        assert_eq!(
            parse_pending(&pending(Pending::Run, 7)),
            Some((Pending::Run, 7))
        );
        assert_eq!(parse_pending(b"x"), None);
    }
}
