//! Where a job's keys live in etcd, all under one configured prefix:
//!
//! ```text
//! <prefix>jobs/<id>            the job record
//! <prefix>audio/<id>/<part>    the audio, in parts (part numbers zero-padded to 6 digits,
//!                              so that a range lists them in order)
//! <prefix>claims/<id>          who works on the job, under that worker's lease
//! <prefix>pending/<id>         present while the job waits for a worker: a range over
//!                              <prefix>pending/ finds the jobs to take
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

    /// The job's entry in the pending index.
    pub fn pending(&self, id: &str) -> Vec<u8> {
        self.key(&["pending/", id])
    }

    /// The prefix of the pending index.
    pub fn pending_prefix(&self) -> Vec<u8> {
        self.key(&["pending/"])
    }

    /// The job id of a key under `jobs/`, `claims/` or `pending/`.
    pub fn id_of<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let id = ["jobs/", "claims/", "pending/"]
            .iter()
            .find_map(|dir| rest.strip_prefix(dir.as_bytes()))?;
        let id = std::str::from_utf8(id).ok()?;
        (!id.is_empty() && !id.contains('/')).then_some(id)
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
            l().audio(id),
            format!("/async-speech/audio/{id}/").into_bytes()
        );
        assert_eq!(
            l().claim(id),
            format!("/async-speech/claims/{id}").into_bytes()
        );
        assert_eq!(
            l().pending(id),
            format!("/async-speech/pending/{id}").into_bytes()
        );
        assert_eq!(l().pending_prefix(), b"/async-speech/pending/".to_vec());
        assert_eq!(l().jobs(), b"/async-speech/jobs/".to_vec());
        assert_eq!(l().id_of(&l().pending(id)), Some(id));
        assert_eq!(l().id_of(&l().claim(id)), Some(id));
        assert_eq!(l().id_of(&l().job(id)), Some(id));
        assert_eq!(l().id_of(&l().audio_part(id, 0)), None);
        assert_eq!(l().id_of(b"/other/jobs/x"), None);
        assert_eq!(l().id_of(b"/async-speech/jobs/"), None);
        assert_eq!(l().id_of(b"/async-speech/jobs/a/b"), None);
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
