//! Requests to etcd's HTTP/JSON gateway (grpc-gateway, etcd 3.4 and later).
//!
//! Every call is a `POST` of a JSON object to a `/v3/...` path. Keys and
//! values are bytes, written in standard base64; int64 fields (revisions,
//! lease ids, TTLs, limits) are written as JSON strings, as the gateway's own
//! answers write them. Field names are the proto names (`create_revision`,
//! `request_put`, `ID`, `TTL`), which the gateway reads and writes.
//!
//! Limits to keep in mind (etcd's defaults): one request (a whole txn
//! included) is at most `--max-request-bytes` (1.5 MiB) of keys and values,
//! a txn holds at most `--max-txn-ops` (128) operations, and a txn may not
//! touch one key twice.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::platform::Callout;

pub const RANGE: &str = "/v3/kv/range";
pub const PUT: &str = "/v3/kv/put";
pub const DELETE_RANGE: &str = "/v3/kv/deleterange";
pub const TXN: &str = "/v3/kv/txn";
pub const LEASE_GRANT: &str = "/v3/lease/grant";
pub const LEASE_REVOKE: &str = "/v3/lease/revoke";
pub const LEASE_KEEPALIVE: &str = "/v3/lease/keepalive";

/// One gateway call: the path to `POST` to and the JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub path: &'static str,
    pub body: Vec<u8>,
}

impl Request {
    fn new(path: &'static str, body: Value) -> Request {
        Request {
            path,
            // Display of a `Value` cannot fail.
            body: body.to_string().into_bytes(),
        }
    }

    /// This request as a callout to the Envoy cluster in front of etcd.
    pub fn callout(&self, cluster: &str, authority: &str, timeout_ms: u64) -> Callout {
        callout(cluster, authority, timeout_ms, self.path, self.body.clone())
    }
}

/// A `POST` of a JSON body to `path` through `cluster`. A `timeout_ms` of 0
/// is sent as 1 (Envoy reads 0 as "no timeout").
pub fn callout(
    cluster: &str,
    authority: &str,
    timeout_ms: u64,
    path: &str,
    body: Vec<u8>,
) -> Callout {
    Callout {
        cluster: cluster.to_string(),
        headers: vec![
            (":method".into(), "POST".into()),
            (":path".into(), path.into()),
            (":authority".into(), authority.into()),
            ("content-type".into(), "application/json".into()),
        ],
        body,
        timeout_ms: timeout_ms.max(1),
    }
}

fn b64(bytes: &[u8]) -> Value {
    Value::String(STANDARD.encode(bytes))
}

fn int(n: i64) -> Value {
    Value::String(n.to_string())
}

/// The end of the range of every key that starts with `prefix` (etcd's
/// `GetPrefixRangeEnd`): the prefix with its last byte below 0xff raised by
/// one, trailing 0xff bytes dropped; `[0]` (to the end of the keyspace) when
/// there is no such byte.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// How a compare sets its result against etcd's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

impl CompareResult {
    fn name(self) -> &'static str {
        match self {
            CompareResult::Equal => "EQUAL",
            CompareResult::Greater => "GREATER",
            CompareResult::Less => "LESS",
            CompareResult::NotEqual => "NOT_EQUAL",
        }
    }
}

/// What of a key a compare looks at, and the value it compares with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    Version(i64),
    /// 0 for a key that does not exist.
    CreateRevision(i64),
    ModRevision(i64),
    Value(Vec<u8>),
    Lease(i64),
}

/// One condition of a txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub result: CompareResult,
    pub target: CompareTarget,
}

impl Compare {
    pub fn new(key: &[u8], result: CompareResult, target: CompareTarget) -> Compare {
        Compare {
            key: key.to_vec(),
            result,
            target,
        }
    }

    /// The key does not exist (its create_revision is 0).
    pub fn absent(key: &[u8]) -> Compare {
        Compare::new(key, CompareResult::Equal, CompareTarget::CreateRevision(0))
    }

