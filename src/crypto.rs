//! Encryption at rest for secrets stored in the database (access-key secrets, cipher passes),
//! with key rotation: a [`Keyring`] seals with its current key and still opens what earlier keys
//! sealed.
//!
//! XChaCha20-Poly1305 with a random 24-byte nonce per message: nonces are
//! long enough that random generation never realistically repeats. The
//! associated data (AAD) binds a ciphertext to the row it belongs to, so a
//! ciphertext copied into another row fails to open; build it with [`aad`].

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::TryRngCore;
use rand::rngs::OsRng;
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretBox, SecretString};

/// Key length in bytes.
pub const KEY_LEN: usize = 32;
/// Nonce length in bytes (XChaCha20).
pub const NONCE_LEN: usize = 24;

/// Why a key could not be loaded. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64")]
    InvalidBase64,
    #[error("must decode to 32 bytes (got {0})")]
    WrongLength(usize),
}

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("nonce must be 24 bytes (got {0})")]
    InvalidNonce(usize),
    /// Wrong key, wrong associated data, or tampered nonce/ciphertext: the
    /// AEAD cannot tell these apart, by design.
    #[error("decryption failed (wrong key, wrong associated data, or tampered ciphertext)")]
    Decrypt,
    #[error("decrypted value is not valid UTF-8")]
    NotUtf8,
}

/// A 32-byte XChaCha20-Poly1305 key, zeroized on drop; `Debug` is redacted.
pub struct EncryptionKey(SecretBox<[u8; KEY_LEN]>);

/// A sealed message: the random nonce and the ciphertext with its 16-byte tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl EncryptionKey {
    /// Loads a key from standard base64 (padded); surrounding whitespace,
    /// such as a trailing newline from a file, is ignored.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let mut bytes = STANDARD
            .decode(s.trim())
            .map_err(|_| KeyError::InvalidBase64)?;
        let result = Self::from_slice(&bytes);
        bytes.zeroize();
        result
    }

    /// Builds a key from raw bytes, which must be exactly 32.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != KEY_LEN {
            return Err(KeyError::WrongLength(bytes.len()));
        }
        Ok(Self(SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| {
            k.copy_from_slice(bytes)
        })))
    }

    /// A fresh random key from the OS CSPRNG, base64 encoded, for demos and docs.
    ///
    /// # Panics
    /// If the operating system's random source fails.
    pub fn generate_base64() -> String {
        let mut key = [0u8; KEY_LEN];
        fill_random(&mut key);
        let encoded = STANDARD.encode(key);
        key.zeroize();
        encoded
    }

    /// Encrypts `plaintext` under a fresh random nonce, authenticating `aad`
    /// (which is not stored; the caller must supply the same bytes to open).
    ///
    /// # Panics
    /// If the operating system's random source fails.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        let ciphertext = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // Only fails for messages beyond ~256 GiB.
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory messages");
        Sealed {
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Decrypts and authenticates `sealed` against `aad`.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<SecretBox<Vec<u8>>, CryptoError> {
        self.decrypt(sealed, aad)
            .map(|plaintext| SecretBox::new(Box::new(plaintext)))
    }

    /// [`open`](Self::open) for a value that was sealed from a UTF-8 string.
    pub fn open_string(&self, sealed: &Sealed, aad: &[u8]) -> Result<SecretString, CryptoError> {
        match String::from_utf8(self.decrypt(sealed, aad)?) {
            Ok(s) => Ok(SecretString::from(s)),
            Err(e) => {
                e.into_bytes().zeroize();
                Err(CryptoError::NotUtf8)
            }
        }
    }

    /// The plaintext, unwrapped: callers must wrap or zeroize it.
    fn decrypt(&self, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.nonce.len() != NONCE_LEN {
            return Err(CryptoError::InvalidNonce(sealed.nonce.len()));
        }
        self.cipher()
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.0.expose_secret().into())
    }
}

