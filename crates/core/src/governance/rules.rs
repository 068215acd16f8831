//! Governance in the configuration: per virtual key, `expires_at`,
//! `allowed_models` and `limits`; and the `pricing` table. Every refusal
//! names the setting.

use serde::Deserialize;
use serde_json::{Number, Value};

use super::window::Window;
use crate::time::parse_rfc3339;

/// A `provider/model` pattern: exact, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    fn parse(text: &str, at: &str) -> Result<Pattern, String> {
        let stem = text.strip_suffix('*').unwrap_or(text);
        if text.is_empty() || stem.contains('*') {
            return Err(format!(
                "{at}: {text:?} must be provider/model, with at most a trailing *"
            ));
        }
        Ok(Pattern(text.to_string()))
    }

    pub fn matches(&self, model: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(stem) => model.starts_with(stem),
            None => self.0 == model,
        }
    }

    /// The model the pattern names exactly, if it has no `*`.
    pub fn exact(&self) -> Option<&str> {
        (!self.0.ends_with('*')).then_some(self.0.as_str())
    }

    /// How much of a model a match pins down: an exact pattern beats any
    /// prefix, a longer prefix a shorter one.
    fn precision(&self) -> usize {
        match self.0.strip_suffix('*') {
            Some(stem) => stem.len(),
            None => usize::MAX,
        }
    }
}

/// A count per window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// For `budget`, in micro-dollars.
    pub max: u64,
    pub window: Window,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_held_jobs: Option<u32>,
    pub max_running_jobs: Option<u32>,
    pub requests: Option<Limit>,
    pub characters: Option<Limit>,
    pub budget: Option<Limit>,
}

impl Limits {
    /// Whether submits of this key carry the RateLimit fields.
    pub fn has_windows(&self) -> bool {
        self.requests.is_some() || self.characters.is_some() || self.budget.is_some()
    }
}

/// What a virtual key may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub expires_at_ms: Option<u64>,
    pub allowed_models: Option<Vec<Pattern>>,
    pub limits: Limits,
}

impl Rules {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    pub fn allows(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(model)))
    }
}

/// Dollars per million input characters, by `provider/model` pattern.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pricing(Vec<(Pattern, f64)>);

impl Pricing {
    /// The patterns priced.
    pub fn patterns(&self) -> impl Iterator<Item = &Pattern> {
        self.0.iter().map(|(p, _)| p)
    }

    /// What `chars` characters cost on `model`, in micro-dollars (a
    /// dollar per million characters is a micro-dollar per character). The
    /// most precise pattern prices it; an unpriced model costs nothing.
    pub fn micros(&self, model: &str, chars: u64) -> u64 {
        let price = self
            .0
            .iter()
            .filter(|(p, _)| p.matches(model))
            .max_by_key(|(p, _)| p.precision())
            .map_or(0.0, |(_, usd)| *usd);
        // Exact up to 2^53 micro-dollars; the product is non-negative.
        (price * chars as f64).round() as u64
    }
}

/// Largest count a limit may have: 2^53, so that it survives JSON numbers.
const MAX_COUNT: u64 = 1 << 53;
const MAX_RUNNING: u64 = 65_535;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_held_jobs: Option<Number>,
    max_running_jobs: Option<Number>,
    // Read one by one below, so that an error names the setting.
    requests: Option<Value>,
    characters: Option<Value>,
    budget: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCount {
    max: Number,
    per: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    max_usd: Number,
    per: String,
}

fn whole(n: &Number, at: &str, min: u64, max: u64) -> Result<u64, String> {
    match n.as_u64() {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(format!(
            "{at} must be between {min} and {max}, a whole number (got {n})"
        )),
    }
}

fn read<T: serde::de::DeserializeOwned>(value: Value, at: &str) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| format!("{at}: {e}"))
}

fn count(raw: Value, at: &str) -> Result<Limit, String> {
    let raw: RawCount = read(raw, at)?;
    Ok(Limit {
        max: whole(&raw.max, &format!("{at}.max"), 1, MAX_COUNT)?,
        window: Window::parse(&raw.per).map_err(|e| format!("{at}.per: {e}"))?,
    })
}

