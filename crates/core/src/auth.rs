//! Virtual-key authentication: which key (if any) a request presents, and whose it is.

use std::collections::BTreeMap;

use crate::config::{sha256_of, Config, JwtOwner};
use crate::error::ApiError;

pub use crate::config::KEY_PREFIX;

/// The owner recorded for jobs made without a key when `allow_unauthenticated` is on.
pub const ANONYMOUS: &str = "";

/// Finds the virtual key among the key headers, in their order of precedence.
/// `header` returns a request header's raw bytes by lower-case name.
pub fn presented_key(header: &dyn Fn(&str) -> Option<Vec<u8>>) -> Option<Vec<u8>> {
    let mut first_seen: Option<Vec<u8>> = None;
    // Read lazily: each header is a host call, and most requests carry their
    // key in the first.
    let candidates = ["authorization", "x-bf-vk", "x-api-key", "api-key"]
        .into_iter()
        .filter_map(|name| match name {
            "authorization" => header(name).and_then(|v| strip_bearer(&v)),
            _ => header(name),
        });
    for value in candidates {
        let value = <[u8]>::trim_ascii(&value).to_vec();
        if value.is_empty() {
            continue;
        }
        if value.starts_with(KEY_PREFIX.as_bytes()) {
            return Some(value);
        }
        // A provider-style key in one header must not hide a virtual key in another.
        first_seen.get_or_insert(value);
    }
    first_seen
}

fn strip_bearer(value: &[u8]) -> Option<Vec<u8>> {
    let v = <[u8]>::trim_ascii(value);
    let scheme = v.get(..7)?;
    if scheme.eq_ignore_ascii_case(b"bearer ") {
        v.get(7..).map(|rest| <[u8]>::trim_ascii(rest).to_vec())
    } else {
        None
    }
}

/// Returns the owner of the request's jobs, or the 401 to answer.
///
/// `verified_claim` is the claim of a JWT that Envoy's `jwt_authn` filter has
/// verified (read from its dynamic metadata, which no client header can set; see
/// [`ClaimValue::from_metadata`]). The owner is `jwt:` + the claim's canonical JSON,
/// so `512` and `"512"` are different owners; a null or empty-string claim counts as
/// none. Owners are namespaced (`jwt:` / `vk:`) so that a key's name can never
/// collide with a token's claim.
pub fn authenticate(
    config: &Config,
    header: &dyn Fn(&str) -> Option<Vec<u8>>,
    verified_claim: Option<&ClaimValue>,
) -> Result<String, ApiError> {
    if config.jwt_owner.is_some() {
        let usable = |c: &&ClaimValue| {
            !matches!(c, ClaimValue::Null) && **c != ClaimValue::String(String::new())
        };
        if let Some(claim) = verified_claim.filter(usable) {
            return Ok(format!("jwt:{}", claim.to_canonical_json()));
        }
    }
    match presented_key(header) {
        None if config.allow_unauthenticated => Ok(ANONYMOUS.to_string()),
        None if config.jwt_owner.is_some() && config.virtual_keys.is_empty() => {
            Err(ApiError::unauthorized("missing credentials: no verified JWT with the owner claim"))
        }
        None => Err(ApiError::unauthorized(
            "missing virtual key: send Authorization: Bearer sk-bf-… (or x-bf-vk, x-api-key, api-key)",
        )),
        Some(key) => {
            let digest = sha256_of(&key);
            config
                .virtual_keys
                .iter()
                .find(|k| k.sha256 == digest)
                .map(|k| format!("vk:{}", k.name))
                .ok_or_else(|| ApiError::unauthorized("unknown virtual key"))
        }
    }
}

/// A verified JWT claim's value, exactly as its JSON was (as far as Envoy keeps it:
/// `jwt_authn` stores the payload as a `google.protobuf.Struct`, so every number is a
/// double). The job owner is `jwt:` + [`ClaimValue::to_canonical_json`], so `"512"`
/// and `512` are two owners, as are any two different values.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimValue {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    List(Vec<ClaimValue>),
    Object(BTreeMap<String, ClaimValue>),
}

/// Nesting beyond this in a claim is refused (no owner), keeping the decoder's recursion bounded.
const MAX_CLAIM_DEPTH: usize = 32;

