//! What happened, for the operator: each report names its log line and the
//! stats it moves. The host adapter only writes them out, so every name is
//! decided (and tested) here, the same whichever store runs.

use super::attempt::{AttemptResult, FailReason};
use super::deliver::DeliveryResult;
use crate::config::Config;
use crate::log_escape::escape_for_log as escape;

/// Prefix of every stat: `wasmcustom.async_speech.…` on Envoy's admin.
pub const STAT_PREFIX: &str = "async_speech";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    Counter,
    Gauge,
    Histogram,
}

/// One change to one stat: a counter's or gauge's delta, a histogram's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub kind: StatKind,
    pub name: String,
    pub value: i64,
}

impl Stat {
    fn count(name: impl Into<String>) -> Stat {
        Stat {
            kind: StatKind::Counter,
            name: format!("{STAT_PREFIX}.{}", name.into()),
            value: 1,
        }
    }
    fn gauge(name: &str, delta: i64) -> Stat {
        Stat {
            kind: StatKind::Gauge,
            name: format!("{STAT_PREFIX}.{name}"),
            value: delta,
        }
    }
    fn histogram(name: impl Into<String>, value: u64) -> Stat {
        Stat {
            kind: StatKind::Histogram,
            name: format!("{STAT_PREFIX}.{}", name.into()),
            value: i64::try_from(value).unwrap_or(i64::MAX),
        }
    }
}

/// Counters and gauges defined at start, so that they show as 0 before traffic.
pub fn defined_at_start() -> Vec<Stat> {
    let counters = [
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
        "jobs_rejected.limit",
        "jobs_rejected.forbidden",
        "webhooks_delivered",
        "webhooks_retried",
        "webhooks_failed",
    ];
    let mut out: Vec<Stat> = counters
        .iter()
        .map(|n| Stat {
            value: 0,
            ..Stat::count(*n)
        })
        .collect();
    out.extend(
        ["jobs_pending", "jobs_in_flight", "jobs_held"]
            .iter()
            .map(|n| Stat::gauge(n, 0)),
    );
    out
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Whose job, on which model: the stat names' key and model parts. Owners
/// without a virtual key are `none` (a JWT identity never names a stat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub key: String,
    pub model: String,
}

/// A name as one part of a stat name: no dots (they separate the parts).
fn segment(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' | '/' => c,
            _ => '_',
        })
        .collect()
}

impl Who {
    /// The owner's key and the model as the configuration lets stats name it
    /// ([`Config::stat_model`]).
    pub fn of(config: &Config, owner: &str, model: &str) -> Who {
        Who {
            key: segment(owner.strip_prefix("vk:").unwrap_or("none")),
            model: match config.stat_model(model).as_str() {
                "" => "none".to_string(),
                m => segment(m),
            },
        }
    }

    fn stat(&self, what: &str) -> String {
        format!("key.{}.model.{}.{what}", self.key, self.model)
    }
}

/// Something that happened to a job or a call. `local` marks events whose
/// counts describe this Envoy's own store (shared data): the held and
/// pending gauges move only then, since with etcd the jobs belong to every
/// replica at once.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A provider call went out.
    Sent {
        id: String,
        attempt: usize,
        part: Option<u32>,
        provider: String,
        model: String,
    },
    /// A provider call ended.
    AttemptEnded {
        id: String,
        provider: String,
        result: AttemptResult,
        status: Option<u16>,
        latency_ms: u64,
    },
    /// A pending job was taken to run (`local`: counted in this Envoy's pending gauge).
    Started {
        id: String,
        local: bool,
    },
    /// A job was handed back or taken over, and waits again.
    Requeued {
        id: String,
        local: bool,
    },
    Completed {
        id: String,
    },
    Failed {
        id: String,
        status: u16,
        reason: FailReason,
        deadline_s: u64,
    },
    /// Finished jobs the store freed at their expiry.
    Expired {
        count: u32,
        local: bool,
    },
    WebhookSent {
        id: String,
        webhook_id: String,
        endpoint: String,
    },
    Webhook {
        id: String,
        webhook_id: String,
        endpoint: String,
        result: DeliveryResult,
        outcome: String,
    },
    /// One call to the job store (etcd): its kind, whether it gave a usable answer, its latency.
    StoreCall {
        op: &'static str,
        ok: bool,
        latency_ms: u64,
    },
    /// Provider calls in flight moved by this much.
    InFlight(i64),
    /// Something an operator should see, already worded.
    Warning(String),
    /// A submit was accepted (`local`: counted in this Envoy's held and pending gauges).
    Submitted {
        id: String,
        model: String,
        fallbacks: usize,
        ttl_s: u64,
        local: bool,
        who: Who,
        chars: u64,
    },
    /// A submit refused with this status; `full` when the store was full.
    Rejected {
        status: u16,
        /// The error's `type`.
        kind: String,
        message: String,
        full: bool,
        who: Who,
    },
    /// A job deleted by its owner, and the characters it gave back.
    Deleted {
        id: String,
        local: bool,
        who: Who,
        returned: u64,
    },
    /// A job ended, for its key's stats: completed or not, what it cost
    /// (micro-dollars).
    KeyJob {
        who: Who,
        completed: bool,
        spend_micros: u64,
    },
    /// A failed job's characters, given back under its primary model.
    Returned {
        who: Who,
        chars: u64,
    },
}

