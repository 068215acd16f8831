//! The engine's side of the shared-data store. Work is found on the job
//! queue (submits) and the timer wheel (deadlines, lapsed claims, webhook
//! attempts due); a claim is a compare-and-swap of the job's slot that names
//! the engine and holds until a time, which every step renews and a timer
//! checks; expiry is the store's own business, done on the wheel.

use super::api::released;
use super::lanes;
use super::{Keys, Loaded, Store};
use crate::config::Config;
use crate::governance::{lane_of, settle, Limits, Settle};
use crate::job::{render, Claim, JobRecord, JobStatus, Rendered};
use crate::platform::{Host, SetError};
use crate::store::shared::slot;
use crate::store::work::{Claimed, Ending, Leave, LetGo, Ticket, WorkDone, WorkOp};

/// Due timers one upkeep handles at most; the rest wait for the next.
const TIMERS_PER_UPKEEP: usize = 2_000;
/// Slots the audit looks at per upkeep: with 10,000 slots and one worker,
/// every slot once in about two minutes. Each is a read of the whole value
/// (its audio too), so more would cost every tick what only a crash needs.
const AUDIT_PER_UPKEEP: u32 = 16;
/// A job still pending this long after its submit, its queue entry perhaps
/// lost with a VM, is queued again by the audit.
pub const PENDING_REQUEUE_MS: u64 = 30_000;
/// Compare-and-swap retries of one change.
const RETRIES: usize = 16;

pub struct SharedWork {
    pub keys: Keys,
    pub max_jobs: u32,
    pub generation: u32,
    /// This engine's name in the claims it makes.
    pub by: u64,
    /// The next lane the audit looks at.
    pub audit_lane: usize,
    /// The second of the last complete drain of the timer wheel.
    pub drained_s: Option<u64>,
}

impl SharedWork {
    /// A store for tests, under the namespace the simulated worlds use.
    #[cfg(test)]
    pub fn for_test(by: u64) -> SharedWork {
        SharedWork {
            keys: Keys::new("t"),
            max_jobs: 50,
            generation: 1,
            by,
            audit_lane: 0,
            drained_s: None,
        }
    }

    fn store<'a>(&'a self, host: &'a dyn Host) -> Store<'a> {
        Store::new(host, &self.keys, self.max_jobs, self.generation)
    }

    pub fn run(&mut self, host: &dyn Host, config: &Config, op: WorkOp, now_ms: u64) -> WorkDone {
        let limits = |lane: &str| limits_of(config, lane);
        match op {
            WorkOp::Upkeep => {
                self.audit_lane(host, config, now_ms);
                let upkept = upkeep(&self.store(host), &limits, self.drained_s, now_ms);
                if upkept.drained {
                    self.drained_s = Some(now_ms / 1000);
                }
                self.generation = upkept.generation;
                upkept.done
            }
            WorkOp::Find { room } => WorkDone::Found {
                tickets: self.next_jobs(host, &limits, room, now_ms),
                expired: 0,
            },
            WorkOp::Claim { ticket, hold_ms } => {
                let claimed = self.claim(&self.store(host), &ticket, hold_ms, now_ms);
                if let (
                    None,
                    Ticket::Shared {
                        lane: Some(lane), ..
                    },
                ) = (&claimed, &ticket)
                {
                    // Counted as running when taken, but nothing to run: uncounted.
                    let once = Settle {
                        was_running: true,
                        ..Settle::default()
                    };
                    settled(host, &self.keys, lane, &limits(lane), &once, now_ms);
                }
                WorkDone::Claimed(claimed.map(Box::new))
            }
            WorkOp::Show { record, hold_ms } => {
                self.show(&self.store(host), *record, hold_ms, now_ms);
                WorkDone::Shown
            }
            WorkOp::Return(Ticket::Shared {
                id,
                lane: Some(lane),
            }) => {
                let store = self.store(host);
                let back = Settle {
                    was_running: true,
                    ..Settle::default()
                };
                settled(host, &self.keys, &lane, &limits(&lane), &back, now_ms);
                requeue(&store, &lane, &id, true);
                WorkDone::Shown
            }
            WorkOp::Return(_) => WorkDone::Shown,
            WorkOp::End(ending) => {
                WorkDone::Ended(self.end(&self.store(host), &limits, *ending, now_ms))
            }
        }
    }

