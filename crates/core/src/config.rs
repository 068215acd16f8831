//! Plugin configuration: parsed and validated once, when Envoy loads it.
//!
//! Every number has a range, listed once in [`RANGES`]; a value outside it
//! refuses the configuration with an error that names the setting.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Number;
use sha2::{Digest, Sha256};

use crate::governance::{parse_pricing, parse_rules, Pricing, Rules};
use crate::store::etcd::{parse_store_config, StoreConfig};
use crate::webhooks::{check_virtual_keys, parse_webhooks, WebhookEndpoint};

/// The accepted values of one numeric setting, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The setting's name as written in the configuration (per provider for `providers.*`).
    pub setting: &'static str,
    pub min: u64,
    pub max: u64,
}

impl Range {
    const fn new(setting: &'static str, min: u64, max: u64) -> Range {
        Range { setting, min, max }
    }

    /// The configured value (or `default` when absent), refused outside the range.
    /// `at` is the path before the setting's name, e.g. `providers.openai.`.
    fn check(&self, at: &str, value: Option<&Number>, default: u64) -> Result<u64, String> {
        let Some(n) = value else { return Ok(default) };
        match n.as_u64() {
            Some(v) if (self.min..=self.max).contains(&v) => Ok(v),
            _ => Err(format!(
                "{at}{} must be between {} and {}, a whole number (got {n})",
                self.setting, self.min, self.max
            )),
        }
    }
}

/// Job slots are addressed with 20 bits of the job id, so that 102 random bits remain.
pub use crate::ids::MAX_JOBS_LIMIT;

pub const DEFAULT_RESULT_TTL_S: Range = Range::new("default_result_ttl_s", 1, 2_592_000);
pub const MAX_RESULT_TTL_S: Range = Range::new("max_result_ttl_s", 1, 2_592_000);
pub const MAX_JOBS: Range = Range::new("max_jobs", 1, MAX_JOBS_LIMIT as u64);
pub const MAX_INPUT_CHARS: Range = Range::new("max_input_chars", 1, 1_000_000);
pub const MAX_BODY_BYTES: Range = Range::new("max_body_bytes", 1024, 67_108_864);
pub const MAX_IN_FLIGHT: Range = Range::new("max_in_flight", 1, 10_000);
pub const JOB_DEADLINE_S: Range = Range::new("job_deadline_s", 1, 604_800);
pub const MAX_FALLBACKS: Range = Range::new("max_fallbacks", 0, 50);
pub const MAX_AUDIO_BYTES: Range = Range::new("max_audio_bytes", 1024, 268_435_456);
/// Per provider: `providers.<name>.timeout_ms`.
pub const PROVIDER_TIMEOUT_MS: Range = Range::new("timeout_ms", 1, 600_000);
/// Per provider: `providers.<name>.max_input_chars`.
pub const PROVIDER_MAX_INPUT_CHARS: Range = Range::new("max_input_chars", 1, 1_000_000);
/// Per provider: `providers.<name>.max_parallel_chunks`.
pub const PROVIDER_MAX_PARALLEL_CHUNKS: Range = Range::new("max_parallel_chunks", 1, 16);

/// Every numeric setting: the top-level ones, then the per-provider ones.
pub const RANGES: [Range; 12] = [
    DEFAULT_RESULT_TTL_S,
    MAX_RESULT_TTL_S,
    MAX_JOBS,
    MAX_INPUT_CHARS,
    MAX_BODY_BYTES,
    MAX_IN_FLIGHT,
    JOB_DEADLINE_S,
    MAX_FALLBACKS,
    MAX_AUDIO_BYTES,
    PROVIDER_TIMEOUT_MS,
    PROVIDER_MAX_INPUT_CHARS,
    PROVIDER_MAX_PARALLEL_CHUNKS,
];

pub const DEFAULT_TIMEOUT_MS: u64 = 120_000;
pub const DEFAULT_AZURE_API_VERSION: &str = "2025-03-01-preview";
pub const DEFAULT_MAX_FALLBACKS: u64 = 5;
pub const DEFAULT_MAX_AUDIO_BYTES: u64 = 26_214_400;
pub const DEFAULT_MAX_PARALLEL_CHUNKS: u64 = 3;

