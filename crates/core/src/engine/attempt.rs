//! One provider call of a job: building it from the job's current step,
//! reading its answer (or its absence), and naming how it went.

use crate::config::{Config, ProviderConfig};
use crate::error::{ApiError, ExtraFields};
use crate::job::{Completion, JobRecord, ResultMeta};
use crate::platform::Callout;
use crate::providers::{for_kind, SpeechAudio, UpstreamResponse};
use crate::speech::{ModelRef, SpeechRequest};

/// One provider call ready to go out, and what is needed to read its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub id: String,
    /// Index in the job's chain (primary first, then the fallbacks).
    pub attempt: usize,
    pub provider: String,
    pub model: String,
    pub callout: Callout,
    /// The whole request: a part's call carries only its text, but its
    /// answer is read with the request's format and options.
    pub request: SpeechRequest,
    /// For a long input, which part this call makes.
    pub part: Option<u32>,
}

/// How a callout ended, as the engine sees it.
pub enum Outcome<'a> {
    Answer(UpstreamResponse<'a>),
    /// Envoy could not send the call at all (no such cluster, say).
    NotSent(&'a str),
    /// No answer: Envoy reset the callout or gave up after `elapsed_ms`.
    NoAnswer {
        elapsed_ms: u64,
    },
    /// The answer's body was larger than `max_audio_bytes` allows; not read.
    TooLarge {
        bytes: usize,
    },
}

/// An error answer that Envoy made itself, not the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvoyReply {
    /// Envoy could not reach the upstream (its text, e.g. "no healthy upstream").
    Unreachable(String),
    /// Envoy gave up waiting ("upstream request timeout").
    Timeout,
}

/// The one detector of Envoy's own error replies, for provider, webhook and
/// store calls alike: a 503 or 504 whose body is Envoy's text.
pub fn envoy_reply(status: u16, body: &[u8]) -> Option<EnvoyReply> {
    let head = String::from_utf8_lossy(body.get(..256).unwrap_or(body));
    let unreachable = [
        "upstream connect error",
        "no healthy upstream",
        "no cluster match",
    ];
    match status {
        503 if unreachable.iter().any(|p| head.starts_with(p)) => {
            Some(EnvoyReply::Unreachable(head.trim().to_string()))
        }
        504 if head.starts_with("upstream request timeout") => Some(EnvoyReply::Timeout),
        _ => None,
    }
}

/// Why a job failed, for stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    ProviderError,
    Timeout,
    Unreachable,
    Deadline,
}

impl FailReason {
    pub fn name(self) -> &'static str {
        match self {
            FailReason::ProviderError => "provider_error",
            FailReason::Timeout => "timeout",
            FailReason::Unreachable => "unreachable",
            FailReason::Deadline => "deadline",
        }
    }

    /// The gateway's own 504 and 502 are a timeout and an unreachable
    /// provider; anything else came from the provider.
    pub fn of(error: &ApiError) -> FailReason {
        match (error.is_bifrost_error, error.status_code) {
            (true, 504) => FailReason::Timeout,
            (true, 502) => FailReason::Unreachable,
            _ => FailReason::ProviderError,
        }
    }
}

/// How one attempt went, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    Success,
    /// The provider answered an error (or an answer the gateway refused).
    Error,
    Timeout,
    Unreachable,
}

impl AttemptResult {
    pub fn name(self) -> &'static str {
        match self {
            AttemptResult::Success => "success",
            AttemptResult::Error => "error",
            AttemptResult::Timeout => "timeout",
            AttemptResult::Unreachable => "unreachable",
        }
    }
}

/// The model and provider of the record's current step.
pub fn current_provider<'c, 'r>(
    config: &'c Config,
    record: &'r JobRecord,
) -> Result<(&'r ModelRef, &'c ProviderConfig), ApiError> {
    let step = record
        .current()
        .ok_or_else(|| ApiError::internal("the job has no attempt left"))?;
    let provider = config.providers.get(&step.provider).ok_or_else(|| {
        ApiError::upstream(
            502,
            format!("provider {} is no longer configured", step.provider),
        )
    })?;
    Ok((step, provider))
}

/// One call of the record's current step with this request.
pub fn build_call(
    config: &Config,
    record: &JobRecord,
    request: SpeechRequest,
) -> Result<Attempt, ApiError> {
    let (step, provider) = current_provider(config, record)?;
    let upstream = for_kind(provider.kind).build(provider, &step.model, &request)?;
    Ok(Attempt {
        id: record.id.clone(),
        attempt: record.attempt,
        provider: step.provider.clone(),
        model: step.model.clone(),
        callout: Callout {
            cluster: provider.cluster.clone(),
            headers: upstream.headers,
            body: upstream.body,
            timeout_ms: provider.timeout_ms.max(1),
        },
        request,
        part: None,
    })
}