impl Report {
    /// The log line, if any (already escaped where it carries client input).
    /// Without `info`, the reports that only ever log at info level are not
    /// even formatted (most of them come once or more per job).
    pub fn log(&self, info: bool) -> Option<(Level, String)> {
        let info_only = matches!(
            self,
            Report::Submitted { .. }
                | Report::Sent { .. }
                | Report::Completed { .. }
                | Report::Deleted { .. }
                | Report::Rejected { .. }
                | Report::WebhookSent { .. }
                | Report::Expired { .. }
        );
        if info_only && !info {
            return None;
        }
        self.call_log()
            .or_else(|| self.job_log())
            .or_else(|| self.webhook_log())
            .or_else(|| self.api_log())
    }

    fn call_log(&self) -> Option<(Level, String)> {
        match self {
            Report::Sent {
                id,
                attempt,
                part,
                provider,
                model,
            } => {
                let part = part.map(|p| format!(" part {p}")).unwrap_or_default();
                let model = escape(model);
                let line = format!(
                    "job {id} attempt {attempt}{part} sent to provider {provider} (model {model})"
                );
                Some((Level::Info, line))
            }
            Report::AttemptEnded {
                id,
                provider,
                result,
                status,
                latency_ms,
            } => match (result, status) {
                (AttemptResult::Success, _) => None,
                (AttemptResult::Error, Some(status)) => Some((
                    Level::Warn,
                    format!("job {id} provider {provider} answered {status}"),
                )),
                _ => Some((
                    Level::Warn,
                    format!(
                        "job {id} provider {provider}: {} after {latency_ms} ms",
                        result.name()
                    ),
                )),
            },
            Report::Warning(text) => Some((Level::Warn, text.clone())),
            _ => None,
        }
    }

    fn job_log(&self) -> Option<(Level, String)> {
        Some(match self {
            Report::Requeued { id, .. } => (
                Level::Warn,
                format!("job {id}: waits again (its worker let go of it, or was lost)"),
            ),
            Report::Completed { id } => (Level::Info, format!("job {id} completed")),
            Report::Failed {
                id,
                reason: FailReason::Deadline,
                deadline_s,
                ..
            } => (
                Level::Warn,
                format!("job {id} failed: past its deadline of {deadline_s} s"),
            ),
            Report::Failed {
                id, status, reason, ..
            } => (
                Level::Warn,
                format!("job {id} failed with status {status} ({})", reason.name()),
            ),
            Report::Expired { count, .. } if *count > 0 => (
                Level::Info,
                format!("{count} finished jobs expired and were freed"),
            ),
            _ => return None,
        })
    }

    fn webhook_log(&self) -> Option<(Level, String)> {
        match self {
            Report::WebhookSent {
                id,
                webhook_id,
                endpoint,
            } => Some((
                Level::Info,
                format!("job {id} webhook {webhook_id} sent to endpoint {endpoint}"),
            )),
            Report::Webhook {
                id,
                webhook_id,
                endpoint,
                result,
                outcome,
            } => {
                let (level, how) = match result {
                    DeliveryResult::Delivered => (Level::Info, "delivered".to_string()),
                    DeliveryResult::Retrying => (Level::Warn, format!("{outcome}; will retry")),
                    DeliveryResult::Failed => (Level::Warn, format!("{outcome}; given up")),
                };
                let line = match result {
                    DeliveryResult::Delivered => {
                        format!("job {id} webhook {webhook_id} {how} to {endpoint}")
                    }
                    _ => format!("job {id} webhook {webhook_id} to {endpoint}: {how}"),
                };
                Some((level, line))
            }
            _ => None,
        }
    }

