//! Where the etcd store keeps things, all under one configured prefix:
//!
//! ```text
//! jobs/<id>                   the job (its head, and the job as a slot holds it)
//! audio/<id>/<part>           a large job's bytes, in parts (numbers zero-padded to 6
//!                             digits, so that a range lists them in order)
//! queue/<round>/<id>          a job waiting to run; the round (16 hex digits) is its
//!                             place in fair dispatch, so a range lists them in order
//! deliver/<due>/<id>          a finished job whose webhook attempt is due then (ms)
//! deadline/<at>/<id>          an unfinished job and its deadline (ms)
//! claims/<id>                 the replica running the job, under that replica's lease
//! active/<replica>/<id>       a job the replica holds, and the queue or deliver key to
//!                             put back if the replica dies (no lease)
//! replicas/<replica>          every replica that may hold jobs (no lease)
//! alive/<replica>             a live replica, under its lease
//! running/<lane>/<name>       a job of the lane with a provider, under its replica's
//!                             lease (a numbered slot where the key caps them)
//! lanes/<lane>                a key's counters and its last place in the queue
//! held/<lane>/<id>            a job the key holds (under the job's TTL lease once finished)
//! round                       the place of the job claimed last
//! ```
//!
//! Audio is split in parts of at most `part_bytes` bytes, each written by a
//! request of its own (etcd counts a whole txn against `--max-request-bytes`).

use super::response::Kv;

