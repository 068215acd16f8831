//! Requests to etcd's HTTP/JSON gateway (grpc-gateway, etcd 3.4 and later):
//! builders over the types of `wire`.
//!
//! Every call is a `POST` of a JSON object to a `/v3/...` path.
//!
//! Limits to keep in mind (etcd's defaults): one request (a whole txn
//! included) is at most `--max-request-bytes` (1.5 MiB) of keys and values,
//! a txn holds at most `--max-txn-ops` (128) operations, and a txn may not
//! touch one key twice.

use serde::Serialize;

pub use super::wire::{Compare, CompareResult, CompareTarget, RequestOp as Op, TxnRequest as Txn};
use super::wire::{DeleteRangeRequest, LeaseRequest, PutRequest, RangeRequest, TxnRequest};
use crate::platform::Callout;

pub const RANGE: &str = "/v3/kv/range";
pub const PUT: &str = "/v3/kv/put";
pub const DELETE_RANGE: &str = "/v3/kv/deleterange";
pub const TXN: &str = "/v3/kv/txn";
pub const LEASE_GRANT: &str = "/v3/lease/grant";
#[cfg(test)]
pub const LEASE_REVOKE: &str = "/v3/lease/revoke";
pub const LEASE_KEEPALIVE: &str = "/v3/lease/keepalive";

/// One gateway call: the path to `POST` to and the JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub path: &'static str,
    pub body: Vec<u8>,
}

impl Request {
    fn new(path: &'static str, body: &impl Serialize) -> Request {
        Request {
            path,
            // Serializing these plain types cannot fail.
            body: serde_json::to_vec(body).unwrap_or_default(),
        }
    }

    /// This request as a callout to the Envoy cluster in front of etcd.
    pub fn callout(&self, cluster: &str, authority: &str, timeout_ms: u64) -> Callout {
        Callout {
            cluster: cluster.to_string(),
            headers: vec![
                (":method".into(), "POST".into()),
                (":path".into(), self.path.into()),
                (":authority".into(), authority.into()),
                ("content-type".into(), "application/json".into()),
            ],
            body: self.body.clone(),
            // Envoy reads 0 as "no timeout".
            timeout_ms: timeout_ms.max(1),
        }
    }
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

impl Compare {
    pub fn new(key: &[u8], result: CompareResult, target: CompareTarget) -> Compare {
        Compare {
            result,
            key: key.to_vec(),
            target,
        }
    }

    /// The key does not exist (its create_revision is 0).
    pub fn absent(key: &[u8]) -> Compare {
        Compare::new(
            key,
            CompareResult::Equal,
            CompareTarget::CreateRevision { create_revision: 0 },
        )
    }

    /// The key exists.
    pub fn present(key: &[u8]) -> Compare {
        Compare::new(
            key,
            CompareResult::Greater,
            CompareTarget::CreateRevision { create_revision: 0 },
        )
    }

    /// The key holds exactly `value`.
    pub fn holds(key: &[u8], value: &[u8]) -> Compare {
        Compare::new(
            key,
            CompareResult::Equal,
            CompareTarget::Value {
                value: value.to_vec(),
            },
        )
    }

    /// The key was last written at `mod_revision` (and so still exists).
    pub fn unchanged(key: &[u8], mod_revision: i64) -> Compare {
        Compare::new(
            key,
            CompareResult::Equal,
            CompareTarget::ModRevision { mod_revision },
        )
    }
}

impl Op {
    pub fn range(key: &[u8]) -> Op {
        Op::RequestRange(RangeRequest {
            key: key.to_vec(),
            ..RangeRequest::default()
        })
    }

    pub fn range_prefix(prefix: &[u8], limit: i64) -> Op {
        Op::RequestRange(RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            limit,
            ..RangeRequest::default()
        })
    }

