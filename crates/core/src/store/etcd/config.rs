//! The plugin config's `store`: shared data (the default) or etcd.

use serde_json::{Map, Value};

use super::keys::Keys;
use super::request::Request;
use crate::platform::Callout;

pub const DEFAULT_PREFIX: &str = "/async-speech/";
pub const DEFAULT_TIMEOUT_MS: u64 = 2000;
pub const TIMEOUT_MS_MIN: u64 = 1;
pub const TIMEOUT_MS_MAX: u64 = 60_000;
/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 1_572_864;
pub const MAX_VALUE_BYTES_MIN: u64 = 1024;
pub const MAX_VALUE_BYTES_MAX: u64 = 1_572_864;
/// The longest `prefix`, so that every key stays short (at most
/// `PREFIX_MAX_BYTES` + 49 bytes with a 36-character job id).
pub const PREFIX_MAX_BYTES: usize = 200;
/// What a request that writes one part carries besides the part: its keys
/// (at most ~250 bytes each; a conditional write names the part's key, the
/// compared key and the key read back on failure), the lease and etcd's
/// framing (under 50 bytes measured). etcd refuses a request of exactly
/// `--max-request-bytes` bytes of value. At most half of `max_value_bytes`.
pub const REQUEST_HEADROOM_BYTES: u64 = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    SharedData,
    Etcd(EtcdConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The Envoy cluster in front of etcd's client port.
    pub cluster: String,
    /// `:authority` of the calls (default: the cluster's name).
    pub authority: String,
    /// Every key starts with it; it starts and ends with '/'.
    pub prefix: String,
    /// Timeout of each call to etcd.
    pub timeout_ms: u64,
    /// The largest request etcd takes (its `--max-request-bytes`).
    pub max_value_bytes: u64,
}

impl EtcdConfig {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }

    /// The largest part of audio one request carries: `max_value_bytes` less
    /// the room for keys and etcd's framing ([`REQUEST_HEADROOM_BYTES`], or
    /// half of `max_value_bytes` when that is less).
    pub fn part_bytes(&self) -> usize {
        let headroom = REQUEST_HEADROOM_BYTES.min(self.max_value_bytes / 2);
        usize::try_from(self.max_value_bytes.saturating_sub(headroom))
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// A request as a callout to etcd's cluster, with the store's timeout.
    pub fn callout(&self, request: &Request) -> Callout {
        request.callout(&self.cluster, &self.authority, self.timeout_ms)
    }
}

const ETCD_SETTINGS: [&str; 6] = [
    "type",
    "cluster",
    "authority",
    "prefix",
    "timeout_ms",
    "max_value_bytes",
];

/// The `store` setting of the plugin config; `None` (or `null`) is shared data.
/// Errors name the setting (`store.timeout_ms must be between 1 and 60000, ...`).
pub fn parse_store_config(value: Option<&Value>) -> Result<StoreConfig, String> {
    let m = match value {
        None | Some(Value::Null) => return Ok(StoreConfig::SharedData),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(
                "store must be an object, e.g. {\"type\": \"etcd\", \"cluster\": \"etcd\"}".into(),
            )
        }
    };
    let kind = match m.get("type") {
        None => "shared_data",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err("store.type must be \"shared_data\" or \"etcd\"".into()),
    };
    match kind {
        "shared_data" => {
            if let Some(k) = m.keys().find(|k| *k != "type") {
                return Err(format!(
                    "store.{k} is not a setting of store type shared_data (only etcd has settings)"
                ));
            }
            Ok(StoreConfig::SharedData)
        }
        "etcd" => parse_etcd(m).map(StoreConfig::Etcd),
        other => Err(format!(
            "store.type must be \"shared_data\" or \"etcd\" (got {other:?})"
        )),
    }
}

fn parse_etcd(m: &Map<String, Value>) -> Result<EtcdConfig, String> {
    if let Some(k) = m.keys().find(|k| !ETCD_SETTINGS.contains(&k.as_str())) {
        return Err(format!(
            "store.{k} is not a setting of store type etcd (expected one of {})",
            ETCD_SETTINGS.join(", ")
        ));
    }
    let cluster = match string(m, "cluster")? {
        Some(c) => c,
        None => return Err("store.cluster is required with store type etcd".into()),
    };
    let authority = string(m, "authority")?.unwrap_or_else(|| cluster.clone());
    let prefix = string(m, "prefix")?.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(format!(
            "store.prefix must start and end with '/' (got {prefix:?})"
        ));
    }
    if prefix.len() > PREFIX_MAX_BYTES {
        return Err(format!(
            "store.prefix must be at most {PREFIX_MAX_BYTES} bytes"
        ));
    }
    if prefix.chars().any(char::is_control) {
        return Err("store.prefix must not contain control characters".into());
    }
    Ok(EtcdConfig {
        cluster,
        authority,
        prefix,
        timeout_ms: number(
            m,
            "timeout_ms",
            TIMEOUT_MS_MIN,
            TIMEOUT_MS_MAX,
            DEFAULT_TIMEOUT_MS,
        )?,
        max_value_bytes: number(
            m,
            "max_value_bytes",
            MAX_VALUE_BYTES_MIN,
            MAX_VALUE_BYTES_MAX,
            DEFAULT_MAX_VALUE_BYTES,
        )?,
    })
}

