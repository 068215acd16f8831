//! Answers of etcd's HTTP/JSON gateway.
//!
//! The gateway omits every field at its zero value: no `kvs` when nothing
//! matched, no `succeeded` when a txn's compare failed, no `value` for an
//! empty value, no `lease` for a key without one, no `TTL` in the keepalive
//! answer for a lease that is gone. int64 fields come as strings ("5"), but
//! numbers are taken too. An error is `{"error": .., "code": .., "message": ..}`
//! (gRPC code), or for the streaming keepalive `{"error": {"grpc_code": ..,
//! "message": ..}}`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{Map, Value};

/// gRPC status codes the gateway reports that callers tell apart.
pub const CODE_INVALID_ARGUMENT: i64 = 3;
pub const CODE_DEADLINE_EXCEEDED: i64 = 4;
pub const CODE_NOT_FOUND: i64 = 5;
pub const CODE_RESOURCE_EXHAUSTED: i64 = 8;
pub const CODE_UNAVAILABLE: i64 = 14;

/// Why a gateway call did not give an answer to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// etcd answered an error: its gRPC code and message (e.g. code 5
    /// `etcdserver: requested lease not found`, code 3 `etcdserver: request
    /// is too large`).
    Gateway { code: i64, message: String },
    /// An HTTP status other than 200 without the gateway's error JSON: most
    /// often Envoy's own answer (503 when etcd cannot be reached, 504 when
    /// the callout timed out).
    Status(u16),
    /// A 200 whose body is not what the gateway sends.
    Malformed(String),
}

impl EtcdError {
    /// etcd could not be reached or did not answer in time: worth a retry
    /// later, and a `503 job store unavailable` meanwhile.
    pub fn is_unavailable(&self) -> bool {
        match self {
            EtcdError::Gateway { code, .. } => {
                matches!(*code, CODE_UNAVAILABLE | CODE_DEADLINE_EXCEEDED)
            }
            EtcdError::Status(s) => *s >= 500,
            EtcdError::Malformed(_) => false,
        }
    }

    /// etcd's "not found" (e.g. revoking a lease that is gone).
    pub fn is_not_found(&self) -> bool {
        matches!(self, EtcdError::Gateway { code, .. } if *code == CODE_NOT_FOUND)
    }
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdError::Gateway { code, message } => write!(f, "etcd error {code}: {message}"),
            EtcdError::Status(s) => write!(f, "etcd gateway answered HTTP {s}"),
            EtcdError::Malformed(m) => write!(f, "unexpected etcd answer: {m}"),
        }
    }
}

/// One key as the gateway lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub version: i64,
    /// 0 when the key has no lease.
    pub lease: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeResponse {
    /// The keys found, in key order (empty when none).
    pub kvs: Vec<Kv>,
    /// More keys matched than the request's `limit`.
    pub more: bool,
    /// How many keys matched in all (not only those returned).
    pub count: i64,
    /// The store's revision when it answered.
    pub revision: i64,
}

/// One response of a txn branch, in the order of the branch's operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResponse {
    Range(RangeResponse),
    Put { revision: i64 },
    DeleteRange { deleted: i64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnResponse {
    /// Every compare held and the `success` branch ran.
    pub succeeded: bool,
    /// The store's revision after the txn.
    pub revision: i64,
    /// The responses of the branch that ran.
    pub responses: Vec<OpResponse>,
}

impl TxnResponse {
    /// The first key of the `i`-th response when it is a range with a key:
    /// what a failed conditional write reads back.
    pub fn range_kv(&self, i: usize) -> Option<&Kv> {
        match self.responses.get(i)? {
            OpResponse::Range(r) => r.kvs.first(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub id: i64,
    /// Seconds; etcd may grant more than was asked (its minimum TTL).
    pub ttl: i64,
}

/// The HTTP answer of a gateway call: its body when the status is 200, the
/// gateway's error (or the bare status) otherwise.
pub fn check_status(status: u16, body: &[u8]) -> Result<&[u8], EtcdError> {
    if status == 200 {
        return Ok(body);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => match gateway_error(&m) {
            Some(e) => Err(e),
            None => Err(EtcdError::Status(status)),
        },
        _ => Err(EtcdError::Status(status)),
    }
}

fn gateway_error(m: &Map<String, Value>) -> Option<EtcdError> {
    match m.get("error")? {
        // Unary calls: {"error": "...", "code": 5, "message": "..."}.
        Value::String(error) => Some(EtcdError::Gateway {
            code: m.get("code").and_then(|c| int(c).ok()).unwrap_or(0),
            message: m
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or(error)
                .to_string(),
        }),
        // Streaming calls: {"error": {"grpc_code": 5, "message": "...", ...}}.
        Value::Object(e) => Some(EtcdError::Gateway {
            code: e
                .get("grpc_code")
                .or_else(|| e.get("code"))
                .and_then(|c| int(c).ok())
                .unwrap_or(0),
            message: e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        }),
        _ => None,
    }
}

/// The body as a JSON object that is not an error.
fn object(body: &[u8]) -> Result<Map<String, Value>, EtcdError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => match gateway_error(&m) {
            Some(e) => Err(e),
            None => Ok(m),
        },
        Ok(_) => Err(EtcdError::Malformed("not a JSON object".into())),
        Err(e) => Err(EtcdError::Malformed(format!("not JSON: {e}"))),
    }
}

fn int(v: &Value) -> Result<i64, EtcdError> {
    match v {
        Value::String(s) => s
            .parse()
            .map_err(|_| EtcdError::Malformed(format!("not an int64: {s:?}"))),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| EtcdError::Malformed(format!("not an int64: {n}"))),
        other => Err(EtcdError::Malformed(format!("not an int64: {other}"))),
    }
}

/// An int64 field, 0 when omitted.
fn int_field(m: &Map<String, Value>, name: &str) -> Result<i64, EtcdError> {
    m.get(name).map_or(Ok(0), int)
}

/// A bool field, false when omitted.
fn bool_field(m: &Map<String, Value>, name: &str) -> Result<bool, EtcdError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(EtcdError::Malformed(format!(
            "{name} is not a bool: {other}"
        ))),
    }
}

