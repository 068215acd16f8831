//! The submit request: the body and TTL header, validated into a `SpeechRequest`.

use serde_json::{Map, Value};

use crate::config::Config;
use crate::error::ApiError;

pub const TTL_HEADER: &str = "x-bf-async-job-result-ttl";

pub use crate::speech::{AudioFormat, ModelRef, SpeakerVoice, SpeechRequest, Voice};

/// Parses the TTL header: absent or 0 means the configured default.
pub fn parse_ttl(header: Option<&[u8]>, config: &Config) -> Result<u64, ApiError> {
    let Some(raw) = header else {
        return Ok(config.default_result_ttl_s);
    };
    let text = std::str::from_utf8(raw).unwrap_or("").trim();
    let ttl: u64 = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().map_err(|_| ttl_error(config))?
    } else {
        return Err(ttl_error(config));
    };
    match ttl {
        0 => Ok(config.default_result_ttl_s),
        t if t > config.max_result_ttl_s => Err(ttl_error(config)),
        t => Ok(t),
    }
}

fn ttl_error(config: &Config) -> ApiError {
    ApiError::invalid(
        TTL_HEADER,
        format!(
            "{TTL_HEADER} must be a whole number of seconds from 0 to {} (0 or absent: {})",
            config.max_result_ttl_s, config.default_result_ttl_s
        ),
    )
}

/// Does the Content-Type say JSON? Absent is taken as JSON, as curl users forget it.
pub fn is_json_content_type(value: Option<&[u8]>) -> bool {
    let Some(v) = value else { return true };
    let v = String::from_utf8_lossy(v).to_ascii_lowercase();
    let essence = v.split(';').next().unwrap_or("").trim();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Longest `model` string, `provider/model` as a whole.
pub const MAX_MODEL_CHARS: usize = 256;
/// Longest `voice` string, and each multi-speaker `speaker` and `voice`.
pub const MAX_VOICE_CHARS: usize = 256;
pub const MAX_INSTRUCTIONS_CHARS: usize = 4096;
pub const MAX_PRONUNCIATION_LOCATORS: usize = 3;

/// Validates a submit body, its limits and the configured providers.
pub fn parse_speech_request(body: &[u8], config: &Config) -> Result<SpeechRequest, ApiError> {
    let obj = parse_object(body)?;
    refuse_streaming(&obj)?;
    let request = SpeechRequest {
        chain: parse_chain(&obj, config)?,
        input: parse_input(&obj, config)?,
        voice: parse_voice(obj.get("voice"))?,
        response_format: parse_format(&obj)?,
        instructions: parse_instructions(&obj)?,
        speed: parse_speed(&obj)?,
        language_code: optional_str(&obj, "language_code")?.map(str::to_string),
        pronunciation_dictionary_locators: parse_locators(&obj)?,
        enable_logging: optional_bool(&obj, "enable_logging")?,
        optimize_streaming_latency: optional_bool(&obj, "optimize_streaming_latency")?,
        with_timestamps: optional_bool(&obj, "with_timestamps")?.unwrap_or(false),
    };
    check_every_attempt(&request, config)?;
    Ok(request)
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::bad_request("request body must be a JSON object")),
    }
}

fn refuse_streaming(obj: &Map<String, Value>) -> Result<(), ApiError> {
    if optional_str(obj, "stream_format")? == Some("sse") {
        return Err(ApiError::invalid(
            "stream_format",
            "stream is not supported for async speech",
        ));
    }
    Ok(())
}

/// A 400 naming `param` when `text` is longer than `limit` characters.
fn within_chars(param: &str, text: &str, limit: usize) -> Result<(), ApiError> {
    // Counting stops past the limit: the work is bounded by the limit, not the text.
    if text.chars().nth(limit).is_some() {
        return Err(ApiError::invalid(
            param,
            format!("{param} is longer than {limit} characters"),
        ));
    }
    Ok(())
}

