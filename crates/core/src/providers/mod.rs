//! Speech providers: one trait, one file per provider type. A provider turns a
//! validated `SpeechRequest` into an upstream HTTP request and the upstream's
//! answer into audio or an error; none of it touches the host.

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use serde_json::Value;

use crate::config::ProviderConfig;
use crate::error::ApiError;
use crate::speech::{AudioFormat, SpeechRequest, Voice};

mod azure;
mod elevenlabs;
mod gemini;
mod openai;

pub use crate::config::ProviderKind;

/// What the worker sends through the provider's Envoy cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamRequest {
    /// Includes the pseudo-headers `:method`, `:path` and `:authority`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl UpstreamRequest {
    #[cfg(test)]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The provider's answer to one attempt.
pub struct UpstreamResponse<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

/// Audio made by a successful attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechAudio {
    pub audio: Vec<u8>,
    pub format: AudioFormat,
    pub alignment: Option<Value>,
    pub normalized_alignment: Option<Value>,
}

pub trait Provider {
    /// Submit-time check that this provider can serve the request at all
    /// (voice shape, audio format); a refusal is a 400 to the client.
    fn check(&self, request: &SpeechRequest, model: &str) -> Result<(), ApiError>;

    /// The sample rate of the PCM this provider makes (for the length of joined parts).
    fn pcm_sample_rate(&self) -> u32 {
        24_000
    }

    /// The audio format used when the client named none.
    fn default_format(&self) -> AudioFormat {
        AudioFormat::Mp3
    }

    fn build(
        &self,
        provider: &ProviderConfig,
        model: &str,
        request: &SpeechRequest,
    ) -> Result<UpstreamRequest, ApiError>;

    /// Maps any answer, 2xx or not, to audio or the job's error. Audio above
    /// `provider.max_audio_bytes` and JSON nested deeper than [`MAX_JSON_DEPTH`] fail
    /// with 502; the provider's key never reaches the error.
    fn parse(
        &self,
        provider: &ProviderConfig,
        request: &SpeechRequest,
        response: &UpstreamResponse,
    ) -> Result<SpeechAudio, ApiError>;
}

pub fn for_kind(kind: ProviderKind) -> &'static dyn Provider {
    match kind {
        ProviderKind::OpenAi => &openai::OpenAi,
        ProviderKind::Azure => &azure::Azure,
        ProviderKind::ElevenLabs => &elevenlabs::ElevenLabs,
        ProviderKind::Gemini => &gemini::Gemini,
    }
}

/// The request's format, or the provider's default.
pub fn effective_format(provider: &dyn Provider, request: &SpeechRequest) -> AudioFormat {
    request
        .response_format
        .unwrap_or_else(|| provider.default_format())
}

/// How a provider takes its key.
pub enum Auth {
    /// `Authorization: Bearer <key>`
    Bearer,
    /// The key as the whole value of this header.
    Header(&'static str),
}

/// The pseudo-headers, content type and key header of a provider call.
/// A provider with no key configured gets no key header; one whose key was
/// meant to come from a variable that is not set fails the attempt with a 401
/// that names the variable.
pub fn request_headers(
    provider: &ProviderConfig,
    path: String,
    auth: Auth,
) -> Result<Vec<(String, String)>, ApiError> {
    let mut headers = vec![
        (":method".into(), "POST".into()),
        (":path".into(), path),
        (":authority".into(), provider.authority.clone()),
        ("content-type".into(), "application/json".into()),
    ];
    let key = match (&provider.api_key, &provider.api_key_env) {
        (Some(key), _) => key,
        (None, Some(var)) => {
            return Err(ApiError::upstream(
                401,
                format!(
                    "provider {} has no API key: set {var} in Envoy's environment (vm_config.environment_variables.host_env_keys)",
                    provider.name
                ),
            ))
        }
        (None, None) => return Ok(headers),
    };
    match auth {
        Auth::Bearer => headers.push(("authorization".into(), format!("Bearer {key}"))),
        Auth::Header(name) => headers.push((name.into(), key.clone())),
    }
    Ok(headers)
}

pub fn single_voice<'a>(request: &'a SpeechRequest, provider: &str) -> Result<&'a str, ApiError> {
    match &request.voice {
        Voice::Single(v) => Ok(v),
        Voice::Multi(_) => Err(ApiError::invalid(
            "voice",
            format!("a multi-speaker voice is not supported by provider type {provider}"),
        )),
    }
}