/// A callout that ended without an answer, as the gateway's error.
pub fn no_answer_error(provider: &str, elapsed_ms: u64, timeout_ms: u64) -> ApiError {
    if elapsed_ms.saturating_add(50) >= timeout_ms {
        ApiError::upstream(
            504,
            format!("provider {provider} did not answer within {timeout_ms} ms"),
        )
    } else {
        ApiError::upstream(
            502,
            format!("provider {provider} is unreachable: the connection failed"),
        )
    }
}

fn too_large_error(bytes: usize, limit: usize) -> ApiError {
    ApiError::upstream(
        502,
        format!(
            "the provider's answer ({bytes} bytes) is larger than max_audio_bytes ({limit} bytes)"
        ),
    )
}

/// The gateway's error for an attempt that got no provider answer, if so.
fn gateway_error(outcome: &Outcome, attempt: &Attempt, limit: usize) -> Option<ApiError> {
    let provider = &attempt.provider;
    match outcome {
        Outcome::NotSent(why) => Some(ApiError::upstream(
            502,
            format!(
                "provider {provider} is unreachable: Envoy cannot call cluster {}: {why}",
                attempt.callout.cluster
            ),
        )),
        Outcome::NoAnswer { elapsed_ms } => Some(no_answer_error(
            provider,
            *elapsed_ms,
            attempt.callout.timeout_ms,
        )),
        Outcome::TooLarge { bytes } => Some(too_large_error(*bytes, limit)),
        Outcome::Answer(response) => match envoy_reply(response.status, response.body)? {
            EnvoyReply::Unreachable(text) => Some(ApiError::upstream(
                502,
                format!("provider {provider} is unreachable: {text}"),
            )),
            EnvoyReply::Timeout => Some(no_answer_error(
                provider,
                attempt.callout.timeout_ms,
                attempt.callout.timeout_ms,
            )),
        },
    }
}

/// How the attempt went, before its answer is read.
pub fn attempt_result(outcome: &Outcome, attempt: &Attempt) -> AttemptResult {
    match (outcome, gateway_error(outcome, attempt, 0)) {
        (Outcome::TooLarge { .. }, _) => AttemptResult::Error,
        (_, Some(e)) if FailReason::of(&e) == FailReason::Timeout => AttemptResult::Timeout,
        (_, Some(_)) => AttemptResult::Unreachable,
        (Outcome::Answer(r), None) if (200..300).contains(&r.status) => AttemptResult::Success,
        _ => AttemptResult::Error,
    }
}

/// An attempt's answer as audio, or the error that fails the attempt.
pub fn read_answer(
    config: &Config,
    attempt: &Attempt,
    outcome: &Outcome,
) -> Result<SpeechAudio, ApiError> {
    if let Some(error) = gateway_error(outcome, attempt, config.max_audio_bytes) {
        return Err(error);
    }
    let Outcome::Answer(response) = outcome else {
        return Err(ApiError::internal("the provider's answer is missing"));
    };
    let provider = config
        .providers
        .get(&attempt.provider)
        .ok_or_else(|| ApiError::upstream(502, "provider is no longer configured"))?;
    let speech = for_kind(provider.kind).parse(provider, &attempt.request, response)?;
    if speech.audio.len() > config.max_audio_bytes {
        return Err(too_large_error(speech.audio.len(), config.max_audio_bytes));
    }
    Ok(speech)
}

/// The completion of an attempt whose answer was `speech`.
pub fn completion(
    attempt: &Attempt,
    speech: SpeechAudio,
    started_ms: u64,
    now_ms: u64,
) -> Completion {
    let mut extra = ExtraFields::speech(&attempt.provider, &attempt.model);
    extra.latency = Some(now_ms.saturating_sub(started_ms));
    Completion {
        meta: ResultMeta {
            response_format: speech.format,
            extra_fields: extra,
        },
        audio: speech.audio,
        alignment: speech.alignment,
        normalized_alignment: speech.normalized_alignment,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoys_own_replies_are_told_from_the_upstreams() {
        assert_eq!(
            envoy_reply(503, b"no healthy upstream"),
            Some(EnvoyReply::Unreachable("no healthy upstream".into()))
        );
        assert_eq!(
            envoy_reply(504, b"upstream request timeout"),
            Some(EnvoyReply::Timeout)
        );
        assert_eq!(envoy_reply(503, br#"{"error":"overloaded"}"#), None);
        assert_eq!(envoy_reply(500, b"upstream connect error"), None);
    }
}