impl ClaimValue {
    /// One JSON text per value: no spaces, object keys sorted, strings escaped as
    /// serde_json does, numbers with Rust's shortest round-trip form (`512`, not
    /// `512.0`; `0.1`; `-0` is `0`).
    pub fn to_canonical_json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut String) {
        match self {
            ClaimValue::Null => out.push_str("null"),
            ClaimValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            ClaimValue::Number(n) if *n == 0.0 => out.push('0'),
            ClaimValue::Number(n) => out.push_str(&n.to_string()),
            ClaimValue::String(s) => out.push_str(&json_string(s)),
            ClaimValue::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json(out);
                }
                out.push(']');
            }
            ClaimValue::Object(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&json_string(key));
                    out.push(':');
                    value.write_json(out);
                }
                out.push('}');
            }
        }
    }

    /// The claim named by `jwt` in Envoy's dynamic metadata.
    ///
    /// `metadata` is what `get_property(["metadata"])` returns: the request's whole
    /// `envoy.config.core.v3.Metadata`, serialized as protobuf (Envoy serializes a
    /// message-typed property with `SerializeToString`). The claim is read from
    /// `filter_metadata[metadata_namespace]` (a `google.protobuf.Struct`), field
    /// `payload_key` (a `Value` holding the payload's Struct), field `claim`.
    ///
    /// Why not read the claim's own property path: there Envoy hands over a string as
    /// its raw bytes, a number as the 8 bytes of a double and a bool as one byte, with
    /// nothing saying which, so an 8-character string could pose as a number. The
    /// Metadata message keeps every value's type. Anything that does not decode (or a
    /// claim nested deeper than 32 levels) gives `None`: no owner, so a 401.
    pub fn from_metadata(metadata: &[u8], jwt: &JwtOwner) -> Option<ClaimValue> {
        let namespace = map_entry(metadata, 1, &jwt.metadata_namespace)?;
        let payload =
            ClaimValue::from_protobuf_value_at(map_entry(namespace, 1, &jwt.payload_key)?, 0)?;
        match payload {
            ClaimValue::Object(mut fields) => fields.remove(&jwt.claim),
            _ => None,
        }
    }

    /// Decodes a `google.protobuf.Value` from protobuf wire bytes: `null_value` = 1,
    /// `number_value` = 2 (double), `string_value` = 3, `bool_value` = 4,
    /// `struct_value` = 5, `list_value` = 6. As protobuf reads a oneof, the last kind
    /// set wins; a Value with none set is null. Malformed bytes give `None`.
    pub fn from_protobuf_value(bytes: &[u8]) -> Option<ClaimValue> {
        ClaimValue::from_protobuf_value_at(bytes, 0)
    }

    fn from_protobuf_value_at(bytes: &[u8], depth: usize) -> Option<ClaimValue> {
        if depth > MAX_CLAIM_DEPTH {
            return None;
        }
        let mut value = ClaimValue::Null;
        for field in WireFields::new(bytes) {
            value = match field? {
                (1, Wire::Varint(_)) => ClaimValue::Null,
                (2, Wire::Fixed64(bits)) => ClaimValue::Number(f64::from_bits(bits)),
                (3, Wire::Bytes(b)) => ClaimValue::String(String::from_utf8(b.to_vec()).ok()?),
                (4, Wire::Varint(v)) => ClaimValue::Bool(v != 0),
                (5, Wire::Bytes(b)) => ClaimValue::Object(decode_struct(b, depth + 1)?),
                (6, Wire::Bytes(b)) => ClaimValue::List(decode_list(b, depth + 1)?),
                (1..=6, _) => return None, // a known field with the wrong wire type
                _ => continue,             // unknown fields are skipped, as protobuf does
            };
        }
        Some(value)
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// `google.protobuf.Struct`: `map<string, Value> fields = 1`; a repeated key's last value wins.
fn decode_struct(bytes: &[u8], depth: usize) -> Option<BTreeMap<String, ClaimValue>> {
    let mut fields = BTreeMap::new();
    for field in WireFields::new(bytes) {
        if let (1, Wire::Bytes(entry)) = field? {
            let (key, value) = decode_map_entry(entry)?;
            fields.insert(
                key.to_string(),
                ClaimValue::from_protobuf_value_at(value, depth)?,
            );
        }
    }
    Some(fields)
}

/// `google.protobuf.ListValue`: `repeated Value values = 1`.
fn decode_list(bytes: &[u8], depth: usize) -> Option<Vec<ClaimValue>> {
    let mut items = Vec::new();
    for field in WireFields::new(bytes) {
        if let (1, Wire::Bytes(item)) = field? {
            items.push(ClaimValue::from_protobuf_value_at(item, depth)?);
        }
    }
    Some(items)
}

/// A map entry message: `key = 1` (string), `value = 2` (bytes of the value message).
fn decode_map_entry(entry: &[u8]) -> Option<(&str, &[u8])> {
    let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
    for field in WireFields::new(entry) {
        match field? {
            (1, Wire::Bytes(b)) => key = b,
            (2, Wire::Bytes(b)) => value = b,
            _ => {}
        }
    }
    Some((std::str::from_utf8(key).ok()?, value))
}

/// The value bytes of `key` in the map field `field` of a message (the last entry wins).
fn map_entry<'a>(message: &'a [u8], field: u64, key: &str) -> Option<&'a [u8]> {
    let mut found = None;
    for f in WireFields::new(message) {
        if let (n, Wire::Bytes(entry)) = f? {
            if n == field {
                let (k, v) = decode_map_entry(entry)?;
                if k == key {
                    found = Some(v);
                }
            }
        }
    }
    found
}

