//! The delivery body, Bifrost's envelope, made once when the job ends:
//!
//! ```json
//! {"event":"async_job.completed","created_at":"…","data":{"job_id":"…","request_type":"speech",
//!  "status":"completed","status_code":200,"created_at":"…","completed_at":"…",
//!  "result_url":"/v1/async/audio/speech/…","result_expires_at":"…"}}
//! ```
//!
//! The job's result may be large (base64 audio), so it goes in as a `RawValue`: checked to be
//! one valid JSON value and written as it is, never parsed into a tree. Bytes that are not
//! valid JSON are left out as if too large, so the body is always valid JSON.

use serde::Serialize;
use serde_json::value::RawValue;

use super::config::Event;

/// Where a job's result is fetched, as `result_url` gives it.
pub const RESULT_PATH_PREFIX: &str = "/v1/async/audio/speech/";

/// The ended job, as the envelope reports it. Timestamps are RFC 3339 strings
/// (`crate::time::rfc3339`); `result` and `error` are the raw JSON of the job's `result`
/// and `error` as GET answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobEnd<'a> {
    pub job_id: &'a str,
    pub status_code: u16,
    pub created_at: &'a str,
    pub completed_at: &'a str,
    pub result_expires_at: &'a str,
    pub result: Option<&'a [u8]>,
    pub error: Option<&'a [u8]>,
}

#[cfg(test)]
/// The event a job that ended in `status` (`completed` or `failed`) sends; `None` for any
/// other status.
pub fn event_for_status(status: &str) -> Option<Event> {
    Event::ALL.into_iter().find(|e| e.job_status() == status)
}

/// The envelope, its fields in Bifrost's order.
#[derive(Serialize)]
struct Envelope<'a, D: Serialize> {
    event: &'a str,
    created_at: &'a str,
    data: D,
}

#[derive(Serialize)]
struct Data<'a> {
    job_id: &'a str,
    request_type: &'static str,
    status: &'static str,
    status_code: u16,
    created_at: &'a str,
    completed_at: &'a str,
    result_url: String,
    result_expires_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_omitted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_omitted: Option<bool>,
}

#[derive(Serialize)]
struct Expired<'a> {
    job_id: &'a str,
    status: &'static str,
    result_expired: bool,
}