/// A bytes field (base64), empty when omitted.
fn bytes_field(m: &Map<String, Value>, name: &str) -> Result<Vec<u8>, EtcdError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => STANDARD
            .decode(s)
            .map_err(|e| EtcdError::Malformed(format!("{name} is not base64: {e}"))),
        Some(other) => Err(EtcdError::Malformed(format!(
            "{name} is not a string: {other}"
        ))),
    }
}

fn object_field<'a>(
    m: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, EtcdError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(EtcdError::Malformed(format!(
            "{name} is not an object: {other}"
        ))),
    }
}

fn array_field<'a>(m: &'a Map<String, Value>, name: &str) -> Result<&'a [Value], EtcdError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(EtcdError::Malformed(format!(
            "{name} is not a list: {other}"
        ))),
    }
}

fn revision(m: &Map<String, Value>) -> Result<i64, EtcdError> {
    match object_field(m, "header")? {
        Some(h) => int_field(h, "revision"),
        None => Ok(0),
    }
}

fn kv(v: &Value) -> Result<Kv, EtcdError> {
    let Value::Object(m) = v else {
        return Err(EtcdError::Malformed(format!("a kv is not an object: {v}")));
    };
    Ok(Kv {
        key: bytes_field(m, "key")?,
        value: bytes_field(m, "value")?,
        mod_revision: int_field(m, "mod_revision")?,
        create_revision: int_field(m, "create_revision")?,
        version: int_field(m, "version")?,
        lease: int_field(m, "lease")?,
    })
}

fn range_response(m: &Map<String, Value>) -> Result<RangeResponse, EtcdError> {
    Ok(RangeResponse {
        kvs: array_field(m, "kvs")?
            .iter()
            .map(kv)
            .collect::<Result<_, _>>()?,
        more: bool_field(m, "more")?,
        count: int_field(m, "count")?,
        revision: revision(m)?,
    })
}

/// The answer of `/v3/kv/range`.
pub fn parse_range(body: &[u8]) -> Result<RangeResponse, EtcdError> {
    range_response(&object(body)?)
}

/// The answer of `/v3/kv/put`: the revision of the write.
pub fn parse_put(body: &[u8]) -> Result<i64, EtcdError> {
    revision(&object(body)?)
}

/// The answer of `/v3/kv/deleterange`: how many keys were deleted.
pub fn parse_delete_range(body: &[u8]) -> Result<i64, EtcdError> {
    int_field(&object(body)?, "deleted")
}

fn op_response(v: &Value) -> Result<OpResponse, EtcdError> {
    let Value::Object(m) = v else {
        return Err(EtcdError::Malformed(format!(
            "a txn response is not an object: {v}"
        )));
    };
    if let Some(r) = object_field(m, "response_range")? {
        return Ok(OpResponse::Range(range_response(r)?));
    }
    if let Some(r) = object_field(m, "response_put")? {
        return Ok(OpResponse::Put {
            revision: revision(r)?,
        });
    }
    if let Some(r) = object_field(m, "response_delete_range")? {
        return Ok(OpResponse::DeleteRange {
            deleted: int_field(r, "deleted")?,
        });
    }
    Err(EtcdError::Malformed(format!("unknown txn response: {v}")))
}

