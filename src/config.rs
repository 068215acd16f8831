//! Plugin configuration (SPEC §3): parsed and validated once, when Envoy loads it.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::providers::ProviderKind;

/// Job slots are addressed with 20 bits of the job id, so that 102 random bits remain.
pub const MAX_JOBS_LIMIT: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub cluster: String,
    pub authority: String,
    pub base_path: String,
    /// The resolved key; `None` when neither `api_key` nor a set `api_key_env` gave one.
    pub api_key: Option<String>,
    /// Where the key was meant to come from, for messages that must not show the key.
    pub api_key_env: Option<String>,
    pub timeout_ms: u64,
    /// Azure OpenAI `api-version` query parameter.
    pub api_version: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualKey {
    pub name: String,
    /// SHA-256 of the key; keys given by value are hashed at load.
    pub sha256: [u8; 32],
}

/// Where a JWT verified by Envoy's `jwt_authn` filter leaves its payload:
/// `metadata.filter_metadata[namespace][payload_key][claim]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtOwner {
    #[serde(default = "default_jwt_namespace")]
    pub metadata_namespace: String,
    pub payload_key: String,
    #[serde(default = "default_jwt_claim")]
    pub claim: String,
}

fn default_jwt_namespace() -> String {
    "envoy.filters.http.jwt_authn".into()
}

fn default_jwt_claim() -> String {
    "sub".into()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub providers: BTreeMap<String, ProviderConfig>,
    pub virtual_keys: Vec<VirtualKey>,
    pub allow_unauthenticated: bool,
    /// Take the job owner from a verified JWT instead of (or besides) virtual keys.
    pub jwt_owner: Option<JwtOwner>,
    pub default_result_ttl_s: u64,
    pub max_result_ttl_s: u64,
    pub max_jobs: u32,
    pub max_input_chars: usize,
    pub max_body_bytes: usize,
    /// Provider callouts one worker runs at once; the rest wait in the queue.
    pub max_in_flight: usize,
    /// Every job ends (completed or failed) within this many seconds of its submit.
    pub job_deadline_s: u64,
    pub max_audio_bytes: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    #[serde(rename = "type")]
    kind: Option<String>,
    cluster: String,
    authority: Option<String>,
    base_path: Option<String>,
    api_key_env: Option<String>,
    api_key: Option<String>,
    timeout_ms: Option<u64>,
    api_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    value: Option<String>,
    sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    virtual_keys: Vec<RawKey>,
    #[serde(default)]
    allow_unauthenticated: bool,
    jwt_owner: Option<JwtOwner>,
    default_result_ttl_s: Option<u64>,
    max_result_ttl_s: Option<u64>,
    max_jobs: Option<u32>,
    max_input_chars: Option<usize>,
    max_body_bytes: Option<usize>,
    max_in_flight: Option<usize>,
    job_deadline_s: Option<u64>,
}

pub const DEFAULT_TIMEOUT_MS: u64 = 120_000;
pub const DEFAULT_AZURE_API_VERSION: &str = "2025-03-01-preview";

impl Config {
    /// Parses the plugin configuration. `env` looks up `api_key_env` variables
    /// (the VM's environment in Envoy, a map in tests).
    pub fn parse(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| format!("configuration is not valid: {e}"))?;

        if raw.providers.is_empty() {
            return Err("providers: configure at least one provider".into());
        }
        let mut providers = BTreeMap::new();
        for (name, p) in raw.providers {
            let provider = parse_provider(&name, p, env)?;
            providers.insert(name, provider);
        }

        let mut virtual_keys: Vec<VirtualKey> = Vec::new();
        for (i, k) in raw.virtual_keys.into_iter().enumerate() {
            let key = parse_key(i, k)?;
            if virtual_keys.iter().any(|v| v.name == key.name) {
                return Err(format!("virtual_keys[{i}]: name {:?} is used twice", key.name));
            }
            if virtual_keys.iter().any(|v| v.sha256 == key.sha256) {
                return Err(format!("virtual_keys[{i}]: the same key is configured twice"));
            }
            virtual_keys.push(key);
        }
        if virtual_keys.is_empty() && !raw.allow_unauthenticated && raw.jwt_owner.is_none() {
            return Err(
                "virtual_keys: no keys configured; add keys, configure jwt_owner, or set allow_unauthenticated: true"
                    .into(),
            );
        }
        if let Some(j) = &raw.jwt_owner {
            if j.metadata_namespace.is_empty() || j.payload_key.is_empty() || j.claim.is_empty() {
                return Err("jwt_owner: metadata_namespace, payload_key and claim must not be empty".into());
            }
        }