fn budget(raw: Value, at: &str) -> Result<Limit, String> {
    let raw: RawBudget = read(raw, at)?;
    let usd = raw.max_usd.as_f64().unwrap_or(-1.0);
    let micros = (usd * 1e6).round();
    if !(usd > 0.0 && micros >= 1.0 && micros <= MAX_COUNT as f64) {
        return Err(format!(
            "{at}.max_usd must be above 0 and at most 9007199254 dollars (got {})",
            raw.max_usd
        ));
    }
    Ok(Limit {
        max: micros as u64,
        window: Window::parse(&raw.per).map_err(|e| format!("{at}.per: {e}"))?,
    })
}

fn limits(value: &Value, at: &str, max_jobs: u32) -> Result<Limits, String> {
    let raw: RawLimits = read(value.clone(), at)?;
    let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(Limits {
        max_held_jobs: raw
            .max_held_jobs
            .map(|n| whole(&n, &format!("{at}.max_held_jobs"), 1, u64::from(max_jobs)))
            .transpose()?
            .map(narrow),
        max_running_jobs: raw
            .max_running_jobs
            .map(|n| whole(&n, &format!("{at}.max_running_jobs"), 1, MAX_RUNNING))
            .transpose()?
            .map(narrow),
        requests: raw
            .requests
            .map(|r| count(r, &format!("{at}.requests")))
            .transpose()?,
        characters: raw
            .characters
            .map(|r| count(r, &format!("{at}.characters")))
            .transpose()?,
        budget: raw
            .budget
            .map(|r| budget(r, &format!("{at}.budget")))
            .transpose()?,
    })
}

