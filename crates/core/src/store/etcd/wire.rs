//! The JSON of etcd's HTTP gateway (grpc-gateway, etcd 3.4 and later), as
//! types: the store's requests are serialized from them and its answers
//! deserialized into them (and the simulated etcd of the native tests reads
//! and writes the same). Keys and values are bytes written in standard
//! base64; int64 fields are JSON strings (numbers are read too); a field at
//! its zero value is left out, as the gateway does.

use serde::{Deserialize, Serialize};

/// Bytes as standard base64.
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = Option::<String>::deserialize(d)?.unwrap_or_default();
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// int64 as a JSON string (a number is read too).
mod int64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&n.to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(i64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        match Option::<Int>::deserialize(d)? {
            None => Ok(0),
            Some(Int::Number(n)) => Ok(n),
            Some(Int::Text(t)) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

// ---- requests ---------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    /// Empty: `key` alone; else the keys in `[key, range_end)`.
    #[serde(default, with = "b64", skip_serializing_if = "Vec::is_empty")]
    pub range_end: Vec<u8>,
    /// 0: no limit.
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub limit: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub count_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    #[serde(default, with = "b64")]
    pub value: Vec<u8>,
    /// 0: no lease.
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub lease: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    #[serde(default, with = "b64", skip_serializing_if = "Vec::is_empty")]
    pub range_end: Vec<u8>,
}

/// One operation of a txn.
#[allow(clippy::enum_variant_names)] // named as the gateway's JSON names them
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOp {
    RequestRange(RangeRequest),
    RequestPut(PutRequest),
    RequestDeleteRange(DeleteRangeRequest),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

/// What of a key a compare looks at, and the value it compares with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "target")]
pub enum CompareTarget {
    #[serde(rename = "VERSION")]
    Version {
        #[serde(default, with = "int64")]
        version: i64,
    },
    /// 0 for a key that does not exist.
    #[serde(rename = "CREATE")]
    CreateRevision {
        #[serde(default, with = "int64")]
        create_revision: i64,
    },
    #[serde(rename = "MOD")]
    ModRevision {
        #[serde(default, with = "int64")]
        mod_revision: i64,
    },
    #[serde(rename = "VALUE")]
    Value {
        #[serde(default, with = "b64")]
        value: Vec<u8>,
    },
    #[serde(rename = "LEASE")]
    Lease {
        #[serde(default, with = "int64")]
        lease: i64,
    },
}

/// One condition of a txn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub result: CompareResult,
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    #[serde(flatten)]
    pub target: CompareTarget,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    #[serde(default)]
    pub compare: Vec<Compare>,
    #[serde(default)]
    pub success: Vec<RequestOp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure: Vec<RequestOp>,
}

/// A lease grant (`TTL`), keep-alive or revoke (`ID`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    #[serde(
        rename = "TTL",
        default,
        with = "int64",
        skip_serializing_if = "is_zero"
    )]
    pub ttl: i64,
    #[serde(
        rename = "ID",
        default,
        with = "int64",
        skip_serializing_if = "is_zero"
    )]
    pub id: i64,
}

// ---- answers ----------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHeader {
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub revision: i64,
}

/// One key as the gateway lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    #[serde(default, with = "b64")]
    pub key: Vec<u8>,
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub create_revision: i64,
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub mod_revision: i64,
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub version: i64,
    #[serde(default, with = "b64", skip_serializing_if = "Vec::is_empty")]
    pub value: Vec<u8>,
    /// 0 when the key has no lease.
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub lease: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    #[serde(default)]
    pub header: ResponseHeader,
    /// The keys found, in key order (empty when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvs: Vec<Kv>,
    /// More keys matched than the request's `limit`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub more: bool,
    /// How many keys matched in all (not only those returned).
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub count: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    #[serde(default)]
    pub header: ResponseHeader,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    #[serde(default)]
    pub header: ResponseHeader,
    #[serde(default, with = "int64", skip_serializing_if = "is_zero")]
    pub deleted: i64,
}

/// One response of a txn branch, in the order of the branch's operations.
#[allow(clippy::enum_variant_names)] // named as the gateway's JSON names them
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseOp {
    ResponseRange(RangeResponse),
    ResponsePut(PutResponse),
    ResponseDeleteRange(DeleteRangeResponse),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    #[serde(default)]
    pub header: ResponseHeader,
    /// Every compare held and the `success` branch ran.
    #[serde(default, skip_serializing_if = "is_false")]
    pub succeeded: bool,
    /// The responses of the branch that ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub responses: Vec<ResponseOp>,
}

impl TxnResponse {
    /// The first key of the `i`-th response when it is a range with a key:
    /// what a failed conditional write reads back.
    pub fn range_kv(&self, i: usize) -> Option<&Kv> {
        match self.responses.get(i)? {
            ResponseOp::ResponseRange(r) => r.kvs.first(),
            _ => None,
        }
    }
}

/// A lease grant's answer, and the body of a keep-alive's `result`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseResponse {
    #[serde(default)]
    pub header: ResponseHeader,
    #[serde(
        rename = "ID",
        default,
        with = "int64",
        skip_serializing_if = "is_zero"
    )]
    pub id: i64,
    /// Seconds; etcd may grant more than was asked (its minimum TTL). 0 or
    /// absent in a keep-alive: the lease is gone.
    #[serde(
        rename = "TTL",
        default,
        with = "int64",
        skip_serializing_if = "is_zero"
    )]
    pub ttl: i64,
}

/// A keep-alive's answer: one `{"result": …}` per line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepAliveAnswer {
    #[serde(default)]
    pub result: Option<LeaseResponse>,
}

/// The gateway's error: `{"error": "...", "code": 14, "message": "..."}` for
/// unary calls, `{"error": {"grpc_code": 5, "message": "..."}}` for streams.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorAnswer {
    pub error: ErrorBody,
    #[serde(default, with = "int64")]
    pub code: i64,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ErrorBody {
    Text(String),
    Stream {
        #[serde(default, with = "int64", alias = "code")]
        grpc_code: i64,
        #[serde(default)]
        message: String,
    },
}

/// The unary form of the gateway's error, as the simulated etcd writes it.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorOut {
    pub error: String,
    pub code: i64,
    pub message: String,
}