        let max_result_ttl_s = raw.max_result_ttl_s.unwrap_or(86_400);
        let default_result_ttl_s = raw.default_result_ttl_s.unwrap_or(3600.min(max_result_ttl_s));
        if max_result_ttl_s == 0 {
            return Err("max_result_ttl_s must be at least 1".into());
        }
        if default_result_ttl_s == 0 || default_result_ttl_s > max_result_ttl_s {
            return Err(format!(
                "default_result_ttl_s must be between 1 and max_result_ttl_s ({max_result_ttl_s})"
            ));
        }
        let max_jobs = raw.max_jobs.unwrap_or(10_000);
        if max_jobs == 0 || max_jobs > MAX_JOBS_LIMIT {
            return Err(format!("max_jobs must be between 1 and {MAX_JOBS_LIMIT}"));
        }
        let max_input_chars = raw.max_input_chars.unwrap_or(100_000);
        if max_input_chars == 0 {
            return Err("max_input_chars must be at least 1".into());
        }
        // Room for the input in UTF-8 (up to 4 bytes a char), escapes and the other fields.
        let max_body_bytes = raw
            .max_body_bytes
            .unwrap_or_else(|| max_input_chars.saturating_mul(6).saturating_add(64 * 1024));
        if max_body_bytes < 1024 {
            return Err("max_body_bytes must be at least 1024".into());
        }
        let max_in_flight = raw.max_in_flight.unwrap_or(64);
        if max_in_flight == 0 {
            return Err("max_in_flight must be at least 1".into());
        }
        let longest_chain_ms: u64 = providers.values().map(|p| p.timeout_ms).max().unwrap_or(0);
        // By default a job may use its primary and three fallbacks at the slowest timeout.
        let job_deadline_s = raw
            .job_deadline_s
            .unwrap_or_else(|| (longest_chain_ms.saturating_mul(4) / 1000).max(60) + 30);
        if job_deadline_s == 0 {
            return Err("job_deadline_s must be at least 1".into());
        }

        Ok(Config {
            providers,
            virtual_keys,
            allow_unauthenticated: raw.allow_unauthenticated,
            jwt_owner: raw.jwt_owner,
            default_result_ttl_s,
            max_result_ttl_s,
            max_jobs,
            max_input_chars,
            max_body_bytes,
            max_in_flight,
            job_deadline_s,
            max_audio_bytes: 26_214_400,
        })
    }
}

fn parse_provider(
    name: &str,
    p: RawProvider,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ProviderConfig, String> {
    let at = format!("providers.{name}");
    if name.is_empty() || name.contains('/') {
        return Err(format!("{at}: a provider name must be non-empty and contain no '/'"));
    }
    let kind_name = p.kind.unwrap_or_else(|| name.to_string());
    let kind = ProviderKind::from_name(&kind_name).ok_or_else(|| {
        format!("{at}.type: unknown provider type {kind_name:?}; one of openai, azure, elevenlabs, gemini")
    })?;
    if p.cluster.is_empty() {
        return Err(format!("{at}.cluster must name an Envoy cluster"));
    }
    if p.api_key.is_some() && p.api_key_env.is_some() {
        return Err(format!("{at}: give api_key or api_key_env, not both"));
    }
    let base_path = p
        .base_path
        .unwrap_or_else(|| kind.default_base_path().to_string());
    if !(base_path.is_empty() || base_path.starts_with('/')) || base_path.ends_with('/') {
        return Err(format!(
            "{at}.base_path must start with '/' and not end with '/' (got {base_path:?})"
        ));
    }
    let timeout_ms = p.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 {
        // Envoy reads a zero callout timeout as "no timeout": never what is meant.
        return Err(format!("{at}.timeout_ms must be at least 1"));
    }
    let api_key = match (&p.api_key, &p.api_key_env) {
        (Some(k), _) if k.is_empty() => return Err(format!("{at}.api_key is empty")),
        (Some(k), _) => Some(k.clone()),
        (None, Some(var)) => env(var).filter(|v| !v.is_empty()),
        (None, None) => None,
    };
    if let Some(k) = &api_key {
        if k.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
            return Err(format!("{at}: the API key holds characters not allowed in a header"));
        }
    }
    Ok(ProviderConfig {
        name: name.to_string(),
        kind,
        authority: p.authority.unwrap_or_else(|| p.cluster.clone()),
        cluster: p.cluster,
        base_path,
        api_key,
        api_key_env: p.api_key_env,
        timeout_ms,
        api_version: p
            .api_version
            .unwrap_or_else(|| DEFAULT_AZURE_API_VERSION.to_string()),
    })
}

fn parse_key(i: usize, k: RawKey) -> Result<VirtualKey, String> {
    let at = format!("virtual_keys[{i}]");
    if k.name.is_empty() {
        return Err(format!("{at}.name must not be empty"));
    }
    let sha256 = match (k.value, k.sha256) {
        (Some(v), None) => {
            if !v.starts_with(crate::auth::KEY_PREFIX) || v.len() <= crate::auth::KEY_PREFIX.len() {
                return Err(format!("{at}.value: virtual keys start with {}", crate::auth::KEY_PREFIX));
            }
            sha256_of(v.as_bytes())
        }
        (None, Some(hex)) => parse_hex32(&hex)
            .ok_or_else(|| format!("{at}.sha256 must be 64 lowercase hex digits"))?,
        _ => return Err(format!("{at}: give exactly one of value or sha256")),
    };
    Ok(VirtualKey { name: k.name, sha256 })
}