/// Virtual keys start with this.
pub const KEY_PREFIX: &str = "sk-bf-";

/// A provider's `type`: which API it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProviderKind {
    OpenAi,
    Azure,
    ElevenLabs,
    Gemini,
}

impl ProviderKind {
    pub fn from_name(name: &str) -> Option<ProviderKind> {
        match name {
            "openai" => Some(ProviderKind::OpenAi),
            "azure" => Some(ProviderKind::Azure),
            "elevenlabs" => Some(ProviderKind::ElevenLabs),
            "gemini" => Some(ProviderKind::Gemini),
            _ => None,
        }
    }

    pub fn default_base_path(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "/v1",
            ProviderKind::Azure | ProviderKind::ElevenLabs | ProviderKind::Gemini => "",
        }
    }

    /// Longest input one call takes by default: the provider's own cap.
    pub fn default_max_input_chars(self) -> u64 {
        match self {
            ProviderKind::OpenAi | ProviderKind::Azure => 4096,
            ProviderKind::ElevenLabs | ProviderKind::Gemini => 5000,
        }
    }
}

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
    /// Longest input one call to this provider takes.
    pub max_input_chars: usize,
    /// Chunks of one job sent to this provider at once.
    pub max_parallel_chunks: usize,
    /// The global `max_audio_bytes`, copied here so that a provider's `parse` can apply it.
    pub max_audio_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualKey {
    pub name: String,
    /// SHA-256 of the key; keys given by value are hashed at load.
    pub sha256: [u8; 32],
    /// Expiry, allowed models and limits.
    pub rules: Rules,
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
    /// Longest `fallbacks` array a submit may give.
    pub max_fallbacks: usize,
    /// Largest audio one job may hold; a larger provider answer fails the job with 502.
    pub max_audio_bytes: usize,
    /// Named webhook endpoints a submit may ask for.
    pub webhooks: BTreeMap<String, WebhookEndpoint>,
    /// Where jobs live: this Envoy's shared data, or etcd.
    pub store: StoreConfig,
    /// Dollars per million characters, by model, for budgets.
    pub pricing: Pricing,
    /// The models the configuration names exactly (in `pricing`, or a key's
    /// `allowed_models`, without `*`): the only ones stats name.
    pub stat_models: BTreeSet<String>,
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
    timeout_ms: Option<Number>,
    api_version: Option<String>,
    max_input_chars: Option<Number>,
    max_parallel_chunks: Option<Number>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    value: Option<String>,
    sha256: Option<String>,
    expires_at: Option<String>,
    allowed_models: Option<Vec<String>>,
    limits: Option<serde_json::Value>,
}

/// Numbers are kept as JSON numbers until checked against their range, so that a
/// negative or fractional value is refused with the setting's name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    virtual_keys: Vec<RawKey>,
    #[serde(default)]
    allow_unauthenticated: bool,
    jwt_owner: Option<JwtOwner>,
    default_result_ttl_s: Option<Number>,
    max_result_ttl_s: Option<Number>,
    max_jobs: Option<Number>,
    max_input_chars: Option<Number>,
    max_body_bytes: Option<Number>,
    max_in_flight: Option<Number>,
    job_deadline_s: Option<Number>,
    max_fallbacks: Option<Number>,
    max_audio_bytes: Option<Number>,
    /// Parsed by `webhooks::parse_webhooks`.
    webhooks: Option<serde_json::Value>,
    /// Parsed by `store::etcd::parse_store_config`.
    store: Option<serde_json::Value>,
    /// Parsed by `governance::parse_pricing`.
    pricing: Option<serde_json::Value>,
}

/// The top-level numbers, checked; `job_deadline_s` waits for the providers.
struct Limits {
    default_result_ttl_s: u64,
    max_result_ttl_s: u64,
    max_jobs: u32,
    max_input_chars: usize,
    max_body_bytes: usize,
    max_in_flight: usize,
    max_fallbacks: usize,
    max_audio_bytes: usize,
}

