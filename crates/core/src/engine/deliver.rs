//! Webhook deliveries, run by the engine like provider calls. When a job
//! ends, `on_job_end` makes its delivery and body, once, in the record that
//! ends the job; the store offers the job again whenever an attempt is due,
//! and `answered` records how the attempt went.

use super::attempt::{envoy_reply, EnvoyReply};
use crate::config::Config;
use crate::job::{push_result, Completion, JobRecord, JobStatus, WebhookJob};
use crate::platform::Callout;
use crate::time::rfc3339;
use crate::webhooks::{
    envelope, expired_envelope, sign, webhook_id, AttemptOutcome, Delivery, DeliveryStatus, Event,
    JobEnd, Next, WebhookEndpoint,
};

/// One delivery attempt ready to go out.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookCall {
    pub id: String,
    pub endpoint: String,
    pub webhook_id: String,
    pub callout: Callout,
}

/// How a delivery attempt went, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryResult {
    Delivered,
    Retrying,
    Failed,
}

impl DeliveryResult {
    pub fn name(self) -> &'static str {
        match self {
            DeliveryResult::Delivered => "delivered",
            DeliveryResult::Retrying => "retried",
            DeliveryResult::Failed => "failed",
        }
    }
}

/// The webhook id of a job's event: made from the job id, so that whichever
/// worker or replica ends the job, the id is the same.
fn id_for(job_id: &str) -> String {
    let digest = crate::config::sha256_of(format!("webhook:{job_id}").as_bytes());
    let mut random = [0u8; 16];
    random
        .iter_mut()
        .zip(digest.iter())
        .for_each(|(o, d)| *o = *d);
    webhook_id(random)
}

/// Called as the job ends: makes its delivery and body, or forgets the
/// webhook when the endpoint does not want this event.
pub fn on_job_end(
    config: &Config,
    record: &mut JobRecord,
    completion: Option<&Completion>,
    now_ms: u64,
) {
    let Some(webhook) = &record.webhook else {
        return;
    };
    let Some(event) = ending_event(record.status) else {
        return;
    };
    let Some(endpoint) = config
        .webhooks
        .get(&webhook.endpoint)
        .filter(|e| e.wants(event))
    else {
        record.webhook = None;
        return;
    };
    let created_at = rfc3339(now_ms);
    let body = body_for(endpoint, record, completion, event, &created_at, now_ms);
    let delivery = Delivery::new(
        &endpoint.name,
        id_for(&record.id),
        event,
        created_at,
        now_ms,
    );
    if let Some(w) = record.webhook.as_mut() {
        w.delivery = Some(delivery);
        w.body = Some(String::from_utf8_lossy(&body).into_owned());
    }
}

/// The event a job that ended with `status` calls webhooks for; `None`
/// while it has not ended.
fn ending_event(status: JobStatus) -> Option<Event> {
    match status {
        JobStatus::Completed => Some(Event::Completed),
        JobStatus::Failed => Some(Event::Failed),
        JobStatus::Pending | JobStatus::Processing => None,
    }
}

/// The delivery's body, made at `created_at`: the job's end, with its
/// result or error only if the endpoint asks for them.
fn body_for(
    endpoint: &WebhookEndpoint,
    record: &JobRecord,
    completion: Option<&Completion>,
    event: Event,
    created_at: &str,
    now_ms: u64,
) -> Vec<u8> {
    let result = included_result(endpoint, record, completion);
    let error = record
        .error
        .as_ref()
        .filter(|_| endpoint.include_response)
        .map(|e| e.to_json());
    let job_end = JobEnd {
        job_id: &record.id,
        status_code: record.status_code.unwrap_or(0),
        created_at: &rfc3339(record.created_at_ms),
        completed_at: &rfc3339(record.completed_at_ms.unwrap_or(now_ms)),
        result_expires_at: &rfc3339(record.expires_at_ms().unwrap_or(now_ms)),
        result: result.as_deref(),
        error: error.as_deref(),
    };
    envelope(
        event,
        created_at,
        &job_end,
        endpoint.include_response,
        endpoint.max_response_payload_bytes(),
    )
}

