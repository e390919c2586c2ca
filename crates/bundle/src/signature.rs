//! ed25519 signatures over bundle digests.
//!
//! A publisher signs a bundle's digest with a private key (`piecework piece keygen` makes one,
//! `piecework piece sign` uses it) and ships the signature beside the bundle
//! (`NAME-VERSION.piece.tgz.sig`) or with the publish; a host given `PW_TRUSTED_KEYS` runs only
//! bundles signed by one of those keys. What is signed is the digest under a fixed context
//! string, so a signature cannot be replayed for another purpose.
//!
//! Text forms: a private key is `ID:BASE64(PKCS#8)`, a public key `ID:BASE64(32 bytes)`, and
//! `PW_TRUSTED_KEYS` is a comma-separated list of public keys.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// What is signed, before the digest.
const CONTEXT: &[u8] = b"piecework bundle signature v1\n";

/// A signature as shipped beside a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The id of the key that signed.
    pub key: String,
    /// The digest signed.
    pub digest: Digest,
    /// The ed25519 signature, base64.
    pub signature: String,
}

/// Why a signature or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("{0}")]
    BadKey(String),
    #[error("the bundle is not signed, and PW_TRUSTED_KEYS requires a signature by one of: {0}")]
    Unsigned(String),
    #[error("the signature is by key `{0}`, which is not in PW_TRUSTED_KEYS (trusted: {1})")]
    UntrustedKey(String, String),
    #[error("the signature is for bundle {signed}, not this one ({actual})")]
    OtherBundle { signed: Digest, actual: Digest },
    #[error("the signature by key `{0}` does not verify: the bundle or the signature was altered")]
    Invalid(String),
}

fn key_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A private signing key.
pub struct SigningKey {
    id: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key, as its private text form (`ID:BASE64`).
    pub fn generate(id: &str) -> Result<String, SignatureError> {
        if !key_id_ok(id) {
            return Err(SignatureError::BadKey(format!(
                "key id {id:?} must be 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| SignatureError::BadKey("cannot generate a key".into()))?;
        Ok(format!("{id}:{}", BASE64.encode(pkcs8.as_ref())))
    }

    /// Reads the private text form. The error never repeats the key.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let bad = |why: &str| SignatureError::BadKey(format!("signing key: {why}"));
        let (id, encoded) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| bad("expected ID:BASE64"))?;
        if !key_id_ok(id) {
            return Err(bad("the id must be letters, digits, '-', '_' or '.'"));
        }
        let pkcs8 = BASE64
            .decode(encoded)
            .map_err(|_| bad("the key is not base64"))?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| bad("not an ed25519 private key (PKCS#8)"))?;
        Ok(Self {
            id: id.to_owned(),
            pair,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public half, as `PW_TRUSTED_KEYS` lists it (`ID:BASE64`).
    pub fn public_key(&self) -> String {
        format!(
            "{}:{}",
            self.id,
            BASE64.encode(self.pair.public_key().as_ref())
        )
    }

    pub fn sign(&self, digest: &Digest) -> Signature {
        let signature = self.pair.sign(&message(digest));
        Signature {
            key: self.id.clone(),
            digest: digest.clone(),
            signature: BASE64.encode(signature.as_ref()),
        }
    }
}

fn message(digest: &Digest) -> Vec<u8> {
    [CONTEXT, digest.as_str().as_bytes()].concat()
}

/// The public keys a host trusts (`PW_TRUSTED_KEYS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl TrustedKeys {
    /// Parses `ID:BASE64,ID:BASE64`; an empty string trusts nothing (and requires nothing).
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let mut keys = Vec::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = |why: String| SignatureError::BadKey(format!("PW_TRUSTED_KEYS: {why}"));
            let (id, encoded) = item
                .split_once(':')
                .ok_or_else(|| bad(format!("{item:?} is not ID:BASE64")))?;
            if !key_id_ok(id) {
                return Err(bad(format!(
                    "key id {id:?} must be letters, digits, '-', '_' or '.'"
                )));
            }
            let key = BASE64
                .decode(encoded)
                .map_err(|_| bad(format!("key `{id}` is not base64")))?;
            if key.len() != 32 {
                return Err(bad(format!(
                    "key `{id}` is {} bytes; an ed25519 public key is 32",
                    key.len()
                )));
            }
            if keys.iter().any(|(known, _)| known == id) {
                return Err(bad(format!("key id `{id}` is listed twice")));
            }
            keys.push((id.to_owned(), key));
        }
        Ok(Self { keys })
    }

    /// Whether signatures are required (some key is trusted).
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn ids(&self) -> String {
        self.keys
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks a bundle's signature: `Ok(Some(key))` when signed by a trusted key, `Ok(None)`
    /// when nothing is required and it is unsigned. A signature that is present is always
    /// checked, even when none is required, so a tampered one is never waved through.
    pub fn verify(
        &self,
        digest: &Digest,
        signature: Option<&Signature>,
    ) -> Result<Option<String>, SignatureError> {
        let Some(signature) = signature else {
            return if self.required() {
                Err(SignatureError::Unsigned(self.ids()))
            } else {
                Ok(None)
            };
        };
        if &signature.digest != digest {
            return Err(SignatureError::OtherBundle {
                signed: signature.digest.clone(),
                actual: digest.clone(),
            });
        }
        let Some((_, key)) = self.keys.iter().find(|(id, _)| *id == signature.key) else {
            return if self.required() {
                Err(SignatureError::UntrustedKey(
                    signature.key.clone(),
                    self.ids(),
                ))
            } else {
                Ok(None)
            };
        };
        let bytes = BASE64
            .decode(&signature.signature)
            .map_err(|_| SignatureError::Invalid(signature.key.clone()))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&message(digest), &bytes)
            .map_err(|_| SignatureError::Invalid(signature.key.clone()))?;
        Ok(Some(signature.key.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_bundle_and_key() {
        let key = SigningKey::parse(&SigningKey::generate("ci").unwrap()).unwrap();
        let other = SigningKey::parse(&SigningKey::generate("laptop").unwrap()).unwrap();
        let trusted = TrustedKeys::parse(&key.public_key()).unwrap();
        let digest = Digest::of(b"bundle");
        let signed = key.sign(&digest);
        assert_eq!(
            trusted.verify(&digest, Some(&signed)).unwrap().as_deref(),
            Some("ci")
        );

        let err = trusted.verify(&digest, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the bundle is not signed, and PW_TRUSTED_KEYS requires a signature by one of: ci"
        );
        let elsewhere = Digest::of(b"another bundle");
        assert!(matches!(
            trusted.verify(&elsewhere, Some(&signed)),
            Err(SignatureError::OtherBundle { .. })
        ));
        let err = trusted
            .verify(&digest, Some(&other.sign(&digest)))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("`laptop`, which is not in PW_TRUSTED_KEYS"),
            "{err}"
        );
        let mut forged = signed.clone();
        forged.signature = other.sign(&digest).signature;
        assert!(matches!(
            trusted.verify(&digest, Some(&forged)),
            Err(SignatureError::Invalid(_))
        ));
        // Nothing trusted: unsigned passes.
        assert_eq!(TrustedKeys::default().verify(&digest, None).unwrap(), None);
    }

    #[test]
    fn bad_keys_are_named_never_echoed() {
        let err = TrustedKeys::parse("ci:AAAA").unwrap_err().to_string();
        assert!(err.contains("is 3 bytes"), "{err}");
        let err = SigningKey::parse("ci:c2VjcmV0LXN0dWZm")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("c2VjcmV0"), "{err}");
        assert!(SigningKey::generate("bad id").is_err());
    }
}
