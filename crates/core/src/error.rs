//! The error shape, shared by every non-2xx answer and by failed jobs.

use serde::{Deserialize, Serialize};

/// One attempt of a job, as listed in a failed job's `error.extra_fields.attempts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptSummary {
    pub provider: String,
    pub model: String,
    pub status_code: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtraFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_requested: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptSummary>>,
}

impl ExtraFields {
    pub fn speech(provider: &str, model: &str) -> Self {
        ExtraFields {
            provider: Some(provider.to_string()),
            model_requested: Some(model.to_string()),
            request_type: Some("speech".to_string()),
            ..ExtraFields::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub is_bifrost_error: bool,
    pub status_code: u16,
    pub error: ErrorBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_fields: Option<ExtraFields>,
    /// Seconds a client should wait before retrying (503 store full); sent as a header.
    #[serde(skip)]
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    fn gateway(status_code: u16, kind: &str, message: impl Into<String>) -> Self {
        ApiError {
            event_id: None,
            kind: None,
            is_bifrost_error: true,
            status_code,
            error: ErrorBody {
                kind: Some(kind.to_string()),
                code: None,
                message: message.into(),
                param: None,
            },
            extra_fields: None,
            retry_after_s: None,
        }
    }

    /// 400 for a field or header the client got wrong; `param` names it.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::gateway(400, "invalid_request_error", message);
        e.error.param = Some(param.to_string());
        e
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::gateway(400, "invalid_request_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::gateway(401, "authentication_error", message)
    }

    /// The one answer for unknown, expired and foreign jobs alike.
    pub fn job_not_found() -> Self {
        ApiError {
            event_id: None,
            kind: None,
            is_bifrost_error: false,
            status_code: 404,
            error: ErrorBody {
                kind: None,
                code: None,
                message: "job not found or expired".to_string(),
                param: None,
            },
            extra_fields: None,
            retry_after_s: None,
        }
    }

    pub fn method_not_allowed(method: &str, allowed: &str) -> Self {
        Self::gateway(
            405,
            "invalid_request_error",
            format!("method {method} is not allowed here; allowed: {allowed}"),
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::gateway(
            413,
            "invalid_request_error",
            format!("request body is larger than {limit} bytes"),
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::gateway(
            415,
            "invalid_request_error",
            "Content-Type must be application/json",
        )
    }

    pub fn store_full(max_jobs: u32) -> Self {
        let mut e = Self::gateway(
            503,
            "service_unavailable",
            format!("the job store is full ({max_jobs} jobs); retry later"),
        );
        e.error.code = Some("store_full".to_string());
        e.retry_after_s = Some(1);
        e
    }

    /// 402 or 429 for a key's limit reached, with when to retry.
    pub fn limit(
        status_code: u16,
        kind: &str,
        message: impl Into<String>,
        retry_after_s: u64,
    ) -> Self {
        let mut e = Self::gateway(status_code, kind, message);
        e.retry_after_s = Some(u32::try_from(retry_after_s).unwrap_or(u32::MAX));
        e
    }

    /// 403 for what a key may not do; `param` names the field, if one.
    pub fn forbidden(kind: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::gateway(403, kind, message);
        e.error.param = param.map(str::to_string);
        e
    }

    /// 503 for a store or queue that cannot take work now (not a full store).
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::gateway(503, "service_unavailable", message);
        e.retry_after_s = Some(1);
        e
    }

    /// The gateway's own failure of a speech call (502 unreachable, 504 timeout, ...).
    pub fn upstream(status_code: u16, message: impl Into<String>) -> Self {
        Self::gateway(status_code, "api_error", message)
    }

    /// An error the provider itself answered with: not the gateway's own. A status that is
    /// not an error status (a redirect, which Envoy does not follow) is an unusable answer
    /// like any other, a 502 of the gateway's: the job's status becomes the status `/content`
    /// answers with, and a 3xx without `Location` would send clients astray.
    pub fn provider(
        status_code: u16,
        kind: Option<String>,
        code: Option<String>,
        message: String,
        param: Option<String>,
    ) -> Self {
        if !(400..=599).contains(&status_code) {
            return Self::upstream(
                502,
                format!("the provider answered HTTP {status_code}, not audio: {message}"),
            );
        }
        ApiError {
            event_id: None,
            kind: None,
            is_bifrost_error: false,
            status_code,
            error: ErrorBody {
                kind,
                code,
                message,
                param,
            },
            extra_fields: None,
            retry_after_s: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::gateway(500, "api_error", message)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs of strings and numbers cannot fail; keep a
        // fallback anyway so that no path can panic.
        serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"is_bifrost_error":true,"status_code":500,"error":{"message":"error serialization failed"}}"#.to_vec()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn not_found_is_exactly_the_spec_body() {
        let v: serde_json::Value =
            serde_json::from_slice(&ApiError::job_not_found().to_json()).unwrap();
        assert_eq!(
            v,
            json!({"is_bifrost_error":false,"status_code":404,"error":{"message":"job not found or expired"}})
        );
    }

    #[test]
    fn a_provider_answer_that_is_no_error_status_fails_as_unusable() {
        let e = ApiError::provider(
            302,
            Some("moved".into()),
            None,
            "see elsewhere".into(),
            None,
        );
        assert_eq!((e.status_code, e.is_bifrost_error), (502, true));
        assert_eq!(e.error.kind.as_deref(), Some("api_error"));
        assert_eq!(
            e.error.message,
            "the provider answered HTTP 302, not audio: see elsewhere"
        );
        for status in [400, 429, 599] {
            let e = ApiError::provider(status, Some("t".into()), None, "m".into(), None);
            assert_eq!((e.status_code, e.is_bifrost_error), (status, false));
            assert_eq!(e.error.kind.as_deref(), Some("t"));
        }
    }

    #[test]
    fn invalid_names_the_param() {
        let v: serde_json::Value = serde_json::from_slice(
            &ApiError::invalid("input", "input is required for speech").to_json(),
        )
        .unwrap();
        assert_eq!(v["status_code"], 400);
        assert_eq!(v["is_bifrost_error"], true);
        assert_eq!(v["error"]["param"], "input");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "input is required for speech");
    }
}
