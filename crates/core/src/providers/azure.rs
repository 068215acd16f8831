//! Azure OpenAI: the model names the deployment.
//! `POST {base_path}/openai/deployments/{deployment}/audio/speech?api-version=…`,
//! or with `api_version: "v1"` the newer `POST {base_path}/openai/v1/audio/speech`.

use super::openai::{binary_audio, speech_request};
use super::{check_model_in_path, encode_component, single_voice, Auth};
use super::{Provider, SpeechAudio, UpstreamRequest, UpstreamResponse};
use crate::config::ProviderConfig;
use crate::error::ApiError;
use crate::speech::SpeechRequest;

pub struct Azure;

impl Provider for Azure {
    fn check(&self, request: &SpeechRequest, model: &str) -> Result<(), ApiError> {
        single_voice(request, "azure")?;
        // The deployment is a path segment (unless api_version is "v1"; refused alike).
        check_model_in_path(model)
    }

    fn build(
        &self,
        provider: &ProviderConfig,
        model: &str,
        request: &SpeechRequest,
    ) -> Result<UpstreamRequest, ApiError> {
        let path = if provider.api_version == "v1" {
            format!("{}/openai/v1/audio/speech", provider.base_path)
        } else {
            format!(
                "{}/openai/deployments/{}/audio/speech?api-version={}",
                provider.base_path,
                encode_component(model),
                encode_component(&provider.api_version)
            )
        };
        speech_request(
            self,
            provider,
            path,
            Auth::Header("api-key"),
            model,
            request,
            "azure",
        )
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
    use serde_json::{json, Value};

    fn config(version: &str) -> Config {
        Config::parse(
            format!(
                r#"{{"providers":{{"az":{{"type":"azure","cluster":"azure","authority":"res.openai.azure.com",
                     "api_key":"az-key","api_version":"{version}"}}}},"allow_unauthenticated":true}}"#
            )
            .as_bytes(),
            &|_| None,
        )
        .unwrap()
    }

    #[test]
    fn deployment_path_api_version_and_key_header() {
        let c = config("2025-03-01-preview");
        let r = parse_speech_request(
            br#"{"model":"az/my tts/1","input":"Hi","voice":"alloy","speed":2}"#,
            &c,
        )
        .unwrap();
        let up = Azure.build(&c.providers["az"], "my tts/1", &r).unwrap();
        assert_eq!(
            up.header(":path"),
            Some("/openai/deployments/my%20tts%2F1/audio/speech?api-version=2025-03-01-preview")
        );
        assert_eq!(up.header("api-key"), Some("az-key"));
        assert_eq!(up.header("authorization"), None);
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(
            body,
            json!({"model":"my tts/1","input":"Hi","voice":"alloy","response_format":"mp3","speed":2.0})
        );
    }

    #[test]
    fn v1_path() {
        let c = config("v1");
        let r = parse_speech_request(
            br#"{"model":"az/gpt-4o-mini-tts","input":"Hi","voice":"alloy"}"#,
            &c,
        )
        .unwrap();
        let up = Azure
            .build(&c.providers["az"], "gpt-4o-mini-tts", &r)
            .unwrap();
        assert_eq!(up.header(":path"), Some("/openai/v1/audio/speech"));
    }

    #[test]
    fn a_dot_segment_in_the_deployment_is_refused() {
        let c = config("2025-03-01-preview");
        for model in ["az/..", "az/.", "az/x/../y", "az/x/."] {
            let body = format!(r#"{{"model":"{model}","input":"Hi","voice":"alloy"}}"#);
            let e = parse_speech_request(body.as_bytes(), &c).unwrap_err();
            assert_eq!(
                (e.status_code, e.error.param.as_deref()),
                (400, Some("model")),
                "{model}"
            );
        }
        let body = br#"{"model":"az/ok","input":"Hi","voice":"alloy","fallbacks":["az/.."]}"#;
        let e = parse_speech_request(body, &c).unwrap_err();
        assert_eq!(e.error.param.as_deref(), Some("fallbacks[0]"));
        assert!(parse_speech_request(
            br#"{"model":"az/a..b/.x","input":"Hi","voice":"alloy"}"#,
            &c
        )
        .is_ok());
    }
}