/// Everything but the RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one URL path segment or query value: only RFC 3986
/// unreserved characters stay as they are, so no input can change the path.
pub fn encode_component(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// Refuses at submit a value that becomes part of a provider URL's path when any of
/// its `/`-separated segments is `.` or `..`. Such a value is percent-encoded into one
/// segment, but a server or proxy that decodes `%2F` before normalizing the path
/// would see a dot segment. `error` builds the refusal from a message.
pub fn check_path_value(
    what: &str,
    value: &str,
    error: impl Fn(String) -> ApiError,
) -> Result<(), ApiError> {
    if value
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(error(format!(
            "{what} {value:?} has \".\" or \"..\" as a path segment, which is not allowed"
        )));
    }
    Ok(())
}

/// A model (or deployment) name that goes into the path. The error leaves `param`
/// empty: `parse_speech_request` names `model` or `fallbacks[i]`.
pub fn check_model_in_path(model: &str) -> Result<(), ApiError> {
    check_path_value("model", model, ApiError::bad_request)
}

/// The deepest nesting of arrays and objects accepted in a provider's JSON
/// answer, counted from its root (the root object is level 1).
pub const MAX_JSON_DEPTH: usize = 32;

/// Whether `bytes` nest arrays and objects at most `max` levels deep. A plain scan
/// without recursion; brackets inside strings do not count. Says nothing about
/// whether the bytes are valid JSON: run it before parsing.
pub fn json_depth_within(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Refuses a provider answer nested deeper than [`MAX_JSON_DEPTH`]: the attempt fails with 502.
pub fn check_json_depth(body: &[u8]) -> Result<(), ApiError> {
    if json_depth_within(body, MAX_JSON_DEPTH) {
        Ok(())
    } else {
        Err(ApiError::upstream(
            502,
            format!("provider answered with JSON nested deeper than {MAX_JSON_DEPTH} levels"),
        ))
    }
}

/// Refuses audio larger than `max_audio_bytes`: the attempt fails with 502.
/// The host calls it with a callout's body size before reading the body; providers
/// call it on the audio they decode.
pub fn audio_within_limit(len: usize, max_audio_bytes: usize) -> Result<(), ApiError> {
    if len <= max_audio_bytes {
        return Ok(());
    }
    Err(ApiError::upstream(
        502,
        format!("provider answered with {len} bytes of audio, above max_audio_bytes ({max_audio_bytes})"),
    ))
}

/// Decodes base64 audio from a provider's JSON, refusing more than `max_audio_bytes`
/// (before decoding, from the text's length, then exactly). `None` when it is not base64.
pub fn decode_audio_base64(b64: &str, max_audio_bytes: usize) -> Result<Option<Vec<u8>>, ApiError> {
    audio_within_limit((b64.len() / 4).saturating_mul(3), max_audio_bytes)?;
    let Ok(audio) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return Ok(None);
    };
    audio_within_limit(audio.len(), max_audio_bytes)?;
    Ok(Some(audio))
}

/// A non-2xx answer is the provider's error, with the provider's key redacted.
pub fn ensure_success(
    provider: &ProviderConfig,
    response: &UpstreamResponse,
) -> Result<(), ApiError> {
    if (200..300).contains(&response.status) {
        Ok(())
    } else {
        Err(provider_error(
            response.status,
            response.body,
            provider.api_key.as_deref(),
        ))
    }
}

/// The audio in the requested format from 16-bit PCM: wrapped in a WAV header for
/// `wav`, as it is otherwise; the result is held to `max_audio_bytes`.
pub fn pcm16_as(
    format: AudioFormat,
    pcm: Vec<u8>,
    sample_rate: u32,
    max_audio_bytes: usize,
) -> Result<Vec<u8>, ApiError> {
    let audio = if format == AudioFormat::Wav {
        crate::audio::wav::from_pcm16(&pcm, sample_rate, 1)
    } else {
        pcm
    };
    audio_within_limit(audio.len(), max_audio_bytes)?;
    Ok(audio)
}

