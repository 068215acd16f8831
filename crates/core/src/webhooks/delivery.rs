//! One event's delivery to one endpoint: at least once, retried with exponential
//! backoff. Pure state, kept in the job store with the job (and past its expiry until the
//! delivery ends), so a VM reload or a replica loss does not lose it.
//!
//! The host runs it like this: [`Delivery::new`] when the job ends; whenever
//! [`Delivery::due`], [`Delivery::begin_attempt`] (store it), send, then
//! [`Delivery::on_result`] (store it) until it answers [`Next::Done`].

use serde::{Deserialize, Serialize};

use super::config::{Event, WebhookEndpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The endpoint answered with this HTTP status.
    Status(u16),
    /// No answer within `attempt_timeout_seconds`.
    Timeout,
    /// The endpoint could not be reached (connection refused or reset, no healthy host, …).
    Unreachable,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The delivery has ended (see [`Delivery::status`]): delivered, or given up.
    Done,
    /// Try again at this time (ms since the epoch).
    RetryAt(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The endpoint's name in the configuration.
    pub endpoint: String,
    /// `webhook-id`: the same on every attempt of this event.
    pub webhook_id: String,
    /// The event sent, kept for the body sent after the job expired.
    pub event: Event,
    /// The envelope's `created_at` (RFC 3339), kept for the body sent after the job expired.
    pub created_at: String,
    /// Attempts finished so far (an attempt under way is not counted yet).
    pub attempts: u32,
    pub status: DeliveryStatus,
    /// The HTTP status of the last attempt; `None` before the first or when the last timed
    /// out or found the endpoint unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status_code: Option<u16>,
    /// When the next attempt is due (ms since the epoch); while an attempt is under way, when
    /// it is given up for lost (see [`Delivery::begin_attempt`]).
    pub next_attempt_at_ms: u64,
}

/// `webhook-id` from 16 random bytes: `msg_` and 32 lowercase hex digits.
pub fn webhook_id(random: [u8; 16]) -> String {
    format!("msg_{}", hex::encode(random))
}

/// The wait before the retry that follows `failed_attempts` failed attempts (1 or more):
/// `retry_backoff_initial_seconds` × 2^(failed_attempts − 1), at most
/// `retry_backoff_max_seconds`, in ms.
pub fn retry_wait_ms(endpoint: &WebhookEndpoint, failed_attempts: u32) -> u64 {
    let doublings = failed_attempts.saturating_sub(1);
    let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
    endpoint
        .retry_backoff_initial_seconds
        .saturating_mul(factor)
        .min(endpoint.retry_backoff_max_seconds)
        .saturating_mul(1000)
}

/// Time allowed past an attempt's timeout before it is taken for lost (VM reload, replica loss).
pub const ATTEMPT_LEASE_GRACE_MS: u64 = 5_000;

impl Delivery {
    /// A delivery about to be made for the first time, due at `now_ms`.
    pub fn new(
        endpoint: &str,
        webhook_id: String,
        event: Event,
        created_at: String,
        now_ms: u64,
    ) -> Delivery {
        Delivery {
            endpoint: endpoint.to_string(),
            webhook_id,
            event,
            created_at,
            attempts: 0,
            status: DeliveryStatus::Pending,
            last_status_code: None,
            next_attempt_at_ms: now_ms,
        }
    }

    /// Whether an attempt should be made now.
    pub fn due(&self, now_ms: u64) -> bool {
        self.status == DeliveryStatus::Pending && now_ms >= self.next_attempt_at_ms
    }

    /// Records that an attempt starts at `now_ms` (store this before sending):
    /// `next_attempt_at_ms` moves past its timeout plus [`ATTEMPT_LEASE_GRACE_MS`], so that no
    /// other worker sends it meanwhile, and so that an attempt whose outcome is lost (VM
    /// reload, replica loss) is made again after that. Returns that time. The attempt is
    /// counted by [`Delivery::on_result`], so a lost one is not counted.
    pub fn begin_attempt(&mut self, now_ms: u64, endpoint: &WebhookEndpoint) -> u64 {
        self.next_attempt_at_ms = now_ms
            .saturating_add(endpoint.attempt_timeout_seconds.saturating_mul(1000))
            .saturating_add(ATTEMPT_LEASE_GRACE_MS);
        self.next_attempt_at_ms
    }

    /// Records how an attempt ended, at `now_ms`, and counts it. A 2xx delivers; a 410 gives up at once; anything else is retried after
    /// [`retry_wait_ms`] counted from `now_ms`, plus `jitter_ms` (never shortened), until
    /// `max_retries` retries have failed (at most 1 + `max_retries` attempts).
    ///
    /// A result for a delivery that has already ended changes nothing and answers
    /// [`Next::Done`].
    pub fn on_result(
        &mut self,
        outcome: AttemptOutcome,
        now_ms: u64,
        endpoint: &WebhookEndpoint,
        jitter_ms: u64,
    ) -> Next {
        if self.status != DeliveryStatus::Pending {
            return Next::Done;
        }
        self.attempts = self.attempts.saturating_add(1);
        self.last_status_code = match outcome {
            AttemptOutcome::Status(code) => Some(code),
            AttemptOutcome::Timeout | AttemptOutcome::Unreachable => None,
        };
        match outcome {
            AttemptOutcome::Status(200..=299) => {
                self.status = DeliveryStatus::Delivered;
                return Next::Done;
            }
            AttemptOutcome::Status(410) => {
                self.status = DeliveryStatus::Failed;
                return Next::Done;
            }
            _ => {}
        }
        let retries_made = self.attempts.saturating_sub(1);
        if retries_made >= endpoint.max_retries {
            self.status = DeliveryStatus::Failed;
            return Next::Done;
        }
        let at = now_ms
            .saturating_add(retry_wait_ms(endpoint, self.attempts))
            .saturating_add(jitter_ms);
        self.next_attempt_at_ms = at;
        Next::RetryAt(at)
    }

    /// The job's `webhook` member as GET answers it:
    /// `{"endpoint":"billing","status":"pending","attempts":2,"last_status_code":503}`
    /// (`last_status_code` left out while there is none).
    pub fn view(&self) -> serde_json::Value {
        let mut v = serde_json::Map::new();
        v.insert("endpoint".into(), self.endpoint.clone().into());
        v.insert("status".into(), self.status.as_str().into());
        v.insert("attempts".into(), self.attempts.into());
        if let Some(code) = self.last_status_code {
            v.insert("last_status_code".into(), code.into());
        }
        serde_json::Value::Object(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::config::parse_webhooks;
    use serde_json::json;

    fn endpoint(extra: serde_json::Value) -> WebhookEndpoint {
        let mut e = json!({"cluster": "hooks", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"});
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        parse_webhooks(&json!({ "billing": e }), &|_| None)
            .unwrap()
            .remove("billing")
            .unwrap()
    }

    fn delivery() -> Delivery {
        Delivery::new(
            "billing",
            webhook_id([0xab; 16]),
            Event::Completed,
            "t".into(),
            1_000,
        )
    }

    #[test]
    fn ids_are_msg_and_hex() {
        assert_eq!(webhook_id([0xab; 16]), format!("msg_{}", "ab".repeat(16)));
        assert_ne!(webhook_id([1; 16]), webhook_id([2; 16]));
    }

    #[test]
    fn first_answer_2xx_delivers() {
        let cfg = endpoint(json!({}));
        let mut d = delivery();
        assert!(d.due(1_000) && !d.due(999));
        d.begin_attempt(1_000, &cfg);
        assert!(!d.due(1_000));
        assert_eq!(
            d.on_result(AttemptOutcome::Status(204), 1_500, &cfg, 0),
            Next::Done
        );
        assert_eq!(d.status, DeliveryStatus::Delivered);
        assert!(!d.due(u64::MAX));
        assert_eq!(
            d.view(),
            json!({"endpoint": "billing", "status": "delivered", "attempts": 1, "last_status_code": 204})
        );
        // A late result changes nothing.
        assert_eq!(
            d.on_result(AttemptOutcome::Status(500), 2_000, &cfg, 0),
            Next::Done
        );
        assert_eq!(d.status, DeliveryStatus::Delivered);
    }

    #[test]
    fn gone_stops_at_once() {
        let cfg = endpoint(json!({}));
        let mut d = delivery();
        d.begin_attempt(1_000, &cfg);
        assert_eq!(
            d.on_result(AttemptOutcome::Status(410), 1_100, &cfg, 0),
            Next::Done
        );
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert_eq!(d.view()["last_status_code"], 410);
    }

    #[test]
    fn backoff_doubles_from_the_end_of_the_attempt_up_to_the_max_then_gives_up() {
        let cfg = endpoint(
            json!({"max_retries": 5, "retry_backoff_initial_seconds": 30, "retry_backoff_max_seconds": 100}),
        );
        let mut d = delivery();
        let mut now = 1_000;
        let mut waits = Vec::new();
        for outcome in [
            AttemptOutcome::Status(503),
            AttemptOutcome::Timeout,
            AttemptOutcome::Unreachable,
            AttemptOutcome::Status(302),
            AttemptOutcome::Status(400),
        ] {
            assert!(d.due(now));
            d.begin_attempt(now, &cfg);
            let end = now + 700;
            match d.on_result(outcome, end, &cfg, 0) {
                Next::RetryAt(at) => {
                    waits.push(at - end);
                    now = at;
                }
                Next::Done => panic!("gave up early"),
            }
        }
        assert_eq!(waits, vec![30_000, 60_000, 100_000, 100_000, 100_000]);
        assert_eq!(
            d.view(),
            json!({"endpoint": "billing", "status": "pending", "attempts": 5, "last_status_code": 400})
        );
        d.begin_attempt(now, &cfg);
        assert_eq!(
            d.on_result(AttemptOutcome::Status(500), now + 1, &cfg, 0),
            Next::Done
        );
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert_eq!(d.attempts, 6);
    }

    #[test]
    fn jitter_lengthens_the_wait() {
        let cfg = endpoint(json!({}));
        let mut d = delivery();
        d.begin_attempt(1_000, &cfg);
        assert_eq!(
            d.on_result(AttemptOutcome::Timeout, 11_000, &cfg, 1_234),
            Next::RetryAt(11_000 + 30_000 + 1_234)
        );
        assert_eq!(d.next_attempt_at_ms, 42_234);
        assert_eq!(d.last_status_code, None);
        assert_eq!(
            d.view(),
            json!({"endpoint": "billing", "status": "pending", "attempts": 1})
        );
    }

    #[test]
    fn no_retries_means_one_attempt() {
        let cfg = endpoint(json!({"max_retries": 0}));
        let mut d = delivery();
        assert_eq!(
            d.on_result(AttemptOutcome::Status(500), 1_000, &cfg, 0),
            Next::Done
        );
        assert_eq!(d.attempts, 1);
        assert_eq!(d.status, DeliveryStatus::Failed);
    }

    #[test]
    fn defaults_give_five_attempts() {
        let cfg = endpoint(json!({}));
        let mut d = delivery();
        let mut n = 0;
        let mut now = 0;
        loop {
            d.begin_attempt(now, &cfg);
            n += 1;
            match d.on_result(AttemptOutcome::Status(503), now, &cfg, 0) {
                Next::RetryAt(at) => now = at,
                Next::Done => break,
            }
        }
        assert_eq!(n, 5);
        assert_eq!(now, (30 + 60 + 120 + 240) * 1000);
    }

    #[test]
    fn a_lost_attempt_is_retried_after_its_lease() {
        let cfg = endpoint(json!({"attempt_timeout_seconds": 10}));
        let mut d = delivery();
        assert_eq!(
            d.begin_attempt(1_000, &cfg),
            1_000 + 10_000 + ATTEMPT_LEASE_GRACE_MS
        );
        assert!(!d.due(15_999));
        assert!(d.due(16_000));
        assert_eq!(d.attempts, 0);
    }

    #[test]
    fn huge_numbers_saturate() {
        let cfg = endpoint(
            json!({"max_retries": 20, "retry_backoff_initial_seconds": 86400, "retry_backoff_max_seconds": 86400}),
        );
        assert_eq!(retry_wait_ms(&cfg, u32::MAX), 86_400_000);
        assert_eq!(retry_wait_ms(&cfg, 0), 86_400_000);
        let mut d = delivery();
        d.begin_attempt(u64::MAX, &cfg);
        assert_eq!(
            d.on_result(AttemptOutcome::Timeout, u64::MAX, &cfg, u64::MAX),
            Next::RetryAt(u64::MAX)
        );
    }

    #[test]
    fn round_trips_through_the_store() {
        let cfg = endpoint(json!({}));
        let mut d = delivery();
        d.begin_attempt(1_000, &cfg);
        d.on_result(AttemptOutcome::Status(503), 2_000, &cfg, 0);
        let stored = serde_json::to_string(&d).unwrap();
        assert!(stored.contains(r#""status":"pending""#), "{stored}");
        assert!(
            stored.contains(r#""event":"async_job.completed""#),
            "{stored}"
        );
        let back: Delivery = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, d);
        let fresh = delivery();
        let back: Delivery = serde_json::from_str(&serde_json::to_string(&fresh).unwrap()).unwrap();
        assert_eq!(back, fresh);
    }
}
