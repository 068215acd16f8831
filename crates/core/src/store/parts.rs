//! Parts of a long job (SPEC §6), each in its own key beside its slot until
//! the job joins them: `s/<slot>/p/<index>`, tagged with the job id and the
//! attempt that made it, so a late part of an old attempt (or of the slot's
//! previous job) is never mistaken for the current one. At most
//! `request::MAX_PARTS` keys per slot, emptied when the job ends.

use serde_json::Value;

use super::{Keys, Store, StoreError};
use crate::platform::SetError;
use crate::store::slot::ID_LEN;

/// One part's audio and, with timestamps, its alignments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Part {
    pub audio: Vec<u8>,
    pub alignment: Option<Value>,
    pub normalized_alignment: Option<Value>,
}

impl Keys {
    pub fn part(&self, slot: u32, index: u32) -> String {
        format!("{}/p/{index}", self.slot(slot))
    }
}

fn encode(id: &str, attempt: usize, part: &Part) -> Vec<u8> {
    let meta = match (&part.alignment, &part.normalized_alignment) {
        (None, None) => Vec::new(),
        (a, n) => serde_json::to_vec(&serde_json::json!({"a": a, "n": n})).unwrap_or_default(),
    };
    let mut out = Vec::with_capacity(ID_LEN + 8 + meta.len() + part.audio.len());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&u32::try_from(attempt).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&part.audio);
    out
}

/// The part if it belongs to this job and attempt.
fn decode(value: &[u8], id: &str, attempt: usize) -> Option<Part> {
    let (tag, rest) = value.split_at_checked(ID_LEN)?;
    if tag != id.as_bytes() {
        return None;
    }
    let made_by = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    if usize::try_from(made_by).ok()? != attempt {
        return None;
    }
    let meta_len = usize::try_from(u32::from_le_bytes(rest.get(4..8)?.try_into().ok()?)).ok()?;
    let (meta, audio) = rest.get(8..)?.split_at_checked(meta_len)?;
    let (alignment, normalized_alignment) = if meta.is_empty() {
        (None, None)
    } else {
        let v: Value = serde_json::from_slice(meta).ok()?;
        let pick = |k: &str| v.get(k).filter(|x| !x.is_null()).cloned();
        (pick("a"), pick("n"))
    };
    Some(Part {
        audio: audio.to_vec(),
        alignment,
        normalized_alignment,
    })
}

fn is_tagged(value: &[u8], id: &str) -> bool {
    value.get(..ID_LEN) == Some(id.as_bytes())
}

impl Store<'_> {
    /// Writes part `index` of `attempt`, if `still_ours()` holds after the key
    /// was read (the job still runs that attempt); a write that raced another
    /// fails its CAS and is dropped. Returns whether it was written.
    pub fn put_part(
        &self,
        slot: u32,
        id: &str,
        attempt: usize,
        index: u32,
        part: &Part,
        still_ours: &dyn Fn() -> bool,
    ) -> Result<bool, StoreError> {
        let key = self.keys.part(slot, index);
        let cas = self
            .host
            .get(&key)
            .map_err(StoreError::Busy)?
            .map(|(_, cas)| cas);
        if !still_ours() {
            return Ok(false);
        }
        match self.host.set(&key, &encode(id, attempt, part), cas) {
            Ok(()) => Ok(true),
            Err(SetError::CasMismatch) => Ok(false),
            Err(SetError::Host(e)) => Err(StoreError::Busy(e)),
        }
    }

    /// All `total` parts of this job's attempt, in order; `None` if one is
    /// missing or belongs to someone else.
    pub fn parts(
        &self,
        slot: u32,
        id: &str,
        attempt: usize,
        total: u32,
    ) -> Result<Option<Vec<Part>>, StoreError> {
        let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for index in 0..total {
            let Some((value, _)) = self
                .host
                .get(&self.keys.part(slot, index))
                .map_err(StoreError::Busy)?
            else {
                return Ok(None);
            };
            match decode(&value, id, attempt) {
                Some(part) => out.push(part),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// Empties the job's part keys (those still tagged with it).
    pub fn clear_parts(&self, slot: u32, id: &str, total: u32) {
        for index in 0..total {
            let key = self.keys.part(slot, index);
            if let Ok(Some((value, cas))) = self.host.get(&key) {
                if is_tagged(&value, id) {
                    let _ = self.host.set(&key, b"", Some(cas));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimHost, SimShared};

    #[test]
    fn parts_belong_to_their_job_and_attempt() {
        let shared = SimShared::new(0);
        let host = SimHost::new(&shared, 1);
        let keys = Keys::new("t");
        let store = Store::new(&host, &keys, 4, 1);
        let id = "0b9c7c4e-8a47-4a39-9d1c-2f0f2a3b8e51";
        let other = "1b9c7c4e-8a47-4a39-9d1c-2f0f2a3b8e51";
        let part = |b: u8| Part {
            audio: vec![b; 3],
            alignment: Some(serde_json::json!({"characters": ["x"]})),
            normalized_alignment: None,
        };
        assert!(store.put_part(2, id, 1, 0, &part(1), &|| true).unwrap());
        assert!(
            !store.put_part(2, id, 1, 1, &part(2), &|| false).unwrap(),
            "not ours any more: not written"
        );
        assert_eq!(store.parts(2, id, 1, 2).unwrap(), None, "part 1 is missing");
        assert!(store.put_part(2, id, 1, 1, &part(2), &|| true).unwrap());
        let got = store.parts(2, id, 1, 2).unwrap().unwrap();
        assert_eq!(
            got.iter().map(|p| p.audio.clone()).collect::<Vec<_>>(),
            vec![vec![1; 3], vec![2; 3]]
        );
        assert_eq!(
            got[0].alignment,
            Some(serde_json::json!({"characters": ["x"]}))
        );
        assert_eq!(
            store.parts(2, id, 0, 2).unwrap(),
            None,
            "another attempt's parts"
        );
        assert_eq!(
            store.parts(2, other, 1, 2).unwrap(),
            None,
            "another job's parts"
        );
        store.clear_parts(2, other, 2);
        assert!(
            store.parts(2, id, 1, 2).unwrap().is_some(),
            "clearing another job's parts touches nothing"
        );
        store.clear_parts(2, id, 2);
        assert_eq!(store.parts(2, id, 1, 2).unwrap(), None);
    }
}