fn to_bytes(value: &impl Serialize) -> Vec<u8> {
    // Plain strings, numbers and already-checked raw JSON: this cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The body of every attempt before the job expires. `event` gives `data.status`
/// (`completed` or `failed`); `created_at` is when the event happened (the job's end).
///
/// With `include_response`, a completed job's `result` goes in `data.response`, a failed job's
/// `error` in `data.error`, when that JSON is at most `max_payload_bytes` long (and valid
/// JSON); otherwise `data.response_omitted` / `data.error_omitted` is `true`.
pub fn envelope(
    event: Event,
    created_at: &str,
    job: &JobEnd<'_>,
    include_response: bool,
    max_payload_bytes: usize,
) -> Vec<u8> {
    let raw = match event {
        Event::Completed => job.result,
        Event::Failed => job.error,
    };
    let embedded = raw
        .filter(|r| include_response && r.len() <= max_payload_bytes)
        .and_then(|r| serde_json::from_slice::<&RawValue>(r).ok());
    let omitted = (include_response && embedded.is_none()).then_some(true);
    let (completed, failed) = (event == Event::Completed, event == Event::Failed);
    let data = Data {
        job_id: job.job_id,
        request_type: "speech",
        status: event.job_status(),
        status_code: job.status_code,
        created_at: job.created_at,
        completed_at: job.completed_at,
        result_url: format!("{RESULT_PATH_PREFIX}{}", job.job_id),
        result_expires_at: job.result_expires_at,
        response: embedded.filter(|_| completed),
        response_omitted: omitted.filter(|_| completed),
        error: embedded.filter(|_| failed),
        error_omitted: omitted.filter(|_| failed),
    };
    to_bytes(&Envelope {
        event: event.as_str(),
        created_at,
        data,
    })
}

/// The body of an attempt made after the job expired: the same `event` and `created_at`,
/// and `data` exactly `{"job_id", "status", "result_expired": true}`.
pub fn expired_envelope(event: Event, created_at: &str, job_id: &str) -> Vec<u8> {
    to_bytes(&Envelope {
        event: event.as_str(),
        created_at,
        data: Expired {
            job_id,
            status: event.job_status(),
            result_expired: true,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const RESULT: &[u8] =
        br#"{"id":"j1","object":"audio.speech","audio":"UklGRg==","content_type":"audio/mpeg"}"#;
    const ERROR: &[u8] = br#"{"message":"provider answered 500","type":"provider_error"}"#;

    fn job() -> JobEnd<'static> {
        JobEnd {
            job_id: "3f0e",
            status_code: 200,
            created_at: "2026-11-23T21:00:00.000Z",
            completed_at: "2026-11-23T21:00:02.410Z",
            result_expires_at: "2026-11-23T22:00:02.410Z",
            result: Some(RESULT),
            error: None,
        }
    }

    fn parsed(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn completed_without_response() {
        let body = envelope(
            Event::Completed,
            "2026-11-23T21:00:02.410Z",
            &job(),
            false,
            1024,
        );
        assert_eq!(
            parsed(&body),
            json!({
                "event": "async_job.completed", "created_at": "2026-11-23T21:00:02.410Z",
                "data": {
                    "job_id": "3f0e", "request_type": "speech", "status": "completed",
                    "status_code": 200, "created_at": "2026-11-23T21:00:00.000Z",
                    "completed_at": "2026-11-23T21:00:02.410Z",
                    "result_url": "/v1/async/audio/speech/3f0e",
                    "result_expires_at": "2026-11-23T22:00:02.410Z"
                }
            })
        );
        // Keys in Bifrost's order.
        let text = String::from_utf8(body).unwrap();
        assert!(text.starts_with(r#"{"event":"async_job.completed","created_at":"2026-11-23T21:00:02.410Z","data":{"job_id":"3f0e","request_type":"speech","status":"completed","status_code":200,"#), "{text}");
    }

    #[test]
    fn response_is_spliced_byte_for_byte_when_small_enough() {
        let body = envelope(Event::Completed, "t", &job(), true, RESULT.len());
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(
            text.ends_with(&format!(
                ",\"response\":{}}}}}",
                std::str::from_utf8(RESULT).unwrap()
            )),
            "{text}"
        );
        assert_eq!(parsed(&body)["data"]["response"], parsed(RESULT));
        assert!(parsed(&body)["data"].get("response_omitted").is_none());

        let body = envelope(Event::Completed, "t", &job(), true, RESULT.len() - 1);
        let data = &parsed(&body)["data"];
        assert_eq!(data["response_omitted"], json!(true));
        assert!(data.get("response").is_none());
    }

    #[test]
    fn failed_jobs_carry_their_error() {
        let failed = JobEnd {
            status_code: 502,
            result: None,
            error: Some(ERROR),
            ..job()
        };
        let body = envelope(Event::Failed, "t", &failed, true, 256 * 1024);
        let v = parsed(&body);
        assert_eq!(v["event"], "async_job.failed");
        assert_eq!(v["data"]["status"], "failed");
        assert_eq!(v["data"]["status_code"], 502);
        assert_eq!(v["data"]["error"], parsed(ERROR));
        assert!(v["data"].get("response").is_none());

        let v = parsed(&envelope(Event::Failed, "t", &failed, true, 10));
        assert_eq!(v["data"]["error_omitted"], json!(true));
        let v = parsed(&envelope(Event::Failed, "t", &failed, false, 10));
        assert!(v["data"].get("error").is_none() && v["data"].get("error_omitted").is_none());
    }

    #[test]
    fn invalid_or_missing_payloads_are_omitted_and_the_body_stays_valid() {
        for raw in [&b"{\"a\":"[..], b"", b"{} {}", b"\"unterminated", b"\xff"] {
            let j = JobEnd {
                result: Some(raw),
                ..job()
            };
            let v = parsed(&envelope(Event::Completed, "t", &j, true, 1 << 20));
            assert_eq!(v["data"]["response_omitted"], json!(true), "{raw:?}");
        }
        let deep = "[".repeat(100_000);
        let j = JobEnd {
            result: Some(deep.as_bytes()),
            ..job()
        };
        assert_eq!(
            parsed(&envelope(Event::Completed, "t", &j, true, 1 << 20))["data"]["response_omitted"],
            json!(true)
        );
        let j = JobEnd {
            result: None,
            ..job()
        };
        assert_eq!(
            parsed(&envelope(Event::Completed, "t", &j, true, 1 << 20))["data"]["response_omitted"],
            json!(true)
        );
        let j = JobEnd {
            result: Some(b" 42 \n"),
            ..job()
        };
        assert_eq!(
            parsed(&envelope(Event::Completed, "t", &j, true, 1 << 20))["data"]["response"],
            json!(42)
        );
    }

    #[test]
    fn strings_are_escaped() {
        let odd = "a\"b\\c\n\u{1}\u{1f}\u{7f}é🔊";
        let j = JobEnd {
            job_id: odd,
            created_at: odd,
            ..job()
        };
        let v = parsed(&envelope(Event::Completed, odd, &j, false, 0));
        assert_eq!(v["created_at"], odd);
        assert_eq!(v["data"]["job_id"], odd);
        assert_eq!(
            v["data"]["result_url"],
            format!("/v1/async/audio/speech/{odd}")
        );
        let v = parsed(&expired_envelope(Event::Failed, odd, odd));
        assert_eq!(v["data"]["job_id"], odd);
    }

    #[test]
    fn expired_form_keeps_event_and_created_at_only() {
        let body = expired_envelope(Event::Completed, "2026-11-23T21:00:02.410Z", "3f0e");
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"event":"async_job.completed","created_at":"2026-11-23T21:00:02.410Z","data":{"job_id":"3f0e","status":"completed","result_expired":true}}"#
        );
        let v = parsed(&expired_envelope(Event::Failed, "t", "x"));
        assert_eq!(
            v,
            json!({"event": "async_job.failed", "created_at": "t",
            "data": {"job_id": "x", "status": "failed", "result_expired": true}})
        );
    }

    proptest::proptest! {
        #[test]
        fn any_input_gives_valid_json(
            id in ".{0,40}",
            at in ".{0,40}",
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            max in 0usize..300,
            failed in proptest::bool::ANY,
        ) {
            let event = if failed { Event::Failed } else { Event::Completed };
            let j = JobEnd { job_id: &id, created_at: &at, result: Some(&raw), error: Some(&raw), ..job() };
            let v = parsed(&envelope(event, &at, &j, true, max));
            proptest::prop_assert_eq!(&v["data"]["job_id"], &Value::from(id.clone()));
            let v = parsed(&expired_envelope(event, &at, &id));
            proptest::prop_assert_eq!(&v["created_at"], &Value::from(at));
        }
    }

    #[test]
    fn statuses_map_to_events() {
        assert_eq!(event_for_status("completed"), Some(Event::Completed));
        assert_eq!(event_for_status("failed"), Some(Event::Failed));
        assert_eq!(event_for_status("processing"), None);
    }
}