/// The primary model, then the fallbacks in order.
fn parse_chain(obj: &Map<String, Value>, config: &Config) -> Result<Vec<ModelRef>, ApiError> {
    let model_text = optional_str(obj, "model")?
        .ok_or_else(|| ApiError::invalid("model", "model is required for speech"))?;
    let mut chain = vec![model_ref("model", model_text, config)?];
    let items = match obj.get("fallbacks") {
        None | Some(Value::Null) => return Ok(chain),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid(
                "fallbacks",
                "fallbacks must be an array of provider/model strings",
            ))
        }
    };
    // Before looking at any entry, so that the work never grows with a huge array.
    if items.len() > config.max_fallbacks {
        return Err(ApiError::invalid(
            "fallbacks",
            format!(
                "fallbacks has {} entries; the limit is {}",
                items.len(),
                config.max_fallbacks
            ),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        let param = format!("fallbacks[{i}]");
        let text = item.as_str().ok_or_else(|| {
            ApiError::invalid(&param, format!("{param} must be a string provider/model"))
        })?;
        chain.push(model_ref(&param, text, config)?);
    }
    Ok(chain)
}

fn parse_input(obj: &Map<String, Value>, config: &Config) -> Result<String, ApiError> {
    let input = optional_str(obj, "input")?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::invalid("input", "input is required for speech"))?;
    if input.chars().nth(config.max_input_chars).is_some() {
        let chars = input.chars().count();
        return Err(ApiError::invalid(
            "input",
            format!(
                "input is {chars} characters; the limit is {}",
                config.max_input_chars
            ),
        ));
    }
    Ok(input.to_string())
}

fn parse_format(obj: &Map<String, Value>) -> Result<Option<AudioFormat>, ApiError> {
    let Some(name) = optional_str(obj, "response_format")? else {
        return Ok(None);
    };
    AudioFormat::from_name(name).map(Some).ok_or_else(|| {
        ApiError::invalid(
            "response_format",
            format!("response_format {name:?} is not one of mp3, opus, aac, flac, wav, pcm"),
        )
    })
}

fn parse_instructions(obj: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let instructions = optional_str(obj, "instructions")?;
    if let Some(text) = instructions {
        within_chars("instructions", text, MAX_INSTRUCTIONS_CHARS)?;
    }
    Ok(instructions.map(str::to_string))
}

fn parse_speed(obj: &Map<String, Value>) -> Result<Option<f64>, ApiError> {
    match obj.get("speed") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let s = n.as_f64().unwrap_or(f64::NAN);
            if !(0.25..=4.0).contains(&s) {
                return Err(ApiError::invalid(
                    "speed",
                    "speed must be between 0.25 and 4",
                ));
            }
            Ok(Some(s))
        }
        Some(_) => Err(ApiError::invalid("speed", "speed must be a number")),
    }
}

fn parse_locators(obj: &Map<String, Value>) -> Result<Option<Vec<Value>>, ApiError> {
    const PARAM: &str = "pronunciation_dictionary_locators";
    match obj.get(PARAM) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) if items.len() > MAX_PRONUNCIATION_LOCATORS => {
            Err(ApiError::invalid(
                PARAM,
                format!(
                    "{PARAM} has {} entries; the limit is {MAX_PRONUNCIATION_LOCATORS}",
                    items.len()
                ),
            ))
        }
        Some(Value::Array(items)) if items.iter().all(is_locator) => Ok(Some(items.clone())),
        Some(_) => Err(ApiError::invalid(
            PARAM,
            format!(
                "{PARAM} must be an array of objects whose pronunciation_dictionary_id and version_id are strings"
            ),
        )),
    }
}

/// An ElevenLabs locator: an object whose two known fields, when given, are strings (or
/// null, which is absent), as Bifrost decodes them; other fields are passed on as they are.
fn is_locator(item: &Value) -> bool {
    let text_or_absent = |field: &str| {
        matches!(
            item.get(field),
            None | Some(Value::Null) | Some(Value::String(_))
        )
    };
    item.is_object()
        && text_or_absent("pronunciation_dictionary_id")
        && text_or_absent("version_id")
}

/// Every attempt must be possible: a fallback that could never take this request
/// is a client error now, not a failed job later.
/// Most parts one long input may be split into.
pub const MAX_PARTS: usize = 256;

