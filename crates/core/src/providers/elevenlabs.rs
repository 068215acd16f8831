//! ElevenLabs: `POST {base_path}/v1/text-to-speech/{voice_id}[/with-timestamps]`
//! with `xi-api-key`. The voice id is percent-encoded into the path.

use serde_json::{json, Map, Value};

use super::{
    audio_within_limit, check_format, check_json_depth, check_path_value, decode_audio_base64,
};
use super::{effective_format, encode_component, ensure_success, pcm16_as, request_headers, Auth};
use super::{single_voice, Provider, SpeechAudio, UpstreamRequest, UpstreamResponse};
use crate::config::ProviderConfig;
use crate::error::ApiError;
use crate::speech::{AudioFormat, SpeechRequest};

pub struct ElevenLabs;

const SUPPORTED: [AudioFormat; 4] = [
    AudioFormat::Mp3,
    AudioFormat::Opus,
    AudioFormat::Pcm,
    AudioFormat::Wav,
];
/// WAV is made from this PCM: 44.1 kHz, 16-bit, mono.
const PCM_RATE: u32 = 44_100;

fn output_format(format: AudioFormat) -> &'static str {
    match format {
        AudioFormat::Opus => "opus_48000_128",
        AudioFormat::Pcm | AudioFormat::Wav => "pcm_44100",
        AudioFormat::Mp3 | AudioFormat::Aac | AudioFormat::Flac => "mp3_44100_128",
    }
}

/// The answer's audio in the requested format: WAV is made from the PCM asked for.
fn finish_audio(
    format: AudioFormat,
    audio: Vec<u8>,
    max_audio_bytes: usize,
) -> Result<Vec<u8>, ApiError> {
    pcm16_as(format, audio, PCM_RATE, max_audio_bytes)
}

impl Provider for ElevenLabs {
    fn pcm_sample_rate(&self) -> u32 {
        PCM_RATE
    }

    fn check(&self, request: &SpeechRequest, _model: &str) -> Result<(), ApiError> {
        let voice = single_voice(request, "elevenlabs")?;
        // The voice id is a path segment.
        check_path_value("voice", voice, |message| {
            ApiError::invalid("voice", message)
        })?;
        check_format(self, request, "elevenlabs", &SUPPORTED)
    }

    fn build(
        &self,
        provider: &ProviderConfig,
        model: &str,
        request: &SpeechRequest,
    ) -> Result<UpstreamRequest, ApiError> {
        let voice = single_voice(request, "elevenlabs")?;
        let format = effective_format(self, request);
        let mut path = format!(
            "{}/v1/text-to-speech/{}",
            provider.base_path,
            encode_component(voice)
        );
        if request.with_timestamps {
            path.push_str("/with-timestamps");
        }
        path.push_str("?output_format=");
        path.push_str(output_format(format));
        if let Some(logging) = request.enable_logging {
            path.push_str(if logging {
                "&enable_logging=true"
            } else {
                "&enable_logging=false"
            });
        }
        if let Some(optimize) = request.optimize_streaming_latency {
            // ElevenLabs takes a level 0-4; true asks for the first level of optimisation.
            path.push_str(if optimize {
                "&optimize_streaming_latency=1"
            } else {
                "&optimize_streaming_latency=0"
            });
        }
        let headers = request_headers(provider, path, Auth::Header("xi-api-key"))?;
        let mut body = Map::new();
        body.insert("text".into(), json!(request.input));
        body.insert("model_id".into(), json!(model));
        if let Some(code) = &request.language_code {
            body.insert("language_code".into(), json!(code));
        }
        if let Some(locators) = &request.pronunciation_dictionary_locators {
            body.insert("pronunciation_dictionary_locators".into(), json!(locators));
        }
        if let Some(speed) = request.speed {
            body.insert("voice_settings".into(), json!({ "speed": speed }));
        }
        Ok(UpstreamRequest {
            headers,
            body: serde_json::to_vec(&Value::Object(body)).unwrap_or_default(),
        })
    }

