//! Webhooks (SPEC §5): endpoint configuration, Standard Webhooks signatures, the Bifrost envelope
//! and the retry schedule.

pub mod config;
pub mod delivery;
pub mod envelope;
pub mod sign;