    fn api_log(&self) -> Option<(Level, String)> {
        Some(match self {
            Report::Submitted {
                id,
                model,
                fallbacks,
                ttl_s,
                ..
            } => (
                Level::Info,
                format!(
                    "job {id} submitted: model {}, {fallbacks} fallbacks, ttl {ttl_s} s",
                    escape(model)
                ),
            ),
            Report::Rejected {
                status, message, ..
            } => (
                Level::Info,
                format!("submit refused with {status}: {}", escape(message)),
            ),
            Report::Deleted { id, .. } => (Level::Info, format!("job {id} deleted by its owner")),
            _ => return None,
        })
    }

    /// The stats this moves.
    pub fn stats(&self) -> Vec<Stat> {
        match self {
            Report::Submitted { .. } | Report::Rejected { .. } | Report::Deleted { .. } => {
                self.api_stats()
            }
            Report::KeyJob { .. } => self.key_job_stats(),
            Report::Returned { who, chars } => vec![returned_stat(who, *chars)],
            _ => self.job_stats(),
        }
    }

    fn job_stats(&self) -> Vec<Stat> {
        match self {
            Report::AttemptEnded {
                provider,
                result,
                latency_ms,
                ..
            } => vec![
                Stat::count(format!("provider.{provider}.attempts.{}", result.name())),
                Stat::histogram(format!("provider.{provider}.latency_ms"), *latency_ms),
            ],
            Report::Started { local: true, .. } => vec![Stat::gauge("jobs_pending", -1)],
            Report::Requeued { local: true, .. } => vec![Stat::gauge("jobs_pending", 1)],
            Report::Completed { .. } => vec![Stat::count("jobs_completed")],
            Report::Failed { reason, .. } => {
                vec![Stat::count(format!("jobs_failed.{}", reason.name()))]
            }
            Report::Expired { count, local } if *count > 0 => {
                let mut out = vec![Stat {
                    value: i64::from(*count),
                    ..Stat::count("jobs_expired")
                }];
                if *local {
                    out.push(Stat::gauge("jobs_held", -i64::from(*count)));
                }
                out
            }
            Report::Webhook { result, .. } => {
                vec![Stat::count(format!("webhooks_{}", result.name()))]
            }
            Report::StoreCall { op, ok, latency_ms } => {
                let mut out = vec![
                    Stat::count("store_calls"),
                    Stat::count(format!("store_calls.{op}")),
                    Stat::histogram("store_latency_ms", *latency_ms),
                ];
                if !ok {
                    out.push(Stat::count("store_failures"));
                }
                out
            }
            Report::InFlight(delta) => vec![Stat::gauge("jobs_in_flight", *delta)],
            _ => Vec::new(),
        }
    }

    fn api_stats(&self) -> Vec<Stat> {
        let (mut out, local_held) = match self {
            Report::Submitted { who, chars, .. } => (
                vec![
                    Stat::count("jobs_submitted"),
                    Stat::count(who.stat("submits")),
                    Stat {
                        value: to_i64(*chars),
                        ..Stat::count(who.stat("characters"))
                    },
                ],
                1,
            ),
            Report::Rejected {
                status,
                full,
                kind,
                who,
                ..
            } => (rejected_stats(*status, *full, kind, who), 0),
            Report::Deleted { who, returned, .. } => {
                let mut out = vec![Stat::count("jobs_deleted")];
                if *returned > 0 {
                    out.push(returned_stat(who, *returned));
                }
                (out, -1)
            }
            _ => return Vec::new(),
        };
        let local = matches!(
            self,
            Report::Submitted { local: true, .. } | Report::Deleted { local: true, .. }
        );
        if local {
            out.push(Stat::gauge("jobs_held", local_held));
            if local_held > 0 {
                out.push(Stat::gauge("jobs_pending", 1));
            }
        }
        out
    }

    fn key_job_stats(&self) -> Vec<Stat> {
        let Report::KeyJob {
            who,
            completed,
            spend_micros,
        } = self
        else {
            return Vec::new();
        };
        let ended = if *completed { "completed" } else { "failed" };
        let mut out = vec![Stat::count(who.stat(ended))];
        if *spend_micros > 0 {
            out.push(Stat {
                value: to_i64(*spend_micros),
                ..Stat::count(who.stat("spend_micros"))
            });
        }
        out
    }
}

