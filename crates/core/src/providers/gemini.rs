//! Google Gemini speech: `POST {base_path}/v1beta/models/{model}:generateContent`
//! with `x-goog-api-key`. The answer is base64 PCM (24 kHz, 16-bit, mono).

use serde_json::{json, Value};

use super::{
    check_format, check_json_depth, check_model_in_path, decode_audio_base64, effective_format,
};
use super::{encode_component, ensure_success, pcm16_as, request_headers, Auth};
use super::{Provider, SpeechAudio, UpstreamRequest, UpstreamResponse};
use crate::config::ProviderConfig;
use crate::error::ApiError;
use crate::speech::{AudioFormat, SpeechRequest, Voice};

pub struct Gemini;

const SUPPORTED: [AudioFormat; 2] = [AudioFormat::Wav, AudioFormat::Pcm];
const PCM_RATE: u32 = 24_000;

fn voice_config(name: &str) -> Value {
    json!({ "prebuiltVoiceConfig": { "voiceName": name } })
}

impl Provider for Gemini {
    fn check(&self, request: &SpeechRequest, model: &str) -> Result<(), ApiError> {
        // The model is a path segment.
        check_model_in_path(model)?;
        check_format(self, request, "gemini", &SUPPORTED)
    }

    fn default_format(&self) -> AudioFormat {
        AudioFormat::Wav
    }

    fn build(
        &self,
        provider: &ProviderConfig,
        model: &str,
        request: &SpeechRequest,
    ) -> Result<UpstreamRequest, ApiError> {
        let path = format!(
            "{}/v1beta/models/{}:generateContent",
            provider.base_path,
            encode_component(model)
        );
        let headers = request_headers(provider, path, Auth::Header("x-goog-api-key"))?;
        // The style prompt goes before the text, as Gemini's speech guide does it.
        let text = match &request.instructions {
            Some(style) if !style.is_empty() => format!("{style}: {}", request.input),
            _ => request.input.clone(),
        };
        let speech_config = match &request.voice {
            Voice::Single(name) => json!({ "voiceConfig": voice_config(name) }),
            Voice::Multi(speakers) => json!({
                "multiSpeakerVoiceConfig": {
                    "speakerVoiceConfigs": speakers.iter().map(|s| json!({
                        "speaker": s.speaker,
                        "voiceConfig": voice_config(&s.voice),
                    })).collect::<Vec<_>>()
                }
            }),
        };
        let body = json!({
            "contents": [{ "parts": [{ "text": text }] }],
            "generationConfig": {
                "responseModalities": ["AUDIO"],
                "speechConfig": speech_config,
            }
        });
        Ok(UpstreamRequest {
            headers,
            body: serde_json::to_vec(&body).unwrap_or_default(),
        })
    }

    fn parse(
        &self,
        provider: &ProviderConfig,
        request: &SpeechRequest,
        response: &UpstreamResponse,
    ) -> Result<SpeechAudio, ApiError> {
        ensure_success(provider, response)?;
        check_json_depth(response.body)?;
        let json: Value = serde_json::from_slice(response.body)
            .map_err(|_| ApiError::upstream(502, "Gemini answered without JSON"))?;
        let pcm = pcm_of(&json, provider.max_audio_bytes)?.ok_or_else(|| {
            let reason = json
                .pointer("/candidates/0/finishReason")
                .or_else(|| json.pointer("/promptFeedback/blockReason"))
                .and_then(Value::as_str)
                .unwrap_or("none given");
            let reason = crate::log_escape::escape_for_log(reason);
            ApiError::upstream(
                502,
                format!("Gemini answered without audio (reason: {reason})"),
            )
        })?;
        let format = effective_format(self, request);
        let audio = pcm16_as(format, pcm, PCM_RATE, provider.max_audio_bytes)?;
        Ok(SpeechAudio {
            audio,
            format,
            alignment: None,
            normalized_alignment: None,
        })
    }
}

