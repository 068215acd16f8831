//! Envoy stats for operators. Names appear on the admin's /stats as
//! `wasmcustom.async_speech.…` (and on /stats/prometheus with `_` for `.`).
//! A name is defined on first use and its id cached per VM; every VM that
//! defines the same name shares one Envoy stat.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use log::warn;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use async_speech_core::dispatch::{AttemptResult, FailReason};

#[derive(Default)]
pub struct Metrics {
    ids: RefCell<HashMap<String, u32>>,
}

pub type SharedMetrics = Rc<Metrics>;

const PREFIX: &str = "async_speech";

impl Metrics {
    fn id(&self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return Some(*id);
        }
        match hostcalls::define_metric(kind, name) {
            Ok(id) => {
                self.ids.borrow_mut().insert(name.to_string(), id);
                Some(id)
            }
            Err(e) => {
                warn!("cannot define metric {name}: {e:?}");
                None
            }
        }
    }

    fn count(&self, name: &str) {
        if let Some(id) = self.id(MetricType::Counter, &format!("{PREFIX}.{name}")) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn add_gauge(&self, name: &str, delta: i64) {
        if let Some(id) = self.id(MetricType::Gauge, &format!("{PREFIX}.{name}")) {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }

    /// Defines the fixed set at configure time so that they show as 0 before traffic.
    pub fn define_all(&self) {
        for name in [
            "jobs_submitted",
            "jobs_completed",
            "jobs_expired",
            "jobs_deleted",
            "jobs_failed.provider_error",
            "jobs_failed.timeout",
            "jobs_failed.unreachable",
            "jobs_failed.deadline",
            "jobs_rejected.auth",
            "jobs_rejected.validation",
            "jobs_rejected.store_full",
            "jobs_rejected.unavailable",
            "webhooks_delivered",
            "webhooks_retried",
            "webhooks_failed",
        ] {
            let _ = self.id(MetricType::Counter, &format!("{PREFIX}.{name}"));
        }
        for name in ["jobs_pending", "jobs_in_flight", "jobs_held"] {
            let _ = self.id(MetricType::Gauge, &format!("{PREFIX}.{name}"));
        }
    }

    pub fn submitted(&self) {
        self.count("jobs_submitted");
    }
    pub fn completed(&self) {
        self.count("jobs_completed");
    }
    pub fn expired(&self) {
        self.count("jobs_expired");
    }
    /// One call to the job store (etcd): counted, failures counted, latency recorded.
    pub fn store_call(&self, op: &str, ok: bool, latency_ms: u64) {
        self.count("store_calls");
        self.count(&format!("store_calls.{op}"));
        if !ok {
            self.count("store_failures");
        }
        if let Some(id) = self.id(MetricType::Histogram, &format!("{PREFIX}.store_latency_ms")) {
            let _ = hostcalls::record_metric(id, latency_ms);
        }
    }

    /// A webhook delivery attempt's end: delivered, retried or failed.
    pub fn webhook(&self, how: &str) {
        self.count(&format!("webhooks_{how}"));
    }
    pub fn deleted(&self) {
        self.count("jobs_deleted");
    }
    pub fn failed(&self, reason: FailReason) {
        self.count(&format!("jobs_failed.{}", reason.name()));
    }
    /// A submit refused with this HTTP status.
    /// A submit refused with this status; `full` when the store was full
    /// (a store that could not take the job for another reason is `unavailable`).
    pub fn rejected(&self, status: u16, full: bool) {
        let reason = match (status, full) {
            (_, true) => "store_full",
            (401, _) => "auth",
            (503, _) => "unavailable",
            _ => "validation",
        };
        self.count(&format!("jobs_rejected.{reason}"));
    }
    pub fn attempt(&self, provider: &str, outcome: AttemptResult, latency_ms: u64) {
        self.count(&format!("provider.{provider}.attempts.{}", outcome.name()));
        if let Some(id) = self.id(
            MetricType::Histogram,
            &format!("{PREFIX}.provider.{provider}.latency_ms"),
        ) {
            let _ = hostcalls::record_metric(id, latency_ms);
        }
    }
    /// Jobs held (pending, processing, finished and unexpired), up or down.
    pub fn held(&self, delta: i64) {
        self.add_gauge("jobs_held", delta);
    }
    pub fn pending(&self, delta: i64) {
        self.add_gauge("jobs_pending", delta);
    }
    pub fn in_flight(&self, delta: i64) {
        self.add_gauge("jobs_in_flight", delta);
    }
}
