//! The `webhooks` object of the plugin configuration, and which endpoint a submit
//! asks for.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::sign::decode_secret;

/// The header a submit names its endpoint with.
pub const WEBHOOK_HEADER: &str = "x-bf-async-webhook";

/// The events an endpoint may be called for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Event {
    #[serde(rename = "async_job.completed")]
    Completed,
    #[serde(rename = "async_job.failed")]
    Failed,
}

impl Event {
    pub const ALL: [Event; 2] = [Event::Completed, Event::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::Completed => "async_job.completed",
            Event::Failed => "async_job.failed",
        }
    }

    pub fn from_name(name: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// The job status this event reports: `completed` or `failed`.
    pub fn job_status(self) -> &'static str {
        match self {
            Event::Completed => "completed",
            Event::Failed => "failed",
        }
    }
}

pub const DEFAULT_MAX_RETRIES: u32 = 4;
pub const DEFAULT_RETRY_BACKOFF_INITIAL_SECONDS: u64 = 30;
pub const DEFAULT_RETRY_BACKOFF_MAX_SECONDS: u64 = 1800;
pub const DEFAULT_ATTEMPT_TIMEOUT_SECONDS: u64 = 10;
pub const DEFAULT_MAX_RESPONSE_PAYLOAD_KBS: u64 = 256;

/// One configured endpoint, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    /// Its key in `webhooks`, the value of `x-bf-async-webhook`.
    pub name: String,
    pub cluster: String,
    pub authority: String,
    pub path: String,
    /// Decoded keys (the part after `whsec_`), each 1 to 64 bytes; every one signs.
    /// Never shown by `Debug`.
    pub secrets: Vec<Vec<u8>>,
    /// The events it is called for, sorted, without duplicates, never empty.
    pub events: Vec<Event>,
    /// Custom headers sent with every delivery; names in lowercase, sorted.
    pub headers: Vec<(String, String)>,
    pub include_response: bool,
    /// Names of the virtual keys allowed to ask for this endpoint; empty: every key.
    pub virtual_keys: Vec<String>,
    pub max_retries: u32,
    pub retry_backoff_initial_seconds: u64,
    pub retry_backoff_max_seconds: u64,
    pub attempt_timeout_seconds: u64,
    pub max_response_payload_kbs: u64,
    pub disabled: bool,
}

impl WebhookEndpoint {
    /// Whether this endpoint is called for `event`.
    pub fn wants(&self, event: Event) -> bool {
        self.events.contains(&event)
    }

    /// `max_response_payload_kbs` in bytes: the largest `response`/`error` JSON put in a body.
    pub fn max_response_payload_bytes(&self) -> usize {
        usize::try_from(self.max_response_payload_kbs.saturating_mul(1024)).unwrap_or(usize::MAX)
    }

    /// Whether the virtual key named `key_name` may ask for this endpoint.
    pub fn allows_key(&self, key_name: Option<&str>) -> bool {
        self.virtual_keys.is_empty()
            || key_name.is_some_and(|k| self.virtual_keys.iter().any(|v| v == k))
    }
}

impl fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("name", &self.name)
            .field("cluster", &self.cluster)
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("events", &self.events)
            .field("headers", &self.headers)
            .field("include_response", &self.include_response)
            .field("virtual_keys", &self.virtual_keys)
            .field("max_retries", &self.max_retries)
            .field(
                "retry_backoff_initial_seconds",
                &self.retry_backoff_initial_seconds,
            )
            .field("retry_backoff_max_seconds", &self.retry_backoff_max_seconds)
            .field("attempt_timeout_seconds", &self.attempt_timeout_seconds)
            .field("max_response_payload_kbs", &self.max_response_payload_kbs)
            .field("disabled", &self.disabled)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    cluster: String,
    authority: Option<String>,
    path: Option<String>,
    secret_env: Option<String>,
    secret: Option<String>,
    secrets: Option<Vec<String>>,
    events: Option<Vec<String>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    include_response: bool,
    #[serde(default)]
    virtual_keys: Vec<String>,
    max_retries: Option<u64>,
    retry_backoff_initial_seconds: Option<u64>,
    retry_backoff_max_seconds: Option<u64>,
    attempt_timeout_seconds: Option<u64>,
    max_response_payload_kbs: Option<u64>,
    #[serde(default)]
    disabled: bool,
}