impl Config {
    /// The rules of the virtual key named `name`, if it is one.
    /// A model as stats name it: as the client named it when the
    /// configuration names it exactly (a `pricing` entry, or one of a key's
    /// `allowed_models`, without `*`), else `<provider>/other`. Clients choose
    /// model names, and every stat name lives as long as Envoy does.
    pub fn stat_model(&self, model: &str) -> String {
        match model.split_once('/') {
            _ if model.is_empty() => String::new(),
            _ if self.stat_models.contains(model) => model.to_string(),
            Some((provider, _)) if self.providers.contains_key(provider) => {
                format!("{provider}/other")
            }
            _ => "other".to_string(),
        }
    }

    pub fn key(&self, name: &str) -> Option<&VirtualKey> {
        self.virtual_keys.iter().find(|k| k.name == name)
    }

    /// What an operator should hear about a configuration that loads.
    pub fn warnings(&self) -> Vec<String> {
        self.providers
            .values()
            .filter(|p| p.api_key.is_none())
            .filter_map(|p| {
                let var = p.api_key_env.as_ref()?;
                Some(format!(
                    "provider {}: {var} is not set; its attempts will fail until it is",
                    p.name
                ))
            })
            .collect()
    }

    /// Parses the plugin configuration. `env` looks up `api_key_env` variables
    /// (the VM's environment in Envoy, a map in tests).
    pub fn parse(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
        let raw: RawConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("configuration is not valid: {e}"))?;
        let limits = parse_limits(&raw)?;
        let providers = parse_providers(raw.providers, env, limits.max_audio_bytes)?;
        let virtual_keys = parse_keys(raw.virtual_keys, limits.max_jobs)?;
        let pricing = parse_pricing(raw.pricing.as_ref())?;
        check_who_may_enter(
            &virtual_keys,
            raw.allow_unauthenticated,
            raw.jwt_owner.as_ref(),
        )?;
        let job_deadline_s = JOB_DEADLINE_S.check(
            "",
            raw.job_deadline_s.as_ref(),
            default_deadline_s(&providers),
        )?;
        let webhooks = match &raw.webhooks {
            Some(value) => parse_webhooks(value, env)?,
            None => BTreeMap::new(),
        };
        let key_names: Vec<&str> = virtual_keys.iter().map(|k| k.name.as_str()).collect();
        check_virtual_keys(&webhooks, &key_names)?;
        let store = parse_store_config(raw.store.as_ref())?;
        let stat_models = named_models(&pricing, &virtual_keys);
        Ok(Config {
            store,
            pricing,
            stat_models,
            providers,
            virtual_keys,
            allow_unauthenticated: raw.allow_unauthenticated,
            jwt_owner: raw.jwt_owner,
            default_result_ttl_s: limits.default_result_ttl_s,
            max_result_ttl_s: limits.max_result_ttl_s,
            max_jobs: limits.max_jobs,
            max_input_chars: limits.max_input_chars,
            max_body_bytes: limits.max_body_bytes,
            max_in_flight: limits.max_in_flight,
            job_deadline_s,
            max_fallbacks: limits.max_fallbacks,
            max_audio_bytes: limits.max_audio_bytes,
            webhooks,
        })
    }
}

/// The models named exactly, by `pricing` or any key's `allowed_models`.
fn named_models(pricing: &Pricing, keys: &[VirtualKey]) -> BTreeSet<String> {
    let allowed = keys
        .iter()
        .filter_map(|k| k.rules.allowed_models.as_ref())
        .flatten();
    pricing
        .patterns()
        .chain(allowed)
        .filter_map(|p| p.exact())
        .map(str::to_string)
        .collect()
}

/// A checked value as `usize`/`u32`; every range above fits both, even on wasm32.
fn narrow<T: TryFrom<u64>>(range: &Range, value: u64) -> Result<T, String> {
    T::try_from(value).map_err(|_| format!("{} is too large for this platform", range.setting))
}

