//! A hierarchical timer wheel over shared queues: when each held job next needs
//! a look (its expiry, a claim that may lapse, its deadline), at constant cost per timer.
//!
//! Level 0 has 128 one-second buckets, level 1 128 buckets of 64 s, level 2
//! 64 buckets of 4096 s (about three days; later timers wait in the farthest
//! bucket and are placed again when it comes round). A timer goes into the
//! finest level whose room holds it. Each tick drains the buckets that are due
//! (a few per level, so a late tick still catches up); a coarse bucket is
//! drained a little before its first second, when all it holds fits the finer
//! level, and its timers move down. Each timer moves at most three times, and
//! a tick does a bounded number of queue operations.

use crate::platform::{Host, Queue};

/// Buckets per level.
const BUCKETS: [u64; 3] = [128, 128, 64];
/// Seconds each level's bucket spans.
const SPAN: [u64; 3] = [1, 64, 4096];
/// Buckets of each level drained per tick, counting back from the current one.
const WINDOW: [u64; 3] = [8, 4, 2];
/// How many buckets ahead of now a level takes timers; with the drain window
/// it stays under the level's size, so a bucket never holds two laps.
const ROOM: [u64; 3] = [120, 124, 62];
/// A coarse bucket is drained this many seconds before it starts: then its
/// last second is just within the finer level's room (120 − 64 and
/// 64 × 124 − 4096 − 63), and its first second is not yet due.
const LEAD: [u64; 3] = [0, 56, 3777];

/// One timer: look at `slot` (if it is still in `epoch`) at `due_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    pub slot: u32,
    pub epoch: u32,
    pub due_s: u64,
}

impl Timer {
    fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.slot.to_le_bytes());
        out[4..8].copy_from_slice(&self.epoch.to_le_bytes());
        out[8..16].copy_from_slice(&self.due_s.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Timer> {
        let mut f = crate::bytes::Fields(bytes);
        Some(Timer {
            slot: f.u32()?,
            epoch: f.u32()?,
            due_s: f.u64()?,
        })
    }
}

fn levels() -> impl Iterator<Item = (u8, u64, u64, u64, u64, u64)> {
    (0u8..3)
        .zip(BUCKETS)
        .zip(SPAN)
        .zip(WINDOW)
        .zip(ROOM)
        .zip(LEAD)
        .map(|(((((l, b), s), w), r), d)| (l, b, s, w, r, d))
}

/// The bucket a timer due at `due_s` goes into when it is `now_s`: the
/// finest level whose room holds it (a timer already due goes into the
/// bucket drained now).
pub fn bucket_for(due_s: u64, now_s: u64) -> Queue {
    for (level, buckets, span, _, room, _) in levels() {
        let (due_b, now_b) = (due_s / span, now_s / span);
        if due_b < now_b + room {
            return Queue::Wheel(level, (due_b.max(now_b) % buckets) as u8);
        }
    }
    // Beyond the last level: its farthest bucket; placed again when drained.
    Queue::Wheel(2, ((now_s / SPAN[2] + ROOM[2] - 1) % BUCKETS[2]) as u8)
}

/// The buckets a tick at `now_s` drains: of each level, those from the one
/// that was current at the last complete drain (`since_s`) to the current
/// one, at most the level's window (so a late tick catches up, and a first
/// tick looks back as far). Timers only ever go into the current bucket or
/// later ones, so a tick within the same second drains one bucket a level.
pub fn due_buckets(now_s: u64, since_s: Option<u64>) -> Vec<Queue> {
    let mut out = Vec::with_capacity(14);
    for (level, buckets, span, window, _, lead) in levels() {
        let current = now_s.saturating_add(lead) / span;
        let back = since_s
            .map_or(window - 1, |s| {
                current.saturating_sub(s.saturating_add(lead) / span)
            })
            .min(window - 1);
        for b in current.saturating_sub(back)..=current {
            out.push(Queue::Wheel(level, (b % buckets) as u8));
        }
    }
    out
}

/// Every queue of the wheel, for the host to register.
pub fn all_buckets() -> impl Iterator<Item = Queue> {
    levels()
        .flat_map(|(level, buckets, ..)| (0..buckets).map(move |i| Queue::Wheel(level, i as u8)))
}

pub fn schedule(host: &dyn Host, timer: Timer, now_s: u64) -> Result<(), String> {
    host.enqueue(&bucket_for(timer.due_s, now_s), &timer.encode())
}

