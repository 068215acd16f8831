//! Long input (SPEC §6): splitting text into chunks and joining audio parts into one file.
//!
//! Everything here is pure (no proxy-wasm calls): bytes in, `Result` out, never a panic on
//! malformed input.

pub mod split;

pub use split::split_text;
