//! The engine's side of the shared-data store. Work is found on the job
//! queue (submits) and the timer wheel (deadlines, lapsed claims, webhook
//! attempts due); a claim is a compare-and-swap of the job's slot that names
//! the engine and holds until a time, which every step renews and a timer
//! checks; expiry is the store's own business, done on the wheel.

use super::{Keys, Loaded, Store};
use crate::job::{render, Claim, JobRecord, JobStatus, Rendered};
use crate::platform::{Host, Queue, SetError};
use crate::store::shared::slot;
use crate::store::work::{Claimed, Ending, Leave, LetGo, Ticket, WorkDone, WorkOp};

/// Due timers one upkeep handles at most; the rest wait for the next.
const TIMERS_PER_UPKEEP: usize = 2_000;
/// Slots the audit looks at per upkeep.
const AUDIT_PER_UPKEEP: u32 = 64;
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
        }
    }

    fn store<'a>(&'a self, host: &'a dyn Host) -> Store<'a> {
        Store::new(host, &self.keys, self.max_jobs, self.generation)
    }

    pub fn run(&mut self, host: &dyn Host, op: WorkOp, now_ms: u64) -> WorkDone {
        let store = self.store(host);
        match op {
            WorkOp::Upkeep => upkeep(&store, now_ms),
            WorkOp::Find { room } => WorkDone::Found {
                tickets: queued(host, room),
                expired: 0,
            },
            WorkOp::Claim { ticket, hold_ms } => WorkDone::Claimed(
                self.claim(&store, ticket.id(), hold_ms, now_ms)
                    .map(Box::new),
            ),
            WorkOp::Show { record, hold_ms } => {
                self.show(&store, *record, hold_ms, now_ms);
                WorkDone::Shown
            }
            WorkOp::End(ending) => WorkDone::Ended(match self.end(&store, *ending, now_ms) {
                true => LetGo::Done,
                false => LetGo::Lost,
            }),
        }
    }

    /// Takes the job if nobody holds it and there is something to do:
    /// pending, or its claim lapsed, or its webhook's attempt is due.
    fn claim(&self, store: &Store, id: &str, hold_ms: u64, now_ms: u64) -> Option<Claimed> {
        let claim = Claim {
            by: self.by,
            until_ms: now_ms.saturating_add(hold_ms),
        };
        let (record, body) = change(store, id, now_ms, |r, body| {
            let wanted = if r.status.is_finished() {
                r.pending_delivery().is_some_and(|d| d.due(now_ms))
            } else {
                true
            };
            if !wanted || r.is_claimed(now_ms) {
                return None;
            }
            r.claim = Some(claim);
            Some(kept(r, body))
        })?;
        Some(Claimed {
            record,
            body: Some(body),
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
        change(store, &id, now_ms, |r, _| {
            if r.claim.map(|c| c.by) != Some(self.by) {
                return None;
            }
            *r = record.clone();
            r.claim = Some(claim);
            Some(render(r, None))
        });
    }

    /// Lets go of the job as the engine asks, if it still holds it.
    fn end(&self, store: &Store, ending: Ending, now_ms: u64) -> bool {
        let Ending {
            record,
            rendered,
            leave,
        } = ending;
        let id = record.id.clone();
        if leave == Leave::Forget {
            return match store.load(&id) {
                Ok(Some(loaded)) => self.holds(&loaded) && free(store, loaded),
                _ => false,
            };
        }
        let written = change(store, &id, now_ms, |r, _| {
            if r.claim.map(|c| c.by) != Some(self.by) {
                return None;
            }
            *r = record.clone();
            r.claim = None;
            Some(match leave {
                Leave::HandBack => render(r, None),
                _ => rendered.clone(),
            })
        });
        if written.is_some() && leave == Leave::HandBack {
            let _ = store.host().enqueue(Queue::Jobs, id.as_bytes());
        }
        written.is_some()
    }

    fn holds(&self, loaded: &Loaded) -> bool {
        loaded
            .view()
            .and_then(|v| v.record())
            .is_some_and(|r| r.claim.map(|c| c.by) == Some(self.by))
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
/// job alone. Schedules the job's next timer after the write. Returns the
/// record and answer as written.
fn change(
    store: &Store,
    id: &str,
    now_ms: u64,
    mut f: impl FnMut(&mut JobRecord, &Rendered) -> Option<Rendered>,
) -> Option<(JobRecord, Rendered)> {
    for _ in 0..RETRIES {
        let loaded = store.load(id).ok()??;
        let view = loaded.view()?;
        let mut record = view.record()?;
        let body = Rendered {
            body: view.body.to_vec(),
            audio_at: view.audio_at,
            tail_at: view.tail_at,
        };
        let rendered = f(&mut record, &body)?;
        let value = slot::encode_held(view.epoch, &record, &rendered)?;
        match store
            .host()
            .set(&store.keys().slot(loaded.slot), &value, Some(loaded.cas))
        {
            Ok(()) => {
                store.schedule(loaded.slot, view.epoch, record.next_timer_ms(), now_ms);
                return Some((record, rendered));
            }
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Host(_)) => return None,
        }
    }
    None
}

fn free(store: &Store, loaded: Loaded) -> bool {
    let id = loaded.view().map(|v| v.id.to_vec()).unwrap_or_default();
    matches!(store.free(loaded, &|v| v.id == id.as_slice()), Ok(true))
}

/// Up to `room` jobs from the job queue.
fn queued(host: &dyn Host, room: usize) -> Vec<Ticket> {
    let mut out = Vec::new();
    while out.len() < room {
        match host.dequeue(Queue::Jobs) {
            Ok(Some(bytes)) => out.push(Ticket::Shared {
                id: String::from_utf8_lossy(&bytes).into_owned(),
            }),
            _ => break,
        }
    }
    out
}

/// Due timers and a few slots of the audit: expired jobs are freed here;
/// jobs that need a worker (deadline passed, claim lapsed, webhook attempt
/// due) are offered to the engine.
fn upkeep(store: &Store, now_ms: u64) -> WorkDone {
    let mut timers = store.due_timers(now_ms, TIMERS_PER_UPKEEP);
    timers.extend(store.audit_step(AUDIT_PER_UPKEEP));
    let mut tickets = Vec::new();
    let mut expired = 0;
    for timer in timers {
        let from_audit = timer.due_s == 0;
        let Ok(Some(loaded)) = store.load_for_timer(timer) else {
            continue;
        };
        let Some(record) = loaded.view().and_then(|v| v.record()) else {
            continue;
        };
        match look(&record, from_audit, now_ms) {
            Look::Offer => tickets.push(Ticket::Shared { id: record.id }),
            Look::Expire => expired += u32::from(free(store, loaded)),
            Look::DropResult => drop_result(store, &record.id, now_ms),
            Look::Requeue => {
                let _ = store.host().enqueue(Queue::Jobs, record.id.as_bytes());
            }
            Look::Later if !from_audit => {
                store.schedule(timer.slot, timer.epoch, record.next_timer_ms(), now_ms)
            }
            Look::Later => {}
        }
    }
    WorkDone::Found { tickets, expired }
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

fn drop_result(store: &Store, id: &str, now_ms: u64) {
    change(store, id, now_ms, |r, _| {
        if r.result_dropped {
            return None;
        }
        r.result_dropped = true;
        Some(Rendered {
            body: b"{}".to_vec(),
            audio_at: None,
            tail_at: 1,
        })
    });
}