/// Takes up to `cap` due timers from the buckets due since `since_s`;
/// timers found early are placed again. Also whether every due bucket was
/// emptied (else the next tick starts from the same place).
pub fn take_due(
    host: &dyn Host,
    now_s: u64,
    since_s: Option<u64>,
    cap: usize,
) -> (Vec<Timer>, bool) {
    let mut due = Vec::new();
    let mut moved = 0usize;
    for bucket in due_buckets(now_s, since_s) {
        loop {
            if due.len() >= cap || moved >= cap {
                return (due, false);
            }
            let item = match host.dequeue(&bucket) {
                Ok(Some(item)) => item,
                _ => break,
            };
            let Some(timer) = Timer::decode(&item) else {
                continue;
            };
            if timer.due_s <= now_s {
                due.push(timer);
            } else {
                moved += 1;
                let _ = schedule(host, timer, now_s);
            }
        }
    }
    (due, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimHost, SimShared};

    #[test]
    fn every_timer_fires_on_time_whatever_its_distance() {
        let shared = SimShared::new(0);
        let host = SimHost::new(&shared, 1);
        let start = 1_000_000u64;
        let dues: Vec<u64> = [
            0u64, 1, 2, 5, 59, 60, 63, 64, 65, 100, 3_000, 4_095, 4_096, 5_000, 86_400, 300_000,
        ]
        .iter()
        .map(|d| start + d)
        .collect();
        for (i, &due_s) in dues.iter().enumerate() {
            schedule(
                &host,
                Timer {
                    slot: i as u32,
                    epoch: 0,
                    due_s,
                },
                start,
            )
            .unwrap();
        }
        let mut fired = vec![None; dues.len()];
        let mut ops_max = 0;
        let mut since = None;
        // Tick every second for a bit over the farthest timer.
        for now in start..=start + 300_010 {
            let before = host.calls();
            let (due, all) = take_due(&host, now, since, 1_000);
            assert!(all);
            since = Some(now);
            for t in due {
                assert!(fired[t.slot as usize].is_none(), "fired twice");
                fired[t.slot as usize] = Some(now);
            }
            ops_max = ops_max.max(host.calls() - before);
        }
        for (i, &due_s) in dues.iter().enumerate() {
            let at =
                fired[i].unwrap_or_else(|| panic!("timer due at +{} never fired", due_s - start));
            assert!(
                at >= due_s && at <= due_s + 1,
                "due +{} fired at +{}",
                due_s - start,
                at - start
            );
        }
        assert!(
            ops_max < 40,
            "a tick costs a bounded number of queue operations ({ops_max})"
        );
        assert!(
            ops_max_idle(&host, start + 400_000) <= 3,
            "a tick in the same second as the last drains one bucket a level"
        );
        assert_eq!(shared.queued_total(), 0);
    }

    #[test]
    fn late_ticks_catch_up_within_the_window() {
        let shared = SimShared::new(0);
        let host = SimHost::new(&shared, 1);
        schedule(
            &host,
            Timer {
                slot: 1,
                epoch: 0,
                due_s: 105,
            },
            100,
        )
        .unwrap();
        assert!(take_due(&host, 104, None, 10).0.is_empty());
        // No tick for 6 seconds past the due time.
        assert_eq!(take_due(&host, 111, Some(104), 10).0.len(), 1);
    }

    #[test]
    fn a_drain_cut_short_by_its_cap_starts_there_next_time() {
        let shared = SimShared::new(0);
        let host = SimHost::new(&shared, 1);
        for slot in 0..5 {
            let timer = Timer {
                slot,
                epoch: 0,
                due_s: 100,
            };
            schedule(&host, timer, 99).unwrap();
        }
        let (first, all) = take_due(&host, 100, Some(99), 3);
        assert_eq!((first.len(), all), (3, false));
        // Seconds later, from the same place: the rest, though their bucket is past.
        let (rest, all) = take_due(&host, 103, Some(99), 3);
        assert_eq!((rest.len(), all), (2, true));
    }

    /// Queue operations of a tick in the same second as the one before.
    fn ops_max_idle(host: &SimHost, now: u64) -> u64 {
        take_due(host, now, None, 10);
        let before = host.calls();
        take_due(host, now, Some(now), 10);
        host.calls() - before
    }
}
