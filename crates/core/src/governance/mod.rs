//! Governance per virtual key: expiry, allowed models, limits (held and
//! running jobs; requests, characters and money per window) and the fair
//! share of dispatch every key gets. This module decides; the stores keep
//! each key's counters (`KeyState`) where every worker (shared data) or
//! every replica (etcd) sees them, and change them under compare-and-swap.

pub mod rules;
pub mod window;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::time::rfc3339;
pub use rules::{parse_pricing, parse_rules, Limit, Limits, Pricing, Rules};

/// Lanes that owners without a virtual key (a JWT claim, or no key at all)
/// share, by a hash of the owner: their number stays fixed, whatever the
/// number of owners.
pub const SHARED_LANES: u32 = 16;

/// The lane of an owner: its virtual key's name, or one of the shared lanes.
pub fn lane_of(owner: &str) -> String {
    match owner.strip_prefix("vk:") {
        Some(name) => name.to_string(),
        None => {
            let digest = crate::config::sha256_of(owner.as_bytes());
            let n = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) % SHARED_LANES;
            format!("~{n}")
        }
    }
}

/// Every lane of a configuration: one per virtual key, and the shared ones.
pub fn lanes(config: &crate::config::Config) -> impl Iterator<Item = String> + '_ {
    config
        .virtual_keys
        .iter()
        .map(|k| k.name.clone())
        .chain((0..SHARED_LANES).map(|n| format!("~{n}")))
}

/// A count in the window it was counted in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    #[serde(rename = "w", default)]
    pub window_s: u64,
    #[serde(rename = "n", default)]
    pub used: u64,
}

impl Tally {
    fn is_zero(&self) -> bool {
        self.used == 0
    }

    /// The count in the window holding `now_s` (0 once a new one began).
    pub fn used(&self, limit: &Limit, now_s: u64) -> u64 {
        if self.window_s == limit.window.start(now_s) {
            self.used
        } else {
            0
        }
    }

    pub fn add(&mut self, limit: &Limit, now_s: u64, n: u64) {
        let start = limit.window.start(now_s);
        if self.window_s != start {
            *self = Tally {
                window_s: start,
                used: 0,
            };
        }
        self.used = self.used.saturating_add(n);
    }

    /// Takes `n` back, if still in the window it was counted in.
    pub fn take_back(&mut self, window_s: u64, n: u64) {
        if self.window_s == window_s {
            self.used = self.used.saturating_sub(n);
        }
    }
}

/// What a store keeps for one lane (a key): its counters, and where its
/// jobs stand in fair dispatch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    #[serde(rename = "r", default, skip_serializing_if = "Tally::is_zero")]
    pub requests: Tally,
    #[serde(rename = "c", default, skip_serializing_if = "Tally::is_zero")]
    pub characters: Tally,
    /// Micro-dollars.
    #[serde(rename = "s", default, skip_serializing_if = "Tally::is_zero")]
    pub spend: Tally,
    /// Jobs held (shared data; etcd counts its held index instead).
    #[serde(rename = "h", default)]
    pub held: u32,
    /// Jobs with a provider now (shared data; etcd counts running keys).
    #[serde(rename = "u", default)]
    pub running: u32,
    /// Jobs waiting in the lane's queue (shared data).
    #[serde(rename = "q", default)]
    pub queued: u32,
    /// The epoch of the lane's entry on the ring of lanes with work, while
    /// it has one (shared data).
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<u32>,
    /// Ring entries made so far: each entry's epoch (shared data).
    #[serde(rename = "x", default)]
    pub ring_epochs: u32,
    /// When a job was last taken from the lane, in ms (shared data); 0 when
    /// it joined the ring since, until the lane audit sees it.
    #[serde(rename = "t", default)]
    pub served_ms: u64,
    /// Since when its queue has been found empty while `queued` says
    /// otherwise, in ms (shared data; 0: it has not).
    #[serde(rename = "m", default, skip_serializing_if = "is_zero_u64")]
    pub missed_ms: u64,
    /// The lane's last place in the dispatch order (etcd).
    #[serde(rename = "p", default)]
    pub round: u64,
}

impl KeyState {
    pub fn decode(bytes: &[u8]) -> KeyState {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// Why a submit is refused, in the order checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    HeldJobs,
    Requests,
    Characters,
    Budget,
}

/// Whether a submit of `chars` characters may go, given `held` jobs held.
pub fn check(
    limits: &Limits,
    state: &KeyState,
    held: u32,
    chars: u64,
    now_s: u64,
) -> Option<Refusal> {
    if limits.max_held_jobs.is_some_and(|max| held >= max) {
        return Some(Refusal::HeldJobs);
    }
    if let Some(l) = &limits.requests {
        if state.requests.used(l, now_s) >= l.max {
            return Some(Refusal::Requests);
        }
    }
    if let Some(l) = &limits.characters {
        if state.characters.used(l, now_s).saturating_add(chars) > l.max {
            return Some(Refusal::Characters);
        }
    }
    if let Some(l) = &limits.budget {
        if state.spend.used(l, now_s) >= l.max {
            return Some(Refusal::Budget);
        }
    }
    None
}

/// Counts an accepted submit.
pub fn count(limits: &Limits, state: &mut KeyState, chars: u64, now_s: u64) {
    if let Some(l) = &limits.requests {
        state.requests.add(l, now_s, 1);
    }
    if let Some(l) = &limits.characters {
        state.characters.add(l, now_s, chars);
    }
    state.held = state.held.saturating_add(1);
}

/// What a job that ends settles with its key: characters given back (it made
/// no audio) and money charged (it completed), in the windows they belong to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settle {
    /// Characters to give back, and the window they were counted in.
    pub give_back: Option<(u64, u64)>,
    /// Micro-dollars to charge.
    pub charge: u64,
    /// The job was counted as running.
    pub was_running: bool,
}

