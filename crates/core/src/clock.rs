//! The store's clock: wall time that never runs backwards.
//!
//! Job timestamps, expiry and deadlines all use this clock. When the host's
//! wall clock steps back, the store's clock holds still instead of jumping back
//! with it (and then advances with the wall clock again), so expiry keeps
//! working. The offset is kept in shared data, so every worker agrees on it;
//! each VM caches it and refreshes it on every tick.

use std::cell::Cell;

use crate::platform::Host;

/// The shared state: `offset_ms` added to the wall clock, and the highest
/// store time seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockState {
    pub offset_ms: u64,
    pub high_ms: u64,
}

impl ClockState {
    fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let (a, b) = out.split_at_mut(8);
        a.copy_from_slice(&self.offset_ms.to_le_bytes());
        b.copy_from_slice(&self.high_ms.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<ClockState> {
        let mut f = crate::bytes::Fields(bytes);
        Some(ClockState {
            offset_ms: f.u64()?,
            high_ms: f.u64()?,
        })
    }

    /// The state after observing `wall_ms`: a wall clock behind the highest
    /// time seen grows the offset so that store time continues from there.
    pub fn observe(self, wall_ms: u64) -> ClockState {
        let now = wall_ms.saturating_add(self.offset_ms);
        if now >= self.high_ms {
            ClockState {
                offset_ms: self.offset_ms,
                high_ms: now,
            }
        } else {
            ClockState {
                offset_ms: self.high_ms - wall_ms,
                high_ms: self.high_ms,
            }
        }
    }
}

/// One VM's view of the store clock.
#[derive(Debug, Default)]
pub struct Clock {
    state: Cell<ClockState>,
}

impl Clock {
    /// Store time now, from the cached offset (never below the last value seen here).
    pub fn now_ms(&self, host: &dyn Host) -> u64 {
        let state = self.state.get().observe(host.wall_ms());
        self.state.set(state);
        state.high_ms
    }

    /// Publishes this VM's observation to shared data and takes the shared
    /// offset back (one get and at most one CAS write; called on tick).
    pub fn sync(&self, host: &dyn Host, key: &str) {
        let wall = host.wall_ms();
        for _ in 0..4 {
            let (shared, cas) = match host.get(key) {
                Ok(Some((v, cas))) => (ClockState::decode(&v).unwrap_or_default(), Some(cas)),
                Ok(None) => (ClockState::default(), None),
                Err(_) => return,
            };
            let local = self.state.get();
            let merged = ClockState {
                offset_ms: shared.offset_ms.max(local.offset_ms),
                high_ms: shared.high_ms.max(local.high_ms),
            }
            .observe(wall);
            self.state.set(merged);
            if merged == shared {
                return;
            }
            match host.set(key, &merged.encode(), cas) {
                Err(crate::platform::SetError::CasMismatch) => continue,
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimHost, SimShared};

    #[test]
    fn a_backward_step_holds_the_clock_then_it_runs_on() {
        let s = ClockState::default().observe(10_000);
        assert_eq!(s.high_ms, 10_000);
        let back = s.observe(4_000);
        assert_eq!(back.high_ms, 10_000, "holds still");
        assert_eq!(
            back.observe(4_500).high_ms,
            10_500,
            "then advances with the wall"
        );
        assert_eq!(back.observe(20_000).high_ms, 26_000);
    }

    #[test]
    fn workers_share_the_offset() {
        let shared = SimShared::new(100_000);
        let (a, b) = (SimHost::new(&shared, 1), SimHost::new(&shared, 2));
        let (ca, cb) = (Clock::default(), Clock::default());
        ca.sync(&a, "clock");
        shared.clock.set(40_000); // the host clock steps back a minute
        ca.sync(&a, "clock");
        assert_eq!(ca.now_ms(&a), 100_000);
        // A worker that never saw the old time learns the offset from shared data.
        cb.sync(&b, "clock");
        shared.advance(1_000);
        assert_eq!(cb.now_ms(&b), 101_000);
        assert_eq!(ca.now_ms(&a), 101_000);
    }
}
