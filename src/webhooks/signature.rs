//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the bytes of `BP_WEBHOOK_SECRET`
//! (`whsec_` followed by their base64, the form the specification's libraries take).

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};

/// The specification's prefix of a secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// The specification asks for secrets of 24 to 64 random bytes.
pub const MIN_KEY_BYTES: usize = 24;
pub const MAX_KEY_BYTES: usize = 64;

/// The key deliveries are signed with. Its bytes are never printed.
#[derive(Clone)]
pub struct SigningKey {
    key: hmac::Key,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Reads `whsec_<base64>` (the prefix may be left out); the error never quotes the secret.
    pub fn from_secret(secret: &SecretString) -> Result<Self, String> {
        let text = secret.expose_secret().trim();
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let usage = format!(
            "must be {SECRET_PREFIX} followed by the base64 of {MIN_KEY_BYTES} to \
             {MAX_KEY_BYTES} random bytes (e.g. whsec_$(openssl rand -base64 32))"
        );
        let bytes = STANDARD.decode(encoded).map_err(|_| usage.clone())?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&bytes.len()) {
            return Err(usage);
        }
        Ok(SigningKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// The `webhook-signature` header value of message `id` sent at `timestamp` (unix seconds).
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        let signed = format!("{id}.{timestamp}.{body}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("v1,{}", STANDARD.encode(tag.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the specification's reference libraries.
    #[test]
    fn signs_the_specification_example() {
        let secret = SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let key = SigningKey::from_secret(&secret).expect("valid secret");
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn the_prefix_is_optional_and_short_or_garbled_secrets_are_refused() {
        let bare = SecretString::from("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let prefixed = SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let (a, b) = (
            SigningKey::from_secret(&bare).unwrap(),
            SigningKey::from_secret(&prefixed).unwrap(),
        );
        assert_eq!(a.sign("id", 1, "{}"), b.sign("id", 1, "{}"));
        for bad in ["whsec_c2hvcnQ=", "whsec_not base64!", ""] {
            let err = SigningKey::from_secret(&SecretString::from(bad)).unwrap_err();
            assert!(
                !bad.is_empty() && !err.contains(bad) || bad.is_empty(),
                "{err}"
            );
        }
        assert_eq!(format!("{a:?}"), "SigningKey(..)");
    }
}