    /// The key was last written at `mod_revision` (and so still exists).
    pub fn unchanged(key: &[u8], mod_revision: i64) -> Compare {
        Compare::new(
            key,
            CompareResult::Equal,
            CompareTarget::ModRevision(mod_revision),
        )
    }

    fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("result".into(), self.result.name().into());
        let (target, field, value) = match &self.target {
            CompareTarget::Version(v) => ("VERSION", "version", int(*v)),
            CompareTarget::CreateRevision(v) => ("CREATE", "create_revision", int(*v)),
            CompareTarget::ModRevision(v) => ("MOD", "mod_revision", int(*v)),
            CompareTarget::Value(v) => ("VALUE", "value", b64(v)),
            CompareTarget::Lease(v) => ("LEASE", "lease", int(*v)),
        };
        m.insert("target".into(), target.into());
        m.insert("key".into(), b64(&self.key));
        m.insert(field.into(), value);
        Value::Object(m)
    }
}

/// One operation, alone or in a txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `key` alone, or `[key, range_end)`; `limit` 0 means no limit.
    Range {
        key: Vec<u8>,
        range_end: Option<Vec<u8>>,
        limit: i64,
    },
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    /// `key` alone, or `[key, range_end)`.
    DeleteRange {
        key: Vec<u8>,
        range_end: Option<Vec<u8>>,
    },
}

impl Op {
    pub fn range(key: &[u8]) -> Op {
        Op::Range {
            key: key.to_vec(),
            range_end: None,
            limit: 0,
        }
    }

    pub fn range_prefix(prefix: &[u8], limit: i64) -> Op {
        Op::Range {
            key: prefix.to_vec(),
            range_end: Some(prefix_end(prefix)),
            limit,
        }
    }

    pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Op {
        Op::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
        }
    }

    pub fn delete(key: &[u8]) -> Op {
        Op::DeleteRange {
            key: key.to_vec(),
            range_end: None,
        }
    }

    pub fn delete_prefix(prefix: &[u8]) -> Op {
        Op::DeleteRange {
            key: prefix.to_vec(),
            range_end: Some(prefix_end(prefix)),
        }
    }

    /// The body of the operation's own request (`RangeRequest`, ...).
    fn json(&self) -> Value {
        let mut m = Map::new();
        match self {
            Op::Range {
                key,
                range_end,
                limit,
            } => {
                m.insert("key".into(), b64(key));
                if let Some(end) = range_end {
                    m.insert("range_end".into(), b64(end));
                }
                if *limit != 0 {
                    m.insert("limit".into(), int(*limit));
                }
            }
            Op::Put { key, value, lease } => {
                m.insert("key".into(), b64(key));
                m.insert("value".into(), b64(value));
                if let Some(lease) = lease {
                    m.insert("lease".into(), int(*lease));
                }
            }
            Op::DeleteRange { key, range_end } => {
                m.insert("key".into(), b64(key));
                if let Some(end) = range_end {
                    m.insert("range_end".into(), b64(end));
                }
            }
        }
        Value::Object(m)
    }

    /// The operation as a `RequestOp` of a txn.
    fn txn_json(&self) -> Value {
        let field = match self {
            Op::Range { .. } => "request_range",
            Op::Put { .. } => "request_put",
            Op::DeleteRange { .. } => "request_delete_range",
        };
        json!({ (field): self.json() })
    }

    /// Bytes of keys and values this operation sends (what etcd's
    /// `--max-request-bytes` counts, give or take a few bytes of framing).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Op::Range { key, range_end, .. } | Op::DeleteRange { key, range_end } => {
                key.len() + range_end.as_ref().map_or(0, Vec::len)
            }
            Op::Put { key, value, .. } => key.len() + value.len(),
        }
    }

    /// This operation as a request of its own.
    pub fn request(&self) -> Request {
        let path = match self {
            Op::Range { .. } => RANGE,
            Op::Put { .. } => PUT,
            Op::DeleteRange { .. } => DELETE_RANGE,
        };
        Request::new(path, self.json())
    }
}