    /// Up to `room` jobs, their lanes taken in turn.
    fn next_jobs(
        &self,
        host: &dyn Host,
        limits: &dyn Fn(&str) -> Limits,
        room: usize,
        now_ms: u64,
    ) -> Vec<Ticket> {
        let mut out = Vec::new();
        while out.len() < room {
            // A few stale ring entries may come before a live one.
            match lanes::next_job(host, &self.keys, limits, 8, now_ms) {
                Some((lane, id)) => out.push(Ticket::Shared {
                    id,
                    lane: Some(lane),
                }),
                None => break,
            }
        }
        out
    }

    /// One lane a tick: a lane whose ring entry was lost with a VM (on the
    /// ring, with work, and not served for a long while) is put on it again.
    fn audit_lane(&mut self, host: &dyn Host, config: &Config, now_ms: u64) {
        let all: Vec<String> = crate::governance::lanes(config).collect();
        let Some(lane) = all.get(self.audit_lane % all.len().max(1)) else {
            return;
        };
        self.audit_lane = self.audit_lane.wrapping_add(1);
        let limits = limits_of(config, lane);
        let _ = lanes::update(host, &self.keys, lane, &limits, |s| {
            if s.ring.is_none() || s.queued == 0 {
                return false;
            }
            // Joined the ring since the last look: its clock starts now.
            if s.served_ms == 0 {
                s.served_ms = now_ms;
                return true;
            }
            let lost = now_ms.saturating_sub(s.served_ms) > LANE_STUCK_MS;
            if lost {
                s.ring = None;
                s.served_ms = now_ms;
            }
            lost
        });
    }

    /// Takes the job if nobody holds it and there is something to do:
    /// pending, or its claim lapsed, or its webhook's attempt is due.
    fn claim(&self, store: &Store, ticket: &Ticket, hold_ms: u64, now_ms: u64) -> Option<Claimed> {
        let claim = Claim {
            by: self.by,
            until_ms: now_ms.saturating_add(hold_ms),
        };
        let from_lane = matches!(ticket, Ticket::Shared { lane: Some(_), .. });
        let mut was = JobStatus::Pending;
        let (record, body) = change(store, ticket.id(), None, now_ms, |r, body| {
            let wanted = if r.status.is_finished() {
                r.pending_delivery().is_some_and(|d| d.due(now_ms))
            } else {
                true
            };
            // A job taken from its lane is only run if still pending (a
            // takeover comes from the timers instead).
            if !wanted || r.is_claimed(now_ms) || (from_lane && r.status != JobStatus::Pending) {
                return None;
            }
            r.claim = Some(claim);
            r.counted_running |= from_lane;
            // Shown processing from this very write: the engine's first
            // show then has nothing to add.
            was = r.status;
            if !r.status.is_finished() {
                r.status = JobStatus::Processing;
            }
            Some(kept(r, body))
        })?;
        Some(Claimed {
            record,
            body: Some(body),
            was,
        })
    }

    /// Writes the running job's state if this engine still holds it, and
    /// renews the claim.
    fn show(&self, store: &Store, record: JobRecord, hold_ms: u64, now_ms: u64) {
        let claim = Claim {
            by: self.by,
            until_ms: now_ms.saturating_add(hold_ms),
        };
        let id = record.id.clone();
        change(store, &id, None, now_ms, |r, _| {
            if r.claim.map(|c| c.by) != Some(self.by) {
                return None;
            }
            *r = record.clone();
            r.claim = Some(claim);
            Some(render(r, None))
        });
    }

    /// Lets go of the job as the engine asks, if it still holds it, and
    /// settles its end with its key.
    fn end(
        &self,
        store: &Store,
        limits: &dyn Fn(&str) -> Limits,
        ending: Ending,
        now_ms: u64,
    ) -> LetGo {
        let Ending {
            record,
            rendered,
            leave,
            settle: owed,
        } = ending;
        let id = record.id.clone();
        let lane = lane_of(&record.owner);
        let limits = limits(&lane);
        let loaded = match store.load(&id) {
            Ok(Some(loaded)) => loaded,
            // Deleted (or expired) meanwhile: only its running count is still ours to settle.
            Ok(None) => {
                let running = Settle {
                    was_running: owed.was_running,
                    ..Settle::default()
                };
                settled(store.host(), store.keys(), &lane, &limits, &running, now_ms);
                return LetGo::Lost;
            }
            Err(_) => return LetGo::Later,
        };
        // Parsed once: for the hold, and as the first try's start.
        let Some(current) = loaded.view().and_then(|v| v.record()) else {
            return LetGo::Lost;
        };
        if current.claim.map(|c| c.by) != Some(self.by) {
            return LetGo::Lost;
        }
        let let_go = if leave == Leave::Forget {
            free(store, loaded, &current, &limits)
        } else {
            self.write_end(store, (loaded, current), &record, &rendered, leave, now_ms)
        };
        if let_go {
            settled(store.host(), store.keys(), &lane, &limits, &owed, now_ms);
        }
        match let_go {
            true => LetGo::Done,
            false => LetGo::Lost,
        }
    }

