//! The root's work between Envoy's callbacks: taking queued jobs, sending
//! calls, following each job's next step, timers, webhook deliveries, and the
//! etcd runner's actions.

use log::{info, warn};

use super::{CalloutAnswer, InFlight, Root, Shared, AUDIT_PER_TICK, TIMERS_PER_TICK};
use async_speech_core::dispatch::etcd::Action as EtcdAction;
use async_speech_core::dispatch::{
    self, Attempt, AttemptResult, DeliveryResult, FailReason, Outcome, Step, WebhookCall,
};
use async_speech_core::error::ApiError;
use async_speech_core::log_escape::escape_for_log as escape;
use async_speech_core::platform::{Host, Queue};
use async_speech_core::providers::UpstreamResponse;
use async_speech_core::store::etcd::StoreConfig;
use async_speech_core::webhooks::AttemptOutcome;

impl Root {
    /// Takes queued jobs while there is room for more callouts.
    pub(super) fn drain(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        while self.in_flight.len() < shared.config.max_in_flight {
            let id = match shared.host.dequeue(Queue::Jobs) {
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                Ok(None) => break,
                Err(e) => {
                    warn!("cannot read the job queue: {e}");
                    break;
                }
            };
            let now = shared.clock.now_ms(shared.host.as_ref());
            let step = dispatch::start(&Self::store(&shared), &shared.config, &id, now);
            if step != Step::Nothing {
                self.metrics.pending(-1);
            }
            self.follow(&shared, step);
        }
    }

    /// Sends the next attempt, or logs and counts how the job ended.
    pub(super) fn follow(&mut self, shared: &Shared, step: Step) {
        let mut pending = vec![step];
        // Each round sends a call or fails an attempt, so the chains bound it.
        for _ in 0..256 {
            let Some(step) = pending.pop() else { return };
            match step {
                Step::Send(attempt) => {
                    if let Some(next) = self.send(shared, *attempt) {
                        pending.push(next);
                    }
                }
                Step::SendAll(attempts) => {
                    for attempt in attempts {
                        if let Some(next) = self.send(shared, attempt) {
                            // One part could not go: the attempt has failed; the rest are stale.
                            pending.push(next);
                            break;
                        }
                    }
                }
                Step::Deliver(call) => self.deliver(shared, *call),
                other => self.report(shared, other),
            }
        }
    }

    /// Sends one provider call; if Envoy refuses it, what comes of the failed attempt.
    pub(super) fn send(&mut self, shared: &Shared, attempt: Attempt) -> Option<Step> {
        let now = shared.clock.now_ms(shared.host.as_ref());
        match shared.host.dispatch(&attempt.callout) {
            Ok(token) => {
                let part = attempt
                    .part
                    .map(|p| format!(" part {p}"))
                    .unwrap_or_default();
                info!(
                    "job {} attempt {}{part} sent to provider {} (model {})",
                    attempt.id,
                    attempt.attempt,
                    attempt.provider,
                    escape(&attempt.model)
                );
                self.in_flight
                    .insert(token, (InFlight::Speech(attempt), now));
                self.metrics.in_flight(1);
                None
            }
            Err(e) => {
                warn!(
                    "job {} provider {}: cannot call cluster {}: {e}",
                    attempt.id, attempt.provider, attempt.callout.cluster
                );
                self.metrics
                    .attempt(&attempt.provider, AttemptResult::Unreachable, 0);
                let error = ApiError::upstream(
                    502,
                    format!(
                        "provider {} is unreachable: Envoy cannot call cluster {}",
                        attempt.provider, attempt.callout.cluster
                    ),
                );
                Some(dispatch::attempt_failed(
                    &Self::store(shared),
                    &shared.config,
                    &attempt,
                    error,
                    now,
                ))
            }
        }
    }

    pub(super) fn report(&self, shared: &Shared, step: Step) {
        match step {
            Step::Completed { id } => {
                info!("job {id} completed");
                self.metrics.completed();
            }
            Step::Failed { id, status, reason } => {
                match reason {
                    FailReason::Deadline => warn!(
                        "job {id} failed: past its deadline of {} s",
                        shared.config.job_deadline_s
                    ),
                    _ => warn!("job {id} failed with status {status} ({})", reason.name()),
                }
                self.metrics.failed(reason);
            }
            Step::Requeued { id } => {
                self.metrics.pending(1);
                warn!("job {id}: queued again (its answer never arrived, or its queue entry was lost)");
            }
            Step::Expired { id } => {
                info!("job {id} expired and was freed");
                self.metrics.expired();
                self.metrics.held(-1);
            }
            Step::Send(_) | Step::SendAll(_) | Step::Deliver(_) | Step::Nothing => {}
        }
    }

