//! Encryption of connection values at rest.
//!
//! AES-256-GCM with a random 96-bit nonce per value and what the value belongs to as associated
//! data (a connection's name and piece, a webhook flow's id), so a sealed value cannot be
//! moved onto another connection or piece. Every sealed value names the key that sealed it:
//! the keyring seals with its first key and opens with any key it holds, which is how keys
//! rotate (put the new key first, `piecework key rotate` re-seals everything under it, then
//! drop the old one).
//!
//! Keys come from `PW_ENCRYPTION_KEY`: `id:base64` pairs, comma-separated, the first one
//! current (`k2:…,k1:…`); a single bare base64 key gets the id `default`. Nothing here ever puts
//! key material or plaintext in an error or a `Debug` output.

use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    #[error("PW_ENCRYPTION_KEY: {0}")]
    BadKey(String),
    #[error(
        "no encryption key is configured: set PW_ENCRYPTION_KEY (generate one with `piecework key generate`)"
    )]
    NoKey,
    #[error(
        "{what} was encrypted with key `{key_id}`, which is not configured (configured: {configured})"
    )]
    UnknownKey {
        what: String,
        key_id: String,
        configured: String,
    },
    #[error(
        "{what} cannot be decrypted with key `{key_id}`: the key is wrong or the data was altered"
    )]
    Undecryptable { what: String, key_id: String },
}

/// A value sealed by a [`Keyring`], as stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: String,
    pub ciphertext: String,
    /// Which associated data the owner bound it to, for owners whose binding changed: a
    /// connection sealed before it was bound to its piece as well as its name has 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub binding: u8,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Compares without stopping at the first difference (the length is not secret): for keys,
/// tokens and signatures given by callers.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `N` bytes from the system's secure random number generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random number generator works");
    bytes
}

/// What an encryption key is hashed with to derive the key that hashes API keys, so that
/// the two uses never share a key.
const HASH_KEY_LABEL: &[u8] = b"piecework api-key hash v1";