fn parse_limits(raw: &RawConfig) -> Result<Limits, String> {
    let max_result_ttl_s = MAX_RESULT_TTL_S.check("", raw.max_result_ttl_s.as_ref(), 86_400)?;
    let default_result_ttl_s = DEFAULT_RESULT_TTL_S.check(
        "",
        raw.default_result_ttl_s.as_ref(),
        3600.min(max_result_ttl_s),
    )?;
    if default_result_ttl_s > max_result_ttl_s {
        return Err(format!(
            "default_result_ttl_s ({default_result_ttl_s}) must not be above max_result_ttl_s ({max_result_ttl_s})"
        ));
    }
    let max_input_chars = MAX_INPUT_CHARS.check("", raw.max_input_chars.as_ref(), 100_000)?;
    // Room for the input in UTF-8 (up to 4 bytes a char), escapes and the other fields:
    // at most 6 MB + 64 KiB, inside the range of max_body_bytes.
    let body_default = max_input_chars.saturating_mul(6).saturating_add(64 * 1024);
    let max_jobs = MAX_JOBS.check("", raw.max_jobs.as_ref(), 10_000)?;
    let max_body_bytes = MAX_BODY_BYTES.check("", raw.max_body_bytes.as_ref(), body_default)?;
    let max_in_flight = MAX_IN_FLIGHT.check("", raw.max_in_flight.as_ref(), 64)?;
    let max_fallbacks =
        MAX_FALLBACKS.check("", raw.max_fallbacks.as_ref(), DEFAULT_MAX_FALLBACKS)?;
    let max_audio_bytes =
        MAX_AUDIO_BYTES.check("", raw.max_audio_bytes.as_ref(), DEFAULT_MAX_AUDIO_BYTES)?;
    Ok(Limits {
        default_result_ttl_s,
        max_result_ttl_s,
        max_jobs: narrow(&MAX_JOBS, max_jobs)?,
        max_input_chars: narrow(&MAX_INPUT_CHARS, max_input_chars)?,
        max_body_bytes: narrow(&MAX_BODY_BYTES, max_body_bytes)?,
        max_in_flight: narrow(&MAX_IN_FLIGHT, max_in_flight)?,
        max_fallbacks: narrow(&MAX_FALLBACKS, max_fallbacks)?,
        max_audio_bytes: narrow(&MAX_AUDIO_BYTES, max_audio_bytes)?,
    })
}

/// 4 × the largest `timeout_ms` + 30 s, at least 90 s (a job may use its
/// primary and three fallbacks at the slowest timeout).
fn default_deadline_s(providers: &BTreeMap<String, ProviderConfig>) -> u64 {
    let longest_ms = providers.values().map(|p| p.timeout_ms).max().unwrap_or(0);
    (longest_ms.saturating_mul(4) / 1000).max(60) + 30
}

fn parse_providers(
    raw: BTreeMap<String, RawProvider>,
    env: &dyn Fn(&str) -> Option<String>,
    max_audio_bytes: usize,
) -> Result<BTreeMap<String, ProviderConfig>, String> {
    if raw.is_empty() {
        return Err("providers: configure at least one provider".into());
    }
    let mut providers = BTreeMap::new();
    for (name, p) in raw {
        let provider = parse_provider(&name, p, env, max_audio_bytes)?;
        providers.insert(name, provider);
    }
    Ok(providers)
}

fn parse_keys(raw: Vec<RawKey>, max_jobs: u32) -> Result<Vec<VirtualKey>, String> {
    let mut virtual_keys: Vec<VirtualKey> = Vec::new();
    for (i, k) in raw.into_iter().enumerate() {
        let key = parse_key(i, k, max_jobs)?;
        if virtual_keys.iter().any(|v| v.name == key.name) {
            return Err(format!(
                "virtual_keys[{i}]: name {:?} is used twice",
                key.name
            ));
        }
        if virtual_keys.iter().any(|v| v.sha256 == key.sha256) {
            return Err(format!(
                "virtual_keys[{i}]: the same key is configured twice"
            ));
        }
        virtual_keys.push(key);
    }
    Ok(virtual_keys)
}

fn check_who_may_enter(
    virtual_keys: &[VirtualKey],
    allow_unauthenticated: bool,
    jwt_owner: Option<&JwtOwner>,
) -> Result<(), String> {
    if virtual_keys.is_empty() && !allow_unauthenticated && jwt_owner.is_none() {
        return Err(
            "virtual_keys: no keys configured; add keys, configure jwt_owner, or set allow_unauthenticated: true"
                .into(),
        );
    }
    if let Some(j) = jwt_owner {
        if j.metadata_namespace.is_empty() || j.payload_key.is_empty() || j.claim.is_empty() {
            return Err(
                "jwt_owner: metadata_namespace, payload_key and claim must not be empty".into(),
            );
        }
    }
    Ok(())
}