/// Parses the `webhooks` object of the plugin configuration. `env` looks up `secret_env`
/// variables, as for provider keys. Errors name the setting (`webhooks.<name>.<setting>`) and
/// never show a secret.
///
/// Refused: a `secret_env` variable that is unset or empty (deliveries would go out unsigned),
/// secrets that are not `whsec_` + base64 of 1 to 64 bytes, unknown events, custom headers
/// named `host`, `content-length`, `content-type`, `webhook-*`, or a hop-by-hop header
/// (`connection`, `keep-alive`, `proxy-connection`, `te`, `transfer-encoding`, `upgrade`),
/// and numbers outside their ranges.
pub fn parse_webhooks(
    value: &serde_json::Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, WebhookEndpoint>, String> {
    let Some(object) = value.as_object() else {
        return Err("webhooks must be an object of named endpoints".into());
    };
    let mut endpoints = BTreeMap::new();
    for (name, raw) in object {
        let at = format!("webhooks.{name}");
        if name.is_empty() || !name.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(format!(
                "{at}: an endpoint name must be non-empty printable ASCII without spaces"
            ));
        }
        let raw = RawEndpoint::deserialize(raw).map_err(|e| format!("{at}: {e}"))?;
        endpoints.insert(name.clone(), parse_endpoint(name, &at, raw, env)?);
    }
    Ok(endpoints)
}

fn parse_endpoint(
    name: &str,
    at: &str,
    raw: RawEndpoint,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<WebhookEndpoint, String> {
    let (authority, path) = parse_target(at, &raw)?;
    let secrets = parse_secrets(at, &raw, env)?;
    let events = parse_events(at, raw.events.as_deref())?;
    let headers = parse_headers(at, &raw.headers)?;
    check_key_names(at, &raw.virtual_keys)?;
    let retry = parse_retry(at, &raw)?;
    let max_response_payload_kbs = in_range(
        at,
        "max_response_payload_kbs",
        raw.max_response_payload_kbs,
        DEFAULT_MAX_RESPONSE_PAYLOAD_KBS,
        1,
        10_240,
    )?;
    Ok(WebhookEndpoint {
        name: name.to_string(),
        cluster: raw.cluster,
        authority,
        path,
        secrets,
        events,
        headers,
        include_response: raw.include_response,
        virtual_keys: raw.virtual_keys,
        max_retries: retry.max_retries,
        retry_backoff_initial_seconds: retry.backoff_initial_seconds,
        retry_backoff_max_seconds: retry.backoff_max_seconds,
        attempt_timeout_seconds: retry.attempt_timeout_seconds,
        max_response_payload_kbs,
        disabled: raw.disabled,
    })
}

/// Where to call: checks `cluster`, and returns the authority (by default the cluster's name)
/// and the path (by default `/`).
fn parse_target(at: &str, raw: &RawEndpoint) -> Result<(String, String), String> {
    if raw.cluster.is_empty() {
        return Err(format!("{at}.cluster must name an Envoy cluster"));
    }
    let authority = raw.authority.clone().unwrap_or_else(|| raw.cluster.clone());
    if authority.is_empty() || !authority.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(format!("{at}.authority must be a non-empty host name"));
    }
    let path = raw.path.clone().unwrap_or_else(|| "/".to_string());
    if !path.starts_with('/') || !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(format!(
            "{at}.path must start with '/' and hold no spaces or control characters"
        ));
    }
    Ok((authority, path))
}

/// The signing keys, from exactly one of `secret_env`, `secret` or `secrets`.
fn parse_secrets(
    at: &str,
    raw: &RawEndpoint,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Vec<u8>>, String> {
    match (&raw.secret_env, &raw.secret, &raw.secrets) {
        (Some(var), None, None) => {
            let value = env(var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                format!("{at}.secret_env: the environment variable {var:?} is not set")
            })?;
            let key = decode_secret(value.trim())
                .map_err(|e| format!("{at}.secret_env: {var:?} holds no valid secret: {e}"))?;
            Ok(vec![key])
        }
        (None, Some(s), None) => {
            let key = decode_secret(s).map_err(|e| format!("{at}.secret: {e}"))?;
            Ok(vec![key])
        }
        (None, None, Some(list)) => {
            if list.is_empty() {
                return Err(format!("{at}.secrets must hold at least one secret"));
            }
            list.iter()
                .enumerate()
                .map(|(i, s)| decode_secret(s).map_err(|e| format!("{at}.secrets[{i}]: {e}")))
                .collect()
        }
        _ => Err(format!(
            "{at}: give exactly one of secret_env, secret or secrets"
        )),
    }
}

