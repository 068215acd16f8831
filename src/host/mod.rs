//! The thin layer over Envoy: the `Host` implementation over proxy-wasm, and
//! the contexts that turn Envoy's callbacks into core calls.

pub mod envoy;
pub mod http;
pub mod metrics;
pub mod root;
