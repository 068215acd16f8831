//! Fair dispatch and per-key counters over shared data. Each lane (a virtual
//! key, or a shared lane of owners without one) has a queue of its pending
//! jobs and a state key (`k/<lane>`: its counters, held and running jobs,
//! how many wait, and whether it is on the ring). The ring is a queue of
//! lanes with work, each at most once: the dispatcher takes a lane from it,
//! one job from the lane, and puts the lane back at the end while it has
//! more, so lanes are served in turn whatever their backlogs. A lane at its
//! `max_running_jobs` leaves the ring until one of its jobs ends. Every
//! change of a lane's state is a compare-and-swap: any number of workers
//! share them, and a dequeue costs a fixed number of host calls.

use crate::bytes::Fields;
use crate::governance::{KeyState, Limits, Tally};
use crate::platform::{Host, Queue, SetError};

use super::Keys;

/// Compare-and-swap tries of one change.
const RETRIES: usize = 16;
/// How long a lane's count may name a job its queue does not hold.
const MISSING_MS: u64 = 1_000;

impl Keys {
    pub fn lane(&self, lane: &str) -> String {
        format!("{}k/{lane}", self.prefix())
    }
}

/// A lane's state and the version it was read at.
pub fn read(host: &dyn Host, keys: &Keys, lane: &str) -> Result<(KeyState, Option<u32>), String> {
    Ok(match host.get(&keys.lane(lane))? {
        Some((bytes, cas)) => (decode(&bytes), Some(cas)),
        None => (KeyState::default(), None),
    })
}

/// The first byte of a lane's state in shared data.
const COMPACT: u8 = b'L';

/// A lane's state as shared data keeps it: fixed-size little-endian fields,
/// since every submit, dispatch, end and expiry reads and writes it (JSON
/// costs several times more; etcd keeps JSON, for `etcdctl` readers).
pub fn encode(s: &KeyState) -> Vec<u8> {
    let mut out = Vec::with_capacity(100);
    out.push(COMPACT);
    for tally in [s.requests, s.characters, s.spend] {
        out.extend_from_slice(&tally.window_s.to_le_bytes());
        out.extend_from_slice(&tally.used.to_le_bytes());
    }
    for n in [s.held, s.running, s.queued, s.ring_epochs] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.push(u8::from(s.ring.is_some()));
    out.extend_from_slice(&s.ring.unwrap_or(0).to_le_bytes());
    for n in [s.served_ms, s.missed_ms, s.round] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out
}

/// Reads [`encode`]'s form, or JSON as an older module wrote it; anything
/// else reads as an empty state.
pub fn decode(bytes: &[u8]) -> KeyState {
    match bytes.split_first() {
        Some((&COMPACT, rest)) => decode_compact(&mut Fields(rest)).unwrap_or_default(),
        _ => KeyState::decode(bytes),
    }
}

fn tally(f: &mut Fields) -> Option<Tally> {
    Some(Tally {
        window_s: f.u64()?,
        used: f.u64()?,
    })
}

fn decode_compact(f: &mut Fields) -> Option<KeyState> {
    let (requests, characters, spend) = (tally(f)?, tally(f)?, tally(f)?);
    let (held, running, queued, ring_epochs) = (f.u32()?, f.u32()?, f.u32()?, f.u32()?);
    let [on_ring] = f.take()?;
    let ring = f.u32()?;
    let state = KeyState {
        requests,
        characters,
        spend,
        held,
        running,
        queued,
        ring: (on_ring == 1).then_some(ring),
        ring_epochs,
        served_ms: f.u64()?,
        missed_ms: f.u64()?,
        round: f.u64()?,
    };
    f.rest().is_empty().then_some(state)
}

/// Writes `state` if the lane is still at `cas`; false if it moved on.
pub fn write(
    host: &dyn Host,
    keys: &Keys,
    lane: &str,
    state: &KeyState,
    cas: Option<u32>,
) -> Result<bool, String> {
    match host.set(&keys.lane(lane), &encode(state), cas) {
        Ok(()) => Ok(true),
        Err(SetError::CasMismatch) => Ok(false),
        Err(SetError::Host(e)) => Err(e),
    }
}

/// Whether the lane may start no more jobs now.
pub fn saturated(limits: &Limits, state: &KeyState) -> bool {
    limits
        .max_running_jobs
        .is_some_and(|max| state.running >= max)
}

/// Puts the lane on the ring if it has work, room to run it, and is not on
/// it already; returns the entry to enqueue, if any.
fn ring_if_due(limits: &Limits, state: &mut KeyState, lane: &str) -> Option<Vec<u8>> {
    if state.ring.is_some() || state.queued == 0 || saturated(limits, state) {
        return None;
    }
    // A new epoch for each entry: an older entry of the lane is then stale.
    state.ring_epochs = state.ring_epochs.wrapping_add(1);
    let epoch = state.ring_epochs;
    state.ring = Some(epoch);
    // Not served on this turn yet: the lane audit starts the clock.
    state.served_ms = 0;
    Some(ring_entry(lane, epoch))
}

fn ring_entry(lane: &str, epoch: u32) -> Vec<u8> {
    let mut out = epoch.to_le_bytes().to_vec();
    out.extend_from_slice(lane.as_bytes());
    out
}