fn parse_provider(
    name: &str,
    p: RawProvider,
    env: &dyn Fn(&str) -> Option<String>,
    max_audio_bytes: usize,
) -> Result<ProviderConfig, String> {
    let at = format!("providers.{name}");
    if name.is_empty() || name.contains('/') {
        return Err(format!(
            "{at}: a provider name must be non-empty and contain no '/'"
        ));
    }
    let kind_name = p.kind.clone().unwrap_or_else(|| name.to_string());
    let kind = ProviderKind::from_name(&kind_name).ok_or_else(|| {
        format!("{at}.type: unknown provider type {kind_name:?}; one of openai, azure, elevenlabs, gemini")
    })?;
    if p.cluster.is_empty() {
        return Err(format!("{at}.cluster must name an Envoy cluster"));
    }
    let base_path = provider_base_path(&at, p.base_path.clone(), kind)?;
    let api_key = provider_api_key(&at, &p, env)?;
    let dotted = format!("{at}.");
    // Envoy reads a zero callout timeout as "no timeout": never what is meant.
    let timeout_ms =
        PROVIDER_TIMEOUT_MS.check(&dotted, p.timeout_ms.as_ref(), DEFAULT_TIMEOUT_MS)?;
    let max_input_chars = PROVIDER_MAX_INPUT_CHARS.check(
        &dotted,
        p.max_input_chars.as_ref(),
        kind.default_max_input_chars(),
    )?;
    let max_parallel_chunks = PROVIDER_MAX_PARALLEL_CHUNKS.check(
        &dotted,
        p.max_parallel_chunks.as_ref(),
        DEFAULT_MAX_PARALLEL_CHUNKS,
    )?;
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
        max_input_chars: narrow(&PROVIDER_MAX_INPUT_CHARS, max_input_chars)?,
        max_parallel_chunks: narrow(&PROVIDER_MAX_PARALLEL_CHUNKS, max_parallel_chunks)?,
        max_audio_bytes,
    })
}

fn provider_base_path(
    at: &str,
    given: Option<String>,
    kind: ProviderKind,
) -> Result<String, String> {
    let base_path = given.unwrap_or_else(|| kind.default_base_path().to_string());
    if !(base_path.is_empty() || base_path.starts_with('/')) || base_path.ends_with('/') {
        return Err(format!(
            "{at}.base_path must start with '/' and not end with '/' (got {base_path:?})"
        ));
    }
    Ok(base_path)
}

fn provider_api_key(
    at: &str,
    p: &RawProvider,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    let api_key = match (&p.api_key, &p.api_key_env) {
        (Some(_), Some(_)) => return Err(format!("{at}: give api_key or api_key_env, not both")),
        (Some(k), _) if k.is_empty() => return Err(format!("{at}.api_key is empty")),
        (Some(k), _) => Some(k.clone()),
        (None, Some(var)) => env(var).filter(|v| !v.is_empty()),
        (None, None) => None,
    };
    if let Some(k) = &api_key {
        if k.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
            return Err(format!(
                "{at}: the API key holds characters not allowed in a header"
            ));
        }
    }
    Ok(api_key)
}

/// A key's name is part of store keys, queue and stat names: it is kept plain.
fn is_plain_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_key(i: usize, k: RawKey, max_jobs: u32) -> Result<VirtualKey, String> {
    let at = format!("virtual_keys[{i}]");
    if !is_plain_name(&k.name) {
        return Err(format!(
            "{at}.name must be 1 to 64 letters, digits, '_' or '-' (got {:?})",
            k.name
        ));
    }
    let rules = parse_rules(
        k.expires_at.as_deref(),
        k.allowed_models.as_deref(),
        k.limits.as_ref(),
        &at,
        max_jobs,
    )?;
    let sha256 = match (k.value, k.sha256) {
        (Some(v), None) => {
            if !v.starts_with(KEY_PREFIX) || v.len() <= KEY_PREFIX.len() {
                return Err(format!(
                    "{at}.value: virtual keys start with {}",
                    KEY_PREFIX
                ));
            }
            sha256_of(v.as_bytes())
        }
        (None, Some(hex)) => parse_hex32(&hex)
            .ok_or_else(|| format!("{at}.sha256 must be 64 lowercase hex digits"))?,
        _ => return Err(format!("{at}: give exactly one of value or sha256")),
    };
    Ok(VirtualKey {
        name: k.name,
        sha256,
        rules,
    })
}

