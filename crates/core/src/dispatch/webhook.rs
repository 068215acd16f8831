//! Webhook deliveries (SPEC §5), run like provider calls: from the root
//! context, on the timer wheel, with their state in the job's record.
//!
//! When a job ends, `on_job_end` makes the delivery and its body, once, in the
//! same write that ends the job. A timer brings the job back when an attempt
//! is due; `begin` stores that the attempt is under way (so no other worker
//! sends it, and a lost one is made again), and `answered` records how it went.
//! A job that expires while its delivery is still pending keeps its slot,
//! without its audio, until the delivery ends.

use crate::config::Config;
use crate::job::{push_result, Completion, JobRecord, JobStatus, WebhookJob};
use crate::platform::Callout;
use crate::store::{Loaded, Store, Updated};
use crate::time::rfc3339;
use crate::webhooks::{
    envelope, expired_envelope, sign, webhook_id, AttemptOutcome, Delivery, Event, JobEnd, Next,
    WebhookEndpoint,
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

/// Called inside the write that ends the job: makes its delivery and body,
/// or forgets the webhook when the endpoint does not want this event.
pub fn on_job_end(
    config: &Config,
    record: &mut JobRecord,
    completion: Option<&Completion>,
    random: [u8; 16],
    now_ms: u64,
) {
    let Some(webhook) = &record.webhook else {
        return;
    };
    let event = match record.status {
        JobStatus::Completed => Event::Completed,
        JobStatus::Failed => Event::Failed,
        JobStatus::Pending | JobStatus::Processing => return,
    };
    let Some(endpoint) = config
        .webhooks
        .get(&webhook.endpoint)
        .filter(|e| e.wants(event))
    else {
        record.webhook = None;
        return;
    };
    let result = match (endpoint.include_response, &record.result, completion) {
        (true, Some(meta), Some(c)) => {
            let mut out = Vec::new();
            push_result(&mut out, meta, c);
            Some(out)
        }
        _ => None,
    };
    let error = record
        .error
        .as_ref()
        .filter(|_| endpoint.include_response)
        .map(|e| e.to_json());
    let created_at = rfc3339(now_ms);
    let job_end = JobEnd {
        job_id: &record.id,
        status_code: record.status_code.unwrap_or(0),
        created_at: &rfc3339(record.created_at_ms),
        completed_at: &rfc3339(record.completed_at_ms.unwrap_or(now_ms)),
        result_expires_at: &rfc3339(record.expires_at_ms().unwrap_or(now_ms)),
        result: result.as_deref(),
        error: error.as_deref(),
    };
    let body = envelope(
        event,
        &created_at,
        &job_end,
        endpoint.include_response,
        endpoint.max_response_payload_bytes(),
    );
    let delivery = Delivery::new(
        &endpoint.name,
        webhook_id(random),
        event,
        created_at,
        now_ms,
    );
    if let Some(w) = record.webhook.as_mut() {
        w.delivery = Some(delivery);
        w.body = Some(String::from_utf8_lossy(&body).into_owned());
    }
}

/// A delivery is due for the job in `loaded`: marks the attempt as under way
/// and builds it (the expired form once the job has expired).
pub fn begin(store: &Store, config: &Config, loaded: &Loaded, now_ms: u64) -> Option<WebhookCall> {
    let view = loaded.view()?;
    let id = String::from_utf8_lossy(view.id).into_owned();
    let expired = view.is_expired(now_ms);
    let endpoint_name = view.record()?.webhook?.endpoint;
    let Some(endpoint) = config.webhooks.get(&endpoint_name) else {
        // The endpoint left the configuration: give the delivery up.
        let _ = store.update(&id, None, &mut |r| {
            match r.webhook.as_mut().and_then(|w| w.delivery.as_mut()) {
                Some(d) => d.status = crate::webhooks::DeliveryStatus::Failed,
                None => return false,
            }
            true
        });
        return None;
    };
    let updated = store.update(&id, None, &mut |r| {
        let Some(d) = r.webhook.as_mut().and_then(|w| w.delivery.as_mut()) else {
            return false;
        };
        if !d.due(now_ms) {
            return false;
        }
        d.begin_attempt(now_ms, endpoint);
        if expired {
            r.result_dropped = true;
        }
        true
    });
    let Ok(Updated::Written(record, epoch)) = updated else {
        return None;
    };
    let webhook = record.webhook.as_ref()?;
    let delivery = webhook.delivery.as_ref()?;
    if let Some(slot) = crate::ids::slot_of(&id) {
        store.schedule(slot, epoch, record.next_timer_ms(), now_ms);
    }
    Some(call_for(endpoint, &id, webhook, delivery, expired, now_ms))
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

/// Records how an attempt went; frees the job once an expired job's delivery ends.
pub fn answered(
    store: &Store,
    config: &Config,
    call: &WebhookCall,
    outcome: AttemptOutcome,
    jitter_ms: u64,
    now_ms: u64,
) -> Option<DeliveryResult> {
    let endpoint = config.webhooks.get(&call.endpoint)?;
    let mut next = Next::Done;
    let updated = store.update(&call.id, None, &mut |r| {
        let Some(d) = r.webhook.as_mut().and_then(|w| w.delivery.as_mut()) else {
            return false;
        };
        if d.webhook_id != call.webhook_id {
            return false;
        }
        next = d.on_result(outcome, now_ms, endpoint, jitter_ms);
        true
    });
    let Ok(Updated::Written(record, epoch)) = updated else {
        return None;
    };
    let slot = crate::ids::slot_of(&call.id)?;
    store.schedule(slot, epoch, record.next_timer_ms(), now_ms);
    let status = record
        .webhook
        .as_ref()
        .and_then(|w| w.delivery.as_ref())
        .map(|d| d.status);
    Some(match (next, status) {
        (Next::RetryAt(_), _) => DeliveryResult::Retrying,
        (Next::Done, Some(crate::webhooks::DeliveryStatus::Delivered)) => DeliveryResult::Delivered,
        (Next::Done, _) => DeliveryResult::Failed,
    })
}

/// Turns a callout's end into the delivery's outcome.
pub fn outcome(
    status: Option<u16>,
    body: &[u8],
    elapsed_ms: u64,
    timeout_ms: u64,
) -> AttemptOutcome {
    let text = String::from_utf8_lossy(body.get(..64).unwrap_or(body));
    match status {
        None if elapsed_ms.saturating_add(50) >= timeout_ms => AttemptOutcome::Timeout,
        None => AttemptOutcome::Unreachable,
        Some(503)
            if text.starts_with("upstream connect error")
                || text.starts_with("no healthy upstream") =>
        {
            AttemptOutcome::Unreachable
        }
        Some(504) if text.starts_with("upstream request timeout") => AttemptOutcome::Timeout,
        Some(code) => AttemptOutcome::Status(code),
    }
}
