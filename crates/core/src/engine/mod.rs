//! The one job engine: it owns the life of the jobs a worker runs, whichever
//! store keeps them. It finds work and claims it through the store
//! (`store::work`), makes each job's attempts (fallbacks in order, a long
//! input in parts), ends it (completion, failure, deadline), delivers its
//! webhook, and hands everything back if its worker goes away. Provider,
//! webhook and store calls go out through `Host::dispatch` and come back to
//! `answered` by token; what happened comes out as [`Report`]s.
//!
//! Jobs being run live in the engine's memory (`Run`); the store holds the
//! claim and what polls see. A worker that dies loses only its memory: its
//! claims lapse and another worker makes the job's current attempt again.

pub(crate) mod attempt;
pub(crate) mod deliver;
pub(crate) mod long;
pub mod report;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::config::Config;
use crate::error::ApiError;
use crate::governance::Settle;
use crate::job::{render, with_new_tail, Completion, JobRecord, JobStatus, NextStep, Rendered};
use crate::platform::{Callout, Host};
use crate::providers::UpstreamResponse;
use crate::store::work::{
    Claimed, Ending, Leave, LetGo, StoreAnswer, Ticket, WorkDone, WorkOp, WorkStep, WorkStore,
    WorkWait,
};
use attempt::{
    attempt_result, build_call, completion, current_provider, read_answer, Attempt, FailReason,
    Outcome,
};
use deliver::WebhookCall;
pub use report::Report;

/// Time past a call's own timeout before the engine stops waiting for its
/// answer, and past an attempt's timeout before a claim on its job lapses.
pub const GRACE_MS: u64 = 5_000;

/// What the engine awaits from a store operation.
#[derive(Debug, Clone, PartialEq)]
enum Awaiting {
    Upkeep,
    Find,
    Claim,
    Show,
    End { id: String },
    Return,
}

/// A call out, handed back with its answer.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Provider(Box<Attempt>),
    Webhook(Box<WebhookCall>),
    Store(WorkWait, Awaiting),
}

#[derive(Debug)]
struct Out {
    call: Call,
    sent_ms: u64,
    timeout_ms: u64,
}

/// A callout's answer as the host read it: no status when the call failed;
/// the body is left unread (empty) when it was larger than the host's bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallAnswer {
    pub status: Option<u16>,
    pub body: Vec<u8>,
    pub body_size: usize,
    pub too_large: bool,
}

/// A job this worker holds.
#[derive(Debug)]
struct Run {
    record: JobRecord,
    /// The job as the store holds it since the claim, until the first show:
    /// a show that would write the same is left out.
    stored: Option<JobRecord>,
    /// When the current attempt began (for its latency).
    started_ms: u64,
    /// A finished job's poll answer, kept while its webhook state changes.
    body: Option<Rendered>,
    /// A long input's parts back so far.
    parts: Option<long::Parts>,
    /// Being let go of: answers that still come are dropped.
    ending: bool,
    /// How it is let go of, kept until the store has it (tried again on
    /// the next tick if the store could not be reached).
    letting: Option<(Box<Ending>, Vec<Report>)>,
    /// The store could not take the ending: try it again on the next tick.
    let_again: bool,
}

/// Everything one step of the engine needs from outside.
pub struct Cx<'a> {
    pub host: &'a dyn Host,
    pub config: &'a Config,
    pub now: u64,
}

pub struct Engine {
    store: WorkStore,
    runs: BTreeMap<String, Run>,
    /// Provider calls waiting for room under `max_in_flight`.
    ready: VecDeque<Attempt>,
    calls: HashMap<u32, Out>,
    /// Provider calls out.
    provider_calls: usize,
    claiming: usize,
    finding: bool,
    /// Work the store's upkeep offered (jobs past a deadline, claims
    /// lapsed, deliveries due), kept until claimed.
    offered: VecDeque<Ticket>,
    /// Work the last find turned up, in the store's order; the next find
    /// replaces it, so that it never goes stale behind newer work.
    found: VecDeque<Ticket>,
    found_at: u64,
    /// Going away: nothing new is taken; what it holds ends, or is handed
    /// back at `hand_back_at`.
    closing: bool,
    hand_back_at: u64,
    out: Vec<Report>,
}