fn check_every_attempt(request: &SpeechRequest, config: &Config) -> Result<(), ApiError> {
    let chars = request.input.chars().count();
    for (i, step) in request.chain.iter().enumerate() {
        let Some(provider) = config.providers.get(&step.provider) else {
            continue;
        };
        if chars > provider.max_input_chars {
            check_splittable(request, provider, chars)?;
        }
        crate::providers::for_kind(provider.kind)
            .check(request, &step.model)
            .map_err(|mut e| {
                if e.error.param.is_none() {
                    e.error.param = Some(if i == 0 {
                        "model".to_string()
                    } else {
                        format!("fallbacks[{}]", i - 1)
                    });
                }
                e
            })?;
    }
    Ok(())
}

/// An input longer than a provider takes at once is split and joined:
/// the format must be joinable, and the parts few enough.
fn check_splittable(
    request: &SpeechRequest,
    provider: &crate::config::ProviderConfig,
    chars: usize,
) -> Result<(), ApiError> {
    let format =
        crate::providers::effective_format(crate::providers::for_kind(provider.kind), request);
    if crate::audio::JoinFormat::from_response_format(format.name()).is_none() {
        return Err(ApiError::invalid(
            "response_format",
            format!(
                "response_format {} cannot be joined, and the input ({chars} characters) is longer than provider {} takes at once ({}); ask for mp3, opus, aac, wav or pcm",
                format.name(),
                provider.name,
                provider.max_input_chars
            ),
        ));
    }
    let parts = crate::audio::split_text(&request.input, provider.max_input_chars).len();
    if parts > MAX_PARTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "input would take {parts} calls of provider {}; the limit is {MAX_PARTS}",
                provider.name
            ),
        ));
    }
    Ok(())
}

fn model_ref(param: &str, text: &str, config: &Config) -> Result<ModelRef, ApiError> {
    within_chars(param, text, MAX_MODEL_CHARS)?;
    let m = ModelRef::parse(text).ok_or_else(|| {
        ApiError::invalid(
            param,
            format!("{param} must be provider/model, e.g. openai/gpt-4o-mini-tts (got {text:?})"),
        )
    })?;
    if !config.providers.contains_key(&m.provider) {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        return Err(ApiError::invalid(
            param,
            format!(
                "provider {:?} is not configured; configured: {}",
                m.provider,
                known.join(", ")
            ),
        ));
    }
    Ok(m)
}

fn parse_voice(value: Option<&Value>) -> Result<Voice, ApiError> {
    match value {
        None | Some(Value::Null) => Err(ApiError::invalid("voice", "voice is required for speech")),
        Some(Value::String(s)) if s.is_empty() => {
            Err(ApiError::invalid("voice", "voice is required for speech"))
        }
        Some(Value::String(s)) => {
            within_chars("voice", s, MAX_VOICE_CHARS)?;
            Ok(Voice::Single(s.clone()))
        }
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(speaker_voice)
            .collect::<Result<_, _>>()
            .map(Voice::Multi),
        Some(_) => Err(ApiError::invalid(
            "voice",
            "voice must be a string or a non-empty array of {speaker, voice}",
        )),
    }
}

fn speaker_voice(item: &Value) -> Result<SpeakerVoice, ApiError> {
    let speaker = item.get("speaker").and_then(Value::as_str).unwrap_or("");
    let voice = item.get("voice").and_then(Value::as_str).unwrap_or("");
    if speaker.is_empty() || voice.is_empty() {
        return Err(ApiError::invalid(
            "voice",
            "each multi-speaker voice must be {\"speaker\": string, \"voice\": string}",
        ));
    }
    within_chars("voice", speaker, MAX_VOICE_CHARS)?;
    within_chars("voice", voice, MAX_VOICE_CHARS)?;
    Ok(SpeakerVoice {
        speaker: speaker.to_string(),
        voice: voice.to_string(),
    })
}

fn optional_str<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("{field} must be a string"),
        )),
    }
}