    /// How many keys start with `prefix` (no keys returned).
    pub fn count_prefix(prefix: &[u8]) -> Op {
        Op::RequestRange(RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            count_only: true,
            ..RangeRequest::default()
        })
    }

    /// The keys in `[start, end)`, at most `limit` (0: all).
    pub fn range_between(start: &[u8], end: &[u8], limit: i64) -> Op {
        Op::RequestRange(RangeRequest {
            key: start.to_vec(),
            range_end: end.to_vec(),
            limit,
            ..RangeRequest::default()
        })
    }

    pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Op {
        Op::RequestPut(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease: lease.unwrap_or(0),
        })
    }

    pub fn delete(key: &[u8]) -> Op {
        Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.to_vec(),
            range_end: Vec::new(),
        })
    }

    pub fn delete_prefix(prefix: &[u8]) -> Op {
        Op::RequestDeleteRange(DeleteRangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
        })
    }

    /// Bytes of keys and values this operation sends (what etcd's
    /// `--max-request-bytes` counts, give or take a few bytes of framing).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Op::RequestRange(r) => r.key.len() + r.range_end.len(),
            Op::RequestDeleteRange(d) => d.key.len() + d.range_end.len(),
            Op::RequestPut(p) => p.key.len() + p.value.len(),
        }
    }

    /// This operation as a request of its own.
    pub fn request(&self) -> Request {
        match self {
            Op::RequestRange(r) => Request::new(RANGE, r),
            Op::RequestPut(p) => Request::new(PUT, p),
            Op::RequestDeleteRange(d) => Request::new(DELETE_RANGE, d),
        }
    }
}

/// A transaction: if every compare holds, the `success` operations run,
/// otherwise the `failure` ones; all at one revision.
impl TxnRequest {
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
                        CompareTarget::Value { value } => value.len(),
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
        Request::new(TXN, self)
    }
}

pub fn range(key: &[u8]) -> Request {
    Op::range(key).request()
}

/// Keys that start with `prefix`, in key order; `limit` 0 means all of them
/// (the answer's `more` says whether there were more than `limit`).
pub fn range_prefix(prefix: &[u8], limit: i64) -> Request {
    Op::range_prefix(prefix, limit).request()
}

#[cfg(test)]
/// Keys that start with `prefix` and come after `after` (the last key of the
/// previous page): the next page of [`range_prefix`].
pub fn range_prefix_after(prefix: &[u8], after: &[u8], limit: i64) -> Request {
    let mut start = after.to_vec();
    start.push(0);
    Op::RequestRange(RangeRequest {
        key: start,
        range_end: prefix_end(prefix),
        limit,
        ..RangeRequest::default()
    })
    .request()
}

pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Request {
    Op::put(key, value, lease).request()
}

#[cfg(test)]
pub fn delete(key: &[u8]) -> Request {
    Op::delete(key).request()
}

#[cfg(test)]
/// Writes `key` only if it does not exist; otherwise the answer's one
/// response is the key as it is.
pub fn put_if_absent(key: &[u8], value: &[u8], lease: Option<i64>) -> Request {
    Txn::new()
        .when(Compare::absent(key))
        .then(Op::put(key, value, lease))
        .otherwise(Op::range(key))
        .request()
}

#[cfg(test)]
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

#[cfg(test)]
/// Deletes `key` only if it was last written at `mod_revision`.
pub fn delete_if(key: &[u8], mod_revision: i64) -> Request {
    Txn::new()
        .when(Compare::unchanged(key, mod_revision))
        .then(Op::delete(key))
        .request()
}

#[cfg(test)]
/// Claims a job: writes `owner` to the claim key under `lease` only if no
/// claim exists (a claim whose lease lapsed is gone with it). When the claim
/// is held, the answer's one response is the claim as it is.
pub fn claim(claim_key: &[u8], owner: &[u8], lease: i64) -> Request {
    put_if_absent(claim_key, owner, Some(lease))
}

/// A lease of `ttl_s` seconds, its id chosen by etcd.
pub fn lease_grant(ttl_s: i64) -> Request {
    Request::new(LEASE_GRANT, &LeaseRequest { ttl: ttl_s, id: 0 })
}

/// Renews a lease for its TTL. The gateway answers one `{"result": ...}`;
/// a lease that is gone has no `TTL` in it.
pub fn lease_keepalive(id: i64) -> Request {
    Request::new(LEASE_KEEPALIVE, &LeaseRequest { ttl: 0, id })
}

#[cfg(test)]
/// Ends a lease and deletes every key attached to it.
pub fn lease_revoke(id: i64) -> Request {
    Request::new(LEASE_REVOKE, &LeaseRequest { ttl: 0, id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde_json::{json, Value};

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
                CompareTarget::Version { version: 1 },
            ))
            .when(Compare::new(
                b"k",
                CompareResult::Less,
                CompareTarget::Value {
                    value: b"v".to_vec(),
                },
            ))
            .when(Compare::new(
                b"k",
                CompareResult::NotEqual,
                CompareTarget::Lease { lease: 3 },
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