/// The events named, sorted and without duplicates; every event when `events` is not given.
fn parse_events(at: &str, names: Option<&[String]>) -> Result<Vec<Event>, String> {
    let Some(names) = names else {
        return Ok(Event::ALL.to_vec());
    };
    let mut events = Vec::new();
    for n in names {
        let event = Event::from_name(n).ok_or_else(|| {
            format!(
                "{at}.events: unknown event {n:?}; one of async_job.completed, async_job.failed"
            )
        })?;
        events.push(event);
    }
    events.sort();
    events.dedup();
    if events.is_empty() {
        return Err(format!("{at}.events must name at least one event"));
    }
    Ok(events)
}

/// The custom headers, names in lowercase, sorted; a name given twice (in any case) is refused.
fn parse_headers(
    at: &str,
    raw: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, String> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for (header, value) in raw {
        let lower = header.to_ascii_lowercase();
        check_header(at, header, &lower, value)?;
        if headers.iter().any(|(n, _)| *n == lower) {
            return Err(format!(
                "{at}.headers: {header:?} is given twice (names ignore case)"
            ));
        }
        headers.push((lower, value.clone()));
    }
    headers.sort();
    Ok(headers)
}

/// Refuses an empty key name; whether the names exist is checked later, against the keys
/// (`check_virtual_keys`).
fn check_key_names(at: &str, virtual_keys: &[String]) -> Result<(), String> {
    if virtual_keys.iter().any(String::is_empty) {
        return Err(format!("{at}.virtual_keys: a key name must not be empty"));
    }
    Ok(())
}

/// How deliveries to an endpoint are retried, checked.
struct RetryKnobs {
    max_retries: u32,
    backoff_initial_seconds: u64,
    backoff_max_seconds: u64,
    attempt_timeout_seconds: u64,
}

/// The retry settings, each in its range or its default; the backoff's maximum may not be
/// below its initial value.
fn parse_retry(at: &str, raw: &RawEndpoint) -> Result<RetryKnobs, String> {
    let max_retries = in_range(
        at,
        "max_retries",
        raw.max_retries,
        u64::from(DEFAULT_MAX_RETRIES),
        0,
        20,
    )?;
    let initial = in_range(
        at,
        "retry_backoff_initial_seconds",
        raw.retry_backoff_initial_seconds,
        DEFAULT_RETRY_BACKOFF_INITIAL_SECONDS,
        1,
        86_400,
    )?;
    let max = in_range(
        at,
        "retry_backoff_max_seconds",
        raw.retry_backoff_max_seconds,
        DEFAULT_RETRY_BACKOFF_MAX_SECONDS,
        1,
        86_400,
    )?;
    if max < initial {
        return Err(format!(
            "{at}.retry_backoff_max_seconds must be at least retry_backoff_initial_seconds ({initial})"
        ));
    }
    let attempt_timeout_seconds = in_range(
        at,
        "attempt_timeout_seconds",
        raw.attempt_timeout_seconds,
        DEFAULT_ATTEMPT_TIMEOUT_SECONDS,
        1,
        300,
    )?;
    Ok(RetryKnobs {
        max_retries: u32::try_from(max_retries).unwrap_or(DEFAULT_MAX_RETRIES),
        backoff_initial_seconds: initial,
        backoff_max_seconds: max,
        attempt_timeout_seconds,
    })
}

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

