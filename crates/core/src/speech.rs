//! What a speech request is, once validated: the types every room shares
//! (parsing lives in `request`, provider mapping in `providers`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    Mp3,
    Opus,
    Aac,
    Flac,
    Wav,
    Pcm,
}

impl AudioFormat {
    pub const ALL: [AudioFormat; 6] = [
        AudioFormat::Mp3,
        AudioFormat::Opus,
        AudioFormat::Aac,
        AudioFormat::Flac,
        AudioFormat::Wav,
        AudioFormat::Pcm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AudioFormat::Mp3 => "mp3",
            AudioFormat::Opus => "opus",
            AudioFormat::Aac => "aac",
            AudioFormat::Flac => "flac",
            AudioFormat::Wav => "wav",
            AudioFormat::Pcm => "pcm",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            AudioFormat::Mp3 => "audio/mpeg",
            AudioFormat::Opus => "audio/ogg",
            AudioFormat::Aac => "audio/aac",
            AudioFormat::Flac => "audio/flac",
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Pcm => "audio/pcm",
        }
    }

    pub fn from_name(name: &str) -> Option<AudioFormat> {
        AudioFormat::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// `provider/model`: which configured provider, and the model it is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

impl ModelRef {
    pub fn parse(text: &str) -> Option<ModelRef> {
        let (provider, model) = text.split_once('/')?;
        if provider.is_empty() || model.is_empty() {
            return None;
        }
        Some(ModelRef {
            provider: provider.to_string(),
            model: model.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeakerVoice {
    pub speaker: String,
    pub voice: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Voice {
    Single(String),
    Multi(Vec<SpeakerVoice>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechRequest {
    /// The primary model first, then the fallbacks in order.
    pub chain: Vec<ModelRef>,
    pub input: String,
    pub voice: Voice,
    /// As the client gave it; each provider picks its default when absent.
    pub response_format: Option<AudioFormat>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub instructions: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub speed: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub language_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pronunciation_dictionary_locators: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enable_logging: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub optimize_streaming_latency: Option<bool>,
    #[serde(default)]
    pub with_timestamps: bool,
}

/// A small valid request for tests: one model per `chain` entry.
#[cfg(test)]
pub fn sample_request(chain: &[(&str, &str)]) -> SpeechRequest {
    SpeechRequest {
        chain: chain
            .iter()
            .map(|(p, m)| ModelRef {
                provider: p.to_string(),
                model: m.to_string(),
            })
            .collect(),
        input: "hi".into(),
        voice: Voice::Single("v".into()),
        response_format: None,
        instructions: None,
        speed: None,
        language_code: None,
        pronunciation_dictionary_locators: None,
        enable_logging: None,
        optimize_streaming_latency: None,
        with_timestamps: false,
    }
}
