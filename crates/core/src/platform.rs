//! What the core needs from Envoy, as one small trait. The wasm build implements
//! it over proxy-wasm (`host::envoy`); native tests implement it in memory
//! (`sim`), where several "workers" can share one shared-data map and one set of
//! queues, with their steps interleaved at will.

/// Why a compare-and-swap write did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    /// Someone changed the value since it was read.
    CasMismatch,
    /// The host refused for another reason.
    Host(String),
}

/// The shared queues the filter uses; the host maps each to its own queue id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Queue {
    /// Ids of one lane's (one key's) jobs waiting for a worker.
    Lane(String),
    /// Lanes with jobs waiting, each at most once: taken in turn.
    Ring,
    /// Free job slots (the store's free list).
    Free,
    /// One bucket of the timer wheel: level and index (`store::wheel`).
    Wheel(u8, u8),
}

impl Queue {
    /// The queue's name in Envoy, under the filter's namespace.
    pub fn name(&self, namespace: &str) -> String {
        match self {
            Queue::Lane(lane) => format!("async-speech/{namespace}/lane/{lane}"),
            Queue::Ring => format!("async-speech/{namespace}/ring"),
            Queue::Free => format!("async-speech/{namespace}/free"),
            Queue::Wheel(level, index) => format!("async-speech/{namespace}/wheel/{level}/{index}"),
        }
    }

    /// Every queue the filter uses with this configuration, for the host to register.
    pub fn all(config: &crate::config::Config) -> Vec<Queue> {
        [Queue::Free, Queue::Ring]
            .into_iter()
            .chain(crate::governance::lanes(config).map(Queue::Lane))
            .chain(crate::store::shared::wheel::all_buckets())
            .collect()
    }
}

/// One provider (or other) HTTP call to send through an Envoy cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Callout {
    pub cluster: String,
    /// Includes the pseudo-headers `:method`, `:path` and `:authority`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Always at least 1: Envoy reads 0 as "no timeout".
    pub timeout_ms: u64,
}

/// A header map as proxy-wasm serializes it (a count, each key's and
/// value's length, then each key and value followed by a NUL), read without
/// trusting a byte of it: a malformed map reads as the pairs before the fault.
pub fn header_pairs(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let u32_at = |at: usize| usize::try_from(crate::bytes::le_u32(bytes, at)?).ok();
    let Some(count) = u32_at(0) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(count.min(256));
    let mut at = count.saturating_mul(8).saturating_add(4);
    for n in 0..count {
        let sizes = n.saturating_mul(8).saturating_add(4);
        let (Some(key_len), Some(value_len)) = (u32_at(sizes), u32_at(sizes + 4)) else {
            break;
        };
        let take =
            |from: usize, len: usize| bytes.get(from..from.checked_add(len)?).map(<[u8]>::to_vec);
        let Some(key) = take(at, key_len) else { break };
        at = at.saturating_add(key_len + 1);
        let Some(value) = take(at, value_len) else {
            break;
        };
        at = at.saturating_add(value_len + 1);
        out.push((key, value));
    }
    out
}

pub trait Host {
    /// Wall-clock milliseconds since the Unix epoch (may step backwards).
    fn wall_ms(&self) -> u64;
    /// Fills `buf` from the host's secure random source.
    fn random(&self, buf: &mut [u8]) -> Result<(), String>;
    /// A shared-data value and its CAS version; `None` when the key is missing.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String>;
    /// Writes a value; with `cas`, only if the version is still that one.
    /// (Envoy has no create-if-absent: a CAS write to a missing key succeeds.)
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
    fn enqueue(&self, queue: &Queue, item: &[u8]) -> Result<(), String>;
    fn dequeue(&self, queue: &Queue) -> Result<Option<Vec<u8>>, String>;
    /// Sends a callout; the answer comes back to the root context by token.
    fn dispatch(&self, call: &Callout) -> Result<u32, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn header_maps_read_as_pairs_and_a_broken_one_never_panics() {
        let pairs: [(&[u8], &[u8]); 3] = [
            (b":path", b"/x"),
            (b"authorization", b"Bearer \xff"),
            (b"\xfe", b""),
        ];
        let bytes = serialize(&pairs);
        let read = header_pairs(&bytes);
        assert_eq!(read.len(), 3);
        assert_eq!(
            read[1],
            (b"authorization".to_vec(), b"Bearer \xff".to_vec())
        );
        for cut in 0..bytes.len() {
            assert!(header_pairs(&bytes[..cut]).len() <= 3);
        }
        assert!(header_pairs(&[0xff, 0xff, 0xff, 0x7f]).is_empty());
    }
}
