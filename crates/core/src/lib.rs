//! Bifrost's async text-to-speech API as an Envoy proxy-wasm filter.
//!
//! Everything but `host` is pure and unit-tested natively; `host` moves bytes
//! between Envoy and that core.

pub mod api;
pub mod audio;
pub mod auth;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod ids;
pub mod job;
pub mod log_escape;
pub mod platform;
pub mod providers;
pub mod redact;
pub mod request;
#[cfg(not(target_arch = "wasm32"))]
pub mod sim;
pub mod speech;
pub mod store;
pub mod time;
pub mod webhooks;