/// Characters given back (a counter, so that it never goes below zero):
/// `characters` less `characters_returned` is what the key's jobs kept.
fn returned_stat(who: &Who, chars: u64) -> Stat {
    Stat {
        value: to_i64(chars),
        ..Stat::count(who.stat("characters_returned"))
    }
}

/// A refused submit's stats: by reason, and by key, model and error type.
fn rejected_stats(status: u16, full: bool, kind: &str, who: &Who) -> Vec<Stat> {
    let reason = match (status, full) {
        (_, true) => "store_full",
        (401, _) => "auth",
        (402 | 429, _) => "limit",
        (403, _) => "forbidden",
        (503, _) => "unavailable",
        _ => "validation",
    };
    let kind = match kind {
        "" => "none".to_string(),
        k => segment(k),
    };
    vec![
        Stat::count(format!("jobs_rejected.{reason}")),
        Stat::count(who.stat(&format!("refusals.{kind}"))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(report: &Report) -> Vec<(String, i64)> {
        report
            .stats()
            .into_iter()
            .map(|s| (s.name, s.value))
            .collect()
    }

    #[test]
    fn key_stats_name_the_key_and_the_model_and_nobody_else() {
        let config = Config::parse(
            br#"{"providers":{"openai":{"cluster":"openai","api_key":"sk"}},
                 "virtual_keys":[{"name":"team-a","value":"sk-bf-a","allowed_models":["openai/tts-1.5","openai/gpt*"]}]}"#,
            &|_| None,
        )
        .unwrap();
        let who = Who::of(&config, "vk:team-a", "openai/tts-1.5");
        assert_eq!(
            (who.key.as_str(), who.model.as_str()),
            ("team-a", "openai/tts-1_5")
        );
        let jwt = Who::of(&config, "jwt:\"alice\"", "");
        assert_eq!((jwt.key.as_str(), jwt.model.as_str()), ("none", "none"));
        // Models the configuration does not name exactly are one stat per
        // provider: a client cannot make Envoy hold a stat per name it invents.
        for (model, named) in [
            ("openai/gpt-4o-mini-tts", "openai/other"),
            ("openai/anything-at-all", "openai/other"),
            ("nobody/tts", "other"),
        ] {
            assert_eq!(Who::of(&config, "vk:team-a", model).model, named);
        }
        let submitted = Report::Submitted {
            id: "j".into(),
            model: "openai/tts-1.5".into(),
            fallbacks: 0,
            ttl_s: 60,
            local: true,
            who: who.clone(),
            chars: 5,
        };
        let key = "async_speech.key.team-a.model.openai/tts-1_5";
        assert_eq!(
            names(&submitted),
            vec![
                ("async_speech.jobs_submitted".into(), 1),
                (format!("{key}.submits"), 1),
                (format!("{key}.characters"), 5),
                ("async_speech.jobs_held".into(), 1),
                ("async_speech.jobs_pending".into(), 1),
            ]
        );
        let failed = Report::KeyJob {
            who: who.clone(),
            completed: false,
            spend_micros: 0,
        };
        assert_eq!(names(&failed), vec![(format!("{key}.failed"), 1)]);
        let returned = Report::Returned {
            who: who.clone(),
            chars: 5,
        };
        assert_eq!(
            names(&returned),
            vec![(format!("{key}.characters_returned"), 5)]
        );
        // Characters only ever add up: both are counters, never a gauge below zero.
        for report in [&submitted, &returned] {
            assert!(report
                .stats()
                .iter()
                .filter(|s| s.name.contains("characters"))
                .all(|s| s.kind == StatKind::Counter));
        }
        let refused = Report::Rejected {
            status: 429,
            kind: "request_limit_exceeded".into(),
            message: String::new(),
            full: false,
            who,
        };
        assert_eq!(
            names(&refused),
            vec![
                ("async_speech.jobs_rejected.limit".into(), 1),
                (format!("{key}.refusals.request_limit_exceeded"), 1),
            ]
        );
    }

    #[test]
    fn info_lines_are_not_formatted_when_unwanted_and_warnings_always_are() {
        let completed = Report::Completed { id: "j".into() };
        assert_eq!(
            completed.log(true),
            Some((Level::Info, "job j completed".to_string()))
        );
        assert_eq!(completed.log(false), None);
        let warning = Report::Warning("careful".into());
        assert_eq!(
            warning.log(false),
            Some((Level::Warn, "careful".to_string()))
        );
    }
}
