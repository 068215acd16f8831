//! Running jobs kept in etcd (SPEC §4), from the root context of any replica.
//!
//! Each VM holds an etcd lease (kept alive every few seconds) and scans the
//! pending index for work. It claims a job with a transaction that puts
//! `claims/<id>` under its lease only if no claim exists, and reads the job in
//! the same step. It then runs the attempts (fallbacks in order) as on shared
//! data, and ends the job with one transaction that holds only while its
//! claim does: the finished record under a lease of the job's TTL (its parts
//! written before under the same lease), the pending entry and the claim
//! removed. A replica that dies takes its lease with it: its claims lapse and
//! another replica takes the jobs over (a late answer of the dead claim's is
//! refused by that transaction). Jobs past their deadline are failed by
//! whoever holds them, or claims them next.

use std::collections::{BTreeMap, HashMap};

use super::webhook::{self, DeliveryResult, WebhookCall};
use super::{
    build_call, chunks, completion, current_provider, read_answer, Attempt, FailReason, Outcome,
    Step,
};
use crate::config::Config;
use crate::error::ApiError;
use crate::job::Completion;
use crate::job::{render, retail, JobRecord, NextStep, PartPlan, Rendered};
use crate::platform::Callout;
use crate::store::etcd::jobs::{
    self, decode_job, parse_pending, Pending, Release, CLAIM_TTL_S, SCAN_LIMIT,
};
use crate::store::etcd::response::{
    check_status, parse_lease_grant, parse_lease_keepalive, parse_range, parse_txn,
};
use crate::store::etcd::{request as req, EtcdConfig, StoreAnswer};
use crate::store::parts::Part;
use crate::store::slot::{self, SlotView};
use crate::webhooks::{AttemptOutcome, Next};

/// Time between scans of the pending index while it has little in it; a scan
/// that came back full is followed by the next at once (on the next tick).
const SCAN_EVERY_MS: u64 = 500;
/// Extra life of a finished job's keys past its TTL (polls answer 404 from the
/// expiry in the record; etcd removes the keys a moment later).
const TTL_MARGIN_S: u64 = 1;

/// What a store call was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    Grant,
    KeepAlive,
    Scan,
    Claim(String),
    TtlLease(String),
    /// A running job's state shown to polls (best effort).
    Progress(String),
    Part(String, u32),
    Finish(String),
}

impl Tag {
    /// For stats: which kind of store call.
    pub fn name(&self) -> &'static str {
        match self {
            Tag::Grant => "lease_grant",
            Tag::KeepAlive => "lease_keepalive",
            Tag::Scan => "scan",
            Tag::Claim(_) => "claim",
            Tag::TtlLease(_) => "ttl_lease",
            Tag::Progress(_) => "progress",
            Tag::Part(..) => "put_part",
            Tag::Finish(_) => "finish",
        }
    }
}

/// What the root is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Store(Tag, Callout),
    Send(Box<Attempt>),
    /// Send this webhook delivery attempt.
    Deliver(Box<WebhookCall>),
    Report(Step),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    None,
    Granting,
    Held {
        id: i64,
        renew_at_ms: u64,
        renewing: bool,
    },
}

/// A job this VM holds, and where it is.
struct Running {
    record: JobRecord,
    started_ms: u64,
    /// A finished job's poll answer (kept for its webhook's updates).
    body: Option<Rendered>,
    /// A long input's parts so far (SPEC §6).
    long: Option<LongRun>,
    ending: Option<Ending>,
}

/// A long input's attempt: its parts, those back, the next to send.
struct LongRun {
    attempt: usize,
    total: u32,
    next: u32,
    parts: BTreeMap<u32, Part>,
}

/// A job on its way back into etcd.
struct Ending {
    value: Vec<u8>,
    parts: Vec<Vec<u8>>,
    parts_left: usize,
    ttl_lease: Option<i64>,
    /// A store call of this ending is under way.
    busy: bool,
    step: Step,
    how: EndAs,
}

/// How an ending leaves the job (see `jobs::Release`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndAs {
    Done,
    DeliverAt(u64),
    Forget,
}

/// The random part of a job's webhook id, the same on every replica.
fn webhook_random(id: &str) -> [u8; 16] {
    let digest = crate::config::sha256_of(id.as_bytes());
    let mut out = [0u8; 16];
    out.iter_mut().zip(digest.iter()).for_each(|(o, d)| *o = *d);
    out
}