impl Settle {
    /// Whether settling changes the key's state under these limits (a
    /// charge counts only against a budget): else there is nothing to write.
    pub fn changes(&self, limits: &Limits) -> bool {
        self.give_back.is_some() || (self.charge > 0 && limits.budget.is_some()) || self.was_running
    }
}

pub fn settle(limits: &Limits, state: &mut KeyState, settle: &Settle, now_s: u64) {
    if let Some((window_s, chars)) = settle.give_back {
        state.characters.take_back(window_s, chars);
    }
    if let Some(l) = &limits.budget {
        if settle.charge > 0 {
            state.spend.add(l, now_s, settle.charge);
        }
    }
    if settle.was_running {
        state.running = state.running.saturating_sub(1);
    }
}

/// The refusal as the client sees it: status, `error.type`, message, and
/// `Retry-After` (to the window's end; 1 s for held jobs).
pub fn refusal_error(refusal: Refusal, limits: &Limits, now_s: u64) -> ApiError {
    let to_end = |l: &Option<Limit>| l.as_ref().map_or(1, |l| l.window.end(now_s) - now_s).max(1);
    let (status, kind, message, retry) = match refusal {
        Refusal::HeldJobs => (
            429,
            "held_jobs_limit_exceeded",
            format!(
                "the key holds {} jobs, its max_held_jobs; delete or let some expire",
                limits.max_held_jobs.unwrap_or(0)
            ),
            1,
        ),
        Refusal::Requests => (
            429,
            "request_limit_exceeded",
            "the key's requests limit for this window is reached".to_string(),
            to_end(&limits.requests),
        ),
        Refusal::Characters => (
            429,
            "character_limit_exceeded",
            "this input would take the key past its characters limit for this window".to_string(),
            to_end(&limits.characters),
        ),
        Refusal::Budget => (
            402,
            "budget_exceeded",
            "the key's budget for this window is spent".to_string(),
            to_end(&limits.budget),
        ),
    };
    ApiError::limit(status, kind, message, retry)
}

/// The IETF RateLimit fields of a submit's answer, for a key with window
/// limits: `RateLimit-Policy` and `RateLimit`, with what remains after this
/// submit was counted (budget in whole cents).
pub fn ratelimit_fields(limits: &Limits, state: &KeyState, now_s: u64) -> Option<(String, String)> {
    let mut policy = Vec::new();
    let mut remaining = Vec::new();
    let mut add = |name: &str, limit: &Option<Limit>, tally: &Tally, unit: u64| {
        if let Some(l) = limit {
            let (q, used) = (l.max / unit, tally.used(l, now_s).div_ceil(unit));
            policy.push(format!("\"{name}\";q={q};w={}", l.window.length(now_s)));
            remaining.push(format!(
                "\"{name}\";r={};t={}",
                q.saturating_sub(used),
                l.window.end(now_s) - now_s
            ));
        }
    };
    add("requests", &limits.requests, &state.requests, 1);
    add("characters", &limits.characters, &state.characters, 1);
    add("budget", &limits.budget, &state.spend, 10_000);
    (!policy.is_empty()).then(|| (policy.join(", "), remaining.join(", ")))
}

/// `GET /v1/async/usage`: the key's own state.
pub fn usage(
    name: &str,
    rules: &Rules,
    state: &KeyState,
    held: u32,
    running: u32,
    now_ms: u64,
) -> Value {
    let now_s = now_ms / 1000;
    let mut out = Map::new();
    out.insert("virtual_key".into(), json!(name));
    if let Some(at) = rules.expires_at_ms {
        out.insert(
            "expires_at".into(),
            json!(rfc3339(at).replace(".000Z", "Z")),
        );
    }
    out.insert("held_jobs".into(), json!(held));
    out.insert("running_jobs".into(), json!(running));
    let l = &rules.limits;
    if let Some(max) = l.max_held_jobs {
        out.insert("max_held_jobs".into(), json!(max));
    }
    if let Some(max) = l.max_running_jobs {
        out.insert("max_running_jobs".into(), json!(max));
    }
    let resets = |l: &Limit| rfc3339(l.window.end(now_s) * 1000).replace(".000Z", "Z");
    let mut limits = Map::new();
    if let Some(r) = &l.requests {
        limits.insert(
            "requests".into(),
            json!({"max": r.max, "used": state.requests.used(r, now_s),
            "window": r.window.text, "resets_at": resets(r)}),
        );
    }
    if let Some(c) = &l.characters {
        limits.insert(
            "characters".into(),
            json!({"max": c.max, "used": state.characters.used(c, now_s),
            "window": c.window.text, "resets_at": resets(c)}),
        );
    }
    if let Some(b) = &l.budget {
        let dollars = |micros: u64| micros as f64 / 1e6;
        limits.insert(
            "budget".into(),
            json!({"max_usd": dollars(b.max), "spent_usd": dollars(state.spend.used(b, now_s)),
            "window": b.window.text, "resets_at": resets(b)}),
        );
    }
    out.insert("limits".into(), Value::Object(limits));
    Value::Object(out)
}

#[cfg(test)]
mod tests;