    fn parse(
        &self,
        provider: &ProviderConfig,
        request: &SpeechRequest,
        response: &UpstreamResponse,
    ) -> Result<SpeechAudio, ApiError> {
        ensure_success(provider, response)?;
        let format = effective_format(self, request);
        if request.with_timestamps {
            return with_timestamps(provider, format, response.body);
        }
        if response.body.is_empty() {
            return Err(ApiError::upstream(502, "provider answered with no audio"));
        }
        audio_within_limit(response.body.len(), provider.max_audio_bytes)?;
        Ok(SpeechAudio {
            audio: finish_audio(format, response.body.to_vec(), provider.max_audio_bytes)?,
            format,
            alignment: None,
            normalized_alignment: None,
        })
    }
}

/// The with-timestamps answer: `{"audio_base64": …, "alignment": …, "normalized_alignment": …}`.
fn with_timestamps(
    provider: &ProviderConfig,
    format: AudioFormat,
    body: &[u8],
) -> Result<SpeechAudio, ApiError> {
    check_json_depth(body)?;
    let json: Value = serde_json::from_slice(body)
        .map_err(|_| ApiError::upstream(502, "ElevenLabs answered with-timestamps without JSON"))?;
    let b64 = json
        .get("audio_base64")
        .and_then(Value::as_str)
        .unwrap_or("");
    let audio = decode_audio_base64(b64, provider.max_audio_bytes)?
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::upstream(502, "ElevenLabs answered without audio_base64"))?;
    let pick = |name: &str| json.get(name).filter(|v| !v.is_null()).cloned();
    Ok(SpeechAudio {
        audio: finish_audio(format, audio, provider.max_audio_bytes)?,
        format,
        alignment: pick("alignment"),
        normalized_alignment: pick("normalized_alignment"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::request::parse_speech_request;

    fn setup(body: &str) -> (Config, SpeechRequest) {
        let c = Config::parse(
            br#"{"providers":{"elevenlabs":{"cluster":"el","authority":"api.elevenlabs.io","api_key":"xi-secret"}},
                 "allow_unauthenticated":true}"#,
            &|_| None,
        )
        .unwrap();
        let r = parse_speech_request(body.as_bytes(), &c).unwrap();
        (c, r)
    }

    #[test]
    fn maps_every_field() {
        let (c, r) = setup(
            r#"{"model":"elevenlabs/eleven_multilingual_v2","input":"Hola","voice":"voice/x y?","speed":1.1,
                "language_code":"es","pronunciation_dictionary_locators":[{"pronunciation_dictionary_id":"d","version_id":"v"}],
                "enable_logging":false,"optimize_streaming_latency":true,"response_format":"opus","instructions":"ignored"}"#,
        );
        let up = ElevenLabs
            .build(&c.providers["elevenlabs"], "eleven_multilingual_v2", &r)
            .unwrap();
        assert_eq!(
            up.header(":path"),
            Some("/v1/text-to-speech/voice%2Fx%20y%3F?output_format=opus_48000_128&enable_logging=false&optimize_streaming_latency=1")
        );
        assert_eq!(up.header("xi-api-key"), Some("xi-secret"));
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(
            body,
            json!({"text":"Hola","model_id":"eleven_multilingual_v2","language_code":"es",
                   "pronunciation_dictionary_locators":[{"pronunciation_dictionary_id":"d","version_id":"v"}],
                   "voice_settings":{"speed":1.1}})
        );
    }

    #[test]
    fn formats() {
        for (format, query) in [
            ("mp3", "mp3_44100_128"),
            ("pcm", "pcm_44100"),
            ("wav", "pcm_44100"),
        ] {
            let (c, r) = setup(&format!(
                r#"{{"model":"elevenlabs/m","input":"a","voice":"v","response_format":"{format}"}}"#
            ));
            let up = ElevenLabs
                .build(&c.providers["elevenlabs"], "m", &r)
                .unwrap();
            assert!(up
                .header(":path")
                .unwrap()
                .ends_with(&format!("?output_format={query}")));
        }
        for format in ["aac", "flac"] {
            let c = setup(r#"{"model":"elevenlabs/m","input":"a","voice":"v"}"#).0;
            let e = parse_speech_request(
                format!(r#"{{"model":"elevenlabs/m","input":"a","voice":"v","response_format":"{format}"}}"#).as_bytes(),
                &c,
            )
            .unwrap_err();
            assert_eq!(e.error.param.as_deref(), Some("response_format"));
        }
        let (c, r) =
            setup(r#"{"model":"elevenlabs/m","input":"a","voice":"v","response_format":"wav"}"#);
        let out = ElevenLabs
            .parse(
                &c.providers["elevenlabs"],
                &r,
                &UpstreamResponse {
                    status: 200,
                    body: &[1, 0],
                },
            )
            .unwrap();
        assert_eq!(&out.audio[..4], b"RIFF");
        assert_eq!(&out.audio[44..], &[1, 0]);
    }

    #[test]
    fn with_timestamps_returns_audio_and_alignment() {
        let (c, r) =
            setup(r#"{"model":"elevenlabs/m","input":"Hi","voice":"v","with_timestamps":true}"#);
        let up = ElevenLabs
            .build(&c.providers["elevenlabs"], "m", &r)
            .unwrap();
        assert_eq!(
            up.header(":path"),
            Some("/v1/text-to-speech/v/with-timestamps?output_format=mp3_44100_128")
        );
        let answer = json!({
            "audio_base64": "AAEC",
            "alignment": {"characters":["H","i"],"character_start_times_seconds":[0.0,0.1],"character_end_times_seconds":[0.1,0.2]},
            "normalized_alignment": {"characters":["H","i"],"character_start_times_seconds":[0.0,0.1],"character_end_times_seconds":[0.1,0.2]}
        });
        let body = serde_json::to_vec(&answer).unwrap();
        let out = ElevenLabs
            .parse(
                &c.providers["elevenlabs"],
                &r,
                &UpstreamResponse {
                    status: 200,
                    body: &body,
                },
            )
            .unwrap();
        assert_eq!(out.audio, vec![0, 1, 2]);
        assert_eq!(out.alignment, Some(answer["alignment"].clone()));
        assert_eq!(
            out.normalized_alignment,
            Some(answer["normalized_alignment"].clone())
        );
    }

    #[test]
    fn errors_keep_the_providers_detail() {
        let (c, r) = setup(r#"{"model":"elevenlabs/m","input":"Hi","voice":"v"}"#);
        let e = ElevenLabs
            .parse(
                &c.providers["elevenlabs"],
                &r,
                &UpstreamResponse {
                    status: 401,
                    body: br#"{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}"#,
                },
            )
            .unwrap_err();
        assert_eq!(
            (
                e.status_code,
                e.error.message.as_str(),
                e.error.code.as_deref()
            ),
            (401, "Invalid API key", Some("invalid_api_key"))
        );
    }

    #[test]
    fn a_dot_segment_in_the_voice_id_is_refused() {
        let c = setup(r#"{"model":"elevenlabs/m","input":"a","voice":"v"}"#).0;
        for voice in ["..", ".", "a/../b", "a/.", "../"] {
            let body = format!(r#"{{"model":"elevenlabs/m","input":"a","voice":"{voice}"}}"#);
            let e = parse_speech_request(body.as_bytes(), &c).unwrap_err();
            assert_eq!(
                (e.status_code, e.error.param.as_deref()),
                (400, Some("voice")),
                "{voice}"
            );
        }
        assert!(parse_speech_request(
            br#"{"model":"elevenlabs/m","input":"a","voice":"...x."}"#,
            &c
        )
        .is_ok());
    }

    #[test]
    fn hostile_answers_fail_the_attempt_with_502() {
        let (c, r) =
            setup(r#"{"model":"elevenlabs/m","input":"Hi","voice":"v","with_timestamps":true}"#);
        let p = &c.providers["elevenlabs"];
        let parse = |body: &[u8]| ElevenLabs.parse(p, &r, &UpstreamResponse { status: 200, body });
        let deep = format!(
            r#"{{"audio_base64":"AAEC","alignment":{}1{}}}"#,
            "[".repeat(32),
            "]".repeat(32)
        );
        let e = parse(deep.as_bytes()).unwrap_err();
        assert_eq!(e.status_code, 502);
        assert!(e.error.message.contains("32 levels"), "{}", e.error.message);
        let ok = format!(
            r#"{{"audio_base64":"AAEC","alignment":{}1{}}}"#,
            "[".repeat(31),
            "]".repeat(31)
        );
        assert!(parse(ok.as_bytes()).is_ok());
        // Audio above max_audio_bytes, refused before it is decoded.
        let big = format!(r#"{{"audio_base64":"{}"}}"#, "A".repeat(40_000_000));
        let e = parse(big.as_bytes()).unwrap_err();
        assert_eq!(e.status_code, 502);
        assert!(
            e.error.message.contains("max_audio_bytes"),
            "{}",
            e.error.message
        );
    }
}