/// The job's result as JSON, if the endpoint asks for it and the job has one.
fn included_result(
    endpoint: &WebhookEndpoint,
    record: &JobRecord,
    completion: Option<&Completion>,
) -> Option<Vec<u8>> {
    match (endpoint.include_response, &record.result, completion) {
        (true, Some(meta), Some(c)) => {
            let mut out = Vec::new();
            push_result(&mut out, meta, c);
            Some(out)
        }
        _ => None,
    }
}

/// The attempt's call: the body made when the job ended (the expired form
/// once the job has expired), signed now with every secret.
pub fn call_for(
    endpoint: &WebhookEndpoint,
    id: &str,
    webhook: &WebhookJob,
    delivery: &Delivery,
    expired: bool,
    now_ms: u64,
) -> WebhookCall {
    let body = if expired {
        expired_envelope(delivery.event, &delivery.created_at, id)
    } else {
        webhook.body.clone().unwrap_or_default().into_bytes()
    };
    let timestamp = now_ms / 1000;
    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), endpoint.path.clone()),
        (":authority".to_string(), endpoint.authority.clone()),
        ("content-type".to_string(), "application/json".to_string()),
        ("webhook-id".to_string(), delivery.webhook_id.clone()),
        ("webhook-timestamp".to_string(), timestamp.to_string()),
        (
            "webhook-signature".to_string(),
            sign(&endpoint.secrets, &delivery.webhook_id, timestamp, &body),
        ),
    ];
    headers.extend(endpoint.headers.iter().cloned());
    WebhookCall {
        id: id.to_string(),
        endpoint: endpoint.name.clone(),
        webhook_id: delivery.webhook_id.clone(),
        callout: Callout {
            cluster: endpoint.cluster.clone(),
            headers,
            body,
            timeout_ms: endpoint.attempt_timeout_seconds.saturating_mul(1000).max(1),
        },
    }
}

/// The delivery attempt due for `record`, if its endpoint is still configured;
/// a delivery whose endpoint left the configuration is given up.
pub fn begin(config: &Config, record: &mut JobRecord, now_ms: u64) -> Option<WebhookCall> {
    let expired = record.is_expired(now_ms);
    let id = record.id.clone();
    let webhook = record.webhook.as_mut()?;
    let endpoint = config.webhooks.get(&webhook.endpoint);
    let delivery = webhook.delivery.as_mut()?;
    let Some(endpoint) = endpoint else {
        delivery.status = DeliveryStatus::Failed;
        return None;
    };
    let delivery = delivery.clone();
    Some(call_for(endpoint, &id, webhook, &delivery, expired, now_ms))
}

/// Records how an attempt went on the record.
pub fn answered(
    config: &Config,
    record: &mut JobRecord,
    call: &WebhookCall,
    outcome: AttemptOutcome,
    jitter_ms: u64,
    now_ms: u64,
) -> Option<DeliveryResult> {
    let endpoint = config.webhooks.get(&call.endpoint)?;
    let delivery = record.webhook.as_mut()?.delivery.as_mut()?;
    if delivery.webhook_id != call.webhook_id {
        return None;
    }
    Some(
        match delivery.on_result(outcome, now_ms, endpoint, jitter_ms) {
            Next::RetryAt(_) => DeliveryResult::Retrying,
            Next::Done if delivery.status == DeliveryStatus::Delivered => DeliveryResult::Delivered,
            Next::Done => DeliveryResult::Failed,
        },
    )
}

/// Turns a callout's end into the delivery's outcome.
pub fn outcome(
    status: Option<u16>,
    body: &[u8],
    elapsed_ms: u64,
    timeout_ms: u64,
) -> AttemptOutcome {
    match status {
        None if elapsed_ms.saturating_add(50) >= timeout_ms => AttemptOutcome::Timeout,
        None => AttemptOutcome::Unreachable,
        Some(code) => match envoy_reply(code, body) {
            Some(EnvoyReply::Unreachable(_)) => AttemptOutcome::Unreachable,
            Some(EnvoyReply::Timeout) => AttemptOutcome::Timeout,
            None => AttemptOutcome::Status(code),
        },
    }
}
