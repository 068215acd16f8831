//! Job ids: UUID-shaped, unguessable, and carrying the job's slot in the store.
//!
//! 128 bits: 6 fixed by the UUID v4 version and variant, 20 used for the slot
//! (XOR-masked by the first 20 random bits so ids still look uniform), which
//! leaves 102 random bits from the host's secure source.

use uuid::{Builder, Uuid};

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
