//! Groundwork for the etcd job store (SPEC §4): pure request builders and
//! answer parsers for etcd's HTTP/JSON gateway, the key keys under the
//! configured prefix, and the `store` config. Nothing here calls the host:
//! a store built on it sends [`request::Request`]s as callouts
//! ([`EtcdConfig::callout`]) and parses their answers with [`response`].
//!
//! How a job maps onto etcd (see [`keys`] for the key names):
//!
//! - **Submit**: one txn `put_if_absent`-style on the record that also writes
//!   `pending/<id>`; the 202 goes out once it succeeded.
//! - **Claim**: a worker holds a lease (granted, kept alive) and takes a job
//!   with [`request::claim`] on `claims/<id>`; when the worker dies its lease
//!   lapses, etcd deletes the claim, and another worker can claim the job.
//! - **Finish**: audio parts first (one put each, under the job's TTL lease),
//!   then the record with [`request::compare_and_put`] (or a [`request::Txn`]
//!   that also deletes `pending/<id>` and the claim), under the same lease, so
//!   etcd removes everything when the job expires.
//! - **Delete**: a txn on the record's mod_revision that deletes the record,
//!   the audio prefix, the claim and the pending entry.

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