pub fn sha256_of(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = hex.get(i * 2..i * 2 + 2)?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(json: &str) -> Result<Config, String> {
        Config::parse(json.as_bytes(), &no_env)
    }

    const MINIMAL: &str = r#"{"providers":{"openai":{"cluster":"openai"}},
        "virtual_keys":[{"name":"a","value":"sk-bf-a"}]}"#;

    #[test]
    fn defaults_follow_the_spec() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.default_result_ttl_s, 3600);
        assert_eq!(c.max_result_ttl_s, 86_400);
        assert_eq!(c.max_jobs, 10_000);
        assert_eq!(c.max_input_chars, 100_000);
        let p = &c.providers["openai"];
        assert_eq!(p.kind, ProviderKind::OpenAi);
        assert_eq!(p.authority, "openai");
        assert_eq!(p.base_path, "/v1");
        assert_eq!(p.timeout_ms, 120_000);
        assert_eq!(p.api_key, None);
    }

    #[test]
    fn type_defaults_to_the_name_and_keys_come_from_env() {
        let env = |k: &str| (k == "LOCAL_KEY").then(|| "secret".to_string());
        let c = Config::parse(
            br#"{"providers":{"local":{"type":"openai","cluster":"tts","api_key_env":"LOCAL_KEY","base_path":""}},
                 "allow_unauthenticated":true}"#,
            &env,
        )
        .unwrap();
        assert_eq!(c.providers["local"].kind, ProviderKind::OpenAi);
        assert_eq!(c.providers["local"].api_key.as_deref(), Some("secret"));
        assert_eq!(c.providers["local"].base_path, "");
        let err = parse(r#"{"providers":{"local":{"cluster":"x"}},"allow_unauthenticated":true}"#).unwrap_err();
        assert!(err.contains("unknown provider type \"local\""), "{err}");
    }

    #[test]
    fn sha256_keys_match_value_keys() {
        let hex: String = sha256_of(b"sk-bf-b").iter().map(|b| format!("{b:02x}")).collect();
        let c = parse(&format!(
            r#"{{"providers":{{"openai":{{"cluster":"o"}}}},"virtual_keys":[{{"name":"b","sha256":"{hex}"}}]}}"#
        ))
        .unwrap();
        assert_eq!(c.virtual_keys[0].sha256, sha256_of(b"sk-bf-b"));
    }

    #[test]
    fn jwt_owner_stands_in_for_virtual_keys() {
        let c = parse(r#"{"providers":{"openai":{"cluster":"o"}},"jwt_owner":{"payload_key":"jwt_payload"}}"#).unwrap();
        let j = c.jwt_owner.unwrap();
        assert_eq!((j.metadata_namespace.as_str(), j.claim.as_str()), ("envoy.filters.http.jwt_authn", "sub"));
        let err = parse(r#"{"providers":{"openai":{"cluster":"o"}},"jwt_owner":{"payload_key":""}}"#).unwrap_err();
        assert!(err.contains("jwt_owner"), "{err}");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            ("{", "not valid"),
            (r#"{"providers":{}}"#, "at least one provider"),
            (r#"{"providers":{"openai":{"cluster":"o"}}}"#, "no keys configured"),
            (r#"{"providers":{"openai":{"cluster":"o","timeout_ms":0}},"allow_unauthenticated":true}"#, "timeout_ms"),
            (r#"{"providers":{"openai":{"cluster":"o","base_path":"v1/"}},"allow_unauthenticated":true}"#, "base_path"),
            (r#"{"providers":{"openai":{"cluster":"o","colour":1}},"allow_unauthenticated":true}"#, "unknown field"),
            (r#"{"providers":{"openai":{"cluster":"o"}},"virtual_keys":[{"name":"a","value":"nope"}]}"#, "start with sk-bf-"),
            (r#"{"providers":{"openai":{"cluster":"o"}},"virtual_keys":[{"name":"a","sha256":"AB"}]}"#, "64 lowercase hex"),
            (r#"{"providers":{"openai":{"cluster":"o"}},"virtual_keys":[{"name":"a"}]}"#, "exactly one"),
            (r#"{"providers":{"openai":{"cluster":"o"}},"virtual_keys":[{"name":"a","value":"sk-bf-1"},{"name":"a","value":"sk-bf-2"}]}"#, "used twice"),
            (r#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"default_result_ttl_s":10,"max_result_ttl_s":5}"#, "default_result_ttl_s"),
            (r#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"max_jobs":0}"#, "max_jobs"),
            (r#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"max_jobs":2000000}"#, "max_jobs"),
            (r#"{"providers":{"a/b":{"type":"openai","cluster":"o"}},"allow_unauthenticated":true}"#, "no '/'"),
        ];
        for (json, needle) in cases {
            let err = parse(json).unwrap_err();
            assert!(err.contains(needle), "{json} -> {err}");
        }
    }
}