/// Refuses at submit a format the provider cannot make.
pub fn check_format(
    provider: &dyn Provider,
    request: &SpeechRequest,
    kind: &str,
    supported: &[AudioFormat],
) -> Result<(), ApiError> {
    let format = effective_format(provider, request);
    if supported.contains(&format) {
        return Ok(());
    }
    let names: Vec<&str> = supported.iter().map(|f| f.name()).collect();
    Err(ApiError::invalid(
        "response_format",
        format!(
            "response_format {} is not available from provider type {kind}; it makes {}",
            format.name(),
            names.join(", ")
        ),
    ))
}

/// Maps a provider's error answer into the error shape, keeping the provider's own
/// type, code and message where its JSON has them (OpenAI `{"error":{…}}`,
/// ElevenLabs `{"detail":…}`, Google `{"error":{"status":…}}`). Every text that
/// repeats `secret` (the provider's key) has it replaced by `[redacted]`; JSON nested
/// deeper than [`MAX_JSON_DEPTH`] is a 502.
pub fn provider_error(status: u16, body: &[u8], secret: Option<&str>) -> ApiError {
    if let Err(e) = check_json_depth(body) {
        return e;
    }
    let error = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|json| error_from_json(status, &json))
        .unwrap_or_else(|| error_from_text(status, body, secret));
    crate::redact::redact_error(error, secret)
}

fn json_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn error_from_json(status: u16, json: &Value) -> Option<ApiError> {
    let text = json_text;
    if let Some(err) = json.get("error") {
        if let Some(message) = err.as_str() {
            return Some(ApiError::provider(
                status,
                None,
                None,
                message.to_string(),
                None,
            ));
        }
        if let Some(message) = text(err.get("message")) {
            let kind = text(err.get("type")).or_else(|| text(err.get("status")));
            return Some(ApiError::provider(
                status,
                kind,
                text(err.get("code")),
                message,
                text(err.get("param")),
            ));
        }
    }
    if let Some(detail) = json.get("detail") {
        if let Some(message) = detail.as_str() {
            return Some(ApiError::provider(
                status,
                None,
                None,
                message.to_string(),
                None,
            ));
        }
        if let Some(message) = text(detail.get("message")) {
            let code = text(detail.get("status")).or_else(|| text(detail.get("code")));
            return Some(ApiError::provider(
                status,
                text(detail.get("type")),
                code,
                message,
                None,
            ));
        }
    }
    let message = text(json.get("message"))?;
    Some(ApiError::provider(
        status,
        None,
        text(json.get("code")),
        message,
        None,
    ))
}