/// How long work found stays worth claiming before it is found again.
const FOUND_FRESH_MS: u64 = 500;
/// Work found beyond this waits in the store.
const FOUND_CAP: usize = 4096;

impl Engine {
    pub fn new(store: WorkStore) -> Engine {
        Engine {
            store,
            runs: BTreeMap::new(),
            ready: VecDeque::new(),
            calls: HashMap::new(),
            provider_calls: 0,
            claiming: 0,
            finding: false,
            offered: VecDeque::new(),
            found: VecDeque::new(),
            found_at: 0,
            closing: false,
            hand_back_at: u64::MAX,
            out: Vec::new(),
        }
    }

    /// Jobs held now (for tests and stats).
    pub fn holding(&self) -> usize {
        self.runs.len()
    }

    /// Provider calls out now.
    pub fn provider_calls(&self) -> usize {
        self.provider_calls
    }

    /// Calls out now, by token (for tests that answer them).
    pub fn has_call(&self, token: u32) -> bool {
        self.calls.contains_key(&token)
    }

    fn finish(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.out)
    }

    /// The timer: calls overdue, jobs past their deadline, the store's
    /// upkeep, and work to take.
    pub fn tick(&mut self, cx: &Cx) -> Vec<Report> {
        self.forget_overdue(cx);
        let late: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, r)| !r.ending && r.record.is_past_deadline(cx.now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in late {
            self.fail_late(cx, &id);
        }
        self.let_go_again(cx);
        if self.closing && cx.now >= self.hand_back_at {
            self.hand_back(cx);
        }
        if !self.closing {
            self.op(cx, WorkOp::Upkeep, Awaiting::Upkeep);
        }
        self.pump(cx);
        self.take_work(cx, true);
        self.finish()
    }

    /// New work may be waiting (the job queue was written to).
    pub fn work_ready(&mut self, cx: &Cx) -> Vec<Report> {
        self.take_work(cx, true);
        self.finish()
    }

    /// The worker is going away (its listener drains): it takes nothing new,
    /// lets the calls it has out end and the jobs it holds finish, and hands
    /// back what is left once the longest call could have ended. Work found
    /// but not claimed goes back at once.
    pub fn drain(&mut self, cx: &Cx) -> Vec<Report> {
        if !self.closing {
            self.closing = true;
            self.hand_back_at = cx
                .now
                .saturating_add(longest_call_ms(cx.config))
                .saturating_add(GRACE_MS);
            let all = std::mem::take(&mut self.offered)
                .into_iter()
                .chain(std::mem::take(&mut self.found));
            for ticket in all {
                self.op(cx, WorkOp::Return(ticket), Awaiting::Return);
            }
        }
        self.finish()
    }

    /// The worker is going away now: every job it holds is handed back at
    /// once, for another worker to take, and nothing new is taken.
    pub fn close(&mut self, cx: &Cx) -> Vec<Report> {
        let mut reports = self.drain(cx);
        self.hand_back(cx);
        reports.extend(self.finish());
        reports
    }

    fn hand_back(&mut self, cx: &Cx) {
        self.hand_back_at = u64::MAX;
        self.ready.clear();
        let ids: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, r)| !r.ending)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.hand_back_one(cx, &id);
        }
    }

    /// Lets go of a job before it ends: pending again (a finished job's
    /// delivery due at once), for any worker to take.
    fn hand_back_one(&mut self, cx: &Cx, id: &str) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        let leave = if run.record.status.is_finished() {
            Leave::DeliverAt(cx.now)
        } else {
            run.record.status = JobStatus::Pending;
            Leave::HandBack
        };
        let rendered = kept_body(run, cx.now);
        let report: Vec<Report> = (leave == Leave::HandBack)
            .then(|| Report::Requeued {
                id: id.to_string(),
                local: self.store.is_local(),
            })
            .into_iter()
            .collect();
        let settle = Settle {
            was_running: run.record.counted_running,
            ..Settle::default()
        };
        let closing = Closing {
            rendered,
            leave,
            settle,
            report,
        };
        self.let_go(cx, id, closing);
    }

    /// Whether every job has been let go of since `drain` (the worker may go).
    pub fn is_closed(&self) -> bool {
        self.closing && self.runs.is_empty() && self.claiming == 0
    }

    /// A callout came back (or failed: no status).
    pub fn answered(&mut self, cx: &Cx, token: u32, answer: CallAnswer) -> Vec<Report> {
        if let Some(out) = self.calls.remove(&token) {
            let elapsed = cx.now.saturating_sub(out.sent_ms);
            self.call_ended(cx, out.call, Ended::Answer(&answer), elapsed);
        }
        self.pump(cx);
        self.take_work(cx, true);
        self.finish()
    }

    // ---- calls --------------------------------------------------------

    fn send(&mut self, cx: &Cx, callout: &Callout, call: Call) {
        match cx.host.dispatch(callout) {
            Ok(token) => {
                if let Call::Provider(_) = call {
                    self.provider_calls += 1;
                    self.out.push(Report::InFlight(1));
                }
                let out = Out {
                    call,
                    sent_ms: cx.now,
                    timeout_ms: callout.timeout_ms,
                };
                self.calls.insert(token, out);
            }
            Err(why) => {
                if let Call::Provider(_) = call {
                    // Counted as sent so that its end can uncount it.
                    self.provider_calls += 1;
                    self.out.push(Report::InFlight(1));
                }
                self.call_ended(cx, call, Ended::NotSent(&why), 0);
            }
        }
    }

    /// Envoy ends every callout by its timeout; should an answer still never
    /// come, the call counts as unanswered.
    fn forget_overdue(&mut self, cx: &Cx) {
        let overdue: Vec<u32> = self
            .calls
            .iter()
            .filter(|(_, o)| {
                cx.now.saturating_sub(o.sent_ms) > o.timeout_ms.saturating_add(GRACE_MS)
            })
            .map(|(t, _)| *t)
            .collect();
        for token in overdue {
            if let Some(out) = self.calls.remove(&token) {
                let elapsed = cx.now.saturating_sub(out.sent_ms);
                self.call_ended(cx, out.call, Ended::Lost, elapsed);
            }
        }
    }

    fn call_ended(&mut self, cx: &Cx, call: Call, ended: Ended, elapsed_ms: u64) {
        match call {
            Call::Provider(attempt) => {
                self.provider_calls = self.provider_calls.saturating_sub(1);
                self.out.push(Report::InFlight(-1));
                let outcome = ended.outcome(elapsed_ms);
                self.provider_answered(cx, &attempt, &outcome, elapsed_ms);
            }
            Call::Webhook(call) => {
                let (status, body) = ended.status_and_body();
                let outcome = deliver::outcome(status, body, elapsed_ms, call.callout.timeout_ms);
                self.webhook_answered(cx, &call, outcome);
            }
            Call::Store(wait, awaiting) => {
                let answer = ended.store_answer();
                let ok = answer.as_ref().is_some_and(|(s, _)| (200..300).contains(s));
                self.out.push(Report::StoreCall {
                    op: wait.name(),
                    ok,
                    latency_ms: elapsed_ms,
                });
                let step = self.store.resume(wait, answer, cx.now);
                self.step(cx, step, awaiting);
            }
        }
    }

    // ---- the store ----------------------------------------------------

    fn op(&mut self, cx: &Cx, op: WorkOp, awaiting: Awaiting) {
        let step = self.store.begin(cx.host, cx.config, op, cx.now);
        self.step(cx, step, awaiting);
    }

    fn step(&mut self, cx: &Cx, step: WorkStep, awaiting: Awaiting) {
        match step {
            WorkStep::Done(done) => self.done(cx, awaiting, done),
            WorkStep::Call(callout, wait) => self.send(cx, &callout, Call::Store(wait, awaiting)),
        }
    }

    fn done(&mut self, cx: &Cx, awaiting: Awaiting, done: WorkDone) {
        match (awaiting, done) {
            (
                awaiting @ (Awaiting::Upkeep | Awaiting::Find),
                WorkDone::Found { tickets, expired },
            ) => {
                self.out.push(Report::Expired {
                    count: expired,
                    local: self.store.is_local(),
                });
                if awaiting == Awaiting::Find {
                    self.finding = false;
                    // What the last find turned up and is still unclaimed goes
                    // back (a ticket counted as running must not be lost).
                    for ticket in std::mem::take(&mut self.found) {
                        self.op(cx, WorkOp::Return(ticket), Awaiting::Return);
                    }
                    self.found = tickets.into();
                    self.found_at = cx.now;
                } else {
                    let room = FOUND_CAP.saturating_sub(self.offered.len());
                    self.offered.extend(tickets.into_iter().take(room));
                }
                self.take_work(cx, false);
            }
            (Awaiting::Find, _) => self.finding = false,
            (Awaiting::Claim, WorkDone::Claimed(claimed)) => {
                self.claiming = self.claiming.saturating_sub(1);
                if let Some(claimed) = claimed {
                    self.start_run(cx, *claimed);
                }
            }
            (Awaiting::Claim, _) => self.claiming = self.claiming.saturating_sub(1),
            (Awaiting::End { id }, WorkDone::Ended(LetGo::Later)) => {
                if let Some(run) = self.runs.get_mut(&id) {
                    run.let_again = true;
                }
            }
            (Awaiting::End { id }, WorkDone::Ended(how)) => {
                let run = self.runs.remove(&id);
                if let (LetGo::Done, Some((_, reports))) = (how, run.and_then(|r| r.letting)) {
                    self.out.extend(reports);
                }
            }
            (Awaiting::End { id }, _) => {
                self.runs.remove(&id);
            }
            (Awaiting::Return, _) => {}
            _ => {}
        }
    }

    /// Claims found work while there is room: a worker holds at most
    /// `max_in_flight` jobs, and sends at most that many provider calls.
    fn take_work(&mut self, cx: &Cx, find: bool) {
        if self.closing {
            return;
        }
        let room = |e: &Engine| {
            cx.config
                .max_in_flight
                .saturating_sub(e.runs.len() + e.claiming)
        };
        // Work found a while ago may have been taken by others, and newer work
        // come before it: found again.
        if find && cx.now.saturating_sub(self.found_at) >= FOUND_FRESH_MS && !self.found.is_empty()
        {
            for ticket in std::mem::take(&mut self.found) {
                self.op(cx, WorkOp::Return(ticket), Awaiting::Return);
            }
        }
        while room(self) > 0 {
            let Some(ticket) = self.offered.pop_front().or_else(|| self.found.pop_front()) else {
                break;
            };
            if self.runs.contains_key(ticket.id()) {
                continue;
            }
            self.claiming += 1;
            let hold_ms = longest_call_ms(cx.config).saturating_add(GRACE_MS);
            self.op(cx, WorkOp::Claim { ticket, hold_ms }, Awaiting::Claim);
        }
        let room = room(self);
        if find && room > 0 && !self.finding {
            self.finding = true;
            self.op(cx, WorkOp::Find { room }, Awaiting::Find);
        }
    }

    // ---- a job's life -------------------------------------------------

    fn start_run(&mut self, cx: &Cx, claimed: Claimed) {
        let Claimed {
            mut record,
            body,
            was,
        } = claimed;
        let id = record.id.clone();
        let finished = record.status.is_finished();
        // Only a running job is shown.
        let stored = (!finished).then(|| record.clone());
        if !finished {
            if was == JobStatus::Pending {
                self.out.push(Report::Started {
                    id: id.clone(),
                    local: self.store.is_local(),
                });
            }
            record.status = JobStatus::Processing;
        }
        let late = record.is_past_deadline(cx.now);
        let due = record.pending_delivery().is_some_and(|d| d.due(cx.now));
        let run = Run {
            record,
            stored,
            started_ms: cx.now,
            body,
            parts: None,
            ending: false,
            letting: None,
            let_again: false,
        };
        self.runs.insert(id.clone(), run);
        if self.closing {
            // Claimed as the worker began to go away: straight back.
            return self.hand_back_one(cx, &id);
        }
        match (finished, late, due) {
            (true, _, true) => self.deliver(cx, &id),
            (true, _, false) => self.let_go_as_is(cx, &id),
            (false, true, _) => self.fail_late(cx, &id),
            (false, false, _) => self.start_attempt(cx, &id),
        }
    }

    /// Builds the job's current attempt (every first part of a long input)
    /// and queues its calls; an attempt that cannot even be built fails at
    /// once and the next fallback is tried.
    fn start_attempt(&mut self, cx: &Cx, id: &str) {
        for _ in 0..=self.runs.get(id).map_or(0, |r| r.record.chain.len()) {
            let Some(run) = self.runs.get_mut(id) else {
                return;
            };
            let Some(request) = run.record.request.clone() else {
                return;
            };
            let built = match current_provider(cx.config, &run.record) {
                Ok((_, provider)) if long::needs_parts(provider, &request) => {
                    let plan = long::plan(provider, &request, run.record.attempt);
                    let calls: Result<Vec<Attempt>, ApiError> = (0..plan.next)
                        .map(|i| long::part_attempt(cx.config, &run.record, &request, i))
                        .collect();
                    calls.inspect(|_| {
                        run.parts = Some(long::Parts {
                            attempt: plan.attempt,
                            done: BTreeMap::new(),
                        });
                        run.record.parts = Some(plan);
                    })
                }
                _ => build_call(cx.config, &run.record, request).map(|a| vec![a]),
            };
            match built {
                Ok(calls) => {
                    run.started_ms = cx.now;
                    self.ready.extend(calls);
                    self.show(cx, id);
                    return;
                }
                Err(error) => {
                    let (status, reason) = (error.status_code, FailReason::of(&error));
                    run.parts = None;
                    if run.record.record_failure(cx.now, error) == NextStep::Failed {
                        let report = self.failed(id, status, reason, cx);
                        return self.end_job(cx, id, None, report);
                    }
                }
            }
        }
    }

    /// How long a claim must hold for what the job has out or queued.
    fn hold_ms(&self, cx: &Cx, id: &str) -> u64 {
        let Some(run) = self.runs.get(id) else {
            return GRACE_MS;
        };
        let timeout = current_provider(cx.config, &run.record).map_or(0, |(_, p)| p.timeout_ms);
        let queued = self.ready.iter().filter(|a| a.id == id).count();
        let waits = u64::try_from(queued.max(1)).unwrap_or(1);
        timeout.saturating_mul(waits).saturating_add(GRACE_MS)
    }

    /// Shows the running job to polls and keeps its claim.
    fn show(&mut self, cx: &Cx, id: &str) {
        let hold_ms = self.hold_ms(cx, id);
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        // The claim's write showed it already (and holds at least as long).
        if run.stored.take().is_some_and(|s| s == run.record) {
            return;
        }
        let op = WorkOp::Show {
            record: Box::new(run.record.clone()),
            hold_ms,
        };
        self.op(cx, op, Awaiting::Show);
    }

    /// Sends queued provider calls while there is room.
    fn pump(&mut self, cx: &Cx) {
        while self.provider_calls < cx.config.max_in_flight {
            let Some(attempt) = self.ready.pop_front() else {
                return;
            };
            let live = self.runs.get(&attempt.id).is_some_and(|r| {
                !r.ending
                    && r.record.is_running(attempt.attempt)
                    && (attempt.part.is_none()
                        || r.parts
                            .as_ref()
                            .is_some_and(|p| p.attempt == attempt.attempt))
            });
            if !live {
                continue;
            }
            self.out.push(Report::Sent {
                id: attempt.id.clone(),
                attempt: attempt.attempt,
                part: attempt.part,
                provider: attempt.provider.clone(),
                model: attempt.model.clone(),
            });
            let callout = attempt.callout.clone();
            self.send(cx, &callout, Call::Provider(Box::new(attempt)));
        }
    }

    fn provider_answered(&mut self, cx: &Cx, attempt: &Attempt, outcome: &Outcome, elapsed: u64) {
        let result = attempt_result(outcome, attempt);
        let status = match outcome {
            Outcome::Answer(r) => Some(r.status),
            _ => None,
        };
        self.out.push(Report::AttemptEnded {
            id: attempt.id.clone(),
            provider: attempt.provider.clone(),
            result,
            status,
            latency_ms: elapsed,
        });
        let Some(run) = self.runs.get(&attempt.id) else {
            return;
        };
        if run.ending || !run.record.is_running(attempt.attempt) {
            return;
        }
        let started_ms = run.started_ms;
        match (read_answer(cx.config, attempt, outcome), attempt.part) {
            (Ok(speech), None) => {
                let done = completion(attempt, speech, started_ms, cx.now);
                self.complete(cx, &attempt.id, done);
            }
            (Ok(speech), Some(index)) => self.part_done(cx, attempt, index, speech.into()),
            (Err(error), _) => self.attempt_failed(cx, &attempt.id, error),
        }
    }

    /// A part of a long input came back: keep it, queue the next, or join
    /// them all into the job's audio.
    fn part_done(&mut self, cx: &Cx, attempt: &Attempt, index: u32, part: long::Part) {
        let Some(run) = self.runs.get_mut(&attempt.id) else {
            return;
        };
        let (Some(parts), Some(plan)) = (
            run.parts.as_mut().filter(|p| p.attempt == attempt.attempt),
            run.record.parts.as_mut(),
        ) else {
            return;
        };
        parts.done.insert(index, part);
        if !plan.done.contains(&index) {
            plan.done.push(index);
        }
        if plan.is_complete() {
            let all: Vec<long::Part> = std::mem::take(&mut parts.done).into_values().collect();
            let started_ms = run.started_ms;
            return match long::join_parts(cx.config, attempt, &all, started_ms, cx.now) {
                Ok(done) => self.complete(cx, &attempt.id, done),
                Err(error) => self.attempt_failed(cx, &attempt.id, error),
            };
        }
        if plan.next < plan.total {
            let next = plan.next;
            plan.next += 1;
            let built = match run.record.request.as_ref() {
                Some(request) => long::part_attempt(cx.config, &run.record, request, next),
                None => Err(ApiError::internal("the job's request is gone")),
            };
            match built {
                Ok(call) => self.ready.push_back(call),
                Err(error) => return self.attempt_failed(cx, &attempt.id, error),
            }
        }
        self.show(cx, &attempt.id);
    }

    fn attempt_failed(&mut self, cx: &Cx, id: &str, error: ApiError) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        run.parts = None;
        let (status, reason) = (error.status_code, FailReason::of(&error));
        match run.record.record_failure(cx.now, error) {
            NextStep::TryNext => self.start_attempt(cx, id),
            NextStep::Failed => {
                let report = self.failed(id, status, reason, cx);
                self.end_job(cx, id, None, report);
            }
        }
    }

    fn failed(&self, id: &str, status: u16, reason: FailReason, cx: &Cx) -> Report {
        Report::Failed {
            id: id.to_string(),
            status,
            reason,
            deadline_s: cx.config.job_deadline_s,
        }
    }

    fn fail_late(&mut self, cx: &Cx, id: &str) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        if run.ending {
            return;
        }
        run.parts = None;
        run.record
            .fail_past_deadline(cx.now, cx.config.job_deadline_s);
        let report = self.failed(id, 504, FailReason::Deadline, cx);
        self.end_job(cx, id, None, report);
    }

    fn complete(&mut self, cx: &Cx, id: &str, done: Completion) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        run.parts = None;
        run.record.complete(cx.now, done.meta.clone());
        let report = Report::Completed { id: id.to_string() };
        self.end_job(cx, id, Some(&done), report);
    }

    /// The job has just ended (`done` holds its audio if it completed): its
    /// webhook's delivery and body are made, its answer rendered, and it is
    /// let go of.
    fn end_job(&mut self, cx: &Cx, id: &str, done: Option<&Completion>, report: Report) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        deliver::on_job_end(cx.config, &mut run.record, done, cx.now);
        let settle = owed(cx.config, &run.record);
        let closing = Closing {
            rendered: render(&run.record, done),
            leave: leave_for(&run.record, cx.now),
            report: [vec![report], key_reports(cx.config, &run.record, &settle)].concat(),
            settle,
        };
        self.let_go(cx, id, closing);
    }

    /// A finished job that needs nothing now: let go of as it stands.
    fn let_go_as_is(&mut self, cx: &Cx, id: &str) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        let rendered = kept_body(run, cx.now);
        let leave = leave_for(&run.record, cx.now);
        // Past its expiry with nothing left to deliver: it goes now.
        let report: Vec<Report> = (leave == Leave::Forget)
            .then(|| Report::Expired {
                count: 1,
                local: self.store.is_local(),
            })
            .into_iter()
            .collect();
        let settle = Settle::default();
        self.let_go(
            cx,
            id,
            Closing {
                rendered,
                leave,
                settle,
                report,
            },
        );
    }

    fn let_go(&mut self, cx: &Cx, id: &str, closing: Closing) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        run.ending = true;
        let Closing {
            rendered,
            leave,
            settle,
            report,
        } = closing;
        let ending = Box::new(Ending {
            record: run.record.clone(),
            rendered,
            leave,
            settle,
        });
        run.letting = Some((ending.clone(), report));
        self.op(
            cx,
            WorkOp::End(ending),
            Awaiting::End { id: id.to_string() },
        );
    }

    /// Endings the store could not take before: once more.
    fn let_go_again(&mut self, cx: &Cx) {
        let again: Vec<(String, Box<Ending>)> = self
            .runs
            .iter_mut()
            .filter(|(_, r)| r.let_again)
            .filter_map(|(id, r)| {
                r.let_again = false;
                Some((id.clone(), r.letting.as_ref()?.0.clone()))
            })
            .collect();
        for (id, ending) in again {
            self.op(cx, WorkOp::End(ending), Awaiting::End { id });
        }
    }

    // ---- webhooks -----------------------------------------------------

    fn deliver(&mut self, cx: &Cx, id: &str) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        match deliver::begin(cx.config, &mut run.record, cx.now) {
            Some(call) => {
                self.out.push(Report::WebhookSent {
                    id: id.to_string(),
                    webhook_id: call.webhook_id.clone(),
                    endpoint: call.endpoint.clone(),
                });
                let callout = call.callout.clone();
                self.send(cx, &callout, Call::Webhook(Box::new(call)));
            }
            // The endpoint left the configuration: the delivery was given up.
            None => self.let_go_as_is(cx, id),
        }
    }

    fn webhook_answered(
        &mut self,
        cx: &Cx,
        call: &WebhookCall,
        outcome: crate::webhooks::AttemptOutcome,
    ) {
        // Jitter lengthens a retry's wait by up to a second, never shortens it.
        let mut random = [0u8; 2];
        let _ = cx.host.random(&mut random);
        let jitter = u64::from(u16::from_le_bytes(random)) % 1000;
        let Some(run) = self.runs.get_mut(&call.id) else {
            return;
        };
        if run.ending {
            return;
        }
        let result = deliver::answered(cx.config, &mut run.record, call, outcome, jitter, cx.now);
        if let Some(result) = result {
            self.out.push(Report::Webhook {
                id: call.id.clone(),
                webhook_id: call.webhook_id.clone(),
                endpoint: call.endpoint.clone(),
                result,
                outcome: format!("{outcome:?}"),
            });
        }
        self.let_go_as_is(cx, &call.id);
    }
}

