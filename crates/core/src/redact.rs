//! Keeping provider keys out of what clients and logs see.

use crate::error::ApiError;

/// What stands in for a key.
pub const REDACTED: &str = "[redacted]";

/// `text` with every occurrence of `secret` replaced by `[redacted]`; an empty or
/// absent secret changes nothing.
pub fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() && text.contains(s) => text.replace(s, REDACTED),
        _ => text.to_string(),
    }
}

/// Redacts `secret` from every text of an error that reaches a job: message,
/// type, code and param.
pub fn redact_error(mut error: ApiError, secret: Option<&str>) -> ApiError {
    let Some(secret) = secret.filter(|s| !s.is_empty()) else {
        return error;
    };
    let body = &mut error.error;
    body.message = redact(&body.message, Some(secret));
    for field in [
        &mut body.kind,
        &mut body.code,
        &mut body.param,
        &mut error.kind,
    ] {
        if let Some(text) = field.as_mut() {
            *text = redact(text, Some(secret));
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_occurrence_is_replaced() {
        assert_eq!(
            redact("key sk-1 and sk-1.", Some("sk-1")),
            "key [redacted] and [redacted]."
        );
        assert_eq!(redact("nothing here", Some("sk-1")), "nothing here");
        assert_eq!(redact("sk-1", None), "sk-1");
        assert_eq!(redact("sk-1", Some("")), "sk-1");
    }

    #[test]
    fn every_field_of_an_error_is_redacted() {
        let e = ApiError::provider(
            401,
            Some("bad k".into()),
            Some("k".into()),
            "Incorrect API key provided: k".into(),
            Some("k".into()),
        );
        let e = redact_error(e, Some("k"));
        assert_eq!(
            e.error.message,
            "Incorrect API [redacted]ey provided: [redacted]"
        );
        assert_eq!(e.error.kind.as_deref(), Some("bad [redacted]"));
        assert_eq!(e.error.code.as_deref(), Some("[redacted]"));
        assert_eq!(e.error.param.as_deref(), Some("[redacted]"));
    }
}