    /// Timers that are due, then a few slots of the audit walk.
    pub(super) fn run_timers(&mut self, shared: &Shared) {
        let store = Self::store(shared);
        let now = shared.clock.now_ms(shared.host.as_ref());
        let mut timers = store.due_timers(now, TIMERS_PER_TICK);
        timers.extend(store.audit_step(AUDIT_PER_TICK));
        for timer in timers {
            let step = dispatch::on_timer(shared.host.as_ref(), &store, &shared.config, timer, now);
            self.follow(shared, step);
        }
    }

    /// Carries out what the etcd runner asks for.
    pub(super) fn act(&mut self, shared: &Shared, actions: Vec<EtcdAction>) {
        let mut pending = actions;
        // Each round sends a call or records a failure; a job's chain bounds it.
        for _ in 0..1024 {
            let Some(action) = pending.pop() else { return };
            let now = shared.clock.now_ms(shared.host.as_ref());
            match action {
                EtcdAction::Store(tag, callout) => match shared.host.dispatch(&callout) {
                    Ok(token) => {
                        self.in_flight
                            .insert(token, (InFlight::Store(tag, callout.timeout_ms), now));
                        self.metrics.in_flight(1);
                    }
                    Err(e) => {
                        warn!("cannot call the job store ({}): {e}", tag.name());
                        self.metrics.store_call(tag.name(), false, 0);
                        if let (Some(runner), StoreConfig::Etcd(etcd)) =
                            (self.etcd.as_mut(), &shared.config.store)
                        {
                            pending.extend(runner.on_store_answer(
                                etcd,
                                &shared.config,
                                tag,
                                None,
                                now,
                            ));
                        }
                    }
                },
                EtcdAction::Send(attempt) => match shared.host.dispatch(&attempt.callout) {
                    Ok(token) => {
                        info!(
                            "job {} attempt {} sent to provider {}",
                            attempt.id, attempt.attempt, attempt.provider
                        );
                        self.in_flight
                            .insert(token, (InFlight::Speech(*attempt), now));
                        self.metrics.in_flight(1);
                    }
                    Err(e) => {
                        warn!(
                            "job {} provider {}: cannot call cluster {}: {e}",
                            attempt.id, attempt.provider, attempt.callout.cluster
                        );
                        if let (Some(runner), StoreConfig::Etcd(etcd)) =
                            (self.etcd.as_mut(), &shared.config.store)
                        {
                            let outcome = Outcome::NoAnswer { elapsed_ms: 0 };
                            pending.extend(runner.on_provider_answer(
                                etcd,
                                &shared.config,
                                &attempt,
                                outcome,
                                now,
                            ));
                        }
                    }
                },
                EtcdAction::Deliver(call) => self.deliver(shared, *call),
                EtcdAction::Report(step) => self.report(shared, step),
            }
        }
    }

    pub(super) fn deliver(&mut self, shared: &Shared, call: WebhookCall) {
        let now = shared.clock.now_ms(shared.host.as_ref());
        match shared.host.dispatch(&call.callout) {
            Ok(token) => {
                info!(
                    "job {} webhook {} sent to endpoint {}",
                    call.id, call.webhook_id, call.endpoint
                );
                self.in_flight.insert(token, (InFlight::Webhook(call), now));
                self.metrics.in_flight(1);
            }
            Err(e) => {
                warn!(
                    "job {} webhook to {}: cannot call cluster {}: {e}",
                    call.id, call.endpoint, call.callout.cluster
                );
                self.webhook_answered(shared, &call, AttemptOutcome::Unreachable, now);
            }
        }
    }

    pub(super) fn webhook_answered(
        &mut self,
        shared: &Shared,
        call: &WebhookCall,
        outcome: AttemptOutcome,
        now: u64,
    ) {
        // Jitter lengthens a retry's wait by up to a second, never shortens it.
        let mut random = [0u8; 2];
        let _ = shared.host.random(&mut random);
        let jitter = u64::from(u16::from_le_bytes(random)) % 1000;
        let result = match (self.etcd.as_mut(), &shared.config.store) {
            (Some(runner), StoreConfig::Etcd(etcd)) => {
                let (actions, result) =
                    runner.on_webhook_answer(etcd, &shared.config, call, outcome, jitter, now);
                self.act(shared, actions);
                result
            }
            _ => dispatch::webhook::answered(
                &Self::store(shared),
                &shared.config,
                call,
                outcome,
                jitter,
                now,
            ),
        };
        match result {
            Some(DeliveryResult::Delivered) => {
                info!(
                    "job {} webhook {} delivered to {}",
                    call.id, call.webhook_id, call.endpoint
                );
                self.metrics.webhook("delivered");
            }
            Some(DeliveryResult::Retrying) => {
                warn!(
                    "job {} webhook {} to {}: {outcome:?}; will retry",
                    call.id, call.webhook_id, call.endpoint
                );
                self.metrics.webhook("retried");
            }
            Some(DeliveryResult::Failed) => {
                warn!(
                    "job {} webhook {} to {}: {outcome:?}; given up",
                    call.id, call.webhook_id, call.endpoint
                );
                self.metrics.webhook("failed");
            }
            None => {}
        }
    }

