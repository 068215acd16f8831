//! Standard Webhooks signatures: `webhook-signature: v1,<base64> v1,<base64> …`, one
//! HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}` per secret.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Every secret starts with this; the rest is the base64 of the key.
pub const SECRET_PREFIX: &str = "whsec_";

/// Longest key accepted, in bytes. Standard Webhooks secrets are 24 to 64 bytes; shorter keys
/// (down to 1 byte) are accepted so that test setups work, longer ones are refused.
pub const MAX_SECRET_BYTES: usize = 64;

/// Standard base64 alphabet, with or without the trailing `=` padding.
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes a `whsec_<base64>` secret into its key (1 to [`MAX_SECRET_BYTES`] bytes).
///
/// The error never shows the secret.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let Some(b64) = secret.strip_prefix(SECRET_PREFIX) else {
        return Err(format!("a secret must start with {SECRET_PREFIX}"));
    };
    let key = LENIENT_STANDARD
        .decode(b64.trim_end())
        .map_err(|_| format!("the part after {SECRET_PREFIX} must be standard base64"))?;
    if key.is_empty() || key.len() > MAX_SECRET_BYTES {
        return Err(format!(
            "a secret must decode to 1 to {MAX_SECRET_BYTES} bytes (got {})",
            key.len()
        ));
    }
    Ok(key)
}

/// HMAC-SHA256 of `{msg_id}.{timestamp_s}.{body}` under `key`.
///
/// `None` only if the MAC refused the key, which HMAC never does (any key length is valid).
pub fn signature(key: &[u8], msg_id: &str, timestamp_s: u64, body: &[u8]) -> Option<[u8; 32]> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac.finalize().into_bytes().into())
}

/// The `webhook-signature` header value: `v1,<base64>` for every key, separated by spaces
/// (several keys while a secret is being rotated).
pub fn sign(secrets: &[Vec<u8>], msg_id: &str, timestamp_s: u64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|key| signature(key, msg_id, timestamp_s, body))
        .map(|sig| format!("v1,{}", STANDARD.encode(sig)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: u64 = 1_614_265_330;
    const PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn standard_webhooks_reference_vector() {
        let key = decode_secret(SECRET).unwrap();
        assert_eq!(key.len(), 24);
        assert_eq!(sign(&[key], MSG_ID, TIMESTAMP, PAYLOAD), EXPECTED);
    }

    #[test]
    fn every_secret_signs_separated_by_spaces() {
        let old = decode_secret(SECRET).unwrap();
        let new = decode_secret("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let header = sign(&[old, new.clone()], MSG_ID, TIMESTAMP, PAYLOAD);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], EXPECTED);
        assert_eq!(parts[1], sign(&[new], MSG_ID, TIMESTAMP, PAYLOAD));
        assert_ne!(parts[0], parts[1]);
        assert_eq!(sign(&[], MSG_ID, TIMESTAMP, PAYLOAD), "");
    }

    #[test]
    fn signature_covers_id_timestamp_and_body() {
        let key = decode_secret(SECRET).unwrap();
        let base = sign(std::slice::from_ref(&key), MSG_ID, TIMESTAMP, PAYLOAD);
        assert_ne!(
            sign(std::slice::from_ref(&key), "msg_other", TIMESTAMP, PAYLOAD),
            base
        );
        assert_ne!(
            sign(std::slice::from_ref(&key), MSG_ID, TIMESTAMP + 1, PAYLOAD),
            base
        );
        assert_ne!(sign(&[key], MSG_ID, TIMESTAMP, b"{}"), base);
    }

    #[test]
    fn secrets_are_checked_without_showing_them() {
        assert!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(decode_secret("whsec_").is_err());
        assert!(decode_secret("whsec_not base64!").is_err());
        let too_long = format!("whsec_{}", STANDARD.encode([7u8; 65]));
        let err = decode_secret(&too_long).unwrap_err();
        assert!(err.contains("65"), "{err}");
        assert!(!err.contains(&too_long[6..]));
        assert_eq!(
            decode_secret(&format!("whsec_{}", STANDARD.encode([7u8; 64])))
                .unwrap()
                .len(),
            64
        );
        assert_eq!(decode_secret("whsec_AQ==").unwrap(), vec![1]);
        // Padding may be left off.
        assert_eq!(decode_secret("whsec_AQ").unwrap(), vec![1]);
    }

    /// The shared vectors, also verified by the `standardwebhooks` Python package in
    /// tests/webhooks/test_vectors.py (which says how to make the fixture again).
    const VECTORS: &str = include_str!("../../../../tests/fixtures/webhooks/vectors.json");

    #[test]
    fn sign_makes_the_fixture_signatures() {
        let fixture: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let vectors = fixture["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 2, "the fixture has no vectors");
        let mut rotations = 0;
        for v in vectors {
            let msg_id = v["msg_id"].as_str().unwrap();
            let secrets = v["secrets"].as_array().unwrap();
            let keys: Vec<Vec<u8>> = secrets
                .iter()
                .map(|s| decode_secret(s.as_str().unwrap()).unwrap())
                .collect();
            if keys.len() > 1 {
                rotations += 1;
            }
            let signed = sign(
                &keys,
                msg_id,
                v["timestamp"].as_u64().unwrap(),
                v["body"].as_str().unwrap().as_bytes(),
            );
            assert_eq!(signed, v["signature"].as_str().unwrap(), "vector {msg_id}");
        }
        assert!(rotations > 0, "the fixture has no rotation vector");
    }
}