/// Digits of a part number: enough for 256 MiB of audio in 512-byte parts.
const PART_DIGITS: usize = 6;
/// The highest part number the keys can write.
pub const MAX_PARTS: u32 = 999_999;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` as configured (it starts and ends with '/').
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, parts: &[&str]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push_str(p);
        }
        k.into_bytes()
    }

    /// The job record.
    pub fn job(&self, id: &str) -> Vec<u8> {
        self.key(&["jobs/", id])
    }

    /// The prefix of every job record.
    pub fn jobs(&self) -> Vec<u8> {
        self.key(&["jobs/"])
    }

    /// One part of a job's audio (`part` counts from 0).
    pub fn audio_part(&self, id: &str, part: u32) -> Vec<u8> {
        self.key(&["audio/", id, "/", &format!("{part:0PART_DIGITS$}")])
    }

    /// The prefix of every part of a job's audio.
    pub fn audio(&self, id: &str) -> Vec<u8> {
        self.key(&["audio/", id, "/"])
    }

    /// The claim on a job.
    pub fn claim(&self, id: &str) -> Vec<u8> {
        self.key(&["claims/", id])
    }

    /// A job waiting to run, at its place in the dispatch order.
    pub fn queue(&self, round: u64, id: &str) -> Vec<u8> {
        self.key(&["queue/", &format!("{round:016x}"), "/", id])
    }

    pub fn queue_prefix(&self) -> Vec<u8> {
        self.key(&["queue/"])
    }

    /// A finished job whose webhook attempt is due at `due_ms`.
    pub fn deliver(&self, due_ms: u64, id: &str) -> Vec<u8> {
        self.key(&["deliver/", &format!("{due_ms:016x}"), "/", id])
    }

    pub fn deliver_prefix(&self) -> Vec<u8> {
        self.key(&["deliver/"])
    }

    /// An unfinished job, by its deadline.
    pub fn deadline(&self, at_ms: u64, id: &str) -> Vec<u8> {
        self.key(&["deadline/", &format!("{at_ms:016x}"), "/", id])
    }

    pub fn deadline_prefix(&self) -> Vec<u8> {
        self.key(&["deadline/"])
    }

    /// Where a time-ordered index (`deliver/`, `deadline/`) passes `at_ms`:
    /// the end of a range of what is due by then.
    pub fn by_time(&self, prefix: &[u8], at_ms: u64) -> Vec<u8> {
        let mut end = prefix.to_vec();
        end.extend_from_slice(format!("{:016x}", at_ms.saturating_add(1)).as_bytes());
        end
    }

    /// A job held by a replica.
    pub fn active(&self, replica: &str, id: &str) -> Vec<u8> {
        self.key(&["active/", replica, "/", id])
    }

    pub fn active_of(&self, replica: &str) -> Vec<u8> {
        self.key(&["active/", replica, "/"])
    }

    pub fn replica(&self, replica: &str) -> Vec<u8> {
        self.key(&["replicas/", replica])
    }

    pub fn replicas(&self) -> Vec<u8> {
        self.key(&["replicas/"])
    }

    pub fn alive(&self, replica: &str) -> Vec<u8> {
        self.key(&["alive/", replica])
    }

    pub fn alives(&self) -> Vec<u8> {
        self.key(&["alive/"])
    }

    /// A running job of the lane: `name` is a slot number or the job id.
    pub fn running(&self, lane: &str, name: &str) -> Vec<u8> {
        self.key(&["running/", lane, "/", name])
    }

    pub fn running_of(&self, lane: &str) -> Vec<u8> {
        self.key(&["running/", lane, "/"])
    }

    /// A lane's counters.
    pub fn lane(&self, lane: &str) -> Vec<u8> {
        self.key(&["lanes/", lane])
    }

    /// A job the lane holds.
    pub fn held(&self, lane: &str, id: &str) -> Vec<u8> {
        self.key(&["held/", lane, "/", id])
    }

    pub fn held_of(&self, lane: &str) -> Vec<u8> {
        self.key(&["held/", lane, "/"])
    }

    /// The place of the job claimed last.
    pub fn round(&self) -> Vec<u8> {
        self.key(&["round"])
    }

    /// The last segment of a key: a job id, or a replica's name.
    pub fn last<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let at = rest.iter().rposition(|b| *b == b'/')?;
        let last = std::str::from_utf8(rest.get(at + 1..)?).ok()?;
        (!last.is_empty()).then_some(last)
    }

    /// The round of a `queue/` key, or the time of a `deliver/` or `deadline/` key.
    pub fn number_of(&self, key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let mut parts = rest.split(|b| *b == b'/');
        let _ = parts.next()?;
        u64::from_str_radix(std::str::from_utf8(parts.next()?).ok()?, 16).ok()
    }

    /// A job's audio from the keys of a range over [`Keys::audio`]: exactly
    /// parts `0..parts`, in any order, each once, and nothing else.
    pub fn join_audio(&self, id: &str, kvs: &[Kv], parts: u32) -> Result<Vec<u8>, String> {
        if parts > MAX_PARTS {
            return Err(format!("job {id} has {parts} parts, more than {MAX_PARTS}"));
        }
        let prefix = self.audio(id);
        let mut found: Vec<Option<&[u8]>> = vec![None; parts as usize];
        for kv in kvs {
            let n = kv
                .key
                .strip_prefix(prefix.as_slice())
                .filter(|d| d.len() == PART_DIGITS && d.iter().all(u8::is_ascii_digit))
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| d.parse::<usize>().ok())
                .ok_or_else(|| {
                    format!(
                        "{} is not a part of job {id}",
                        String::from_utf8_lossy(&kv.key)
                    )
                })?;
            match found.get_mut(n) {
                Some(slot @ None) => *slot = Some(&kv.value),
                Some(Some(_)) => return Err(format!("part {n} of job {id} is listed twice")),
                None => return Err(format!("job {id} has {parts} parts, not a part {n}")),
            }
        }
        let mut audio = Vec::with_capacity(found.iter().flatten().map(|p| p.len()).sum());
        for (n, part) in found.iter().enumerate() {
            match part {
                Some(p) => audio.extend_from_slice(p),
                None => return Err(format!("part {n} of job {id} is missing")),
            }
        }
        Ok(audio)
    }
}

/// How many parts of at most `part_bytes` bytes `len` bytes take (0 for none).
pub fn parts_needed(len: usize, part_bytes: usize) -> usize {
    len.div_ceil(part_bytes.max(1))
}

/// `audio` in parts of at most `part_bytes` bytes (at least 1), in order;
/// no parts for no audio.
pub fn split_audio(audio: &[u8], part_bytes: usize) -> Vec<&[u8]> {
    audio.chunks(part_bytes.max(1)).collect()
}

/// Parts back into one buffer (the inverse of [`split_audio`]).
pub fn join_parts(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l() -> Keys {
        Keys::new("/async-speech/")
    }

    #[test]
    fn keys() {
        let id = "0b6ad0c8-5e4e-4a43-9c1e-3f1f0d6e9a01";
        assert_eq!(l().job(id), format!("/async-speech/jobs/{id}").into_bytes());
        assert_eq!(
            l().audio_part(id, 12),
            format!("/async-speech/audio/{id}/000012").into_bytes()
        );
        assert_eq!(
            l().queue(255, id),
            format!("/async-speech/queue/00000000000000ff/{id}").into_bytes()
        );
        assert_eq!(l().last(&l().queue(255, id)), Some(id));
        assert_eq!(l().number_of(&l().queue(255, id)), Some(255));
        assert_eq!(l().number_of(&l().deliver(1_000, id)), Some(1_000));
        assert_eq!(l().last(&l().alive("replica-1")), Some("replica-1"));
        assert_eq!(l().last(b"/other/jobs/x"), None);
        assert_eq!(l().last(b"/async-speech/jobs/"), None);
        // What is due by a time sorts before that time's range end, and what is later after.
        let end = l().by_time(&l().deadline_prefix(), 5_000);
        assert!(l().deadline(5_000, id) < end && l().deadline(5_001, id) >= end);
        assert_eq!(
            l().audio_part(id, MAX_PARTS).len(),
            l().audio_part(id, 0).len()
        );
    }

    #[test]
    fn parts_sort_in_key_order() {
        let a = l().audio_part("j", 9);
        let b = l().audio_part("j", 10);
        assert!(a < b);
    }

    #[test]
    fn split_and_join() {
        let audio: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        for size in [0, 1, 7, 4096, 9_999, 10_000, 10_001] {
            let parts = split_audio(&audio, size);
            assert_eq!(parts.len(), parts_needed(audio.len(), size));
            assert!(parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= size.max(1)));
            assert_eq!(join_parts(&parts), audio);
        }
        assert!(split_audio(&[], 10).is_empty());
        assert_eq!(parts_needed(0, 10), 0);
        assert_eq!(parts_needed(1_572_865, 1_572_864), 2);
    }

    fn kv(key: Vec<u8>, value: &[u8]) -> Kv {
        Kv {
            key,
            value: value.to_vec(),
            ..Kv::default()
        }
    }

    #[test]
    fn join_audio_checks_every_part() {
        let l = l();
        let kvs = vec![
            kv(l.audio_part("j", 1), b"world"),
            kv(l.audio_part("j", 0), b"hello "),
        ];
        assert_eq!(l.join_audio("j", &kvs, 2).unwrap(), b"hello world".to_vec());
        assert_eq!(l.join_audio("j", &[], 0).unwrap(), Vec::<u8>::new());
        assert!(l.join_audio("j", &kvs, 3).unwrap_err().contains("part 2"));
        assert!(l
            .join_audio("j", &kvs, 1)
            .unwrap_err()
            .contains("not a part 1"));
        let twice = vec![kvs[0].clone(), kvs[0].clone()];
        assert!(l.join_audio("j", &twice, 2).unwrap_err().contains("twice"));
        let stray = vec![kv(l.audio_part("k", 0), b"x")];
        assert!(l
            .join_audio("j", &stray, 1)
            .unwrap_err()
            .contains("not a part"));
        let odd = vec![kv(b"/async-speech/audio/j/1".to_vec(), b"x")];
        assert!(l.join_audio("j", &odd, 1).is_err());
    }
}
