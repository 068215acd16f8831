//! Virtual-key authentication: which key (if any) a request presents, and whose it is.

use crate::config::{sha256_of, Config};
use crate::error::ApiError;

pub const KEY_PREFIX: &str = "sk-bf-";

/// The owner recorded for jobs made without a key when `allow_unauthenticated` is on.
pub const ANONYMOUS: &str = "";

/// Finds the virtual key among the headers of SPEC §1, in their order of precedence.
/// `header` returns a request header's raw bytes by lower-case name.
pub fn presented_key(header: &dyn Fn(&str) -> Option<Vec<u8>>) -> Option<Vec<u8>> {
    let mut first_seen: Option<Vec<u8>> = None;
    let candidates = [
        header("authorization").and_then(|v| strip_bearer(&v)),
        header("x-bf-vk"),
        header("x-api-key"),
        header("api-key"),
    ];
    for value in candidates.into_iter().flatten() {
        let value = trim(&value).to_vec();
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
    let v = trim(value);
    let scheme = v.get(..7)?;
    if scheme.eq_ignore_ascii_case(b"bearer ") {
        v.get(7..).map(|rest| trim(rest).to_vec())
    } else {
        None
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    v.get(start..end).unwrap_or(&[])
}

/// Returns the owner of the request's jobs, or the 401 to answer.
///
/// `verified_claim` is the claim of a JWT that Envoy's `jwt_authn` filter has
/// verified (read from its dynamic metadata, which no client header can set).
/// Owners are namespaced (`jwt:` / `vk:`) so that a key's name can never
/// collide with a token's subject.
pub fn authenticate(
    config: &Config,
    header: &dyn Fn(&str) -> Option<Vec<u8>>,
    verified_claim: Option<&[u8]>,
) -> Result<String, ApiError> {
    if config.jwt_owner.is_some() {
        if let Some(claim) = verified_claim.filter(|c| !c.is_empty()) {
            return Ok(format!("jwt:{}", String::from_utf8_lossy(claim)));
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
        assert_eq!(authenticate(&c, &headers(&[]), Some(b"alice")).unwrap(), "jwt:alice");
        let posing = headers(&[("x-jwt-sub", b"alice"), ("authorization", b"Bearer jwt:alice")]);
        assert_eq!(authenticate(&c, &posing, None).unwrap_err().status_code, 401);
        assert_eq!(authenticate(&c, &headers(&[]), Some(b"")).unwrap_err().status_code, 401);
        // Without jwt_owner configured, a claim means nothing.
        assert_eq!(authenticate(&config(false), &headers(&[]), Some(b"alice")).unwrap_err().status_code, 401);
    }

    fn headers(pairs: &[(&str, &[u8])]) -> impl Fn(&str) -> Option<Vec<u8>> {
        let owned: Vec<(String, Vec<u8>)> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
        move |name| owned.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn every_header_of_the_spec_is_accepted() {
        let c = config(false);
        for h in ["x-bf-vk", "x-api-key", "api-key"] {
            assert_eq!(authenticate_(&c, &headers(&[(h, b"sk-bf-b")])).unwrap(), "vk:team-b");
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
        let h = headers(&[("authorization", b"Bearer sk-proj-123"), ("x-bf-vk", b"sk-bf-b")]);
        assert_eq!(authenticate_(&c, &h).unwrap(), "vk:team-b");
    }

    #[test]
    fn missing_unknown_and_non_utf8_keys_are_401() {
        let c = config(false);
        assert_eq!(authenticate_(&c, &headers(&[])).unwrap_err().status_code, 401);
        let e = authenticate_(&c, &headers(&[("x-bf-vk", b"sk-bf-zzz")])).unwrap_err();
        assert_eq!((e.status_code, e.error.message.as_str()), (401, "unknown virtual key"));
        assert_eq!(authenticate_(&c, &headers(&[("x-bf-vk", b"\xff\xfe")])).unwrap_err().status_code, 401);
        assert_eq!(
            authenticate_(&c, &headers(&[("authorization", b"Basic abc")])).unwrap_err().status_code,
            401
        );
    }

    #[test]
    fn unauthenticated_mode_still_rejects_wrong_keys() {
        let c = config(true);
        assert_eq!(authenticate_(&c, &headers(&[])).unwrap(), ANONYMOUS);
        assert_eq!(authenticate_(&c, &headers(&[("x-bf-vk", b"sk-bf-x")])).unwrap_err().status_code, 401);
    }
}