/// The answer of `/v3/kv/txn`.
pub fn parse_txn(body: &[u8]) -> Result<TxnResponse, EtcdError> {
    let m = object(body)?;
    Ok(TxnResponse {
        succeeded: bool_field(&m, "succeeded")?,
        revision: revision(&m)?,
        responses: array_field(&m, "responses")?
            .iter()
            .map(op_response)
            .collect::<Result<_, _>>()?,
    })
}

/// The answer of `/v3/lease/grant`.
pub fn parse_lease_grant(body: &[u8]) -> Result<LeaseGrant, EtcdError> {
    let m = object(body)?;
    // LeaseGrantResponse has an `error` string of its own (empty when granted);
    // `object` already took a non-empty one for the gateway's error shape.
    let id = int_field(&m, "ID")?;
    if id == 0 {
        return Err(EtcdError::Malformed("lease grant without an ID".into()));
    }
    Ok(LeaseGrant {
        id,
        ttl: int_field(&m, "TTL")?,
    })
}

/// The answer of `/v3/lease/keepalive` (one `{"result": ...}`, perhaps
/// followed by a newline): the lease's renewed TTL, or `None` when the lease
/// is gone (expired or revoked: no `TTL`, or one of 0 or less).
pub fn parse_lease_keepalive(body: &[u8]) -> Result<Option<i64>, EtcdError> {
    // A stream of objects, one per line; one request gives one.
    let first = body
        .split(|b| *b == b'\n')
        .find(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
        .ok_or_else(|| EtcdError::Malformed("empty keepalive answer".into()))?;
    let m = object(first)?;
    let Some(result) = object_field(&m, "result")? else {
        return Err(EtcdError::Malformed(
            "keepalive answer without result".into(),
        ));
    };
    let ttl = int_field(result, "TTL")?;
    Ok((ttl > 0).then_some(ttl))
}

/// The answer of `/v3/lease/revoke`. A lease that is gone already is an
/// error with [`EtcdError::is_not_found`].
pub fn parse_lease_revoke(body: &[u8]) -> Result<(), EtcdError> {
    object(body).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Answers captured from etcd 3.4.23's gateway.
    const HEADER: &str = r#""header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"2","raft_term":"2"}"#;

    #[test]
    fn range_with_a_key_and_lease() {
        let body = format!(
            r#"{{{HEADER},"kvs":[{{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy","lease":"4111120409218174473"}}],"count":"1"}}"#
        );
        let r = parse_range(body.as_bytes()).unwrap();
        assert_eq!(
            r,
            RangeResponse {
                kvs: vec![Kv {
                    key: b"foo".to_vec(),
                    value: b"bar".to_vec(),
                    mod_revision: 2,
                    create_revision: 2,
                    version: 1,
                    lease: 4111120409218174473,
                }],
                more: false,
                count: 1,
                revision: 2,
            }
        );
    }

    #[test]
    fn range_of_nothing_has_no_kvs_and_no_count() {
        let body = format!("{{{HEADER}}}");
        let r = parse_range(body.as_bytes()).unwrap();
        assert!(r.kvs.is_empty());
        assert_eq!((r.count, r.more, r.revision), (0, false, 2));
    }

    #[test]
    fn range_with_more_and_an_empty_value() {
        let body = format!(
            r#"{{{HEADER},"kvs":[{{"key":"cC9h","create_revision":"6","mod_revision":"6","version":"1"}}],"more":true,"count":"2"}}"#
        );
        let r = parse_range(body.as_bytes()).unwrap();
        assert!(r.more);
        assert_eq!(r.count, 2);
        assert_eq!(r.kvs[0].key, b"p/a".to_vec());
        assert_eq!(r.kvs[0].value, Vec::<u8>::new());
        assert_eq!(r.kvs[0].lease, 0);
    }

    #[test]
    fn numbers_are_taken_as_well_as_strings() {
        let r = parse_range(br#"{"header":{"revision":7},"count":3}"#).unwrap();
        assert_eq!((r.revision, r.count), (7, 3));
    }

    #[test]
    fn txn_succeeded_with_a_put() {
        let body = format!(
            r#"{{{HEADER},"succeeded":true,"responses":[{{"response_put":{{"header":{{"revision":"3"}}}}}}]}}"#
        );
        let t = parse_txn(body.as_bytes()).unwrap();
        assert!(t.succeeded);
        assert_eq!(t.responses, vec![OpResponse::Put { revision: 3 }]);
    }

    #[test]
    fn txn_failed_reads_back_the_key() {
        let body = format!(
            r#"{{{HEADER},"responses":[{{"response_range":{{"header":{{"revision":"2"}},"kvs":[{{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy","lease":"4111120409218174473"}}],"count":"1"}}}}]}}"#
        );
        let t = parse_txn(body.as_bytes()).unwrap();
        assert!(!t.succeeded);
        let kv = t.range_kv(0).unwrap();
        assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"bar"[..], 2));
        assert_eq!(t.range_kv(1), None);
    }

    #[test]
    fn txn_failed_without_failure_ops_is_just_a_header() {
        let body = format!("{{{HEADER}}}");
        assert_eq!(
            parse_txn(body.as_bytes()).unwrap(),
            TxnResponse {
                succeeded: false,
                revision: 2,
                responses: vec![]
            }
        );
    }

    #[test]
    fn txn_delete_range_response() {
        let body = format!(
            r#"{{{HEADER},"succeeded":true,"responses":[{{"response_delete_range":{{"header":{{"revision":"5"}},"deleted":"1"}}}},{{"response_delete_range":{{"header":{{"revision":"5"}}}}}}]}}"#
        );
        let t = parse_txn(body.as_bytes()).unwrap();
        assert_eq!(
            t.responses,
            vec![
                OpResponse::DeleteRange { deleted: 1 },
                OpResponse::DeleteRange { deleted: 0 }
            ]
        );
    }

    #[test]
    fn put_and_delete_range() {
        assert_eq!(parse_put(format!("{{{HEADER}}}").as_bytes()), Ok(2));
        let body = format!(r#"{{{HEADER},"deleted":"1"}}"#);
        assert_eq!(parse_delete_range(body.as_bytes()), Ok(1));
        assert_eq!(
            parse_delete_range(format!("{{{HEADER}}}").as_bytes()),
            Ok(0)
        );
    }

    #[test]
    fn lease_grant() {
        let body = format!(r#"{{{HEADER},"ID":"4111120409218174471","TTL":"30"}}"#);
        assert_eq!(
            parse_lease_grant(body.as_bytes()),
            Ok(LeaseGrant {
                id: 4111120409218174471,
                ttl: 30
            })
        );
        assert!(matches!(
            parse_lease_grant(format!("{{{HEADER}}}").as_bytes()),
            Err(EtcdError::Malformed(_))
        ));
    }

    #[test]
    fn lease_keepalive_alive_and_gone() {
        let alive = format!(r#"{{"result":{{{HEADER},"ID":"4111120409218174473","TTL":"30"}}}}"#);
        assert_eq!(parse_lease_keepalive(alive.as_bytes()), Ok(Some(30)));
        let gone = format!("{{\"result\":{{{HEADER},\"ID\":\"123\"}}}}\n");
        assert_eq!(parse_lease_keepalive(gone.as_bytes()), Ok(None));
        let err = br#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#;
        let e = parse_lease_keepalive(err).unwrap_err();
        assert!(e.is_unavailable());
        assert_eq!(
            e,
            EtcdError::Gateway {
                code: 14,
                message: "etcdserver: no leader".into()
            }
        );
    }

    #[test]
    fn gateway_errors_are_typed() {
        let body = br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        let e = check_status(404, body).unwrap_err();
        assert!(e.is_not_found());
        assert!(!e.is_unavailable());
        assert_eq!(
            e.to_string(),
            "etcd error 5: etcdserver: requested lease not found"
        );
        assert_eq!(parse_lease_revoke(body), Err(e));
        assert_eq!(
            parse_lease_revoke(format!("{{{HEADER}}}").as_bytes()),
            Ok(())
        );
        let too_large = br#"{"error":"etcdserver: request is too large","message":"etcdserver: request is too large","code":3}"#;
        assert_eq!(
            check_status(400, too_large),
            Err(EtcdError::Gateway {
                code: CODE_INVALID_ARGUMENT,
                message: "etcdserver: request is too large".into()
            })
        );
    }

    #[test]
    fn envoys_own_failures_are_statuses() {
        let e = check_status(
            503,
            b"upstream connect error or disconnect/reset before headers",
        )
        .unwrap_err();
        assert_eq!(e, EtcdError::Status(503));
        assert!(e.is_unavailable());
        assert_eq!(check_status(200, b"{}"), Ok(&b"{}"[..]));
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"[]",
            b"not json",
            br#"{"kvs":"x"}"#,
            br#"{"kvs":[{"key":"!!"}]}"#,
            br#"{"kvs":[1]}"#,
            br#"{"count":"x"}"#,
            br#"{"count":1.5}"#,
            br#"{"more":"yes"}"#,
            br#"{"header":[]}"#,
        ] {
            assert!(
                matches!(parse_range(body), Err(EtcdError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(parse_txn(br#"{"responses":[{"response_other":{}}]}"#).is_err());
        assert!(parse_lease_keepalive(b"\n").is_err());
        assert!(parse_lease_keepalive(b"{}").is_err());
    }
}