/// The longest a provider or webhook call may take.
fn longest_call_ms(config: &Config) -> u64 {
    let providers = config.providers.values().map(|p| p.timeout_ms);
    let webhooks = config
        .webhooks
        .values()
        .map(|w| w.attempt_timeout_seconds.saturating_mul(1000));
    providers.chain(webhooks).max().unwrap_or(0)
}

/// How the engine lets go of a job, and what it reports once the store has it.
struct Closing {
    rendered: Rendered,
    leave: Leave,
    settle: Settle,
    report: Vec<Report>,
}

/// What a job that just ended owes its key: its characters back if it made
/// no audio, the price of the model that served it if it did.
fn owed(config: &Config, record: &JobRecord) -> Settle {
    let give_back = match record.status {
        JobStatus::Failed => record.chars_window_s.map(|w| (w, record.chars)),
        _ => None,
    };
    let served = record.result.as_ref().and_then(|r| {
        Some(format!(
            "{}/{}",
            r.extra_fields.provider.as_ref()?,
            r.extra_fields.model_requested.as_ref()?
        ))
    });
    Settle {
        give_back,
        charge: served.map_or(0, |m| config.pricing.micros(&m, record.chars)),
        was_running: record.counted_running,
    }
}

/// The job's end, for its key's stats: under the model that served it (or
/// made its last attempt); a failed job's characters go back under the model
/// its submit counted them under, the primary.
fn key_reports(config: &Config, record: &JobRecord, settle: &Settle) -> Vec<Report> {
    let completed = record.status == JobStatus::Completed;
    let model = match &record.result {
        Some(r) => format!(
            "{}/{}",
            r.extra_fields.provider.as_deref().unwrap_or(""),
            r.extra_fields.model_requested.as_deref().unwrap_or("")
        ),
        None => record
            .attempts
            .last()
            .map(|a| format!("{}/{}", a.provider, a.model))
            .unwrap_or_default(),
    };
    let mut out = vec![Report::KeyJob {
        who: report::Who::of(config, &record.owner, &model),
        completed,
        spend_micros: settle.charge,
    }];
    if !completed && record.chars > 0 {
        out.push(Report::Returned {
            who: report::Who::of(config, &record.owner, &record.first_model()),
            chars: record.chars,
        });
    }
    out
}