/// A transaction: if every compare holds, the `success` operations run,
/// otherwise the `failure` ones; all at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Adds a condition.
    pub fn when(mut self, compare: Compare) -> Txn {
        self.compare.push(compare);
        self
    }

    /// Adds an operation run when every condition holds.
    pub fn then(mut self, op: Op) -> Txn {
        self.success.push(op);
        self
    }

    /// Adds an operation run when a condition does not hold.
    pub fn otherwise(mut self, op: Op) -> Txn {
        self.failure.push(op);
        self
    }

    /// Bytes of keys and values of the whole txn (see [`Op::payload_bytes`]).
    pub fn payload_bytes(&self) -> usize {
        let compares: usize = self
            .compare
            .iter()
            .map(|c| {
                c.key.len()
                    + match &c.target {
                        CompareTarget::Value(v) => v.len(),
                        _ => 0,
                    }
            })
            .sum();
        let ops: usize = self
            .success
            .iter()
            .chain(&self.failure)
            .map(Op::payload_bytes)
            .sum();
        compares + ops
    }

    pub fn request(&self) -> Request {
        let mut m = Map::new();
        m.insert(
            "compare".into(),
            self.compare.iter().map(Compare::json).collect(),
        );
        m.insert(
            "success".into(),
            self.success.iter().map(Op::txn_json).collect(),
        );
        if !self.failure.is_empty() {
            m.insert(
                "failure".into(),
                self.failure.iter().map(Op::txn_json).collect(),
            );
        }
        Request::new(TXN, Value::Object(m))
    }
}

/// The value of one key (no answer's `kvs` when it does not exist).
pub fn range(key: &[u8]) -> Request {
    Op::range(key).request()
}

/// Keys that start with `prefix`, in key order; `limit` 0 means all of them
/// (the answer's `more` says whether there were more than `limit`).
pub fn range_prefix(prefix: &[u8], limit: i64) -> Request {
    Op::range_prefix(prefix, limit).request()
}

/// Keys that start with `prefix` and come after `after` (the last key of the
/// previous page): the next page of [`range_prefix`].
pub fn range_prefix_after(prefix: &[u8], after: &[u8], limit: i64) -> Request {
    let mut start = after.to_vec();
    start.push(0);
    Op::Range {
        key: start,
        range_end: Some(prefix_end(prefix)),
        limit,
    }
    .request()
}

pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Request {
    Op::put(key, value, lease).request()
}

pub fn delete(key: &[u8]) -> Request {
    Op::delete(key).request()
}

/// Writes `key` only if it does not exist; otherwise the answer's one
/// response is the key as it is.
pub fn put_if_absent(key: &[u8], value: &[u8], lease: Option<i64>) -> Request {
    Txn::new()
        .when(Compare::absent(key))
        .then(Op::put(key, value, lease))
        .otherwise(Op::range(key))
        .request()
}

/// Writes `key` only if it was last written at `expected_mod_revision`;
/// otherwise the answer's one response is the key as it is (no `kvs` when it
/// is gone).
pub fn compare_and_put(
    key: &[u8],
    expected_mod_revision: i64,
    value: &[u8],
    lease: Option<i64>,
) -> Request {
    Txn::new()
        .when(Compare::unchanged(key, expected_mod_revision))
        .then(Op::put(key, value, lease))
        .otherwise(Op::range(key))
        .request()
}

/// Deletes `key` only if it was last written at `mod_revision`.
pub fn delete_if(key: &[u8], mod_revision: i64) -> Request {
    Txn::new()
        .when(Compare::unchanged(key, mod_revision))
        .then(Op::delete(key))
        .request()
}

/// Claims a job: writes `owner` to the claim key under `lease` only if no
/// claim exists (a claim whose lease lapsed is gone with it). When the claim
/// is held, the answer's one response is the claim as it is.
pub fn claim(claim_key: &[u8], owner: &[u8], lease: i64) -> Request {
    put_if_absent(claim_key, owner, Some(lease))
}

/// A lease of `ttl_s` seconds, its id chosen by etcd.
pub fn lease_grant(ttl_s: i64) -> Request {
    Request::new(LEASE_GRANT, json!({ "TTL": int(ttl_s) }))
}