/// The raw answer as the message, redacted before it is cut to 300 characters so
/// that no part of a key survives the cut.
fn error_from_text(status: u16, body: &[u8], secret: Option<&str>) -> ApiError {
    let text = crate::redact::redact(&String::from_utf8_lossy(body), secret);
    let snippet: String = text.chars().take(300).collect();
    let message = if snippet.trim().is_empty() {
        format!("provider answered HTTP {status} with no error message")
    } else {
        format!("provider answered HTTP {status}: {}", snippet.trim())
    };
    ApiError::provider(status, None, None, message, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_encoded_so_they_cannot_change_the_path() {
        assert_eq!(
            encode_component("21m00Tcm4TlvDq8ikWAM"),
            "21m00Tcm4TlvDq8ikWAM"
        );
        assert_eq!(
            encode_component("../admin?x=1#y z/é"),
            "..%2Fadmin%3Fx%3D1%23y%20z%2F%C3%A9"
        );
    }

    #[test]
    fn wav_header_describes_the_pcm() {
        let wav = crate::audio::wav::from_pcm16(&[1, 0, 2, 0], 24_000, 1);
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(wav[4..8].try_into().unwrap()), 40);
        assert_eq!(&wav[8..16], b"WAVEfmt ");
        assert_eq!(u32::from_le_bytes(wav[24..28].try_into().unwrap()), 24_000);
        assert_eq!(u32::from_le_bytes(wav[28..32].try_into().unwrap()), 48_000);
        assert_eq!(&wav[36..40], b"data");
        assert_eq!(u32::from_le_bytes(wav[40..44].try_into().unwrap()), 4);
        assert_eq!(&wav[44..], &[1, 0, 2, 0]);
    }

    #[test]
    fn provider_errors_keep_type_code_and_message() {
        let e = provider_error(
            429,
            br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded","param":null}}"#,
            None,
        );
        assert_eq!(e.status_code, 429);
        assert!(!e.is_bifrost_error);
        assert_eq!(e.error.message, "Rate limit reached");
        assert_eq!(e.error.kind.as_deref(), Some("requests"));
        assert_eq!(e.error.code.as_deref(), Some("rate_limit_exceeded"));

        let e = provider_error(
            401,
            br#"{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}"#,
            None,
        );
        assert_eq!(
            (e.error.message.as_str(), e.error.code.as_deref()),
            ("Invalid API key", Some("invalid_api_key"))
        );

        let e = provider_error(
            400,
            br#"{"error":{"code":400,"message":"bad voice","status":"INVALID_ARGUMENT"}}"#,
            None,
        );
        assert_eq!(e.error.kind.as_deref(), Some("INVALID_ARGUMENT"));
        assert_eq!(e.error.code.as_deref(), Some("400"));

        let e = provider_error(500, b"<html>oops</html>", None);
        assert_eq!(
            e.error.message,
            "provider answered HTTP 500: <html>oops</html>"
        );
        assert_eq!(
            provider_error(502, b"", None).error.message,
            "provider answered HTTP 502 with no error message"
        );
    }

    #[test]
    fn json_depth_counts_from_the_root_and_ignores_strings() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(json_depth_within(nest(32).as_bytes(), 32));
        assert!(!json_depth_within(nest(33).as_bytes(), 32));
        assert!(json_depth_within(br#"{"a":1}"#, 1));
        assert!(!json_depth_within(br#"{"a":{"b":1}}"#, 1));
        // Brackets in strings, also after escaped quotes and backslashes, do not count.
        assert!(json_depth_within(br#"{"a":"[[[[{{{{"}"#, 1));
        assert!(json_depth_within(br#"{"a":"\"[[[[","b":"\\"}"#, 1));
        assert!(!json_depth_within(br#"{"a":"\\",  "b":[1]}"#, 1));
        assert!(json_depth_within(b"", 32));
        assert!(json_depth_within(b"]]]]", 0));
        // A deep answer is refused without recursion, however deep.
        assert!(!json_depth_within("[".repeat(10_000_000).as_bytes(), 32));
        assert_eq!(
            check_json_depth(nest(33).as_bytes())
                .unwrap_err()
                .status_code,
            502
        );
    }

    #[test]
    fn audio_limit_names_the_setting() {
        assert!(audio_within_limit(10, 10).is_ok());
        let e = audio_within_limit(11, 10).unwrap_err();
        assert_eq!(e.status_code, 502);
        assert!(
            e.error.message.contains("max_audio_bytes (10)"),
            "{}",
            e.error.message
        );
        assert_eq!(decode_audio_base64("AAEC", 3).unwrap(), Some(vec![0, 1, 2]));
        assert!(decode_audio_base64("AAEC", 2).is_err());
        assert_eq!(decode_audio_base64("not base64!", 100).unwrap(), None);
    }

    #[test]
    fn dot_segments_are_found_in_every_segment() {
        for bad in [".", "..", "a/..", "../a", "a/./b", "a//.."] {
            assert!(check_model_in_path(bad).is_err(), "{bad}");
        }
        for good in ["a", "a.b", "...", ".a", "a..", "org/model", "a/.../b"] {
            assert!(check_model_in_path(good).is_ok(), "{good}");
        }
        assert_eq!(check_model_in_path("..").unwrap_err().error.param, None);
    }
}