/// How a finished job is let go of: kept for its webhook, kept until it
/// expires, or gone (expired, and nothing left to deliver).
fn leave_for(record: &JobRecord, now_ms: u64) -> Leave {
    match record.pending_delivery() {
        Some(d) => Leave::DeliverAt(d.next_attempt_at_ms),
        None if record.is_expired(now_ms) => Leave::Forget,
        None => Leave::Finished,
    }
}

/// The poll answer of a job whose state changed but not its result: the
/// answer it had with a new tail (webhook state), or a fresh one while it
/// runs; past its expiry only the record is kept, not the audio.
fn kept_body(run: &mut Run, now_ms: u64) -> Rendered {
    if run.record.status.is_finished() && run.record.is_expired(now_ms) {
        run.record.result_dropped = true;
        return Rendered {
            body: b"{}".to_vec(),
            audio: None,
            tail_at: 1,
        };
    }
    match (&run.body, run.record.status.is_finished()) {
        (Some(old), true) => with_new_tail(&old.body, old.audio, old.tail_at, &run.record),
        _ => render(&run.record, None),
    }
}

/// How a call ended, before it is read for what it was.
enum Ended<'a> {
    Answer(&'a CallAnswer),
    NotSent(&'a str),
    /// The engine stopped waiting for it.
    Lost,
}

impl Ended<'_> {
    fn outcome(&self, elapsed_ms: u64) -> Outcome<'_> {
        match self {
            Ended::Answer(a) => match a.status {
                Some(_) if a.too_large => Outcome::TooLarge { bytes: a.body_size },
                Some(status) => Outcome::Answer(UpstreamResponse {
                    status,
                    body: &a.body,
                }),
                None => Outcome::NoAnswer { elapsed_ms },
            },
            Ended::NotSent(why) => Outcome::NotSent(why),
            Ended::Lost => Outcome::NoAnswer { elapsed_ms },
        }
    }

    fn status_and_body(&self) -> (Option<u16>, &[u8]) {
        match self {
            Ended::Answer(a) => (a.status, &a.body),
            Ended::NotSent(_) | Ended::Lost => (None, &[]),
        }
    }

    fn store_answer(&self) -> StoreAnswer {
        match self {
            Ended::Answer(a) => a.status.map(|s| (s, a.body.clone())),
            Ended::NotSent(_) | Ended::Lost => None,
        }
    }
}