    /// The job's last write by this engine, from `before` (its slot as just
    /// loaded, and parsed); handed back, it goes back on its lane.
    fn write_end(
        &self,
        store: &Store,
        before: (Loaded, JobRecord),
        record: &JobRecord,
        rendered: &Rendered,
        leave: Leave,
        now_ms: u64,
    ) -> bool {
        let written = change(store, &record.id, Some(before), now_ms, |r, _| {
            if r.claim.map(|c| c.by) != Some(self.by) {
                return None;
            }
            *r = record.clone();
            r.claim = None;
            r.counted_running = false;
            Some(match leave {
                Leave::HandBack => render(r, None),
                _ => rendered.clone(),
            })
        });
        if written.is_some() && leave == Leave::HandBack {
            requeue(store, &record.owner, &record.id, false);
        }
        written.is_some()
    }
}

/// A finished job's stored answer, or a fresh one for an unfinished job.
fn kept(record: &JobRecord, body: &Rendered) -> Rendered {
    if record.status.is_finished() {
        body.clone()
    } else {
        render(record, None)
    }
}

/// Applies `f` to the job's record under compare-and-swap, retrying on
/// contention; `f` gives the poll answer to store, or `None` to leave the
/// job alone. Schedules the job's next timer after the write, unless one at
/// or before it is still to come. Returns the
/// record and answer as written. The first try may start from a value the
/// caller has just read and parsed (`read_before`).
fn change(
    store: &Store,
    id: &str,
    mut read_before: Option<(Loaded, JobRecord)>,
    now_ms: u64,
    mut f: impl FnMut(&mut JobRecord, &Rendered) -> Option<Rendered>,
) -> Option<(JobRecord, Rendered)> {
    for _ in 0..RETRIES {
        let (loaded, mut record) = match read_before.take() {
            Some(before) => before,
            None => {
                let loaded = store.load(id).ok()??;
                let record = loaded.view()?.record()?;
                (loaded, record)
            }
        };
        let view = loaded.view()?;
        let due_before = record.next_timer_ms();
        let body = Rendered {
            body: view.body.to_vec(),
            audio: view.audio,
            tail_at: view.tail_at,
        };
        let rendered = f(&mut record, &body)?;
        let value = slot::encode_held(view.epoch, &record, &rendered)?;
        match store
            .host()
            .set(&store.keys().slot(loaded.slot), &value, Some(loaded.cas))
        {
            Ok(()) => {
                // A timer still to come at or before the new one looks at the
                // job then and places it again: no second timer.
                let due = record.next_timer_ms();
                if due_before <= now_ms || due < due_before {
                    store.schedule(loaded.slot, view.epoch, due, now_ms);
                }
                return Some((record, rendered));
            }
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Host(_)) => return None,
        }
    }
    None
}

/// A lane's counters looked at again when its ring entry may be lost.
const LANE_STUCK_MS: u64 = 60_000;

/// The limits of a lane: its key's, or none (a shared lane).
fn limits_of(config: &Config, lane: &str) -> Limits {
    config
        .key(lane)
        .map(|k| k.rules.limits.clone())
        .unwrap_or_default()
}

/// Applies what a job's end owes its key.
fn settled(host: &dyn Host, keys: &Keys, lane: &str, limits: &Limits, owed: &Settle, now_ms: u64) {
    if !owed.changes(limits) {
        return;
    }
    let _ = lanes::update(host, keys, lane, limits, |s| {
        settle(limits, s, owed, now_ms / 1000);
        true
    });
}

/// Frees the job's slot (`record`: its record as loaded), and counts it
/// out of its lane's held jobs.
fn free(store: &Store, loaded: Loaded, record: &JobRecord, limits: &Limits) -> bool {
    let id = record.id.as_bytes();
    let freed = matches!(store.free(loaded, &|v| v.id == id), Ok(true));
    if freed {
        released(store.host(), store.keys(), record, limits, None);
    }
    freed
}