/// Renews a lease for its TTL. The gateway answers one `{"result": ...}`;
/// a lease that is gone has no `TTL` in it.
pub fn lease_keepalive(id: i64) -> Request {
    Request::new(LEASE_KEEPALIVE, json!({ "ID": int(id) }))
}

/// Ends a lease and deletes every key attached to it.
pub fn lease_revoke(id: i64) -> Request {
    Request::new(LEASE_REVOKE, json!({ "ID": int(id) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: &Request) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn put_writes_base64_and_int64_as_strings() {
        let r = put(b"foo", b"bar", Some(7587));
        assert_eq!(r.path, "/v3/kv/put");
        assert_eq!(
            body(&r),
            json!({"key": "Zm9v", "value": "YmFy", "lease": "7587"})
        );
        assert_eq!(
            body(&put(b"foo", b"", None)),
            json!({"key": "Zm9v", "value": ""})
        );
    }

    #[test]
    fn range_prefix_has_range_end_and_limit() {
        assert_eq!(
            body(&range_prefix(b"p/", 10)),
            json!({"key": "cC8=", "range_end": "cDA=", "limit": "10"})
        );
        assert_eq!(
            body(&range_prefix(b"p/", 0)),
            json!({"key": "cC8=", "range_end": "cDA="})
        );
        assert_eq!(
            body(&range_prefix_after(b"p/", b"p/a", 1)),
            json!({"key": STANDARD.encode(b"p/a\0"), "range_end": "cDA=", "limit": "1"})
        );
    }

    #[test]
    fn put_if_absent_compares_create_revision_zero() {
        let r = put_if_absent(b"k", b"v", None);
        assert_eq!(r.path, "/v3/kv/txn");
        assert_eq!(
            body(&r),
            json!({
                "compare": [{"result": "EQUAL", "target": "CREATE", "key": "aw==", "create_revision": "0"}],
                "success": [{"request_put": {"key": "aw==", "value": "dg=="}}],
                "failure": [{"request_range": {"key": "aw=="}}],
            })
        );
    }

    #[test]
    fn delete_if_has_no_failure_branch() {
        assert_eq!(
            body(&delete_if(b"k", 42)),
            json!({
                "compare": [{"result": "EQUAL", "target": "MOD", "key": "aw==", "mod_revision": "42"}],
                "success": [{"request_delete_range": {"key": "aw=="}}],
            })
        );
    }

    #[test]
    fn every_compare_target() {
        let t = Txn::new()
            .when(Compare::new(
                b"k",
                CompareResult::Greater,
                CompareTarget::Version(1),
            ))
            .when(Compare::new(
                b"k",
                CompareResult::Less,
                CompareTarget::Value(b"v".to_vec()),
            ))
            .when(Compare::new(
                b"k",
                CompareResult::NotEqual,
                CompareTarget::Lease(3),
            ));
        assert_eq!(
            body(&t.request())["compare"],
            json!([
                {"result": "GREATER", "target": "VERSION", "key": "aw==", "version": "1"},
                {"result": "LESS", "target": "VALUE", "key": "aw==", "value": "dg=="},
                {"result": "NOT_EQUAL", "target": "LEASE", "key": "aw==", "lease": "3"},
            ])
        );
        assert_eq!(t.payload_bytes(), 4);
    }

    #[test]
    fn callout_is_a_json_post() {
        let c = lease_grant(30).callout("etcd", "etcd.local", 0);
        assert_eq!(c.cluster, "etcd");
        assert_eq!(c.timeout_ms, 1);
        assert_eq!(
            c.headers,
            vec![
                (":method".to_string(), "POST".to_string()),
                (":path".to_string(), "/v3/lease/grant".to_string()),
                (":authority".to_string(), "etcd.local".to_string()),
                ("content-type".to_string(), "application/json".to_string()),
            ]
        );
        assert_eq!(c.body, br#"{"TTL":"30"}"#.to_vec());
    }
}