fn read_ring_entry(bytes: &[u8]) -> Option<(String, u32)> {
    let mut f = Fields(bytes);
    let epoch = f.u32()?;
    Some((String::from_utf8(f.rest().to_vec()).ok()?, epoch))
}

/// Applies `change` to the lane's state under compare-and-swap, retrying on
/// contention, then queues what it asks for: the ring entry of a lane that
/// now has work and room. `change` returns false to leave it alone.
pub fn update(
    host: &dyn Host,
    keys: &Keys,
    lane: &str,
    limits: &Limits,
    change: impl FnMut(&mut KeyState) -> bool,
) -> Result<Option<KeyState>, String> {
    update_from(host, keys, lane, limits, None, change)
}

/// As [`update`], its first try from a state the caller has just read (one
/// read fewer when nobody changed the lane since).
pub fn update_from(
    host: &dyn Host,
    keys: &Keys,
    lane: &str,
    limits: &Limits,
    mut read_before: Option<(KeyState, Option<u32>)>,
    mut change: impl FnMut(&mut KeyState) -> bool,
) -> Result<Option<KeyState>, String> {
    for _ in 0..RETRIES {
        let (mut state, cas) = match read_before.take() {
            Some(before) => before,
            None => read(host, keys, lane)?,
        };
        if !change(&mut state) {
            return Ok(None);
        }
        let entry = ring_if_due(limits, &mut state, lane);
        if write(host, keys, lane, &state, cas)? {
            if let Some(entry) = entry {
                host.enqueue(&Queue::Ring, &entry)?;
            }
            return Ok(Some(state));
        }
    }
    Err(format!("lane {lane} is contended"))
}

/// A job of the lane joins its queue (its counters already changed by the
/// caller's write, which counted it in `queued`).
pub fn enqueue_job(host: &dyn Host, lane: &str, id: &str) -> Result<(), String> {
    host.enqueue(&Queue::Lane(lane.to_string()), id.as_bytes())
}

/// The next job to start, lanes taken in turn: (lane, job id). The lane
/// counts it as running. At most `tries` ring entries are looked at.
pub fn next_job(
    host: &dyn Host,
    keys: &Keys,
    limits_of: &dyn Fn(&str) -> Limits,
    tries: usize,
    now_ms: u64,
) -> Option<(String, String)> {
    for _ in 0..tries {
        let entry = host.dequeue(&Queue::Ring).ok()??;
        let Some((lane, epoch)) = read_ring_entry(&entry) else {
            continue;
        };
        let limits = limits_of(&lane);
        if let Some(id) = take_from(host, keys, &lane, epoch, &limits, now_ms) {
            return Some((lane, id));
        }
    }
    None
}

/// One job from the lane whose ring entry (`epoch`) was just taken; the lane
/// goes back on the ring while it has more and room for them.
fn take_from(
    host: &dyn Host,
    keys: &Keys,
    lane: &str,
    epoch: u32,
    limits: &Limits,
    now_ms: u64,
) -> Option<String> {
    let mut id: Option<String> = None;
    for _ in 0..RETRIES {
        let (mut state, cas) = read(host, keys, lane).ok()?;
        if state.ring != Some(epoch) {
            return None; // a stale entry: the lane left the ring, or was put on it again
        }
        if id.is_none() && state.queued > 0 && !saturated(limits, &state) {
            id = host
                .dequeue(&Queue::Lane(lane.to_string()))
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned());
        }
        match &id {
            Some(_) => {
                state.queued = state.queued.saturating_sub(1);
                state.running = state.running.saturating_add(1);
                state.served_ms = now_ms;
                state.missed_ms = 0;
            }
            // Counted but not there: a submit between its count and its enqueue (it
            // comes in a moment), or an entry lost with a VM, which the count forgets
            // once it has been missing for a second.
            None if state.queued > 0 && !saturated(limits, &state) => {
                if state.missed_ms == 0 {
                    state.missed_ms = now_ms;
                } else if now_ms.saturating_sub(state.missed_ms) > MISSING_MS {
                    state.queued = 0;
                    state.missed_ms = 0;
                }
            }
            None => {}
        }
        let again = state.queued > 0 && !saturated(limits, &state);
        state.ring = again.then_some(epoch);
        if write(host, keys, lane, &state, cas).ok()? {
            if again {
                let _ = host.enqueue(&Queue::Ring, &ring_entry(lane, epoch));
            }
            return id;
        }
    }
    // Contended throughout: the job goes back, for the audit to find.
    if let Some(id) = &id {
        let _ = enqueue_job(host, lane, id);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_an_older_modules_json_still_reads() {
        let state = KeyState {
            requests: Tally {
                window_s: 60,
                used: 3,
            },
            characters: Tally {
                window_s: 120,
                used: u64::MAX,
            },
            spend: Tally {
                window_s: 7,
                used: 9,
            },
            held: 4,
            running: 2,
            queued: u32::MAX,
            ring: Some(0),
            ring_epochs: 11,
            served_ms: 1_800_000_000_000,
            missed_ms: 5,
            round: 6,
        };
        let bytes = encode(&state);
        assert_eq!(decode(&bytes), state);
        let off_ring = KeyState {
            ring: None,
            ..state.clone()
        };
        assert_eq!(decode(&encode(&off_ring)), off_ring);
        assert_eq!(decode(&state.encode()), state, "JSON from an older module");
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), KeyState::default(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), KeyState::default());
    }
}
