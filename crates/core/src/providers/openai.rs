//! OpenAI and every OpenAI-compatible speech server: `POST {base_path}/audio/speech`.

use serde_json::{json, Map, Value};

use super::{
    audio_within_limit, effective_format, ensure_success, request_headers, single_voice, Auth,
};
use super::{Provider, SpeechAudio, UpstreamRequest, UpstreamResponse};
use crate::config::ProviderConfig;
use crate::error::ApiError;
use crate::speech::SpeechRequest;

pub struct OpenAi;

/// The OpenAI speech body; Azure OpenAI takes the same one.
pub fn speech_body(model: &str, voice: &str, request: &SpeechRequest, format: &str) -> Vec<u8> {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("input".into(), json!(request.input));
    body.insert("voice".into(), json!(voice));
    body.insert("response_format".into(), json!(format));
    if let Some(speed) = request.speed {
        body.insert("speed".into(), json!(speed));
    }
    if let Some(instructions) = &request.instructions {
        body.insert("instructions".into(), json!(instructions));
    }
    serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
}

/// An OpenAI-shaped speech request to `path` (Azure OpenAI uses it too).
pub fn speech_request(
    this: &dyn Provider,
    provider: &ProviderConfig,
    path: String,
    auth: Auth,
    model: &str,
    request: &SpeechRequest,
    kind: &str,
) -> Result<UpstreamRequest, ApiError> {
    let voice = single_voice(request, kind)?;
    let headers = request_headers(provider, path, auth)?;
    let format = effective_format(this, request).name();
    Ok(UpstreamRequest {
        headers,
        body: speech_body(model, voice, request, format),
    })
}

/// A 2xx answer is the audio itself, in the requested format.
pub fn binary_audio(
    this: &dyn Provider,
    provider: &ProviderConfig,
    request: &SpeechRequest,
    response: &UpstreamResponse,
) -> Result<SpeechAudio, ApiError> {
    ensure_success(provider, response)?;
    if response.body.is_empty() {
        return Err(ApiError::upstream(502, "provider answered with no audio"));
    }
    audio_within_limit(response.body.len(), provider.max_audio_bytes)?;
    Ok(SpeechAudio {
        audio: response.body.to_vec(),
        format: effective_format(this, request),
        alignment: None,
        normalized_alignment: None,
    })
}

impl Provider for OpenAi {
    fn check(&self, request: &SpeechRequest, _model: &str) -> Result<(), ApiError> {
        single_voice(request, "openai").map(|_| ())
    }

    fn build(
        &self,
        provider: &ProviderConfig,
        model: &str,
        request: &SpeechRequest,
    ) -> Result<UpstreamRequest, ApiError> {
        let path = format!("{}/audio/speech", provider.base_path);
        speech_request(self, provider, path, Auth::Bearer, model, request, "openai")
    }

