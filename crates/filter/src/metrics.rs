//! Writes the core's reports out: each one's log line and stats. Stat names
//! appear on the admin's /stats as `wasmcustom.async_speech.…`; a name is
//! defined on first use and its id cached per VM (every VM that defines the
//! same name shares one Envoy stat). Counters and gauges are summed in the
//! VM and written on the root's tick, one host call per stat that moved,
//! instead of one per event; histograms are recorded as they come.

use std::cell::RefCell;
use std::collections::HashMap;

use async_speech_core::engine::report::{defined_at_start, Level, Stat, StatKind};
use async_speech_core::engine::Report;
use log::{info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Default)]
pub struct Stats {
    ids: RefCell<HashMap<String, u32>>,
    /// Counter and gauge deltas not written yet, by stat id.
    unwritten: RefCell<HashMap<u32, i64>>,
}

impl Stats {
    fn id(&self, kind: StatKind, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return Some(*id);
        }
        let kind = match kind {
            StatKind::Counter => MetricType::Counter,
            StatKind::Gauge => MetricType::Gauge,
            StatKind::Histogram => MetricType::Histogram,
        };
        let id = hostcalls::define_metric(kind, name).ok()?;
        self.ids.borrow_mut().insert(name.to_string(), id);
        Some(id)
    }

    fn apply(&self, stat: &Stat) {
        let Some(id) = self.id(stat.kind, &stat.name) else {
            return;
        };
        match stat.kind {
            StatKind::Histogram => {
                let _ = hostcalls::record_metric(id, u64::try_from(stat.value).unwrap_or(0));
            }
            _ if stat.value == 0 => {}
            _ => *self.unwritten.borrow_mut().entry(id).or_default() += stat.value,
        }
    }

    /// Writes the summed counters and gauges to Envoy.
    pub fn flush(&self) {
        for (id, delta) in self.unwritten.borrow_mut().drain() {
            if delta != 0 {
                let _ = hostcalls::increment_metric(id, delta);
            }
        }
    }

    /// Defines the fixed set, so that it shows as 0 before traffic.
    pub fn define_all(&self) {
        for stat in defined_at_start() {
            self.apply(&stat);
        }
    }

    pub fn write(&self, reports: Vec<Report>) {
        let info = log::max_level() >= log::LevelFilter::Info;
        for report in reports {
            match report.log(info) {
                Some((Level::Info, line)) => info!("{line}"),
                Some((Level::Warn, line)) => warn!("{line}"),
                None => {}
            }
            for stat in report.stats() {
                self.apply(&stat);
            }
        }
    }
}