/// The first non-empty base64 audio among the answer's parts.
fn pcm_of(json: &Value, max_audio_bytes: usize) -> Result<Option<Vec<u8>>, ApiError> {
    let parts = json
        .pointer("/candidates/0/content/parts")
        .and_then(Value::as_array);
    let datas = parts
        .into_iter()
        .flatten()
        .filter_map(|p| p.pointer("/inlineData/data").and_then(Value::as_str));
    for b64 in datas {
        if let Some(pcm) = decode_audio_base64(b64, max_audio_bytes)?.filter(|a| !a.is_empty()) {
            return Ok(Some(pcm));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::wav::from_pcm16 as wav_from_pcm16;
    use crate::config::Config;
    use crate::request::parse_speech_request;

    fn setup(body: &str) -> (Config, SpeechRequest) {
        let c = Config::parse(
            br#"{"providers":{"gemini":{"cluster":"g","authority":"generativelanguage.googleapis.com","api_key":"g-key"},
                 "openai":{"cluster":"o"}},"allow_unauthenticated":true}"#,
            &|_| None,
        )
        .unwrap();
        let r = parse_speech_request(body.as_bytes(), &c).unwrap();
        (c, r)
    }

    #[test]
    fn single_voice_with_style_prompt() {
        let (c, r) = setup(
            r#"{"model":"gemini/gemini-2.5-flash-preview-tts","input":"Have a wonderful day!","voice":"Kore","instructions":"Say cheerfully"}"#,
        );
        let up = Gemini
            .build(&c.providers["gemini"], "gemini-2.5-flash-preview-tts", &r)
            .unwrap();
        assert_eq!(
            up.header(":path"),
            Some("/v1beta/models/gemini-2.5-flash-preview-tts:generateContent")
        );
        assert_eq!(up.header("x-goog-api-key"), Some("g-key"));
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(
            body,
            json!({"contents":[{"parts":[{"text":"Say cheerfully: Have a wonderful day!"}]}],
                   "generationConfig":{"responseModalities":["AUDIO"],
                     "speechConfig":{"voiceConfig":{"prebuiltVoiceConfig":{"voiceName":"Kore"}}}}})
        );
    }

    #[test]
    fn multi_speaker() {
        let (c, r) = setup(
            r#"{"model":"gemini/m","input":"Joe: Hi\nJane: Hey","voice":[{"speaker":"Joe","voice":"Kore"},{"speaker":"Jane","voice":"Puck"}]}"#,
        );
        let up = Gemini.build(&c.providers["gemini"], "m", &r).unwrap();
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(
            body["generationConfig"]["speechConfig"],
            json!({"multiSpeakerVoiceConfig":{"speakerVoiceConfigs":[
                {"speaker":"Joe","voiceConfig":{"prebuiltVoiceConfig":{"voiceName":"Kore"}}},
                {"speaker":"Jane","voiceConfig":{"prebuiltVoiceConfig":{"voiceName":"Puck"}}}]}})
        );
    }

    #[test]
    fn wav_by_default_pcm_on_request_and_nothing_else() {
        let answer = br#"{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"audio/L16;codec=pcm;rate=24000","data":"AQACAA=="}}]}}]}"#;
        let (c, r) = setup(r#"{"model":"gemini/m","input":"a","voice":"Kore"}"#);
        let out = Gemini
            .parse(
                &c.providers["gemini"],
                &r,
                &UpstreamResponse {
                    status: 200,
                    body: answer,
                },
            )
            .unwrap();
        assert_eq!(out.format, AudioFormat::Wav);
        assert_eq!(out.audio, wav_from_pcm16(&[1, 0, 2, 0], 24_000, 1));
        let (c, r) =
            setup(r#"{"model":"gemini/m","input":"a","voice":"Kore","response_format":"pcm"}"#);
        let out = Gemini
            .parse(
                &c.providers["gemini"],
                &r,
                &UpstreamResponse {
                    status: 200,
                    body: answer,
                },
            )
            .unwrap();
        assert_eq!(out.audio, vec![1, 0, 2, 0]);
        let e = parse_speech_request(
            br#"{"model":"gemini/m","input":"a","voice":"Kore","response_format":"mp3"}"#,
            &c,
        )
        .unwrap_err();
        assert_eq!(e.error.param.as_deref(), Some("response_format"));
        // A multi-speaker voice is refused where a fallback cannot take it.
        let e = parse_speech_request(
            br#"{"model":"gemini/m","input":"a","voice":[{"speaker":"A","voice":"Kore"}],"fallbacks":["openai/tts-1"]}"#,
            &c,
        )
        .unwrap_err();
        assert_eq!(e.error.param.as_deref(), Some("voice"));
    }

    #[test]
    fn google_errors_are_mapped() {
        let (c, r) = setup(r#"{"model":"gemini/m","input":"a","voice":"Kore"}"#);
        let p = &c.providers["gemini"];
        let e = Gemini
            .parse(p, &r, &UpstreamResponse { status: 400, body: br#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT"}}"# })
            .unwrap_err();
        assert_eq!(
            (
                e.status_code,
                e.error.message.as_str(),
                e.error.kind.as_deref()
            ),
            (400, "API key not valid.", Some("INVALID_ARGUMENT"))
        );
        let e = Gemini
            .parse(
                p,
                &r,
                &UpstreamResponse {
                    status: 200,
                    body: br#"{"candidates":[{"finishReason":"SAFETY"}]}"#,
                },
            )
            .unwrap_err();
        assert!(e.error.message.contains("SAFETY"));
    }

    #[test]
    fn a_dot_segment_in_the_model_is_refused_and_deep_answers_fail() {
        let (c, r) = setup(r#"{"model":"gemini/m","input":"a","voice":"Kore"}"#);
        for model in ["gemini/..", "gemini/models/../x"] {
            let body = format!(r#"{{"model":"{model}","input":"a","voice":"Kore"}}"#);
            let e = parse_speech_request(body.as_bytes(), &c).unwrap_err();
            assert_eq!(
                (e.status_code, e.error.param.as_deref()),
                (400, Some("model")),
                "{model}"
            );
        }
        let p = &c.providers["gemini"];
        let deep = format!("{}{}", "[".repeat(33), "]".repeat(33));
        for status in [200, 400] {
            let e = Gemini
                .parse(
                    p,
                    &r,
                    &UpstreamResponse {
                        status,
                        body: deep.as_bytes(),
                    },
                )
                .unwrap_err();
            assert_eq!(e.status_code, 502, "{status}");
            assert!(
                e.error.message.contains("nested deeper than 32"),
                "{}",
                e.error.message
            );
        }
    }
}
