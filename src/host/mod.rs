//! The thin layer over Envoy: proxy-wasm contexts and host calls.

pub mod http;
pub mod metrics;
pub mod root;
pub mod shared;

use std::time::UNIX_EPOCH;

/// Milliseconds since the epoch by the host's clock.
pub fn now_ms() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// The name of the queue that carries submitted job ids to the workers.
pub const QUEUE_NAME: &str = "async-speech/jobs";
