//! Job ids: UUID-shaped, unguessable, and carrying the job's slot in the store.
//!
//! 128 bits: 6 fixed by the UUID v4 version and variant, 20 used for the slot
//! (XOR-masked by the first 20 random bits so ids still look uniform), which
//! leaves 102 random bits from the host's secure source.

use uuid::{Builder, Uuid};

/// Random bytes from a seed of the host's secure source, drawn once: SHA-256
/// of the seed and a counter, block by block. Unguessable without the seed,
/// and one host call per VM instead of one per id.
#[derive(Debug)]
pub struct Drbg {
    seed: [u8; 32],
    counter: u64,
}

impl Drbg {
    pub fn new(seed: [u8; 32]) -> Drbg {
        Drbg { seed, counter: 0 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        use sha2::{Digest, Sha256};
        for chunk in buf.chunks_mut(32) {
            self.counter = self.counter.wrapping_add(1);
            let block = Sha256::new()
                .chain_update(self.seed)
                .chain_update(self.counter.to_le_bytes())
                .finalize();
            chunk
                .iter_mut()
                .zip(block.iter())
                .for_each(|(out, b)| *out = *b);
        }
    }
}

/// Job slots are addressed with 20 bits of the job id, so that 102 random bits remain.
pub const MAX_JOBS_LIMIT: u32 = 1 << 20;

pub fn make_id(random: [u8; 16], slot: u32) -> String {
    let mut bytes = *Builder::from_random_bytes(random).as_uuid().as_bytes();
    let slot = slot & (MAX_JOBS_LIMIT - 1);
    let mask = first20(&bytes);
    let coded = slot ^ mask;
    let [_, b1, b2, b3] = coded.to_be_bytes();
    bytes[13] = (bytes[13] & 0xf0) | (b1 & 0x0f);
    bytes[14] = b2;
    bytes[15] = b3;
    Uuid::from_bytes(bytes).hyphenated().to_string()
}

/// The slot an id points at; `None` for anything that is not a canonical id.
pub fn slot_of(id: &str) -> Option<u32> {
    let uuid = Uuid::try_parse(id).ok()?;
    // Only the lower-case hyphenated form is ever issued.
    if uuid.hyphenated().to_string() != id {
        return None;
    }
    let bytes = uuid.as_bytes();
    let coded = u32::from_be_bytes([0, bytes[13] & 0x0f, bytes[14], bytes[15]]);
    Some(coded ^ first20(bytes))
}

fn first20(bytes: &[u8; 16]) -> u32 {
    u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) >> 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_never_repeats_a_block_and_depends_on_its_seed() {
        let mut a = Drbg::new([1; 32]);
        let mut b = Drbg::new([2; 32]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut x = [0u8; 16];
            a.fill(&mut x);
            assert!(seen.insert(x));
        }
        let (mut x, mut y) = ([0u8; 40], [0u8; 40]);
        Drbg::new([1; 32]).fill(&mut x);
        b.fill(&mut y);
        assert_ne!(x, y);
        assert_ne!(x[..32], x[32..], "each block its own");
    }

    #[test]
    fn ids_round_trip_their_slot_and_look_like_uuid_v4() {
        for (i, slot) in [0u32, 1, 4095, 65_536, MAX_JOBS_LIMIT - 1]
            .into_iter()
            .enumerate()
        {
            let random = [i as u8 * 37 + 11; 16];
            let id = make_id(random, slot);
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "4", "{id}");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
            assert_eq!(slot_of(&id), Some(slot), "{id}");
        }
    }

    #[test]
    fn non_canonical_ids_have_no_slot() {
        let id = make_id([0xab; 16], 3);
        assert_ne!(id, id.to_uppercase());
        assert_eq!(slot_of(&id.to_uppercase()), None);
        assert_eq!(slot_of(&id.replace('-', "")), None);
        assert_eq!(slot_of("nope"), None);
        assert_eq!(slot_of(""), None);
    }
}
