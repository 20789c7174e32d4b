//! The pgBackRest `repo*-cipher-pass`: client-side encryption passphrase.

use std::fmt;

use rand::TryRngCore;
use rand::distr::{Distribution, Uniform};
use rand::rngs::OsRng;
use secrecy::{ExposeSecret, SecretString};

use super::ValidationError;

/// Length of a cipher pass, as in the runbook (`head -c 64`).
pub const CIPHER_PASS_LEN: usize = 64;
/// Alphabet of a cipher pass, as in the runbook (`tr -dc A-Za-z0-9`).
pub const CIPHER_PASS_ALPHABET: &[u8; 62] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A 64-character `[A-Za-z0-9]` passphrase. Never displayed, never
/// serialized; `Debug` prints `CipherPass([REDACTED])`. Zeroized on drop.
#[derive(Clone)]
pub struct CipherPass(SecretString);

impl CipherPass {
    /// Draws 64 characters uniformly from [`CIPHER_PASS_ALPHABET`] using the
    /// operating system's CSPRNG (rejection sampling, no modulo bias).
    ///
    /// # Panics
    /// If the operating system's random source fails, as `rand` does.
    pub fn generate() -> Self {
        let mut rng = OsRng.unwrap_err();
        let index = Uniform::new(0usize, CIPHER_PASS_ALPHABET.len()).expect("non-empty alphabet");
        let mut pass = String::with_capacity(CIPHER_PASS_LEN);
        for _ in 0..CIPHER_PASS_LEN {
            pass.push(char::from(CIPHER_PASS_ALPHABET[index.sample(&mut rng)]));
        }
        Self(SecretString::from(pass))
    }

    /// Accepts exactly 64 ASCII letters and digits. The error never echoes
    /// the value.
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        let len = value.chars().count();
        if len != CIPHER_PASS_LEN {
            return Err(ValidationError::new(
                "cipher_pass",
                format!(
                    "cipher pass must be exactly {CIPHER_PASS_LEN} characters long (got {len})"
                ),
            ));
        }
        if !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ValidationError::new(
                "cipher_pass",
                "cipher pass may contain only ASCII letters and digits (A-Z, a-z, 0-9)",
            ));
        }
        Ok(Self(SecretString::from(value)))
    }

    /// The passphrase, for writing `s3.conf`. Keep the borrow short.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for CipherPass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CipherPass([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn generated_pass_has_length_and_alphabet() {
        for _ in 0..100 {
            let pass = CipherPass::generate();
            assert_eq!(pass.expose().len(), CIPHER_PASS_LEN);
            assert!(pass.expose().bytes().all(|b| b.is_ascii_alphanumeric()));
            // Generated values always parse.
            assert_eq!(
                CipherPass::parse(pass.expose()).unwrap().expose(),
                pass.expose()
            );
        }
    }

    #[test]
    fn generated_passes_are_unique() {
        let set: HashSet<String> = (0..1000)
            .map(|_| CipherPass::generate().expose().to_owned())
            .collect();
        assert_eq!(set.len(), 1000);
    }

    #[test]
    fn generation_uses_the_whole_alphabet() {
        // 200 * 64 = 12,800 draws over 62 symbols: every symbol appears with
        // overwhelming probability (miss chance per symbol ~ e^-206).
        let mut seen = HashSet::new();
        for _ in 0..200 {
            seen.extend(CipherPass::generate().expose().bytes());
        }
        assert_eq!(seen.len(), CIPHER_PASS_ALPHABET.len());
    }

    #[test]
    fn debug_is_redacted() {
        let pass = CipherPass::generate();
        let debug = format!("{pass:?}");
        assert_eq!(debug, "CipherPass([REDACTED])");
        assert!(!debug.contains(pass.expose()));
        let wrapped = format!("{:?}", Some(pass.clone()));
        assert_eq!(wrapped, "Some(CipherPass([REDACTED]))");
    }

    #[test]
    fn parse_rejects_without_echoing() {
        let secret = format!("{}!", "s3cr3t".repeat(10));
        let e = CipherPass::parse(&secret).unwrap_err();
        assert_eq!(e.field, "cipher_pass");
        assert_eq!(
            e.message,
            "cipher pass must be exactly 64 characters long (got 61)"
        );
        let bad_char = format!("{}-", "a".repeat(63));
        let e = CipherPass::parse(&bad_char).unwrap_err();
        assert!(e.message.contains("only ASCII letters and digits"));
        assert!(!e.to_string().contains(&bad_char));
        let unicode = format!("{}é", "a".repeat(63));
        assert!(CipherPass::parse(&unicode).is_err());
        assert!(CipherPass::parse("").is_err());
        assert!(CipherPass::parse(&"A1".repeat(32)).is_ok());
    }
}