fn check_header(at: &str, name: &str, lower: &str, value: &str) -> Result<(), String> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if lower.is_empty() || !lower.bytes().all(is_tchar) {
        return Err(format!("{at}.headers: {name:?} is not a valid header name"));
    }
    if matches!(lower, "host" | "content-length" | "content-type")
        || lower.starts_with("webhook-")
        || HOP_BY_HOP.contains(&lower)
    {
        return Err(format!(
            "{at}.headers: {name:?} is set by the filter and may not be configured"
        ));
    }
    let valid_byte = |b: u8| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80;
    let padded = value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']);
    if padded || !value.bytes().all(valid_byte) {
        return Err(format!(
            "{at}.headers.{name}: not a valid header value (control characters or leading/trailing spaces)"
        ));
    }
    Ok(())
}

fn in_range(
    at: &str,
    setting: &str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, String> {
    let v = value.unwrap_or(default);
    if v < min || v > max {
        return Err(format!("{at}.{setting} must be between {min} and {max}"));
    }
    Ok(v)
}

/// Checks every endpoint's `virtual_keys` against the configured key names, so that a typo
/// refuses the configuration instead of locking every caller out of the endpoint.
pub fn check_virtual_keys(
    endpoints: &BTreeMap<String, WebhookEndpoint>,
    known_keys: &[&str],
) -> Result<(), String> {
    for (name, e) in endpoints {
        if let Some(k) = e
            .virtual_keys
            .iter()
            .find(|k| !known_keys.contains(&k.as_str()))
        {
            return Err(format!(
                "webhooks.{name}.virtual_keys: no virtual key is named {k:?}"
            ));
        }
    }
    Ok(())
}

/// The endpoint a submit asks for with `x-bf-async-webhook` (`header_value`, trimmed), for the
/// caller's virtual key `key_name`. `Ok(None)`: no header, no webhook. `Err`: a message for a
/// 400 with `param` `x-bf-async-webhook` (an empty or unknown name, a disabled endpoint, or one
/// the key may not use; an endpoint reserved for other keys reads as unknown).
pub fn endpoint_for_submit<'a>(
    endpoints: &'a BTreeMap<String, WebhookEndpoint>,
    header_value: Option<&[u8]>,
    key_name: Option<&str>,
) -> Result<Option<&'a WebhookEndpoint>, String> {
    let Some(raw) = header_value else {
        return Ok(None);
    };
    let name = raw.trim_ascii();
    let unknown = || {
        let shown: String = String::from_utf8_lossy(name).chars().take(64).collect();
        format!("{WEBHOOK_HEADER}: no webhook endpoint is named {shown:?}")
    };
    if name.is_empty() {
        return Err(format!(
            "{WEBHOOK_HEADER} is empty; name a webhook endpoint"
        ));
    }
    let endpoint = std::str::from_utf8(name)
        .ok()
        .and_then(|n| endpoints.get(n))
        .ok_or_else(unknown)?;
    if !endpoint.allows_key(key_name) {
        return Err(unknown());
    }
    if endpoint.disabled {
        return Err(format!(
            "{WEBHOOK_HEADER}: webhook endpoint {:?} is disabled",
            endpoint.name
        ));
    }
    Ok(Some(endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn env(k: &str) -> Option<String> {
        (k == "BILLING_WEBHOOK_SECRET").then(|| SECRET.to_string())
    }

    fn parse(v: serde_json::Value) -> Result<BTreeMap<String, WebhookEndpoint>, String> {
        parse_webhooks(&v, &env)
    }

    fn parse_one(endpoint: serde_json::Value) -> Result<WebhookEndpoint, String> {
        parse(json!({ "billing": endpoint })).map(|mut m| m.remove("billing").unwrap())
    }

    fn err(endpoint: serde_json::Value) -> String {
        parse_one(endpoint).unwrap_err()
    }

    #[test]
    fn the_spec_example_parses() {
        let e = parse_one(json!({
            "cluster": "hooks", "authority": "hooks.internal", "path": "/speech-events",
            "secret_env": "BILLING_WEBHOOK_SECRET",
            "events": ["async_job.completed", "async_job.failed"],
            "headers": { "X-Team": "platform" },
            "include_response": false,
            "virtual_keys": ["team-a"],
            "max_retries": 4, "retry_backoff_initial_seconds": 30, "retry_backoff_max_seconds": 1800,
            "attempt_timeout_seconds": 10, "max_response_payload_kbs": 256, "disabled": false
        }))
        .unwrap();
        assert_eq!(e.name, "billing");
        assert_eq!(e.cluster, "hooks");
        assert_eq!(e.authority, "hooks.internal");
        assert_eq!(e.path, "/speech-events");
        assert_eq!(e.secrets, vec![decode_secret(SECRET).unwrap()]);
        assert_eq!(e.events, vec![Event::Completed, Event::Failed]);
        assert_eq!(
            e.headers,
            vec![("x-team".to_string(), "platform".to_string())]
        );
        assert_eq!(e.virtual_keys, vec!["team-a".to_string()]);
        assert_eq!(e.max_response_payload_bytes(), 256 * 1024);
        assert!(!e.disabled && !e.include_response);
    }

    #[test]
    fn defaults_are_the_examples_values() {
        let e = parse_one(json!({"cluster": "hooks", "secret": SECRET})).unwrap();
        assert_eq!(e.authority, "hooks");
        assert_eq!(e.path, "/");
        assert_eq!(e.events, Event::ALL.to_vec());
        assert!(e.headers.is_empty() && e.virtual_keys.is_empty());
        assert!(!e.include_response && !e.disabled);
        assert_eq!(e.max_retries, 4);
        assert_eq!(e.retry_backoff_initial_seconds, 30);
        assert_eq!(e.retry_backoff_max_seconds, 1800);
        assert_eq!(e.attempt_timeout_seconds, 10);
        assert_eq!(e.max_response_payload_kbs, 256);
        assert!(parse(json!({})).unwrap().is_empty());
    }

    #[test]
    fn debug_hides_the_secrets() {
        let e = parse_one(json!({"cluster": "hooks", "secret": SECRET})).unwrap();
        let shown = format!("{e:?}");
        assert!(shown.contains("<1 redacted>"), "{shown}");
        assert!(!shown.contains("49, "), "{shown}"); // no raw key bytes
    }

    #[test]
    fn exactly_one_way_to_give_the_secret() {
        let e = err(json!({"cluster": "hooks"}));
        assert!(
            e.contains("exactly one of secret_env, secret or secrets"),
            "{e}"
        );
        let e = err(
            json!({"cluster": "hooks", "secret": SECRET, "secret_env": "BILLING_WEBHOOK_SECRET"}),
        );
        assert!(e.contains("exactly one"), "{e}");
        let e = err(json!({"cluster": "hooks", "secret": SECRET, "secrets": [SECRET]}));
        assert!(e.contains("exactly one"), "{e}");
        let e = err(json!({"cluster": "hooks", "secret_env": "NOT_SET"}));
        assert_eq!(
            e,
            "webhooks.billing.secret_env: the environment variable \"NOT_SET\" is not set"
        );
        let e = err(json!({"cluster": "hooks", "secrets": []}));
        assert_eq!(e, "webhooks.billing.secrets must hold at least one secret");
        let two = format!(
            "whsec_{}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 32])
        );
        let e = parse_one(json!({"cluster": "hooks", "secrets": [SECRET, two]})).unwrap();
        assert_eq!(e.secrets.len(), 2);
        assert_eq!(e.secrets[1], vec![1u8; 32]);
    }

    #[test]
    fn bad_secrets_are_refused_without_being_shown() {
        let e = err(json!({"cluster": "hooks", "secret": "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}));
        assert!(
            e.starts_with("webhooks.billing.secret: a secret must start with whsec_"),
            "{e}"
        );
        assert!(!e.contains("MfKQ9"));
        let e = err(json!({"cluster": "hooks", "secrets": [SECRET, "whsec_%%%"]}));
        assert!(e.starts_with("webhooks.billing.secrets[1]:"), "{e}");
        assert!(!e.contains("%%%"));
        let bad_env = |_: &str| Some("whsec_@@@".to_string());
        let e = parse_webhooks(&json!({"b": {"cluster": "c", "secret_env": "S"}}), &bad_env)
            .unwrap_err();
        assert!(
            e.starts_with("webhooks.b.secret_env: \"S\" holds no valid secret"),
            "{e}"
        );
        assert!(!e.contains("@@@"));
    }

    #[test]
    fn numbers_outside_their_ranges_are_refused_by_name() {
        let base = || json!({"cluster": "hooks", "secret": SECRET});
        let with = |k: &str, v: serde_json::Value| {
            let mut o = base();
            o[k] = v;
            err(o)
        };
        assert_eq!(
            with("max_retries", json!(21)),
            "webhooks.billing.max_retries must be between 0 and 20"
        );
        assert_eq!(
            with("retry_backoff_initial_seconds", json!(0)),
            "webhooks.billing.retry_backoff_initial_seconds must be between 1 and 86400"
        );
        assert_eq!(
            with("retry_backoff_max_seconds", json!(86_401)),
            "webhooks.billing.retry_backoff_max_seconds must be between 1 and 86400"
        );
        assert_eq!(
            with("retry_backoff_max_seconds", json!(10)),
            "webhooks.billing.retry_backoff_max_seconds must be at least retry_backoff_initial_seconds (30)"
        );
        assert_eq!(
            with("attempt_timeout_seconds", json!(301)),
            "webhooks.billing.attempt_timeout_seconds must be between 1 and 300"
        );
        assert_eq!(
            with("max_response_payload_kbs", json!(0)),
            "webhooks.billing.max_response_payload_kbs must be between 1 and 10240"
        );
        assert!(with("max_retries", json!(-1)).starts_with("webhooks.billing: "));
        assert!(with("max_retries", json!(1.5)).starts_with("webhooks.billing: "));
        let mut ok = base();
        ok["max_retries"] = json!(0);
        ok["retry_backoff_initial_seconds"] = json!(86_400);
        ok["retry_backoff_max_seconds"] = json!(86_400);
        let e = parse_one(ok).unwrap();
        assert_eq!(e.max_retries, 0);
    }

    #[test]
    fn unknown_fields_events_and_shapes_are_refused() {
        let e = err(json!({"cluster": "hooks", "secret": SECRET, "retries": 3}));
        assert!(
            e.starts_with("webhooks.billing: unknown field `retries`"),
            "{e}"
        );
        let e = err(json!({"cluster": "hooks", "secret": SECRET, "events": ["async_job.started"]}));
        assert!(
            e.starts_with("webhooks.billing.events: unknown event \"async_job.started\""),
            "{e}"
        );
        let e = err(json!({"cluster": "hooks", "secret": SECRET, "events": []}));
        assert_eq!(e, "webhooks.billing.events must name at least one event");
        let e = parse_one(json!({"cluster": "hooks", "secret": SECRET,
            "events": ["async_job.failed", "async_job.failed"]}))
        .unwrap();
        assert_eq!(e.events, vec![Event::Failed]);
        assert!(e.wants(Event::Failed) && !e.wants(Event::Completed));
        assert!(err(json!({"secret": SECRET})).contains("missing field `cluster`"));
        assert_eq!(
            err(json!({"cluster": "", "secret": SECRET})),
            "webhooks.billing.cluster must name an Envoy cluster"
        );
        let e = err(json!({"cluster": "hooks", "secret": SECRET, "path": "hooks"}));
        assert!(
            e.starts_with("webhooks.billing.path must start with '/'"),
            "{e}"
        );
        assert!(
            err(json!({"cluster": "hooks", "secret": SECRET, "path": "/a b"})).contains(".path")
        );
        assert!(
            err(json!({"cluster": "hooks", "secret": SECRET, "authority": ""}))
                .contains(".authority")
        );
        assert!(
            err(json!({"cluster": "hooks", "secret": SECRET, "virtual_keys": [""]}))
                .contains(".virtual_keys")
        );
        assert!(parse(json!([])).is_err());
        assert!(parse(json!({"billing": 3}))
            .unwrap_err()
            .starts_with("webhooks.billing: "));
        assert!(parse(json!({"": {"cluster": "c", "secret": SECRET}})).is_err());
        assert!(parse(json!({"a b": {"cluster": "c", "secret": SECRET}})).is_err());
    }

    #[test]
    fn custom_headers_are_checked() {
        let headers = |h: serde_json::Value| {
            parse_one(json!({"cluster": "hooks", "secret": SECRET, "headers": h}))
        };
        for name in [
            "Host",
            "content-length",
            "Content-Type",
            "Webhook-Signature",
            "webhook-id",
            "Connection",
            "TE",
        ] {
            let e = headers(json!({ name: "x" })).unwrap_err();
            assert!(e.contains("may not be configured"), "{name}: {e}");
            assert!(e.starts_with("webhooks.billing.headers: "), "{e}");
        }
        for name in ["", ":path", "x team", "x\u{e9}"] {
            assert!(
                headers(json!({ name: "x" }))
                    .unwrap_err()
                    .contains("not a valid header name"),
                "{name}"
            );
        }
        for value in ["a\r\nb", "a\u{0}", " padded", "padded\t"] {
            let e = headers(json!({ "x-team": value })).unwrap_err();
            assert!(
                e.starts_with("webhooks.billing.headers.x-team: not a valid header value"),
                "{e}"
            );
        }
        let e = headers(json!({"X-Team": "a", "x-team": "b"})).unwrap_err();
        assert!(e.contains("given twice"), "{e}");
        let e = headers(json!({"X-B": "2", "x-a": "", "X-Webhooks": "caf\u{e9} ok"})).unwrap();
        assert_eq!(
            e.headers,
            vec![
                ("x-a".to_string(), String::new()),
                ("x-b".to_string(), "2".to_string()),
                ("x-webhooks".to_string(), "caf\u{e9} ok".to_string()),
            ]
        );
    }

    fn endpoints() -> BTreeMap<String, WebhookEndpoint> {
        parse(json!({
            "billing": {"cluster": "hooks", "secret": SECRET, "virtual_keys": ["team-a"]},
            "open": {"cluster": "hooks", "secret": SECRET},
            "off": {"cluster": "hooks", "secret": SECRET, "disabled": true},
        }))
        .unwrap()
    }

    #[test]
    fn submit_picks_the_named_endpoint() {
        let eps = endpoints();
        assert!(endpoint_for_submit(&eps, None, Some("team-a"))
            .unwrap()
            .is_none());
        let e = endpoint_for_submit(&eps, Some(b"  billing\t"), Some("team-a"))
            .unwrap()
            .unwrap();
        assert_eq!(e.name, "billing");
        let e = endpoint_for_submit(&eps, Some(b"open"), None)
            .unwrap()
            .unwrap();
        assert_eq!(e.name, "open");
        assert_eq!(
            endpoint_for_submit(&eps, Some(b"open"), Some("team-b"))
                .unwrap()
                .unwrap()
                .name,
            "open"
        );
    }

    #[test]
    fn submit_refuses_unknown_disabled_and_foreign_endpoints() {
        let eps = endpoints();
        let e = endpoint_for_submit(&eps, Some(b"nope"), Some("team-a")).unwrap_err();
        assert_eq!(
            e,
            "x-bf-async-webhook: no webhook endpoint is named \"nope\""
        );
        // Reserved for team-a: to anyone else it does not exist.
        let e = endpoint_for_submit(&eps, Some(b"billing"), Some("team-b")).unwrap_err();
        assert_eq!(
            e,
            "x-bf-async-webhook: no webhook endpoint is named \"billing\""
        );
        assert!(endpoint_for_submit(&eps, Some(b"billing"), None).is_err());
        let e = endpoint_for_submit(&eps, Some(b"off"), Some("team-a")).unwrap_err();
        assert!(e.contains("disabled"), "{e}");
        assert!(endpoint_for_submit(&eps, Some(b"   "), None)
            .unwrap_err()
            .contains("empty"));
        assert!(endpoint_for_submit(&eps, Some(b"Billing"), Some("team-a")).is_err());
        let long = vec![0xffu8; 10_000];
        let e = endpoint_for_submit(&eps, Some(&long), None).unwrap_err();
        assert!(e.len() < 400, "{e}");
    }

    #[test]
    fn virtual_key_names_are_checked_against_the_configured_keys() {
        let eps = endpoints();
        assert!(check_virtual_keys(&eps, &["team-a", "team-b"]).is_ok());
        assert_eq!(
            check_virtual_keys(&eps, &["team-b"]).unwrap_err(),
            "webhooks.billing.virtual_keys: no virtual key is named \"team-a\""
        );
    }
}
