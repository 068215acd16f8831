//! The etcd store: jobs in an etcd (3.4 or later) cluster, reached through
//! its HTTP/JSON gateway with callouts to an Envoy cluster, so that every
//! replica pointing at the same etcd and prefix serves the same jobs.
//!
//! - `wire`: the gateway's JSON as types; `request` builds calls from them,
//!   `response` reads answers into them.
//! - `keys`: every key under the prefix, and what it holds.
//! - `jobs`: a job's value, and the transactions that move it from submit
//!   to its end (each one lands once: a compare, and a read back on failure).
//! - `call`: one call, made again on another member within `timeout_ms`
//!   when it gets no usable answer.
//! - `api` (submit, poll, delete, usage) and `work` (the engine's side:
//!   lease, scan, claim, show, release, and the sweep of dead replicas).
//! - `config`: the `store` setting.

pub(crate) mod api;
pub(crate) mod call;
pub mod config;
pub(crate) mod jobs;
pub(crate) mod keys;
pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod wire;
pub(crate) mod work;

pub use config::{parse_store_config, EtcdConfig, StoreConfig};
pub use keys::{join_parts, parts_needed, split_audio, Keys};
pub use request::{Compare, CompareResult, CompareTarget, Op, Request, Txn};
pub use response::{EtcdError, Kv, LeaseGrant, RangeResponse, TxnResponse};

#[cfg(test)]
mod fixtures;