pub struct EtcdRunner {
    owner: Vec<u8>,
    lease: Lease,
    scanning: bool,
    next_scan_ms: u64,
    jobs: HashMap<String, Running>,
}

fn ok_body(answer: &StoreAnswer) -> Option<&[u8]> {
    answer
        .as_ref()
        .and_then(|(status, body)| check_status(*status, body).ok())
}

impl EtcdRunner {
    /// `random` names this VM's claims.
    pub fn new(random: [u8; 16]) -> EtcdRunner {
        EtcdRunner {
            owner: format!("replica-{}", hex::encode(random)).into_bytes(),
            lease: Lease::None,
            scanning: false,
            next_scan_ms: 0,
            jobs: HashMap::new(),
        }
    }

    /// Lease upkeep, deadlines, endings to retry, and a scan for work.
    pub fn tick(&mut self, etcd: &EtcdConfig, config: &Config, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match self.lease {
            Lease::None => {
                self.lease = Lease::Granting;
                out.push(Action::Store(
                    Tag::Grant,
                    etcd.callout(&req::lease_grant(CLAIM_TTL_S)),
                ));
            }
            Lease::Held {
                id,
                renew_at_ms,
                renewing: false,
            } if now_ms >= renew_at_ms => {
                self.lease = Lease::Held {
                    id,
                    renew_at_ms,
                    renewing: true,
                };
                out.push(Action::Store(
                    Tag::KeepAlive,
                    etcd.callout(&req::lease_keepalive(id)),
                ));
            }
            _ => {}
        }
        let late: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, r)| r.ending.is_none() && r.record.is_past_deadline(now_ms))
            .map(|(id, _)| id.clone())
            .collect();
        for id in late {
            out.extend(self.fail_late(etcd, config, &id, now_ms));
        }
        let retry: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, r)| r.ending.as_ref().is_some_and(|e| !e.busy))
            .map(|(id, _)| id.clone())
            .collect();
        for id in retry {
            out.extend(self.resume_ending(etcd, &id, now_ms));
        }
        if let Lease::Held { .. } = self.lease {
            if !self.scanning
                && now_ms >= self.next_scan_ms
                && self.jobs.len() < config.max_in_flight
            {
                self.scanning = true;
                self.next_scan_ms = now_ms + SCAN_EVERY_MS;
                let scan = req::range_prefix(&etcd.layout().pending_prefix(), SCAN_LIMIT);
                out.push(Action::Store(Tag::Scan, etcd.callout(&scan)));
            }
        }
        out
    }

    pub fn on_store_answer(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        tag: Tag,
        answer: StoreAnswer,
        now_ms: u64,
    ) -> Vec<Action> {
        let body = ok_body(&answer);
        match tag {
            Tag::Grant => {
                self.lease = match body.and_then(|b| parse_lease_grant(b).ok()) {
                    Some(grant) => Lease::Held {
                        id: grant.id,
                        renew_at_ms: now_ms + renew_after_ms(grant.ttl),
                        renewing: false,
                    },
                    None => Lease::None,
                };
                Vec::new()
            }
            Tag::KeepAlive => {
                if let Lease::Held { id, .. } = self.lease {
                    self.lease = match body.map(parse_lease_keepalive) {
                        Some(Ok(Some(ttl))) => Lease::Held {
                            id,
                            renew_at_ms: now_ms + renew_after_ms(ttl),
                            renewing: false,
                        },
                        // The lease is gone (etcd forgot it): our claims with it.
                        Some(Ok(None)) => Lease::None,
                        // No answer: try again on the next tick.
                        _ => Lease::Held {
                            id,
                            renew_at_ms: now_ms,
                            renewing: false,
                        },
                    };
                }
                Vec::new()
            }
            Tag::Scan => {
                self.scanning = false;
                let full = body.and_then(|b| parse_range(b).ok()).is_some_and(|r| {
                    r.more || i64::try_from(r.kvs.len()).unwrap_or(0) >= SCAN_LIMIT
                });
                if full {
                    self.next_scan_ms = now_ms;
                }
                self.claim_pending(etcd, config, body, now_ms)
            }
            Tag::Claim(id) => self.claimed(etcd, config, &id, body, now_ms),
            // Best effort: a poll shows `pending` a little longer if it did not land.
            Tag::Progress(_) => Vec::new(),
            Tag::TtlLease(id) => {
                let lease = body.and_then(|b| parse_lease_grant(b).ok()).map(|g| g.id);
                if let Some(ending) = self.jobs.get_mut(&id).and_then(|r| r.ending.as_mut()) {
                    ending.busy = false;
                    ending.ttl_lease = lease;
                }
                self.resume_ending(etcd, &id, now_ms)
            }
            Tag::Part(id, _) => {
                let Some(ending) = self.jobs.get_mut(&id).and_then(|r| r.ending.as_mut()) else {
                    return Vec::new();
                };
                if body.is_some() {
                    ending.parts_left = ending.parts_left.saturating_sub(1);
                    if ending.parts_left == 0 {
                        ending.busy = false;
                        return self.resume_ending(etcd, &id, now_ms);
                    }
                } else {
                    // Written again, all of them, on the next tick.
                    ending.parts_left = ending.parts.len();
                    ending.busy = false;
                    ending.ttl_lease = None;
                }
                Vec::new()
            }
            Tag::Finish(id) => match body.map(parse_txn) {
                Some(Ok(txn)) => {
                    let run = self.jobs.remove(&id);
                    match (txn.succeeded, run.and_then(|r| r.ending)) {
                        (true, Some(ending)) => vec![Action::Report(ending.step)],
                        // The claim lapsed and another replica has the job: drop this answer.
                        _ => Vec::new(),
                    }
                }
                _ => {
                    if let Some(ending) = self.jobs.get_mut(&id).and_then(|r| r.ending.as_mut()) {
                        ending.busy = false;
                    }
                    Vec::new()
                }
            },
        }
    }

    /// Claims pending jobs this VM does not hold, as many as it has room for.
    fn claim_pending(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        body: Option<&[u8]>,
        now_ms: u64,
    ) -> Vec<Action> {
        let (Some(range), Lease::Held { id: lease, .. }) =
            (body.and_then(|b| parse_range(b).ok()), self.lease)
        else {
            return Vec::new();
        };
        let layout = etcd.layout();
        let room = config.max_in_flight.saturating_sub(self.jobs.len());
        range
            .kvs
            .iter()
            // A delivery waits until its next attempt is due; a job to run does not wait.
            .filter(|kv| match parse_pending(&kv.value) {
                Some((Pending::Deliver, due_ms)) => due_ms <= now_ms,
                _ => true,
            })
            .filter_map(|kv| layout.id_of(&kv.key))
            .filter(|id| !self.jobs.contains_key(*id))
            .take(room)
            .map(|id| {
                Action::Store(
                    Tag::Claim(id.to_string()),
                    etcd.callout(&jobs::claim(&layout, id, &self.owner, lease)),
                )
            })
            .collect()
    }

    /// A claim came back: run the job, or end it if it is already late.
    fn claimed(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        id: &str,
        body: Option<&[u8]>,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(txn) = body.and_then(|b| parse_txn(b).ok()).filter(|t| t.succeeded) else {
            return Vec::new();
        };
        let Some(kv) = txn.range_kv(1) else {
            return Vec::new();
        };
        let Some(payload) = decode_job(&kv.value).and_then(|j| j.whole) else {
            return Vec::new();
        };
        let SlotView::Held(view) = slot::decode(payload) else {
            return Vec::new();
        };
        let Some(mut record) = view.record() else {
            return Vec::new();
        };
        if record.status.is_finished() {
            // Pending for its webhook: the next attempt is due (else let go of it as it is).
            let due = record.pending_delivery().is_some_and(|d| d.due(now_ms));
            let body = Rendered {
                body: view.body.to_vec(),
                audio_at: view.audio_at,
                tail_at: view.tail_at,
            };
            let run = Running {
                record,
                started_ms: now_ms,
                body: Some(body),
                long: None,
                ending: None,
            };
            self.jobs.insert(id.to_string(), run);
            if due {
                return self.start_delivery(etcd, config, id, now_ms);
            }
            self.end_with(etcd, id, None, Step::Nothing, now_ms);
            return self.resume_ending(etcd, id, now_ms);
        }
        // A job taken over from a replica that died starts over on its chain.
        record.status = crate::job::JobStatus::Pending;
        record.claim(now_ms, 0);
        let run = Running {
            record,
            started_ms: now_ms,
            body: None,
            long: None,
            ending: None,
        };
        self.jobs.insert(id.to_string(), run);
        if self
            .jobs
            .get(id)
            .is_some_and(|r| r.record.is_past_deadline(now_ms))
        {
            return self.fail_late(etcd, config, id, now_ms);
        }
        self.next_attempt(etcd, config, id, now_ms)
    }

    /// Shows a running job as it now stands (`processing`, and for a long
    /// input its `progress`) to polls on any replica.
    fn show_running(&mut self, etcd: &EtcdConfig, id: &str) -> Option<Action> {
        let run = self.jobs.get_mut(id)?;
        run.record.parts = run.long.as_ref().map(|l| PartPlan {
            attempt: l.attempt,
            total: l.total,
            done: l.parts.keys().copied().collect(),
            next: l.next,
        });
        let payload = slot::encode_held(0, &run.record, &render(&run.record, None))?;
        let (value, parts) =
            jobs::encode_job(&payload, run.record.owner.as_bytes(), 0, etcd.part_bytes());
        if !parts.is_empty() {
            return None;
        }
        let request = jobs::show_running(&etcd.layout(), id, &self.owner, &value);
        Some(Action::Store(
            Tag::Progress(id.to_string()),
            etcd.callout(&request),
        ))
    }

    /// Ends a job that ran past its deadline as failed (504).
    fn fail_late(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        id: &str,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(run) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        run.record.fail_past_deadline(now_ms, config.job_deadline_s);
        let step = Step::Failed {
            id: id.to_string(),
            status: 504,
            reason: FailReason::Deadline,
        };
        self.end_job(etcd, config, id, None, step, now_ms)
    }

    /// Builds the job's current attempt; an attempt that cannot be built fails
    /// at once and the next fallback is tried.
    fn next_attempt(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        id: &str,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(run) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        for _ in 0..=run.record.chain.len() {
            let Some(request) = run.record.request.clone() else {
                break;
            };
            let provider = current_provider(config, &run.record).ok().map(|(_, p)| p);
            if let Some(provider) = provider.filter(|p| chunks::needs_parts(p, &request)) {
                let total = u32::try_from(
                    crate::audio::split_text(&request.input, provider.max_input_chars).len(),
                )
                .unwrap_or(u32::MAX);
                let first = total.min(
                    u32::try_from(provider.max_parallel_chunks)
                        .unwrap_or(1)
                        .max(1),
                );
                let calls: Result<Vec<Attempt>, ApiError> = (0..first)
                    .map(|i| chunks::part_attempt(config, &run.record, &request, i))
                    .collect();
                if let Ok(calls) = calls {
                    run.started_ms = now_ms;
                    run.long = Some(LongRun {
                        attempt: run.record.attempt,
                        total,
                        next: first,
                        parts: BTreeMap::new(),
                    });
                    let mut out: Vec<Action> = calls
                        .into_iter()
                        .map(|c| Action::Send(Box::new(c)))
                        .collect();
                    out.extend(self.show_running(etcd, id));
                    return out;
                }
            }
            match build_call(config, &run.record, request) {
                Ok(attempt) => {
                    run.started_ms = now_ms;
                    let mut out = vec![Action::Send(Box::new(attempt))];
                    out.extend(self.show_running(etcd, id));
                    return out;
                }
                Err(error) => {
                    let status = error.status_code;
                    let reason = FailReason::of(&error);
                    if run.record.record_failure(now_ms, error) == NextStep::Failed {
                        let step = Step::Failed {
                            id: id.to_string(),
                            status,
                            reason,
                        };
                        return self.end_job(etcd, config, id, None, step, now_ms);
                    }
                }
            }
        }
        Vec::new()
    }

    /// A provider's answer (or its absence) for one of this VM's jobs.
    pub fn on_provider_answer(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        attempt: &Attempt,
        outcome: Outcome,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(run) = self.jobs.get(&attempt.id) else {
            return Vec::new();
        };
        if run.ending.is_some() || !run.record.is_running(attempt.attempt) {
            return Vec::new();
        }
        let started_ms = run.started_ms;
        match (read_answer(config, attempt, outcome), attempt.part) {
            (Ok(speech), None) => {
                let done = completion(attempt, speech, started_ms, now_ms);
                self.complete(etcd, config, &attempt.id, done, now_ms)
            }
            (Ok(speech), Some(index)) => {
                self.part_done(etcd, config, attempt, index, speech, now_ms)
            }
            (Err(error), _) => self.attempt_failed(etcd, config, &attempt.id, error, now_ms),
        }
    }

    fn complete(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        id: &str,
        done: Completion,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(run) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        run.long = None;
        run.record.complete(now_ms, done.meta.clone());
        self.end_job(
            etcd,
            config,
            id,
            Some(&done),
            Step::Completed { id: id.to_string() },
            now_ms,
        )
    }

    /// The job has just ended (`done` holds its audio if it completed): its
    /// webhook's delivery and body are made, its answer rendered, and it goes
    /// back into etcd.
    fn end_job(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        id: &str,
        done: Option<&Completion>,
        step: Step,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(run) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        webhook::on_job_end(config, &mut run.record, done, webhook_random(id), now_ms);
        let rendered = render(&run.record, done);
        self.end_with(etcd, id, Some(rendered), step, now_ms);
        self.resume_ending(etcd, id, now_ms)
    }

    /// The attempt failed (one of its parts, for a long input): the next
    /// fallback, every part again, or the job's end.
    fn attempt_failed(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        id: &str,
        error: ApiError,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(run) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        run.long = None;
        let (status, reason) = (error.status_code, FailReason::of(&error));
        match run.record.record_failure(now_ms, error) {
            NextStep::TryNext => self.next_attempt(etcd, config, id, now_ms),
            NextStep::Failed => {
                let step = Step::Failed {
                    id: id.to_string(),
                    status,
                    reason,
                };
                self.end_job(etcd, config, id, None, step, now_ms)
            }
        }
    }

    /// A part of a long input came back: keep it, send the next, or join them
    /// all. Parts wait in this replica's memory: should it die, its claim
    /// lapses and another replica makes the job again from the start.
    fn part_done(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        attempt: &Attempt,
        index: u32,
        speech: crate::providers::SpeechAudio,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(run) = self.jobs.get_mut(&attempt.id) else {
            return Vec::new();
        };
        let Some(long) = run.long.as_mut().filter(|l| l.attempt == attempt.attempt) else {
            return Vec::new();
        };
        let part = Part {
            audio: speech.audio,
            alignment: speech.alignment,
            normalized_alignment: speech.normalized_alignment,
        };
        long.parts.insert(index, part);
        let Some(request) = run.record.request.clone() else {
            return Vec::new();
        };
        if long.next < long.total {
            let next = long.next;
            long.next += 1;
            return match chunks::part_attempt(config, &run.record, &request, next) {
                Ok(call) => {
                    let mut out = vec![Action::Send(Box::new(call))];
                    out.extend(self.show_running(etcd, &attempt.id));
                    out
                }
                Err(error) => self.attempt_failed(etcd, config, &attempt.id, error, now_ms),
            };
        }
        if u32::try_from(long.parts.len()).unwrap_or(u32::MAX) < long.total {
            return Vec::new();
        }
        let parts: Vec<Part> = std::mem::take(&mut long.parts).into_values().collect();
        match chunks::join_parts(config, attempt, &request, &parts, run.started_ms, now_ms) {
            Ok(done) => self.complete(etcd, config, &attempt.id, done, now_ms),
            Err(error) => self.attempt_failed(etcd, config, &attempt.id, error, now_ms),
        }
    }

    /// Makes the job's bytes, once per ending: its record and its parts, and
    /// how it is left (finished for good, pending for its webhook, or gone).
    /// They are written by `resume_ending`, now or on a later tick.
    fn end_with(
        &mut self,
        etcd: &EtcdConfig,
        id: &str,
        rendered: Option<Rendered>,
        step: Step,
        now_ms: u64,
    ) {
        let Some(run) = self.jobs.get_mut(id) else {
            return;
        };
        let expired = run.record.is_expired(now_ms);
        let how = match run.record.pending_delivery() {
            Some(d) => EndAs::DeliverAt(d.next_attempt_at_ms),
            None if expired => EndAs::Forget,
            None => EndAs::Done,
        };
        let rendered = if expired {
            // Past its TTL: only the delivery's state is kept, not the audio.
            run.record.result_dropped = true;
            Rendered {
                body: b"{}".to_vec(),
                audio_at: None,
                tail_at: 1,
            }
        } else {
            match (rendered, &run.body) {
                (Some(r), _) => r,
                (None, Some(old)) => retail(&old.body, old.audio_at, old.tail_at, &run.record),
                (None, None) => render(&run.record, None),
            }
        };
        let Some(payload) = slot::encode_held(0, &run.record, &rendered) else {
            return;
        };
        run.body = Some(rendered);
        let expires = run.record.expires_at_ms().unwrap_or(0);
        let (value, parts) = jobs::encode_job(
            &payload,
            run.record.owner.as_bytes(),
            expires,
            etcd.part_bytes(),
        );
        let parts: Vec<Vec<u8>> = parts.into_iter().map(<[u8]>::to_vec).collect();
        run.ending = Some(Ending {
            value,
            parts_left: parts.len(),
            parts,
            ttl_lease: None,
            busy: false,
            step,
            how,
        });
    }

    /// The next store call of a job's ending: a TTL lease (for a job finished
    /// for good), its parts, then the transaction that lets go of it.
    fn resume_ending(&mut self, etcd: &EtcdConfig, id: &str, now_ms: u64) -> Vec<Action> {
        let layout = etcd.layout();
        let owner = self.owner.clone();
        let Some(run) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        let remaining_s = run
            .record
            .expires_at_ms()
            .unwrap_or(now_ms)
            .saturating_sub(now_ms)
            .div_ceil(1000);
        let Some(ending) = run.ending.as_mut() else {
            return Vec::new();
        };
        if ending.busy {
            return Vec::new();
        }
        ending.busy = true;
        let release = match ending.how {
            EndAs::Forget => Release::Forget,
            EndAs::DeliverAt(due) => Release::DeliverAt(due),
            EndAs::Done => match ending.ttl_lease {
                Some(ttl_lease) => Release::Done { ttl_lease },
                None => {
                    let ttl =
                        i64::try_from(remaining_s.saturating_add(TTL_MARGIN_S)).unwrap_or(i64::MAX);
                    return vec![Action::Store(
                        Tag::TtlLease(id.to_string()),
                        etcd.callout(&req::lease_grant(ttl)),
                    )];
                }
            },
        };
        if ending.parts_left > 0 && ending.how != EndAs::Forget {
            return ending
                .parts
                .iter()
                .enumerate()
                .map(|(n, part)| {
                    let n = u32::try_from(n).unwrap_or(u32::MAX);
                    let put = jobs::put_part(&layout, id, n, part, ending.ttl_lease);
                    Action::Store(Tag::Part(id.to_string(), n), etcd.callout(&put))
                })
                .collect();
        }
        let finish = jobs::release(&layout, id, &owner, &ending.value, release);
        vec![Action::Store(
            Tag::Finish(id.to_string()),
            etcd.callout(&finish),
        )]
    }

    /// A finished job's webhook attempt is due: mark it under way and build it.
    fn start_delivery(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        id: &str,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(run) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        let expired = run.record.is_expired(now_ms);
        let Some(webhook) = run.record.webhook.as_mut() else {
            return Vec::new();
        };
        let endpoint = config.webhooks.get(&webhook.endpoint);
        let Some(delivery) = webhook.delivery.as_mut() else {
            return Vec::new();
        };
        let Some(endpoint) = endpoint else {
            // The endpoint left the configuration: give the delivery up.
            delivery.status = crate::webhooks::DeliveryStatus::Failed;
            self.end_with(etcd, id, None, Step::Nothing, now_ms);
            return self.resume_ending(etcd, id, now_ms);
        };
        delivery.begin_attempt(now_ms, endpoint);
        let delivery = delivery.clone();
        let call = webhook::call_for(endpoint, id, webhook, &delivery, expired, now_ms);
        vec![Action::Deliver(Box::new(call))]
    }

    /// A delivery attempt ended: record it, and let go of the job (pending
    /// again for a retry, or done).
    pub fn on_webhook_answer(
        &mut self,
        etcd: &EtcdConfig,
        config: &Config,
        call: &WebhookCall,
        outcome: AttemptOutcome,
        jitter_ms: u64,
        now_ms: u64,
    ) -> (Vec<Action>, Option<DeliveryResult>) {
        let Some(run) = self.jobs.get_mut(&call.id) else {
            return (Vec::new(), None);
        };
        let Some(endpoint) = config.webhooks.get(&call.endpoint) else {
            return (Vec::new(), None);
        };
        let Some(delivery) = run
            .record
            .webhook
            .as_mut()
            .and_then(|w| w.delivery.as_mut())
        else {
            return (Vec::new(), None);
        };
        let result = match delivery.on_result(outcome, now_ms, endpoint, jitter_ms) {
            Next::RetryAt(_) => DeliveryResult::Retrying,
            Next::Done if delivery.status == crate::webhooks::DeliveryStatus::Delivered => {
                DeliveryResult::Delivered
            }
            Next::Done => DeliveryResult::Failed,
        };
        self.end_with(etcd, &call.id, None, Step::Nothing, now_ms);
        (self.resume_ending(etcd, &call.id, now_ms), Some(result))
    }
}

/// When to renew a lease of `ttl` seconds: at a third of it.
fn renew_after_ms(ttl: i64) -> u64 {
    u64::try_from(ttl).unwrap_or(0).saturating_mul(1000) / 3
}