    fn parse(
        &self,
        provider: &ProviderConfig,
        request: &SpeechRequest,
        response: &UpstreamResponse,
    ) -> Result<SpeechAudio, ApiError> {
        binary_audio(self, provider, request, response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::request::parse_speech_request;
    use crate::speech::AudioFormat;

    fn setup(extra: &str) -> (Config, SpeechRequest) {
        let c = Config::parse(
            br#"{"providers":{"openai":{"cluster":"openai","authority":"api.openai.com","api_key":"sk-prov"},
                 "nokey":{"type":"openai","cluster":"n","api_key_env":"UNSET"}},"allow_unauthenticated":true}"#,
            &|_| None,
        )
        .unwrap();
        let r = parse_speech_request(
            format!(r#"{{"model":"openai/gpt-4o-mini-tts","input":"Hi","voice":"alloy"{extra}}}"#)
                .as_bytes(),
            &c,
        )
        .unwrap();
        (c, r)
    }

    #[test]
    fn builds_the_openai_request() {
        let (c, r) = setup(r#","speed":1.25,"instructions":"calm","response_format":"opus""#);
        let up = OpenAi
            .build(&c.providers["openai"], "gpt-4o-mini-tts", &r)
            .unwrap();
        assert_eq!(up.header(":method"), Some("POST"));
        assert_eq!(up.header(":path"), Some("/v1/audio/speech"));
        assert_eq!(up.header(":authority"), Some("api.openai.com"));
        assert_eq!(up.header("authorization"), Some("Bearer sk-prov"));
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(
            body,
            json!({"model":"gpt-4o-mini-tts","input":"Hi","voice":"alloy","response_format":"opus","speed":1.25,"instructions":"calm"})
        );
    }

    #[test]
    fn default_format_is_mp3_and_missing_keys_fail_the_attempt() {
        let (c, r) = setup("");
        let up = OpenAi.build(&c.providers["openai"], "m", &r).unwrap();
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(body["response_format"], "mp3");
        assert!(body.get("speed").is_none());
        let e = OpenAi.build(&c.providers["nokey"], "m", &r).unwrap_err();
        assert_eq!(e.status_code, 401);
        assert!(e.error.message.contains("UNSET"));
    }

    #[test]
    fn maps_audio_and_errors() {
        let (c, r) = setup("");
        let p = &c.providers["openai"];
        let ok = OpenAi
            .parse(
                p,
                &r,
                &UpstreamResponse {
                    status: 200,
                    body: &[0, 255, 1],
                },
            )
            .unwrap();
        assert_eq!((ok.audio, ok.format), (vec![0, 255, 1], AudioFormat::Mp3));
        let err = OpenAi
            .parse(
                p,
                &r,
                &UpstreamResponse {
                    status: 429,
                    body: br#"{"error":{"message":"slow down"}}"#,
                },
            )
            .unwrap_err();
        assert_eq!(
            (err.status_code, err.error.message.as_str()),
            (429, "slow down")
        );
    }

    #[test]
    fn a_key_repeated_by_the_provider_is_redacted() {
        let (c, r) = setup("");
        let p = &c.providers["openai"];
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-prov.","type":"sk-prov","code":"sk-prov","param":"sk-prov"}}"#;
        let e = OpenAi
            .parse(p, &r, &UpstreamResponse { status: 401, body })
            .unwrap_err();
        assert_eq!(e.error.message, "Incorrect API key provided: [redacted].");
        for field in [&e.error.kind, &e.error.code, &e.error.param] {
            assert_eq!(field.as_deref(), Some("[redacted]"));
        }
        // Also in the raw fallback, even where the key straddles the 300-character cut.
        let mut raw = "x".repeat(296).into_bytes();
        raw.extend_from_slice(b"sk-prov and more");
        let e = OpenAi
            .parse(
                p,
                &r,
                &UpstreamResponse {
                    status: 500,
                    body: &raw,
                },
            )
            .unwrap_err();
        assert!(!e.error.message.contains("sk-p"), "{}", e.error.message);
        assert!(!String::from_utf8_lossy(&e.to_json()).contains("sk-prov"));
    }

    #[test]
    fn audio_above_the_limit_fails_with_502() {
        let c = Config::parse(
            br#"{"providers":{"openai":{"cluster":"o"}},"allow_unauthenticated":true,"max_audio_bytes":1024}"#,
            &|_| None,
        )
        .unwrap();
        let r = parse_speech_request(br#"{"model":"openai/m","input":"Hi","voice":"alloy"}"#, &c)
            .unwrap();
        let p = &c.providers["openai"];
        let ok = vec![7u8; 1024];
        assert!(OpenAi
            .parse(
                p,
                &r,
                &UpstreamResponse {
                    status: 200,
                    body: &ok
                }
            )
            .is_ok());
        let big = vec![7u8; 1025];
        let e = OpenAi
            .parse(
                p,
                &r,
                &UpstreamResponse {
                    status: 200,
                    body: &big,
                },
            )
            .unwrap_err();
        assert_eq!(e.status_code, 502);
        assert!(
            e.error.message.contains("max_audio_bytes (1024)"),
            "{}",
            e.error.message
        );
    }
}