/// The configured encryption keys.
#[derive(Clone)]
pub struct Keyring {
    current: String,
    keys: HashMap<String, Aes256Gcm>,
    /// Per key id, the HMAC-SHA256 key that hashes API keys, derived from the encryption key.
    hash_keys: HashMap<String, ring::hmac::Key>,
    order: Vec<String>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.order)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Parses `id:base64[,id:base64…]` (first is current) or one bare base64 key.
    pub fn parse(spec: &str) -> Result<Self, SecretsError> {
        let mut keys = HashMap::new();
        let mut hash_keys = HashMap::new();
        let mut order = Vec::new();
        for (i, entry) in spec
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (id, encoded) = match entry.split_once(':') {
                Some((id, encoded)) => (id.trim().to_owned(), encoded.trim()),
                None => ("default".to_owned(), entry),
            };
            let valid_id = !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid_id {
                return Err(SecretsError::BadKey(format!(
                    "key {} has an invalid id (letters, digits, - and _)",
                    i + 1
                )));
            }
            let bytes = BASE64
                .decode(encoded)
                .map_err(|_| SecretsError::BadKey(format!("key `{id}` is not valid base64")))?;
            if bytes.len() != 32 {
                return Err(SecretsError::BadKey(format!(
                    "key `{id}` must be 32 bytes (256 bits) of base64, got {} bytes",
                    bytes.len()
                )));
            }
            let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
            let hash_key = ring::hmac::sign(&derive, HASH_KEY_LABEL);
            hash_keys.insert(
                id.clone(),
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, hash_key.as_ref()),
            );
            if keys
                .insert(
                    id.clone(),
                    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)),
                )
                .is_some()
            {
                return Err(SecretsError::BadKey(format!("key id `{id}` appears twice")));
            }
            order.push(id);
        }
        let current = order.first().cloned().ok_or(SecretsError::NoKey)?;
        Ok(Self {
            current,
            keys,
            hash_keys,
            order,
        })
    }

    /// A fresh random key in `PW_ENCRYPTION_KEY` form, with the given id.
    pub fn generate_spec(id: &str) -> String {
        let key = Aes256Gcm::generate_key(OsRng);
        format!("{id}:{}", BASE64.encode(key))
    }

    pub fn current_id(&self) -> &str {
        &self.current
    }

    pub fn key_ids(&self) -> &[String] {
        &self.order
    }

    /// The keyed hash (HMAC-SHA256, base64) of `secret` under the current key, with that
    /// key's id: how API keys are stored.
    pub fn hash(&self, secret: &[u8]) -> (String, String) {
        let tag = ring::hmac::sign(&self.hash_keys[&self.current], secret);
        (self.current.clone(), BASE64.encode(tag.as_ref()))
    }

    /// Whether `hash` (from [`Keyring::hash`] under `key_id`) is the hash of `secret`, compared
    /// in constant time. `false` when the key id is no longer configured.
    pub fn verify_hash(&self, key_id: &str, secret: &[u8], hash: &str) -> bool {
        let (Some(key), Ok(tag)) = (self.hash_keys.get(key_id), BASE64.decode(hash)) else {
            return false;
        };
        ring::hmac::verify(key, secret, &tag).is_ok()
    }

    /// A URL-safe tag of `message` under the current key: `<key id>.<base64url HMAC-SHA256>`,
    /// for tokens the API verifies later (resume URLs).
    pub fn sign(&self, message: &[u8]) -> String {
        let tag = ring::hmac::sign(&self.hash_keys[&self.current], message);
        format!("{}.{}", self.current, URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Whether `token` is [`Keyring::sign`] of `message` under a configured key, compared in
    /// constant time.
    pub fn verify(&self, message: &[u8], token: &str) -> bool {
        let Some((key_id, tag)) = token.rsplit_once('.') else {
            return false;
        };
        let (Some(key), Ok(tag)) = (self.hash_keys.get(key_id), URL_SAFE_NO_PAD.decode(tag)) else {
            return false;
        };
        ring::hmac::verify(key, message, &tag).is_ok()
    }

    /// Encrypts `plaintext`, bound to `context` (the connection's name).
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Sealed {
        let cipher = &self.keys[&self.current];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer does not fail");
        Sealed {
            key_id: self.current.clone(),
            nonce: BASE64.encode(nonce),
            ciphertext: BASE64.encode(ciphertext),
            binding: 0,
        }
    }

    /// Decrypts a value sealed for `context`; `what` names it in errors.
    pub fn open(
        &self,
        sealed: &Sealed,
        context: &str,
        what: &str,
    ) -> Result<Vec<u8>, SecretsError> {
        let cipher = self
            .keys
            .get(&sealed.key_id)
            .ok_or_else(|| SecretsError::UnknownKey {
                what: what.to_owned(),
                key_id: sealed.key_id.clone(),
                configured: self.order.join(", "),
            })?;
        let undecryptable = || SecretsError::Undecryptable {
            what: what.to_owned(),
            key_id: sealed.key_id.clone(),
        };
        let nonce = BASE64.decode(&sealed.nonce).map_err(|_| undecryptable())?;
        let ciphertext = BASE64
            .decode(&sealed.ciphertext)
            .map_err(|_| undecryptable())?;
        if nonce.len() != 12 {
            return Err(undecryptable());
        }
        cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| undecryptable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_under_their_key_id_only() {
        let old = Keyring::generate_spec("k1");
        let ring = Keyring::parse(&old).unwrap();
        let (key_id, hash) = ring.hash(b"secret");
        assert_eq!(key_id, "k1");
        assert!(ring.verify_hash("k1", b"secret", &hash));
        assert!(!ring.verify_hash("k1", b"secreT", &hash));
        assert!(!ring.verify_hash("k2", b"secret", &hash));
        assert!(!ring.verify_hash("k1", b"secret", "not base64!"));
        // After a rotation the old key id still verifies; without it, nothing does.
        let rotated = Keyring::parse(&format!("{},{old}", Keyring::generate_spec("k2"))).unwrap();
        assert!(rotated.verify_hash("k1", b"secret", &hash));
        assert_eq!(rotated.hash(b"secret").0, "k2");
        let other = Keyring::parse(&Keyring::generate_spec("k1")).unwrap();
        assert!(
            !other.verify_hash("k1", b"secret", &hash),
            "another key, same id"
        );
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let ring = Keyring::parse(&Keyring::generate_spec("k1")).unwrap();
        let sealed = ring.seal(br#"{"api_key":"s3cr3t"}"#, "prod-tickets");
        assert_eq!(sealed.key_id, "k1");
        assert!(!sealed.ciphertext.contains("s3cr3t"));
        assert!(!format!("{sealed:?}{ring:?}").contains(&sealed.ciphertext));
        assert_eq!(
            ring.open(&sealed, "prod-tickets", "connection `prod-tickets`")
                .unwrap(),
            br#"{"api_key":"s3cr3t"}"#
        );
        let moved = ring
            .open(&sealed, "other", "connection `other`")
            .unwrap_err();
        assert!(
            moved
                .to_string()
                .contains("the key is wrong or the data was altered"),
            "{moved}"
        );
    }

    #[test]
    fn a_wrong_or_missing_key_fails_clearly() {
        let old = Keyring::parse(&Keyring::generate_spec("k1")).unwrap();
        let sealed = old.seal(b"x", "c");
        let other = Keyring::parse(&Keyring::generate_spec("k1")).unwrap();
        assert!(matches!(
            other.open(&sealed, "c", "connection `c`"),
            Err(SecretsError::Undecryptable { .. })
        ));
        let rotated = Keyring::parse(&Keyring::generate_spec("k2")).unwrap();
        let err = rotated.open(&sealed, "c", "connection `c`").unwrap_err();
        assert_eq!(
            err.to_string(),
            "connection `c` was encrypted with key `k1`, which is not configured (configured: k2)"
        );
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let k1 = Keyring::generate_spec("k1");
        let old = Keyring::parse(&k1).unwrap();
        let sealed = old.seal(b"x", "c");
        let both = Keyring::parse(&format!("{},{k1}", Keyring::generate_spec("k2"))).unwrap();
        assert_eq!(both.open(&sealed, "c", "c").unwrap(), b"x");
        assert_eq!(both.seal(b"y", "c").key_id, "k2");
    }

    #[test]
    fn bad_key_specs_say_what_is_wrong_without_echoing_the_key() {
        let err = Keyring::parse("k1:c2hvcnQ=").unwrap_err();
        assert_eq!(
            err.to_string(),
            "PW_ENCRYPTION_KEY: key `k1` must be 32 bytes (256 bits) of base64, got 5 bytes"
        );
        assert!(
            Keyring::parse("k1:!!!")
                .unwrap_err()
                .to_string()
                .contains("not valid base64")
        );
        assert_eq!(Keyring::parse("").unwrap_err(), SecretsError::NoKey);
        let bare = Keyring::generate_spec("x")
            .split_once(':')
            .unwrap()
            .1
            .to_owned();
        assert_eq!(Keyring::parse(&bare).unwrap().current_id(), "default");
    }
}