/// A pending job goes (back) on its lane's queue (`is_lane`: `owner` names
/// the lane itself).
fn requeue(store: &Store, owner: &str, id: &str, is_lane: bool) {
    let lane = if is_lane {
        owner.to_string()
    } else {
        lane_of(owner)
    };
    let counted = lanes::update(store.host(), store.keys(), &lane, &Limits::default(), |s| {
        s.queued = s.queued.saturating_add(1);
        true
    });
    if counted.is_ok() {
        let _ = lanes::enqueue_job(store.host(), &lane, id);
    }
}

/// What an upkeep did, and learnt.
struct Upkept {
    done: WorkDone,
    /// Every due bucket of the wheel was emptied.
    drained: bool,
    /// The newest generation of the Envoy's VMs.
    generation: u32,
}

/// Due timers and a few slots of the audit: expired jobs are freed here;
/// jobs that need a worker (deadline passed, claim lapsed, webhook attempt
/// due) are offered to the engine.
fn upkeep(
    store: &Store,
    limits: &dyn Fn(&str) -> Limits,
    since_s: Option<u64>,
    now_ms: u64,
) -> Upkept {
    let (timers, drained) = store.due_timers(now_ms, since_s, TIMERS_PER_UPKEEP);
    let due = timers.into_iter().filter_map(|timer| {
        let loaded = store.load_for_timer(timer).ok()??;
        Some((Some(timer), loaded))
    });
    let (audited, generation) = store.audit_step(AUDIT_PER_UPKEEP);
    let mut tickets = Vec::new();
    let mut expired = 0;
    for (timer, loaded) in due.chain(audited.into_iter().map(|loaded| (None, loaded))) {
        let Some(record) = loaded.view().and_then(|v| v.record()) else {
            continue;
        };
        match look(&record, timer.is_none(), now_ms) {
            Look::Offer => tickets.push(Ticket::Shared {
                id: record.id,
                lane: None,
            }),
            Look::Expire => {
                expired += u32::from(free(
                    store,
                    loaded,
                    &record,
                    &limits(&lane_of(&record.owner)),
                ))
            }
            Look::DropResult => drop_result(store, &record.id, now_ms),
            Look::Requeue => requeue_lost(store, &record),
            Look::Later => {
                if let Some(timer) = timer {
                    store.schedule(timer.slot, timer.epoch, record.next_timer_ms(), now_ms)
                }
            }
        }
    }
    Upkept {
        done: WorkDone::Found { tickets, expired },
        drained,
        generation,
    }
}

/// What a timer means for the job in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Needs a worker now.
    Offer,
    /// Expired, nothing left to deliver: free the slot.
    Expire,
    /// Expired with its webhook still to deliver: keep the record, drop the audio.
    DropResult,
    /// Pending for long, its queue entry perhaps lost: queue it again.
    Requeue,
    /// Nothing yet.
    Later,
}

fn look(record: &JobRecord, from_audit: bool, now_ms: u64) -> Look {
    if record.is_claimed(now_ms) {
        return Look::Later;
    }
    if record.status.is_finished() {
        return match record.pending_delivery() {
            Some(d) if d.due(now_ms) => Look::Offer,
            Some(_) if record.is_expired(now_ms) && !record.result_dropped => Look::DropResult,
            Some(_) => Look::Later,
            None if record.is_expired(now_ms) => Look::Expire,
            None => Look::Later,
        };
    }
    if record.is_past_deadline(now_ms) || record.status == JobStatus::Processing {
        // Past its deadline, or its worker's claim lapsed.
        return Look::Offer;
    }
    if from_audit && now_ms.saturating_sub(record.created_at_ms) > PENDING_REQUEUE_MS {
        return Look::Requeue;
    }
    Look::Later
}

/// A job pending for long while its lane's queue holds nothing: its queue
/// entry was lost with a VM; it goes on its lane again.
fn requeue_lost(store: &Store, record: &JobRecord) {
    let lane = lane_of(&record.owner);
    if let Ok((state, _)) = lanes::read(store.host(), store.keys(), &lane) {
        if state.queued == 0 {
            requeue(store, &record.owner, &record.id, false);
        }
    }
}

fn drop_result(store: &Store, id: &str, now_ms: u64) {
    change(store, id, None, now_ms, |r, _| {
        if r.result_dropped {
            return None;
        }
        r.result_dropped = true;
        Some(Rendered {
            body: b"{}".to_vec(),
            audio: None,
            tail_at: 1,
        })
    });
}
