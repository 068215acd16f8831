//! Everything the async speech filter decides, free of proxy-wasm: the API
//! (`api`), the one job engine (`engine`), the stores it runs on (`store`:
//! Envoy shared data or etcd), providers, audio joining and webhooks. The
//! filter crate implements `platform::Host` over proxy-wasm and turns Envoy's
//! callbacks into calls of this crate; everything here is tested natively,
//! the engine and both stores on a simulated host (`sim`) with an in-memory
//! etcd.

pub mod api;
pub(crate) mod audio;
pub(crate) mod bytes;
/// The WAV reader and writer, for tools/local-tts.
pub use audio::wav;
pub mod auth;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod governance;
pub mod ids;
pub(crate) mod job;
pub mod log_escape;
pub mod platform;
pub(crate) mod providers;
pub(crate) mod redact;
pub(crate) mod request;
#[cfg(test)]
pub(crate) mod sim;
pub(crate) mod speech;
pub mod store;
pub(crate) mod time;
pub(crate) mod webhooks;
