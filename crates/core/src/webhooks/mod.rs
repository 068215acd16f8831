//! Webhooks: endpoint configuration, Standard Webhooks signatures, the Bifrost envelope
//! and the retry schedule.
//!
//! All of it is pure (no host calls): [`config`] validates the `webhooks` object and picks the
//! endpoint a submit names; [`envelope`] builds the body once, when the job ends; [`sign`] makes
//! the `webhook-signature` of each attempt; [`delivery`] is the per-event state kept in the
//! store, deciding when to retry and when to give up.

pub mod config;
pub mod delivery;
pub mod envelope;
pub mod sign;

pub use config::{
    check_virtual_keys, endpoint_for_submit, parse_webhooks, Event, WebhookEndpoint, WEBHOOK_HEADER,
};
pub use delivery::{webhook_id, AttemptOutcome, Delivery, DeliveryStatus, Next};
pub use envelope::{envelope, expired_envelope, JobEnd};
pub use sign::sign;