    /// Envoy ends every callout by its timeout; should an answer still never
    /// come, the lease timer has ended that attempt and its room is freed here.
    pub(super) fn forget_overdue_callouts(&mut self, shared: &Shared, now: u64) {
        let overdue: Vec<u32> = self
            .in_flight
            .iter()
            .filter(|(_, (call, started))| {
                now.saturating_sub(*started)
                    > call.timeout_ms().saturating_add(dispatch::LEASE_GRACE_MS)
            })
            .map(|(token, _)| *token)
            .collect();
        for token in overdue {
            let Some((call, _)) = self.in_flight.remove(&token) else {
                continue;
            };
            self.metrics.in_flight(-1);
            // The etcd runner must hear of it, or a job could wait on this call for ever
            // (a provider call that never ends is bounded by the job's deadline instead).
            let (Some(runner), StoreConfig::Etcd(etcd)) =
                (self.etcd.as_mut(), &shared.config.store)
            else {
                continue;
            };
            let actions = match call {
                InFlight::Store(tag, _) => {
                    runner.on_store_answer(etcd, &shared.config, tag, None, now)
                }
                InFlight::Webhook(call) => {
                    runner
                        .on_webhook_answer(
                            etcd,
                            &shared.config,
                            &call,
                            AttemptOutcome::Timeout,
                            0,
                            now,
                        )
                        .0
                }
                InFlight::Speech(_) => Vec::new(),
            };
            self.act(shared, actions);
        }
    }

    /// A callout came back: to the webhook, the etcd runner or the job it was for.
    pub(super) fn answered(
        &mut self,
        shared: &Shared,
        call: InFlight,
        answer: CalloutAnswer,
        started: u64,
    ) {
        let now = shared.clock.now_ms(shared.host.as_ref());
        let CalloutAnswer {
            status,
            headers,
            body,
            body_size,
            too_large,
        } = answer;
        let attempt = match call {
            InFlight::Speech(attempt) => attempt,
            InFlight::Webhook(call) => {
                let outcome = dispatch::webhook::outcome(
                    status,
                    &body,
                    now.saturating_sub(started),
                    call.callout.timeout_ms,
                );
                self.webhook_answered(shared, &call, outcome, now);
                return self.drain();
            }
            InFlight::Store(tag, _) => {
                let ok = status.is_some_and(|s| (200..300).contains(&s));
                self.metrics
                    .store_call(tag.name(), ok, now.saturating_sub(started));
                let answer = status.map(|s| (s, body));
                if let (Some(runner), StoreConfig::Etcd(etcd)) =
                    (self.etcd.as_mut(), &shared.config.store)
                {
                    let actions = runner.on_store_answer(etcd, &shared.config, tag, answer, now);
                    self.act(shared, actions);
                }
                return;
            }
        };
        let outcome = match status {
            Some(_) if too_large => Outcome::TooLarge { bytes: body_size },
            Some(status) => Outcome::Answer(UpstreamResponse {
                status,
                headers: &headers,
                body: &body,
            }),
            None => Outcome::NoAnswer {
                elapsed_ms: now.saturating_sub(started),
            },
        };
        let latency = now.saturating_sub(started);
        let how = dispatch::attempt_result(&outcome, &attempt);
        match (how, status) {
            (AttemptResult::Success, _) => {}
            (AttemptResult::Error, Some(status)) => warn!(
                "job {} provider {} answered {status}",
                attempt.id, attempt.provider
            ),
            _ => warn!(
                "job {} provider {}: {} after {latency} ms",
                attempt.id,
                attempt.provider,
                how.name()
            ),
        }
        self.metrics.attempt(&attempt.provider, how, latency);
        if let (Some(runner), StoreConfig::Etcd(etcd)) = (self.etcd.as_mut(), &shared.config.store)
        {
            let actions = runner.on_provider_answer(etcd, &shared.config, &attempt, outcome, now);
            return self.act(shared, actions);
        }
        let step = dispatch::finish(
            &Self::store(shared),
            &shared.config,
            &attempt,
            outcome,
            started,
            now,
        );
        self.follow(shared, step);
        self.drain();
    }
}