/// One field's value as protobuf's wire format carries it.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
}

/// The fields of a protobuf message, in order; an item is `None` (and ends the
/// walk) where the bytes are malformed or use groups.
struct WireFields<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> WireFields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        WireFields {
            rest: bytes,
            failed: false,
        }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.rest.split_first()?;
            self.rest = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(head)
    }

    fn field(&mut self) -> Option<(u64, Wire<'a>)> {
        let tag = self.varint()?;
        let wire = match tag & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                Wire::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed32
            }
            _ => return None,
        };
        Some((tag >> 3, wire))
    }
}

impl<'a> Iterator for WireFields<'a> {
    type Item = Option<(u64, Wire<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let field = self.field();
        self.failed = field.is_none();
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(allow: bool) -> Config {
        Config::parse(
            format!(
                r#"{{"providers":{{"openai":{{"cluster":"o"}}}},"allow_unauthenticated":{allow},
                   "virtual_keys":[{{"name":"team-a","value":"sk-bf-a"}},{{"name":"team-b","value":"sk-bf-b"}}]}}"#
            )
            .as_bytes(),
            &|_| None,
        )
        .unwrap()
    }

    fn authenticate_(c: &Config, h: &dyn Fn(&str) -> Option<Vec<u8>>) -> Result<String, ApiError> {
        authenticate(c, h, None)
    }

    #[test]
    fn a_verified_jwt_claim_owns_jobs_and_headers_cannot_pose_as_one() {
        let c = Config::parse(
            br#"{"providers":{"openai":{"cluster":"o"}},"jwt_owner":{"payload_key":"jwt_payload"}}"#,
            &|_| None,
        )
        .unwrap();
        let alice = ClaimValue::String("alice".into());
        assert_eq!(
            authenticate(&c, &headers(&[]), Some(&alice)).unwrap(),
            r#"jwt:"alice""#
        );
        let posing = headers(&[
            ("x-jwt-sub", b"alice"),
            ("authorization", b"Bearer jwt:alice"),
        ]);
        assert_eq!(
            authenticate(&c, &posing, None).unwrap_err().status_code,
            401
        );
        for nothing in [ClaimValue::String(String::new()), ClaimValue::Null] {
            assert_eq!(
                authenticate(&c, &headers(&[]), Some(&nothing))
                    .unwrap_err()
                    .status_code,
                401
            );
        }
        // Without jwt_owner configured, a claim means nothing.
        assert_eq!(
            authenticate(&config(false), &headers(&[]), Some(&alice))
                .unwrap_err()
                .status_code,
            401
        );
    }

    fn headers(pairs: &[(&str, &[u8])]) -> impl Fn(&str) -> Option<Vec<u8>> {
        let owned: Vec<(String, Vec<u8>)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        move |name| {
            owned
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn every_header_of_the_spec_is_accepted() {
        let c = config(false);
        for h in ["x-bf-vk", "x-api-key", "api-key"] {
            assert_eq!(
                authenticate_(&c, &headers(&[(h, b"sk-bf-b")])).unwrap(),
                "vk:team-b"
            );
        }
        assert_eq!(
            authenticate_(&c, &headers(&[("authorization", b"Bearer sk-bf-a")])).unwrap(),
            "vk:team-a"
        );
        assert_eq!(
            authenticate_(&c, &headers(&[("authorization", b"bearer  sk-bf-a ")])).unwrap(),
            "vk:team-a"
        );
    }

    #[test]
    fn a_virtual_key_wins_over_a_provider_key() {
        let c = config(false);
        let h = headers(&[
            ("authorization", b"Bearer sk-proj-123"),
            ("x-bf-vk", b"sk-bf-b"),
        ]);
        assert_eq!(authenticate_(&c, &h).unwrap(), "vk:team-b");
    }

    #[test]
    fn missing_unknown_and_non_utf8_keys_are_401() {
        let c = config(false);
        assert_eq!(
            authenticate_(&c, &headers(&[])).unwrap_err().status_code,
            401
        );
        let e = authenticate_(&c, &headers(&[("x-bf-vk", b"sk-bf-zzz")])).unwrap_err();
        assert_eq!(
            (e.status_code, e.error.message.as_str()),
            (401, "unknown virtual key")
        );
        assert_eq!(
            authenticate_(&c, &headers(&[("x-bf-vk", b"\xff\xfe")]))
                .unwrap_err()
                .status_code,
            401
        );
        assert_eq!(
            authenticate_(&c, &headers(&[("authorization", b"Basic abc")]))
                .unwrap_err()
                .status_code,
            401
        );
    }

    #[test]
    fn unauthenticated_mode_still_rejects_wrong_keys() {
        let c = config(true);
        assert_eq!(authenticate_(&c, &headers(&[])).unwrap(), ANONYMOUS);
        assert_eq!(
            authenticate_(&c, &headers(&[("x-bf-vk", b"sk-bf-x")]))
                .unwrap_err()
                .status_code,
            401
        );
    }

    // A small protobuf writer, to build what Envoy hands over.
    fn varint(mut n: u64, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    fn len_field(field: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(field << 3 | 2, &mut out);
        varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
        out
    }
    fn number(n: f64) -> Vec<u8> {
        let mut out = vec![2 << 3 | 1];
        out.extend_from_slice(&n.to_le_bytes());
        out
    }
    fn string(s: &str) -> Vec<u8> {
        len_field(3, s.as_bytes())
    }
    fn boolean(b: bool) -> Vec<u8> {
        vec![4 << 3, u8::from(b)]
    }
    fn null() -> Vec<u8> {
        vec![1 << 3, 0]
    }
    fn entry(key: &str, value: &[u8]) -> Vec<u8> {
        [len_field(1, key.as_bytes()), len_field(2, value)].concat()
    }
    /// The bytes of a Struct with these fields.
    fn pb_struct(fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
        fields
            .iter()
            .flat_map(|(k, v)| len_field(1, &entry(k, v)))
            .collect()
    }
    fn struct_value(fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
        len_field(5, &pb_struct(fields))
    }
    fn list_value(items: &[Vec<u8>]) -> Vec<u8> {
        len_field(
            6,
            &items
                .iter()
                .flat_map(|i| len_field(1, i))
                .collect::<Vec<u8>>(),
        )
    }
    /// Metadata with the JWT payload at filter_metadata["envoy.filters.http.jwt_authn"]["jwt_payload"].
    fn metadata(payload: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let other = len_field(
            1,
            &entry("envoy.lb", &pb_struct(&[("canary", boolean(true))])),
        );
        let jwt = len_field(
            1,
            &entry(
                "envoy.filters.http.jwt_authn",
                &pb_struct(&[("jwt_payload", struct_value(payload))]),
            ),
        );
        [other, jwt, vec![2 << 3 | 2, 0]].concat() // and an empty typed_filter_metadata entry
    }
    fn jwt(claim: &str) -> JwtOwner {
        JwtOwner {
            metadata_namespace: "envoy.filters.http.jwt_authn".into(),
            payload_key: "jwt_payload".into(),
            claim: claim.into(),
        }
    }
    fn owner_of(value: Vec<u8>) -> String {
        let c = Config::parse(
            br#"{"providers":{"openai":{"cluster":"o"}},"jwt_owner":{"payload_key":"jwt_payload"}}"#,
            &|_| None,
        )
        .unwrap();
        let m = metadata(&[("iss", string("issuer")), ("sub", value)]);
        let claim = ClaimValue::from_metadata(&m, &jwt("sub")).unwrap();
        authenticate(&c, &headers(&[]), Some(&claim)).unwrap()
    }

    #[test]
    fn the_owner_is_the_claims_exact_json() {
        assert_eq!(owner_of(number(512.0)), "jwt:512");
        assert_eq!(owner_of(number(768.0)), "jwt:768");
        assert_eq!(owner_of(string("512")), r#"jwt:"512""#);
        assert_eq!(owner_of(number(0.1)), "jwt:0.1");
        assert_eq!(owner_of(number(-2.5)), "jwt:-2.5");
        assert_eq!(owner_of(number(-0.0)), "jwt:0");
        assert_eq!(owner_of(number(1e21)), "jwt:1000000000000000000000");
        assert_eq!(owner_of(boolean(true)), "jwt:true");
        assert_eq!(owner_of(string("a\"b\n")), r#"jwt:"a\"b\n""#);
        assert_eq!(
            owner_of(list_value(&[number(1.0), string("x"), null()])),
            r#"jwt:[1,"x",null]"#
        );
        let nested = struct_value(&[("z", number(1.0)), ("a", list_value(&[]))]);
        assert_eq!(owner_of(nested), r#"jwt:{"a":[],"z":1}"#);
    }

    #[test]
    fn a_string_never_poses_as_a_number() {
        // The 8 bytes of the double 512 as a string claim: raw property bytes could
        // not tell them apart; the typed metadata does.
        let bytes = 512f64.to_le_bytes();
        let text: String = bytes.iter().map(|&b| char::from(b)).collect();
        assert_ne!(owner_of(string(&text)), owner_of(number(512.0)));
    }

    #[test]
    fn claims_that_are_absent_or_malformed_give_no_owner() {
        let m = metadata(&[("sub", string("alice"))]);
        assert_eq!(
            ClaimValue::from_metadata(&m, &jwt("sub")),
            Some(ClaimValue::String("alice".into()))
        );
        assert_eq!(ClaimValue::from_metadata(&m, &jwt("email")), None);
        let other_ns = JwtOwner {
            metadata_namespace: "other".into(),
            ..jwt("sub")
        };
        assert_eq!(ClaimValue::from_metadata(&m, &other_ns), None);
        let other_key = JwtOwner {
            payload_key: "other".into(),
            ..jwt("sub")
        };
        assert_eq!(ClaimValue::from_metadata(&m, &other_key), None);
        for cut in 0..m.len() {
            // A truncated message never panics, and never yields a different claim.
            let got = ClaimValue::from_metadata(&m[..cut], &jwt("sub"));
            assert!(
                got.is_none() || got == Some(ClaimValue::String("alice".into())),
                "{cut}"
            );
        }
        assert_eq!(
            ClaimValue::from_protobuf_value(&[2 << 3 | 1, 0, 0]),
            None,
            "a short double"
        );
        assert_eq!(
            ClaimValue::from_protobuf_value(&[3 << 3 | 2, 2, 0xff, 0xfe]),
            None,
            "not UTF-8"
        );
        assert_eq!(
            ClaimValue::from_protobuf_value(&[2 << 3, 1]),
            None,
            "wrong wire type"
        );
        assert_eq!(
            ClaimValue::from_protobuf_value(&[1 << 3 | 3]),
            None,
            "a group"
        );
        assert_eq!(ClaimValue::from_protobuf_value(&[]), Some(ClaimValue::Null));
        // Unknown fields are skipped; the last kind set wins.
        let mut v = vec![9 << 3, 1];
        v.extend(string("a"));
        v.extend(number(3.0));
        assert_eq!(
            ClaimValue::from_protobuf_value(&v),
            Some(ClaimValue::Number(3.0))
        );
    }

    #[test]
    fn deep_claims_are_refused() {
        let mut v = number(1.0);
        for _ in 0..32 {
            v = list_value(&[v]);
        }
        assert!(ClaimValue::from_protobuf_value(&v).is_some());
        let v = list_value(&[v]);
        assert_eq!(ClaimValue::from_protobuf_value(&v), None);
    }
}