/// A key's rules from its settings (`at` names the key, e.g. `virtual_keys[0]`).
pub fn parse_rules(
    expires_at: Option<&str>,
    allowed_models: Option<&[String]>,
    raw_limits: Option<&Value>,
    at: &str,
    max_jobs: u32,
) -> Result<Rules, String> {
    let expires_at_ms = expires_at
        .map(|t| {
            parse_rfc3339(t).ok_or_else(|| {
                format!(
                    "{at}.expires_at: {t:?} is not an RFC 3339 UTC time, e.g. 2027-06-30T00:00:00Z"
                )
            })
        })
        .transpose()?;
    let allowed_models = allowed_models
        .map(|list| {
            list.iter()
                .enumerate()
                .map(|(i, m)| Pattern::parse(m, &format!("{at}.allowed_models[{i}]")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let limits = match raw_limits {
        None | Some(Value::Null) => Limits::default(),
        Some(v) => limits(v, &format!("{at}.limits"), max_jobs)?,
    };
    Ok(Rules {
        expires_at_ms,
        allowed_models,
        limits,
    })
}

/// The `pricing` table: `{"openai/tts-1": 15.0, "elevenlabs/*": 180.0}`.
pub fn parse_pricing(value: Option<&Value>) -> Result<Pricing, String> {
    let map = match value {
        None | Some(Value::Null) => return Ok(Pricing::default()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(
                "pricing must be an object of provider/model to dollars per million characters"
                    .into(),
            )
        }
    };
    let mut out = Vec::with_capacity(map.len());
    for (model, price) in map {
        let at = format!("pricing[{model:?}]");
        let pattern = Pattern::parse(model, &at)?;
        match price.as_f64() {
            Some(usd) if usd >= 0.0 && usd.is_finite() => out.push((pattern, usd)),
            _ => {
                return Err(format!(
                    "{at} must be dollars per million characters, 0 or more (got {price})"
                ))
            }
        }
    }
    Ok(Pricing(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(limits: Value) -> Result<Rules, String> {
        parse_rules(None, None, Some(&limits), "virtual_keys[0]", 1000)
    }

    #[test]
    fn the_documented_example_loads() {
        let r = parse_rules(
            Some("2027-06-30T00:00:00Z"),
            Some(&[
                "openai/*".into(),
                "elevenlabs/eleven_multilingual_v2".into(),
            ]),
            Some(&json!({"max_held_jobs": 500, "max_running_jobs": 20,
                "requests": {"max": 600, "per": "1m"},
                "characters": {"max": 1000000, "per": "1d"},
                "budget": {"max_usd": 50.0, "per": "1M"}})),
            "virtual_keys[0]",
            10_000,
        )
        .unwrap();
        assert_eq!(r.expires_at_ms, Some(1_814_313_600_000));
        assert!(r.allows("openai/tts-1") && r.allows("elevenlabs/eleven_multilingual_v2"));
        assert!(!r.allows("elevenlabs/eleven_v3") && !r.allows("gemini/x"));
        assert_eq!(r.limits.budget.as_ref().unwrap().max, 50_000_000);
        assert_eq!(r.limits.requests.as_ref().unwrap().window.text, "1m");
        assert!(r.is_expired(1_814_313_600_000) && !r.is_expired(1_814_313_599_999));
    }

    #[test]
    fn bad_settings_are_refused_naming_them() {
        let cases = [
            (
                json!({"requests": {"max": 5, "per": "1x"}}),
                "virtual_keys[0].limits.requests.per: \"1x\": unknown unit",
            ),
            (
                json!({"requests": {"max": 5, "per": "0m"}}),
                "virtual_keys[0].limits.requests.per: \"0m\"",
            ),
            (
                json!({"characters": {"max": -1, "per": "1d"}}),
                "virtual_keys[0].limits.characters.max must be between 1",
            ),
            (
                json!({"characters": {"max": 0, "per": "1d"}}),
                "virtual_keys[0].limits.characters.max must be between 1",
            ),
            (
                json!({"budget": {"max_usd": -5, "per": "1d"}}),
                "virtual_keys[0].limits.budget.max_usd must be above 0",
            ),
            (
                json!({"budget": {"max_usd": 0, "per": "1d"}}),
                "virtual_keys[0].limits.budget.max_usd must be above 0",
            ),
            (
                json!({"max_held_jobs": 1001}),
                "virtual_keys[0].limits.max_held_jobs must be between 1 and 1000",
            ),
            (
                json!({"max_running_jobs": 0}),
                "virtual_keys[0].limits.max_running_jobs must be between 1 and 65535",
            ),
            (
                json!({"requests": {"max": 5, "per": "1m", "burst": 2}}),
                "virtual_keys[0].limits.requests: unknown field `burst`",
            ),
            (
                json!({"rps": 5}),
                "virtual_keys[0].limits: unknown field `rps`",
            ),
        ];
        for (limits, want) in cases {
            let got = rules(limits.clone()).unwrap_err();
            assert!(got.starts_with(want), "{limits}: {got}");
        }
        let e = parse_rules(Some("2027-06-30"), None, None, "virtual_keys[1]", 10).unwrap_err();
        assert!(
            e.starts_with("virtual_keys[1].expires_at: \"2027-06-30\""),
            "{e}"
        );
        let e = parse_rules(
            None,
            Some(&["open*ai/x".into()]),
            None,
            "virtual_keys[1]",
            10,
        )
        .unwrap_err();
        assert!(e.starts_with("virtual_keys[1].allowed_models[0]"), "{e}");
        let e = parse_pricing(Some(&json!({"openai/tts-1": -1}))).unwrap_err();
        assert!(e.starts_with("pricing[\"openai/tts-1\"]"), "{e}");
    }

    #[test]
    fn the_most_precise_price_applies_and_unpriced_models_are_free() {
        let p = parse_pricing(Some(&json!({"openai/tts-1": 15.0, "openai/*": 30.0, "elevenlabs/*": 180.0, "openai/tts-1-hd*": 20.0}))).unwrap();
        assert_eq!(p.micros("openai/tts-1", 1000), 15_000);
        assert_eq!(p.micros("openai/tts-1-hd", 1000), 20_000);
        assert_eq!(p.micros("openai/gpt-4o-mini-tts", 1000), 30_000);
        assert_eq!(p.micros("elevenlabs/v2", 3), 540);
        assert_eq!(p.micros("gemini/x", 1000), 0);
    }
}
