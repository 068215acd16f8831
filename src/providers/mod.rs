//! Speech providers: one trait, one file per provider type. A provider turns a
//! validated `SpeechRequest` into an upstream HTTP request and the upstream's
//! answer into audio or an error; none of it touches the host.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ProviderConfig;
use crate::error::ApiError;
use crate::request::{AudioFormat, SpeechRequest, Voice};

mod azure;
mod elevenlabs;
mod gemini;
mod openai;

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

    /// Longest input one call takes by default (SPEC §3): the provider's own cap.
    pub fn default_max_input_chars(self) -> u64 {
        match self {
            ProviderKind::OpenAi | ProviderKind::Azure => 4096,
            ProviderKind::ElevenLabs | ProviderKind::Gemini => 5000,
        }
    }
}

/// What the worker sends through the provider's Envoy cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamRequest {
    /// Includes the pseudo-headers `:method`, `:path` and `:authority`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl UpstreamRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The provider's answer to one attempt.
pub struct UpstreamResponse<'a> {
    pub status: u16,
    pub headers: &'a [(String, Vec<u8>)],
    pub body: &'a [u8],
}

impl UpstreamResponse<'_> {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
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

    /// Maps any answer, 2xx or not, to audio or the job's error.
    fn parse(&self, request: &SpeechRequest, response: &UpstreamResponse) -> Result<SpeechAudio, ApiError>;
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
    request.response_format.unwrap_or_else(|| provider.default_format())
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

/// Percent-encodes one URL path segment or query value: only RFC 3986
/// unreserved characters stay as they are, so no input can change the path.
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

/// Wraps 16-bit little-endian PCM in a WAV (RIFF) header.
pub fn wav_from_pcm16(pcm: &[u8], sample_rate: u32, channels: u16) -> Vec<u8> {
    let data_len = u32::try_from(pcm.len()).unwrap_or(u32::MAX - 36);
    let block_align = channels.saturating_mul(2);
    let byte_rate = sample_rate.saturating_mul(u32::from(block_align));
    let mut wav = Vec::with_capacity(44 + pcm.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36u32.saturating_add(data_len)).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&channels.to_le_bytes());
    wav.extend_from_slice(&sample_rate.to_le_bytes());
    wav.extend_from_slice(&byte_rate.to_le_bytes());
    wav.extend_from_slice(&block_align.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    wav.extend_from_slice(pcm);
    wav
}

/// Maps a provider's error answer into the error shape, keeping the provider's own
/// type, code and message where its JSON has them (OpenAI `{"error":{…}}`,
/// ElevenLabs `{"detail":…}`, Google `{"error":{"status":…}}`).
pub fn provider_error(status: u16, body: &[u8]) -> ApiError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let text = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    if let Some(json) = &json {
        if let Some(err) = json.get("error") {
            if let Some(message) = err.as_str() {
                return ApiError::provider(status, None, None, message.to_string(), None);
            }
            if let Some(message) = text(err.get("message")) {
                return ApiError::provider(
                    status,
                    text(err.get("type")).or_else(|| text(err.get("status"))),
                    text(err.get("code")),
                    message,
                    text(err.get("param")),
                );
            }
        }
        if let Some(detail) = json.get("detail") {
            if let Some(message) = detail.as_str() {
                return ApiError::provider(status, None, None, message.to_string(), None);
            }
            if let Some(message) = text(detail.get("message")) {
                return ApiError::provider(status, text(detail.get("type")), text(detail.get("status")).or_else(|| text(detail.get("code"))), message, None);
            }
        }
        if let Some(message) = text(json.get("message")) {
            return ApiError::provider(status, None, text(json.get("code")), message, None);
        }
    }
    let snippet: String = String::from_utf8_lossy(body).chars().take(300).collect();
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
        assert_eq!(encode_component("21m00Tcm4TlvDq8ikWAM"), "21m00Tcm4TlvDq8ikWAM");
        assert_eq!(encode_component("../admin?x=1#y z/é"), "..%2Fadmin%3Fx%3D1%23y%20z%2F%C3%A9");
    }

    #[test]
    fn wav_header_describes_the_pcm() {
        let wav = wav_from_pcm16(&[1, 0, 2, 0], 24_000, 1);
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
        );
        assert_eq!(e.status_code, 429);
        assert!(!e.is_bifrost_error);
        assert_eq!(e.error.message, "Rate limit reached");
        assert_eq!(e.error.kind.as_deref(), Some("requests"));
        assert_eq!(e.error.code.as_deref(), Some("rate_limit_exceeded"));

        let e = provider_error(401, br#"{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}"#);
        assert_eq!((e.error.message.as_str(), e.error.code.as_deref()), ("Invalid API key", Some("invalid_api_key")));

        let e = provider_error(400, br#"{"error":{"code":400,"message":"bad voice","status":"INVALID_ARGUMENT"}}"#);
        assert_eq!(e.error.kind.as_deref(), Some("INVALID_ARGUMENT"));
        assert_eq!(e.error.code.as_deref(), Some("400"));

        let e = provider_error(500, b"<html>oops</html>");
        assert_eq!(e.error.message, "provider answered HTTP 500: <html>oops</html>");
        assert_eq!(provider_error(502, b"").error.message, "provider answered HTTP 502 with no error message");
    }
}