impl EncryptionKey {
    /// Names the key without revealing it: the first 8 bytes of its SHA-256, in hex. Stored
    /// with each sealed value so the key that opens it is known after a rotation.
    pub fn id(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.0.expose_secret());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The keys of a rotation: the current key seals and opens; previous keys only open what was
/// sealed before the rotation (the caller re-seals it with the current key).
#[derive(Clone, Debug)]
pub struct Keyring {
    current: EncryptionKey,
    previous: Vec<EncryptionKey>,
}

/// A value a [`Keyring`] opened, and the id of the key that opened it.
pub struct Opened {
    pub secret: SecretString,
    pub key_id: String,
}

impl Keyring {
    /// `previous` keys equal to the current one (or to each other) are dropped.
    pub fn new(current: EncryptionKey, previous: Vec<EncryptionKey>) -> Self {
        let mut ids = vec![current.id()];
        let mut unique = Vec::with_capacity(previous.len());
        for key in previous {
            let id = key.id();
            if !ids.contains(&id) {
                ids.push(id);
                unique.push(key);
            }
        }
        Keyring {
            current,
            previous: unique,
        }
    }

    /// The key that seals.
    pub fn current(&self) -> &EncryptionKey {
        &self.current
    }

    /// Opens `sealed` with the key named `key_id`, or, for a value sealed before key ids were
    /// recorded (`None`), with each key in turn.
    pub fn open_string(
        &self,
        sealed: &Sealed,
        aad: &[u8],
        key_id: Option<&str>,
    ) -> Result<Opened, CryptoError> {
        let keys = std::iter::once(&self.current).chain(&self.previous);
        let mut last = CryptoError::Decrypt;
        for key in keys {
            let id = key.id();
            if key_id.is_some_and(|wanted| wanted != id) {
                continue;
            }
            match key.open_string(sealed, aad) {
                Ok(secret) => return Ok(Opened { secret, key_id: id }),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl From<EncryptionKey> for Keyring {
    fn from(current: EncryptionKey) -> Self {
        Keyring::new(current, Vec::new())
    }
}

impl Clone for EncryptionKey {
    fn clone(&self) -> Self {
        let key = self.0.expose_secret();
        Self(SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| *k = *key))
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey([REDACTED])")
    }
}

/// Builds unambiguous associated data from parts (each length-prefixed), so
/// `aad(&[b"ab", b"c"]) != aad(&[b"a", b"bc"])`.
/// Example: `aad(&[repository_id.as_bytes(), access_key_id.as_bytes()])`.
pub fn aad(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn fill_random(buf: &mut [u8]) {
    OsRng
        .try_fill_bytes(buf)
        .expect("operating system random source failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> EncryptionKey {
        EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap()
    }

    #[test]
    fn round_trip() {
        let key = key();
        let aad = aad(&[b"repo-1", b"AKIAEXAMPLE"]);
        let sealed = key.seal(b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", &aad);
        assert_eq!(sealed.nonce.len(), NONCE_LEN);
        assert_eq!(sealed.ciphertext.len(), 40 + 16);
        let opened = key.open(&sealed, &aad).unwrap();
        assert_eq!(
            opened.expose_secret().as_slice(),
            b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        );
        let s = key.open_string(&sealed, &aad).unwrap();
        assert_eq!(
            s.expose_secret(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        );
        // A cloned key opens too.
        assert!(key.clone().open(&sealed, &aad).is_ok());
        // Empty plaintext and empty aad work.
        let sealed = key.seal(b"", b"");
        assert!(key.open(&sealed, b"").unwrap().expose_secret().is_empty());
    }

    #[test]
    fn nonces_are_fresh() {
        let key = key();
        let a = key.seal(b"same", b"aad");
        let b = key.seal(b"same", b"aad");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn wrong_key_fails() {
        let sealed = key().seal(b"secret", b"aad");
        assert_eq!(
            key().open(&sealed, b"aad").unwrap_err(),
            CryptoError::Decrypt
        );
    }

    #[test]
    fn wrong_aad_fails() {
        let key = key();
        let sealed = key.seal(b"secret", &aad(&[b"repo-1", b"key-1"]));
        assert_eq!(
            key.open(&sealed, &aad(&[b"repo-2", b"key-1"])).unwrap_err(),
            CryptoError::Decrypt
        );
        assert!(key.open(&sealed, b"").is_err());
    }

    #[test]
    fn tampered_ciphertext_or_nonce_fails() {
        let key = key();
        let sealed = key.seal(b"secret", b"aad");
        for i in 0..sealed.ciphertext.len() {
            let mut t = sealed.clone();
            t.ciphertext[i] ^= 0x01;
            assert_eq!(key.open(&t, b"aad").unwrap_err(), CryptoError::Decrypt);
        }
        let mut t = sealed.clone();
        t.ciphertext.pop();
        assert!(key.open(&t, b"aad").is_err());
        let mut t = sealed.clone();
        t.ciphertext.push(0);
        assert!(key.open(&t, b"aad").is_err());
        let mut t = sealed.clone();
        t.nonce[0] ^= 0x80;
        assert_eq!(key.open(&t, b"aad").unwrap_err(), CryptoError::Decrypt);
        let mut t = sealed.clone();
        t.nonce.truncate(12);
        assert_eq!(
            key.open(&t, b"aad").unwrap_err(),
            CryptoError::InvalidNonce(12)
        );
    }

    #[test]
    fn open_string_rejects_non_utf8() {
        let key = key();
        let sealed = key.seal(&[0xff, 0xfe], b"");
        assert_eq!(
            key.open_string(&sealed, b"").unwrap_err(),
            CryptoError::NotUtf8
        );
    }

    #[test]
    fn key_errors() {
        let e = EncryptionKey::from_base64("not base64!").unwrap_err();
        assert_eq!(e, KeyError::InvalidBase64);
        assert_eq!(e.to_string(), "not valid base64");
        let e = EncryptionKey::from_base64(&STANDARD.encode([0u8; 16])).unwrap_err();
        assert_eq!(e, KeyError::WrongLength(16));
        assert_eq!(e.to_string(), "must decode to 32 bytes (got 16)");
        assert_eq!(
            EncryptionKey::from_base64("").unwrap_err(),
            KeyError::WrongLength(0)
        );
        assert_eq!(
            EncryptionKey::from_base64(&STANDARD.encode([0u8; 33])).unwrap_err(),
            KeyError::WrongLength(33)
        );
        // Surrounding whitespace (a trailing newline from a file) is accepted.
        let k = EncryptionKey::generate_base64();
        assert!(EncryptionKey::from_base64(&format!(" {k}\n")).is_ok());
        assert_eq!(STANDARD.decode(&k).unwrap().len(), KEY_LEN);
        assert_ne!(k, EncryptionKey::generate_base64());
    }

    #[test]
    fn debug_is_redacted() {
        let encoded = EncryptionKey::generate_base64();
        let key = EncryptionKey::from_base64(&encoded).unwrap();
        assert_eq!(format!("{key:?}"), "EncryptionKey([REDACTED])");
    }

    #[test]
    fn key_ids_name_keys_without_revealing_them() {
        let (a, b) = (key(), key());
        assert_eq!(a.id().len(), 16);
        assert!(a.id().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.id(), a.clone().id());
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn a_keyring_opens_with_the_named_key_or_any_key_when_unnamed() {
        let (a, b, c) = (key(), key(), key());
        let sealed = a.seal(b"secret", b"aad");
        let ring = Keyring::new(b.clone(), vec![a.clone(), b.clone(), a.clone()]);
        assert_eq!(ring.previous.len(), 1, "duplicates dropped");
        let opened = ring.open_string(&sealed, b"aad", Some(&a.id())).unwrap();
        assert_eq!(
            (opened.secret.expose_secret(), opened.key_id),
            ("secret", a.id())
        );
        let opened = ring.open_string(&sealed, b"aad", None).unwrap();
        assert_eq!(
            opened.key_id,
            a.id(),
            "an unnamed value is tried with every key"
        );
        assert_eq!(
            ring.open_string(&sealed, b"aad", Some(&b.id())).err(),
            Some(CryptoError::Decrypt),
            "a named value is opened by that key only"
        );
        let only_c = Keyring::from(c);
        assert!(only_c.open_string(&sealed, b"aad", None).is_err());
        assert!(only_c.open_string(&sealed, b"aad", Some(&a.id())).is_err());
    }

    #[test]
    fn aad_is_unambiguous() {
        assert_ne!(aad(&[b"ab", b"c"]), aad(&[b"a", b"bc"]));
        assert_ne!(aad(&[b"abc"]), aad(&[b"abc", b""]));
        assert_eq!(aad(&[]), Vec::<u8>::new());
    }
}