/// A non-empty string setting, `None` when absent.
fn string(m: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match m.get(name) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(format!("store.{name} must be a non-empty string")),
    }
}

/// A whole number in `min..=max`, `default` when absent (the wording of
/// `config::Range`).
fn number(
    m: &Map<String, Value>,
    name: &str,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64, String> {
    match m.get(name) {
        None => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!(
                "store.{name} must be between {min} and {max}, a whole number (got {v})"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<StoreConfig, String> {
        parse_store_config(Some(&v))
    }

    fn etcd(v: Value) -> EtcdConfig {
        match parse(v).unwrap() {
            StoreConfig::Etcd(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shared_data_is_the_default() {
        assert_eq!(parse_store_config(None), Ok(StoreConfig::SharedData));
        assert_eq!(parse(Value::Null), Ok(StoreConfig::SharedData));
        assert_eq!(parse(json!({})), Ok(StoreConfig::SharedData));
        assert_eq!(
            parse(json!({"type": "shared_data"})),
            Ok(StoreConfig::SharedData)
        );
        let e = parse(json!({"type": "shared_data", "cluster": "etcd"})).unwrap_err();
        assert!(e.starts_with("store.cluster is not a setting"), "{e}");
        let e = parse(json!({"cluster": "etcd"})).unwrap_err();
        assert!(e.starts_with("store.cluster is not a setting"), "{e}");
    }

    #[test]
    fn etcd_defaults() {
        let e = etcd(json!({"type": "etcd", "cluster": "etcd"}));
        assert_eq!(
            e,
            EtcdConfig {
                cluster: "etcd".into(),
                authority: "etcd".into(),
                prefix: "/async-speech/".into(),
                timeout_ms: 2000,
                max_value_bytes: 1_572_864,
            }
        );
        assert_eq!(e.part_bytes(), 1_570_816);
        assert_eq!(e.keys().queue_prefix(), b"/async-speech/queue/".to_vec());
        let c = e.callout(&super::super::request::range(b"k"));
        assert_eq!((c.cluster.as_str(), c.timeout_ms), ("etcd", 2000));
    }

    #[test]
    fn etcd_every_setting() {
        let e = etcd(
            json!({"type": "etcd", "cluster": "etcd-tls", "authority": "etcd.internal",
            "prefix": "/tts/prod/", "timeout_ms": 60000, "max_value_bytes": 1024}),
        );
        assert_eq!(e.authority, "etcd.internal");
        assert_eq!(e.prefix, "/tts/prod/");
        assert_eq!((e.timeout_ms, e.max_value_bytes), (60000, 1024));
        assert_eq!(e.part_bytes(), 512);
    }

    #[test]
    fn errors_name_the_setting() {
        let cases = [
            (json!([]), "store must be an object"),
            (json!({"type": 1}), "store.type must be"),
            (
                json!({"type": "redis"}),
                "store.type must be \"shared_data\" or \"etcd\" (got \"redis\")",
            ),
            (json!({"type": "etcd"}), "store.cluster is required"),
            (
                json!({"type": "etcd", "cluster": ""}),
                "store.cluster must be a non-empty string",
            ),
            (
                json!({"type": "etcd", "cluster": 5}),
                "store.cluster must be a non-empty string",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "authority": null}),
                "store.authority must be",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "prefix": "async/"}),
                "store.prefix must start and end with '/'",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "prefix": "/async"}),
                "store.prefix must start and end with '/'",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "prefix": format!("/{}/", "a".repeat(199))}),
                "store.prefix must be at most 200 bytes",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "prefix": "/a\nb/"}),
                "store.prefix must not contain control",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "timeout_ms": 0}),
                "store.timeout_ms must be between 1 and 60000, a whole number (got 0)",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "timeout_ms": 60001}),
                "store.timeout_ms must be between 1 and 60000",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "timeout_ms": 1.5}),
                "store.timeout_ms must be between 1 and 60000",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "timeout_ms": "2000"}),
                "store.timeout_ms must be between 1 and 60000",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "max_value_bytes": 1023}),
                "store.max_value_bytes must be between 1024 and 1572864",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "max_value_bytes": 1572865}),
                "store.max_value_bytes must be between 1024 and 1572864",
            ),
            (
                json!({"type": "etcd", "cluster": "e", "endpoints": []}),
                "store.endpoints is not a setting of store type etcd",
            ),
        ];
        for (v, want) in cases {
            let got = parse(v.clone()).unwrap_err();
            assert!(got.starts_with(want), "{v}: {got}");
        }
        assert_eq!(
            etcd(
                json!({"type": "etcd", "cluster": "e", "prefix": format!("/{}/", "a".repeat(198))})
            )
            .prefix
            .len(),
            200
        );
    }
}
