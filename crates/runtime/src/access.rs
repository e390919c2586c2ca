//! Named API keys: created with a role, shown once, stored as a keyed hash, revoked at once.
//!
//! A key is checked against the store on every request (one read), so a revoked key stops
//! working on every api process as soon as it is deleted.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use piecework_core::access::{self, KEY_PREFIX, Role};
use piecework_store::ApiKeyRecord;
use serde::Serialize;

use crate::{Actor, Runtime, RuntimeError};

/// The name of the admin key that comes from the environment (`PW_API_KEY`); no stored key
/// may take it.
pub const BOOTSTRAP: &str = "bootstrap";

/// What the API shows of a key: never the key, nor its hash.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct ApiKeyInfo {
    pub name: String,
    pub role: Role,
    /// The encryption key its hash is keyed with: it must stay in `PW_ENCRYPTION_KEY`.
    pub key_id: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

impl From<ApiKeyRecord> for ApiKeyInfo {
    fn from(record: ApiKeyRecord) -> Self {
        Self {
            name: record.name,
            role: record.role,
            key_id: record.key_id,
            created_at: record.created_at,
            created_by: record.created_by,
        }
    }
}

/// A caller the API has recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name (`bootstrap` for the key from the environment).
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Who it is in the audit trail: `api:NAME`.
    pub fn actor(&self) -> Actor {
        Actor::api(&self.name)
    }

    /// Who it is as the starter of a run.
    pub fn principal(&self) -> piecework_sdk::Principal {
        piecework_sdk::Principal::new(
            format!("api:{}", self.name),
            Some(self.role.as_str().to_owned()),
        )
    }
}

fn new_secret() -> String {
    URL_SAFE_NO_PAD.encode(crate::secrets::random_bytes::<32>())
}

impl Runtime {
    /// Creates a key; the answer holds the key itself, which is never shown again. Audited
    /// as `api_key.create`.
    pub async fn create_api_key(
        &self,
        name: &str,
        role: Role,
        actor: &Actor,
    ) -> Result<(ApiKeyInfo, String), RuntimeError> {
        self.audited(
            actor,
            "api_key.create",
            &format!("api-key/{name}"),
            self.insert_api_key(name, role, actor),
        )
        .await
    }

    async fn insert_api_key(
        &self,
        name: &str,
        role: Role,
        actor: &Actor,
    ) -> Result<(ApiKeyInfo, String), RuntimeError> {
        access::check_key_name(name).map_err(RuntimeError::Invalid)?;
        if name == BOOTSTRAP {
            return Err(RuntimeError::Invalid(format!(
                "`{BOOTSTRAP}` is the name of the key from PW_API_KEY; choose another"
            )));
        }
        let secret = new_secret();
        let (key_id, hash) = self.keyring()?.hash(secret.as_bytes());
        let record = ApiKeyRecord {
            name: name.to_owned(),
            role,
            hash,
            key_id,
            created_at: Utc::now(),
            created_by: actor.0.clone(),
        };
        if !self.store.create_api_key(&record).await? {
            return Err(RuntimeError::Conflict(format!(
                "an API key named `{name}` exists; revoke it first or choose another name"
            )));
        }
        Ok((record.into(), format!("{KEY_PREFIX}{name}_{secret}")))
    }

    /// Every key, by name.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, RuntimeError> {
        Ok(self
            .store
            .list_api_keys()
            .await?
            .into_iter()
            .map(ApiKeyInfo::from)
            .collect())
    }

    /// Deletes a key: from the next request on, no api process accepts it. Audited as
    /// `api_key.revoke`.
    pub async fn revoke_api_key(&self, name: &str, actor: &Actor) -> Result<(), RuntimeError> {
        let revoke = async {
            match self.store.delete_api_key(name).await? {
                true => Ok(()),
                false => Err(RuntimeError::NoSuchApiKey(name.to_owned())),
            }
        };
        self.audited(actor, "api_key.revoke", &format!("api-key/{name}"), revoke)
            .await
    }

    /// The caller a stored key belongs to; `None` for a key that is malformed, unknown,
    /// revoked or wrong.
    pub async fn authenticate(&self, key: &str) -> Result<Option<Caller>, RuntimeError> {
        let Some((name, secret)) = access::split_key(key) else {
            return Ok(None);
        };
        let Some(record) = self.store.get_api_key(name).await? else {
            return Ok(None);
        };
        let keyring = self.keyring()?;
        if !keyring.verify_hash(&record.key_id, secret.as_bytes(), &record.hash) {
            return Ok(None);
        }
        if record.key_id != keyring.current_id() {
            self.rehash(&record, secret).await;
        }
        Ok(Some(Caller {
            name: record.name,
            role: record.role,
        }))
    }

    /// Re-hashes a key hashed under an older encryption key, now that its plaintext is at
    /// hand (key rotation cannot: it never sees keys). Best effort: a failure leaves the old
    /// hash, which keeps working while its key is configured.
    async fn rehash(&self, record: &ApiKeyRecord, secret: &str) {
        let Ok(keyring) = self.keyring() else { return };
        let (key_id, hash) = keyring.hash(secret.as_bytes());
        let rehashed = ApiKeyRecord {
            hash,
            key_id,
            ..record.clone()
        };
        match self.store.rehash_api_key(record, &rehashed).await {
            Ok(true) => {
                tracing::info!(key = %record.name, from = %record.key_id, to = %rehashed.key_id, "api key re-hashed under the current encryption key");
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(key = %record.name, error = %err, "cannot re-hash an api key");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_url_safe() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