pub fn sha256_of(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// 64 lowercase hex digits (the spec's form of a key's SHA-256).
fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
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
        let err = parse(r#"{"providers":{"local":{"cluster":"x"}},"allow_unauthenticated":true}"#)
            .unwrap_err();
        assert!(err.contains("unknown provider type \"local\""), "{err}");
    }

    #[test]
    fn sha256_keys_match_value_keys() {
        let hex: String = sha256_of(b"sk-bf-b")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let c = parse(&format!(
            r#"{{"providers":{{"openai":{{"cluster":"o"}}}},"virtual_keys":[{{"name":"b","sha256":"{hex}"}}]}}"#
        ))
        .unwrap();
        assert_eq!(c.virtual_keys[0].sha256, sha256_of(b"sk-bf-b"));
    }

    #[test]
    fn jwt_owner_stands_in_for_virtual_keys() {
        let c = parse(
            r#"{"providers":{"openai":{"cluster":"o"}},"jwt_owner":{"payload_key":"jwt_payload"}}"#,
        )
        .unwrap();
        let j = c.jwt_owner.unwrap();
        assert_eq!(
            (j.metadata_namespace.as_str(), j.claim.as_str()),
            ("envoy.filters.http.jwt_authn", "sub")
        );
        let err =
            parse(r#"{"providers":{"openai":{"cluster":"o"}},"jwt_owner":{"payload_key":""}}"#)
                .unwrap_err();
        assert!(err.contains("jwt_owner"), "{err}");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            ("{", "not valid"),
            (r#"{"providers":{}}"#, "at least one provider"),
            (
                r#"{"providers":{"openai":{"cluster":"o"}}}"#,
                "no keys configured",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o","timeout_ms":0}},"allow_unauthenticated":true}"#,
                "providers.openai.timeout_ms",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o","timeout_ms":1.5}},"allow_unauthenticated":true}"#,
                "providers.openai.timeout_ms",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"max_jobs":-3}"#,
                "max_jobs",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"max_jobs":1e40}"#,
                "max_jobs",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o","base_path":"v1/"}},"allow_unauthenticated":true}"#,
                "base_path",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o","colour":1}},"allow_unauthenticated":true}"#,
                "unknown field",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"virtual_keys":[{"name":"a","value":"nope"}]}"#,
                "start with sk-bf-",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"virtual_keys":[{"name":"a","sha256":"AB"}]}"#,
                "64 lowercase hex",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"virtual_keys":[{"name":"a"}]}"#,
                "exactly one",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"virtual_keys":[{"name":"a","value":"sk-bf-1"},{"name":"a","value":"sk-bf-2"}]}"#,
                "used twice",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"default_result_ttl_s":10,"max_result_ttl_s":5}"#,
                "default_result_ttl_s",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"max_jobs":0}"#,
                "max_jobs",
            ),
            (
                r#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"max_jobs":2000000}"#,
                "max_jobs",
            ),
            (
                r#"{"providers":{"a/b":{"type":"openai","cluster":"o"}},"allow_unauthenticated":true}"#,
                "no '/'",
            ),
        ];
        for (json, needle) in cases {
            let err = parse(json).unwrap_err();
            assert!(err.contains(needle), "{json} -> {err}");
        }
    }

    /// A config with one number set: top-level, or under `providers.openai` for the
    /// per-provider ranges.
    fn with_setting(range: &Range, value: &str) -> String {
        let per_provider = [
            PROVIDER_TIMEOUT_MS,
            PROVIDER_MAX_INPUT_CHARS,
            PROVIDER_MAX_PARALLEL_CHUNKS,
        ]
        .contains(range);
        if per_provider {
            format!(
                r#"{{"providers":{{"openai":{{"cluster":"o","{}":{value}}}}},"allow_unauthenticated":true}}"#,
                range.setting
            )
        } else {
            // default_result_ttl_s may not exceed max_result_ttl_s: give it all the room.
            let room = if range.setting == "default_result_ttl_s" {
                r#","max_result_ttl_s":2592000"#
            } else {
                ""
            };
            format!(
                r#"{{"providers":{{"openai":{{"cluster":"o"}}}},"allow_unauthenticated":true,"{}":{value}{room}}}"#,
                range.setting
            )
        }
    }

    #[test]
    fn every_range_is_enforced_and_named() {
        for range in RANGES {
            for ok in [range.min, range.max] {
                let json = with_setting(&range, &ok.to_string());
                assert!(parse(&json).is_ok(), "{json}: {:?}", parse(&json).err());
            }
            let below = if range.min == 0 {
                "-1".to_string()
            } else {
                (range.min - 1).to_string()
            };
            for bad in [below, (range.max + 1).to_string()] {
                let json = with_setting(&range, &bad);
                let err = parse(&json).unwrap_err();
                assert!(err.contains(range.setting), "{json} -> {err}");
                assert!(
                    err.contains(&format!("between {} and {}", range.min, range.max)),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn new_settings_have_their_spec_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!((c.max_fallbacks, c.max_audio_bytes), (5, 26_214_400));
        // 4 × 120 s + 30 s.
        assert_eq!(c.job_deadline_s, 510);
        let p = &c.providers["openai"];
        assert_eq!(
            (p.max_input_chars, p.max_parallel_chunks, p.max_audio_bytes),
            (4096, 3, 26_214_400)
        );
        let c = parse(
            r#"{"providers":{"elevenlabs":{"cluster":"e","timeout_ms":1000},"gemini":{"cluster":"g","timeout_ms":1000},
                "azure":{"cluster":"a","timeout_ms":1000}},"allow_unauthenticated":true,"max_audio_bytes":2048}"#,
        )
        .unwrap();
        assert_eq!(c.providers["elevenlabs"].max_input_chars, 5000);
        assert_eq!(c.providers["gemini"].max_input_chars, 5000);
        assert_eq!(c.providers["azure"].max_input_chars, 4096);
        assert_eq!(c.providers["azure"].max_audio_bytes, 2048);
        assert_eq!(c.job_deadline_s, 90, "at least 90 s");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (0u64..3_000_000).prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,8}".prop_map(Value::String),
            prop_oneof![Just("openai"), Just("gemini"), Just("sk-bf-x"), Just("/v1")]
                .prop_map(|s| Value::String(s.to_string())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A config with a valid provider and any values for the top-level settings.
    fn config_like() -> impl Strategy<Value = Value> {
        let settings = prop::collection::vec(
            (
                prop::sample::select(RANGES.iter().map(|r| r.setting).collect::<Vec<_>>()),
                any_json(),
            ),
            0..5,
        );
        (settings, any_json(), any_json()).prop_map(|(settings, timeout, keys)| {
            let mut c = json!({
                "providers": {"openai": {"cluster": "o", "timeout_ms": timeout}},
                "virtual_keys": keys,
                "allow_unauthenticated": true,
            });
            for (name, value) in settings {
                c[name] = value;
            }
            c
        })
    }

    fn check(bytes: &[u8]) {
        match Config::parse(bytes, &|_| Some("k".into())) {
            Ok(c) => {
                for p in c.providers.values() {
                    assert!((1..=600_000).contains(&p.timeout_ms));
                }
                assert!(c.default_result_ttl_s <= c.max_result_ttl_s);
                assert!(c.max_fallbacks <= 50 && c.max_audio_bytes >= 1024);
            }
            Err(e) => assert!(!e.is_empty()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&bytes);
        }

        #[test]
        fn arbitrary_json_never_panics(value in any_json()) {
            check(&serde_json::to_vec(&value).unwrap());
        }

        #[test]
        fn config_shaped_json_is_accepted_in_range_or_refused(value in config_like()) {
            check(&serde_json::to_vec(&value).unwrap());
        }
    }
}