fn optional_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("{field} must be true or false"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            br#"{"providers":{"openai":{"cluster":"o"},"local":{"type":"openai","cluster":"l"}},
                 "virtual_keys":[{"name":"a","value":"sk-bf-a"}],"max_input_chars":10,"max_result_ttl_s":100}"#,
            &|_| None,
        )
        .unwrap()
    }

    fn reject(body: &str) -> ApiError {
        parse_speech_request(body.as_bytes(), &config()).unwrap_err()
    }

    #[test]
    fn a_full_request_parses() {
        let r = parse_speech_request(
            br#"{"model":"openai/tts-1","input":"hello","voice":"alloy","fallbacks":["local/x"],
                 "response_format":"wav","speed":1.5,"instructions":"calm","unknown":1,"stream_format":"audio"}"#,
            &config(),
        )
        .unwrap();
        assert_eq!(
            r.chain,
            vec![
                ModelRef {
                    provider: "openai".into(),
                    model: "tts-1".into()
                },
                ModelRef {
                    provider: "local".into(),
                    model: "x".into()
                }
            ]
        );
        assert_eq!(r.voice, Voice::Single("alloy".into()));
        assert_eq!(r.response_format, Some(AudioFormat::Wav));
        assert_eq!(r.speed, Some(1.5));
        assert_eq!(r.instructions.as_deref(), Some("calm"));
    }

    #[test]
    fn null_in_an_optional_field_is_absent() {
        let r = parse_speech_request(
            br#"{"model":"openai/t","input":"a","voice":"v","fallbacks":null,"stream_format":null,
                 "instructions":null,"response_format":null,"speed":null,"language_code":null,
                 "pronunciation_dictionary_locators":null,"enable_logging":null,
                 "optimize_streaming_latency":null,"with_timestamps":null}"#,
            &config(),
        )
        .unwrap();
        let plain = parse_speech_request(
            br#"{"model":"openai/t","input":"a","voice":"v"}"#,
            &config(),
        )
        .unwrap();
        assert_eq!(r, plain);
        // And inside a locator, as Bifrost decodes it.
        let r = parse_speech_request(
            br#"{"model":"openai/t","input":"a","voice":"v","pronunciation_dictionary_locators":
                 [{"pronunciation_dictionary_id":"d","version_id":null,"extra":[1]}]}"#,
            &config(),
        )
        .unwrap();
        assert_eq!(
            r.pronunciation_dictionary_locators.map(|l| l.len()),
            Some(1)
        );
    }

    #[test]
    fn model_with_slashes_keeps_the_rest_as_model() {
        let r = parse_speech_request(
            br#"{"model":"local/org/model","input":"a","voice":"v"}"#,
            &config(),
        )
        .unwrap();
        assert_eq!(r.chain[0].model, "org/model");
    }

    #[test]
    fn every_rule_is_a_400_naming_its_param() {
        let cases = [
            (r#"[1]"#, None),
            (r#"not json"#, None),
            (r#"{"input":"a","voice":"v"}"#, Some("model")),
            (
                r#"{"model":"tts-1","input":"a","voice":"v"}"#,
                Some("model"),
            ),
            (
                r#"{"model":"azure/tts","input":"a","voice":"v"}"#,
                Some("model"),
            ),
            (r#"{"model":7,"input":"a","voice":"v"}"#, Some("model")),
            (r#"{"model":"openai/t","voice":"v"}"#, Some("input")),
            (
                r#"{"model":"openai/t","input":"","voice":"v"}"#,
                Some("input"),
            ),
            (
                r#"{"model":"openai/t","input":"01234567890","voice":"v"}"#,
                Some("input"),
            ),
            (r#"{"model":"openai/t","input":"a"}"#, Some("voice")),
            (
                r#"{"model":"openai/t","input":"a","voice":""}"#,
                Some("voice"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":3}"#,
                Some("voice"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":[{"speaker":"x"}]}"#,
                Some("voice"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":[{"speaker":"x","voice":"y"}]}"#,
                Some("voice"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","fallbacks":"local/x"}"#,
                Some("fallbacks"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","fallbacks":["nope"]}"#,
                Some("fallbacks[0]"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","fallbacks":["local/x",1]}"#,
                Some("fallbacks[1]"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","stream_format":"sse"}"#,
                Some("stream_format"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","response_format":"ogg"}"#,
                Some("response_format"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","speed":0.2}"#,
                Some("speed"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","speed":4.01}"#,
                Some("speed"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","speed":"1"}"#,
                Some("speed"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","instructions":1}"#,
                Some("instructions"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","with_timestamps":"yes"}"#,
                Some("with_timestamps"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","pronunciation_dictionary_locators":[1]}"#,
                Some("pronunciation_dictionary_locators"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","pronunciation_dictionary_locators":[{"pronunciation_dictionary_id":"d","version_id":{}}]}"#,
                Some("pronunciation_dictionary_locators"),
            ),
            (
                r#"{"model":"openai/t","input":"a","voice":"v","pronunciation_dictionary_locators":[{"pronunciation_dictionary_id":7}]}"#,
                Some("pronunciation_dictionary_locators"),
            ),
        ];
        for (body, param) in cases {
            let e = reject(body);
            assert_eq!(e.status_code, 400, "{body}");
            assert_eq!(
                e.error.param.as_deref(),
                param,
                "{body}: {}",
                e.error.message
            );
            assert!(!e.error.message.is_empty());
        }
        assert_eq!(
            reject(r#"{"model":"openai/t","input":"a","voice":"v","stream_format":"sse"}"#)
                .error
                .message,
            "stream is not supported for async speech"
        );
    }

    #[test]
    fn field_sizes_are_bounded() {
        let ok = |extra: &str| {
            let body = format!(r#"{{"input":"a"{extra}}}"#);
            parse_speech_request(body.as_bytes(), &config())
        };
        let param_of = |extra: &str| ok(extra).unwrap_err().error.param;
        let long = |n: usize| "é".repeat(n);
        // model: 256 characters in all, provider/ included.
        assert!(ok(&format!(r#","voice":"v","model":"local/{}""#, long(250))).is_ok());
        assert_eq!(
            param_of(&format!(r#","voice":"v","model":"local/{}""#, long(251))).as_deref(),
            Some("model")
        );
        let fallback = format!(
            r#","voice":"v","model":"openai/t","fallbacks":["local/x","local/{}"]"#,
            long(251)
        );
        assert_eq!(param_of(&fallback).as_deref(), Some("fallbacks[1]"));
        // voice, and each speaker and voice of a multi-speaker voice.
        assert!(ok(&format!(r#","model":"openai/t","voice":"{}""#, long(256))).is_ok());
        assert_eq!(
            param_of(&format!(r#","model":"openai/t","voice":"{}""#, long(257))).as_deref(),
            Some("voice")
        );
        for (speaker, voice) in [(long(257), "v".to_string()), ("s".to_string(), long(257))] {
            let extra = format!(
                r#","model":"openai/t","voice":[{{"speaker":"{speaker}","voice":"{voice}"}}]"#
            );
            let e = ok(&extra).unwrap_err();
            assert_eq!(e.error.param.as_deref(), Some("voice"));
            assert!(e.error.message.contains("256"), "{}", e.error.message);
        }
        // instructions.
        let base = r#","model":"openai/t","voice":"v""#;
        assert!(ok(&format!(r#"{base},"instructions":"{}""#, long(4096))).is_ok());
        assert_eq!(
            param_of(&format!(r#"{base},"instructions":"{}""#, long(4097))).as_deref(),
            Some("instructions")
        );
        // pronunciation_dictionary_locators: at most 3.
        assert!(ok(&format!(
            r#"{base},"pronunciation_dictionary_locators":[{{}},{{}},{{}}]"#
        ))
        .is_ok());
        assert_eq!(
            param_of(&format!(
                r#"{base},"pronunciation_dictionary_locators":[{{}},{{}},{{}},{{}}]"#
            ))
            .as_deref(),
            Some("pronunciation_dictionary_locators")
        );
    }

    #[test]
    fn fallbacks_are_capped_before_any_entry_is_read() {
        let c = config();
        let five = r#"["local/a","local/b","local/c","local/d","local/e"]"#;
        let body = format!(r#"{{"model":"openai/t","input":"a","voice":"v","fallbacks":{five}}}"#);
        assert_eq!(
            parse_speech_request(body.as_bytes(), &c)
                .unwrap()
                .chain
                .len(),
            6
        );
        // Six entries, the first of them invalid: the count is what is refused.
        let six = r#"[1,"local/b","local/c","local/d","local/e","local/f"]"#;
        let body = format!(r#"{{"model":"openai/t","input":"a","voice":"v","fallbacks":{six}}}"#);
        let e = parse_speech_request(body.as_bytes(), &c).unwrap_err();
        assert_eq!(
            (e.status_code, e.error.param.as_deref()),
            (400, Some("fallbacks"))
        );
        assert!(
            e.error.message.contains("limit is 5"),
            "{}",
            e.error.message
        );
        let none = Config {
            max_fallbacks: 0,
            ..c
        };
        let body = br#"{"model":"openai/t","input":"a","voice":"v","fallbacks":["local/x"]}"#;
        assert_eq!(
            parse_speech_request(body, &none)
                .unwrap_err()
                .error
                .param
                .as_deref(),
            Some("fallbacks")
        );
        let body = br#"{"model":"openai/t","input":"a","voice":"v","fallbacks":[]}"#;
        assert!(parse_speech_request(body, &none).is_ok());
    }

    #[test]
    fn input_limit_counts_characters_not_bytes() {
        assert!(parse_speech_request(
            r#"{"model":"openai/t","input":"ééééééééé","voice":"v"}"#.as_bytes(),
            &config()
        )
        .is_ok());
    }

    #[test]
    fn ttl_header_rules() {
        let c = config();
        assert_eq!(
            parse_ttl(None, &c).unwrap(),
            100,
            "the default is capped by the maximum"
        );
        assert_eq!(parse_ttl(Some(b"0"), &c).unwrap(), c.default_result_ttl_s);
        assert_eq!(parse_ttl(Some(b"42"), &c).unwrap(), 42);
        for bad in [
            &b"-1"[..],
            b"1.5",
            b"abc",
            b"",
            b"101",
            b"99999999999999999999999",
            b"\xff",
        ] {
            let e = parse_ttl(Some(bad), &c).unwrap_err();
            assert_eq!(e.error.param.as_deref(), Some(TTL_HEADER));
            assert!(e.error.message.contains(TTL_HEADER));
        }
    }

    #[test]
    fn content_types() {
        assert!(is_json_content_type(None));
        assert!(is_json_content_type(Some(
            b"application/json; charset=utf-8"
        )));
        assert!(is_json_content_type(Some(b"Application/JSON")));
        assert!(!is_json_content_type(Some(b"text/plain")));
        assert!(!is_json_content_type(Some(
            b"multipart/form-data; boundary=x"
        )));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn config() -> Config {
        Config::parse(
            br#"{"providers":{"openai":{"cluster":"o"},"el":{"type":"elevenlabs","cluster":"e"},
                 "g":{"type":"gemini","cluster":"g"},"az":{"type":"azure","cluster":"a"}},
                 "allow_unauthenticated":true,"max_input_chars":50,"max_fallbacks":2}"#,
            &|_| None,
        )
        .unwrap()
    }

    /// Any JSON value, a few levels deep.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,8}".prop_map(Value::String),
            prop_oneof![
                Just("openai/tts-1"),
                Just("el/m"),
                Just("g/m"),
                Just("az/.."),
                Just("..")
            ]
            .prop_map(|s| Value::String(s.to_string())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Objects with the fields of a submit, each any JSON or absent.
    fn submit_like() -> impl Strategy<Value = Value> {
        const FIELDS: [&str; 13] = [
            "model",
            "input",
            "voice",
            "fallbacks",
            "stream_format",
            "instructions",
            "response_format",
            "speed",
            "language_code",
            "pronunciation_dictionary_locators",
            "enable_logging",
            "optimize_streaming_latency",
            "with_timestamps",
        ];
        prop::collection::vec(prop::option::of(any_json()), FIELDS.len()).prop_map(|values| {
            let mut obj = Map::new();
            for (field, value) in FIELDS.iter().zip(values) {
                if let Some(v) = value {
                    obj.insert(field.to_string(), v);
                }
            }
            Value::Object(obj)
        })
    }

    fn check(body: &[u8]) {
        if let Err(e) = parse_speech_request(body, &config()) {
            assert!((400..500).contains(&e.status_code), "{}", e.status_code);
            assert!(!e.error.message.is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&body);
        }

        #[test]
        fn arbitrary_json_never_panics(value in any_json()) {
            check(&serde_json::to_vec(&value).unwrap());
        }

        #[test]
        fn submit_shaped_json_is_accepted_or_a_4xx(value in submit_like()) {
            check(&serde_json::to_vec(&value).unwrap());
        }
    }
}
