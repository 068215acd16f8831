//! How one job slot is kept in one shared-data value.
//!
//! A free slot is `F epoch gen` (9 bytes). A held slot is a fixed header that a
//! poll reads without parsing JSON, then the owner, the job record (JSON) and
//! the rendered poll answer:
//!
//! ```text
//! 'H' | epoch u32 | status u8 | expires_at_ms u64 | owner_len u16 | id [36]
//!     | record_len u32 | audio_at u32 | audio_len u32 | tail_at u32 | owner | record | body
//! ```
//! All integers little-endian. `epoch` counts how often the slot was freed, so
//! a free-list entry or timer that names an older epoch is recognised as stale.

use crate::bytes::Fields;
use crate::job::{JobRecord, JobStatus, Rendered, Span};

pub const ID_LEN: usize = 36;
const HEADER: usize = 1 + 4 + 1 + 8 + 2 + ID_LEN + 4 + 4 + 4 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    pub epoch: u32,
    /// The VM generation that put the slot on the free list (see `store::audit`).
    pub gen: u32,
}

impl Free {
    pub fn encode(self) -> [u8; 9] {
        let mut out = [0u8; 9];
        out[0] = b'F';
        out[1..5].copy_from_slice(&self.epoch.to_le_bytes());
        out[5..9].copy_from_slice(&self.gen.to_le_bytes());
        out
    }
}

/// A held slot's value, borrowed; only the header is decoded up front.
#[derive(Debug, Clone, Copy)]
pub struct HeldView<'a> {
    pub epoch: u32,
    pub status: JobStatus,
    /// 0 while the job runs.
    pub expires_at_ms: u64,
    pub id: &'a [u8],
    pub owner: &'a [u8],
    pub record: &'a [u8],
    pub body: &'a [u8],
    pub audio: Option<Span>,
    pub tail_at: u32,
}

impl<'a> HeldView<'a> {
    pub fn record(&self) -> Option<JobRecord> {
        serde_json::from_slice(self.record).ok()
    }

    /// The base64 audio inside the body, if the job completed.
    pub fn audio_base64(&self) -> Option<&'a [u8]> {
        let Span { at, len } = self.audio?;
        let start = usize::try_from(at).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.body.get(start..end)
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && now_ms >= self.expires_at_ms
    }
}

#[derive(Debug, Clone, Copy)]
pub enum SlotView<'a> {
    /// Never written (beyond the slots made so far) or unreadable.
    Missing,
    Free(Free),
    Held(HeldView<'a>),
}

pub fn decode(value: &[u8]) -> SlotView<'_> {
    match value.split_first() {
        Some((b'F', rest)) => {
            let mut f = Fields(rest);
            match (f.u32(), f.u32()) {
                (Some(epoch), Some(gen)) => SlotView::Free(Free { epoch, gen }),
                _ => SlotView::Missing,
            }
        }
        Some((b'H', rest)) => decode_held(rest).map_or(SlotView::Missing, SlotView::Held),
        _ => SlotView::Missing,
    }
}

/// A held slot's value after its `H`.
fn decode_held(v: &[u8]) -> Option<HeldView<'_>> {
    let mut f = Fields(v);
    let epoch = f.u32()?;
    let [status] = f.take()?;
    let status = JobStatus::from_code(status)?;
    let expires_at_ms = f.u64()?;
    let owner_len = usize::from(f.u16()?);
    let id = f.bytes(ID_LEN)?;
    let record_len = usize::try_from(f.u32()?).ok()?;
    let (audio_at, audio_len, tail_at) = (f.u32()?, f.u32()?, f.u32()?);
    let owner = f.bytes(owner_len)?;
    let record = f.bytes(record_len)?;
    Some(HeldView {
        epoch,
        status,
        expires_at_ms,
        id,
        owner,
        record,
        body: f.rest(),
        audio: (audio_len > 0).then_some(Span {
            at: audio_at,
            len: audio_len,
        }),
        tail_at,
    })
}

/// Encodes a held slot. `None` if the id or owner does not fit the header
/// (ids are always 36 bytes; owners are capped at 64 KiB).
pub fn encode_held(epoch: u32, record: &JobRecord, rendered: &Rendered) -> Option<Vec<u8>> {
    let record_json = serde_json::to_vec(record).ok()?;
    let owner = record.owner.as_bytes();
    let id = record.id.as_bytes();
    if id.len() != ID_LEN {
        return None;
    }
    let owner_len = u16::try_from(owner.len()).ok()?;
    let record_len = u32::try_from(record_json.len()).ok()?;
    let Span {
        at: audio_at,
        len: audio_len,
    } = rendered.audio.unwrap_or_default();
    let expires = if record.status.is_finished() {
        record.expires_at_ms().unwrap_or(0).max(1)
    } else {
        0
    };
    let mut out =
        Vec::with_capacity(HEADER + owner.len() + record_json.len() + rendered.body.len());
    out.push(b'H');
    out.extend_from_slice(&epoch.to_le_bytes());
    out.push(record.status.code());
    out.extend_from_slice(&expires.to_le_bytes());
    out.extend_from_slice(&owner_len.to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&record_len.to_le_bytes());
    out.extend_from_slice(&audio_at.to_le_bytes());
    out.extend_from_slice(&audio_len.to_le_bytes());
    out.extend_from_slice(&rendered.tail_at.to_le_bytes());
    out.extend_from_slice(owner);
    out.extend_from_slice(&record_json);
    out.extend_from_slice(&rendered.body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::render;

    #[test]
    fn held_slots_round_trip_and_truncations_read_as_missing() {
        let request = crate::speech::sample_request(&[("p", "m")]);
        let id = "0b9c7c4e-8a47-4a39-9d1c-2f0f2a3b8e51".to_string();
        let record = JobRecord::new(id.clone(), "vk:a".into(), 5, 60, 90, request);
        let rendered = render(&record, None);
        let bytes = encode_held(7, &record, &rendered).unwrap();
        let SlotView::Held(view) = decode(&bytes) else {
            panic!("not held")
        };
        assert_eq!(
            (view.epoch, view.status, view.expires_at_ms),
            (7, JobStatus::Pending, 0)
        );
        assert_eq!((view.id, view.owner), (id.as_bytes(), &b"vk:a"[..]));
        assert_eq!(view.record().unwrap(), record);
        assert_eq!(view.body, &rendered.body[..]);
        for cut in 0..bytes.len() - rendered.body.len() {
            assert!(
                matches!(decode(&bytes[..cut]), SlotView::Missing),
                "cut at {cut}"
            );
        }
        let free = Free { epoch: 3, gen: 9 };
        assert!(matches!(decode(&free.encode()), SlotView::Free(f) if f == free));
        assert!(matches!(decode(b""), SlotView::Missing));
    }
}
