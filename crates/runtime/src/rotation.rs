//! Encryption key rotation: re-sealing every stored secret under the current key.
//!
//! The procedure (docs/operating.md): put the new key first in `PW_ENCRYPTION_KEY` on every
//! process, keeping the old one after it (`k2:…,k1:…`), so everything sealed under either
//! opens; then [`Runtime::rotate_keys`] (`piecework key rotate`, `POST /v1/keys/rotate`)
//! re-seals every connection and webhook secret under the new key inside the process that
//! runs it — no plaintext leaves it — and reports what still needs the old key. API keys
//! cannot be re-hashed without their plaintext: each is re-hashed the next time it is used
//! ([`Runtime::authenticate`]). Once nothing needs the old key, drop it.
//!
//! Every write is a compare-and-swap against what was read, so a connection saved (or a
//! secret rotated) meanwhile is never overwritten with older values.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::{Actor, CONNECTION_BINDING, Runtime, RuntimeError, secrets};

/// What a rotation did, per kind of secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Resealed {
    /// Re-sealed under the current key.
    pub resealed: usize,
    /// Already sealed under the current key (and, for connections, bound to their piece).
    pub current: usize,
    /// Changed by someone else while the rotation ran: theirs stands (sealed under the
    /// current key already).
    pub changed_meanwhile: usize,
}

/// An API key hashed under another encryption key than the current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct PendingApiKey {
    pub name: String,
    pub key_id: String,
}

/// The report of [`Runtime::rotate_keys`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Rotation {
    /// The key everything is sealed under now.
    pub key_id: String,
    pub connections: Resealed,
    pub webhook_secrets: Resealed,
    /// Keys that are re-hashed at their next use; until then they need their key id.
    pub api_keys_pending: Vec<PendingApiKey>,
    /// What could not be opened, and why (never a value).
    pub failed: Vec<String>,
    /// Key ids something stored still needs: keep them in `PW_ENCRYPTION_KEY`.
    pub still_needed: Vec<String>,
}

impl Runtime {
    /// Re-seals every connection and webhook secret under the current key. Audited as
    /// `keys.rotate` — as a failure when something could not be re-sealed, though the rest
    /// was, and the report says what.
    pub async fn rotate_keys(&self, actor: &Actor) -> Result<Rotation, RuntimeError> {
        let started = std::time::Instant::now();
        let resource = format!("keys/{}", self.keyring()?.current_id());
        let result = self.reseal_everything().await;
        let error = match &result {
            Err(err) => Some(err.to_string()),
            Ok(rotation) if !rotation.failed.is_empty() => Some(format!(
                "{} secret(s) could not be re-sealed: {}",
                rotation.failed.len(),
                rotation.failed.join("; ")
            )),
            Ok(_) => None,
        };
        self.audit(actor, "keys.rotate", &resource, started, error.as_ref())
            .await;
        result
    }

    async fn reseal_everything(&self) -> Result<Rotation, RuntimeError> {
        let keyring = self.keyring()?;
        let current = keyring.current_id().to_owned();
        let mut rotation = Rotation {
            key_id: current.clone(),
            ..Rotation::default()
        };
        let mut still_needed = BTreeSet::new();

        for record in self.store.list_connections().await? {
            let sealed = match serde_json::from_str::<secrets::Sealed>(&record.secret) {
                Ok(sealed) => sealed,
                Err(_) => {
                    rotation.failed.push(format!(
                        "connection `{}` is stored in an unreadable form",
                        record.name
                    ));
                    continue;
                }
            };
            if sealed.key_id == current && sealed.binding == CONNECTION_BINDING {
                rotation.connections.current += 1;
                continue;
            }
            let plaintext = match self.open_connection_bytes(&record) {
                Ok(plaintext) => plaintext,
                Err(err) => {
                    still_needed.insert(sealed.key_id.clone());
                    rotation.failed.push(err.to_string());
                    continue;
                }
            };
            let resealed = self.seal_connection_values(&plaintext, &record.name, &record.piece)?;
            let mut new = record.clone();
            new.key_id = resealed.key_id.clone();
            new.secret = serde_json::to_string(&resealed).expect("sealed values serialize");
            if self.store.reseal_connection(&record, &new).await? {
                rotation.connections.resealed += 1;
            } else {
                rotation.connections.changed_meanwhile += 1;
            }
        }

        for flow in self.store.list_flows().await? {
            let Some(text) = self.store.get_webhook_secret(&flow.id).await? else {
                continue;
            };
            let key_id = serde_json::from_str::<secrets::Sealed>(&text)
                .map(|s| s.key_id)
                .unwrap_or_default();
            if key_id == current {
                rotation.webhook_secrets.current += 1;
                continue;
            }
            let secret = match self.webhook_secret(&flow.id).await {
                Ok(Some(secret)) => secret,
                Ok(None) => continue,
                Err(err) => {
                    still_needed.insert(key_id);
                    rotation.failed.push(err.to_string());
                    continue;
                }
            };
            let resealed = self.seal_webhook_secret(&flow.id, &secret)?;
            if self
                .store
                .reseal_webhook_secret(&flow.id, &text, &resealed)
                .await?
            {
                rotation.webhook_secrets.resealed += 1;
            } else {
                rotation.webhook_secrets.changed_meanwhile += 1;
            }
        }

        for key in self.store.list_api_keys().await? {
            if key.key_id != current {
                still_needed.insert(key.key_id.clone());
                rotation.api_keys_pending.push(PendingApiKey {
                    name: key.name,
                    key_id: key.key_id,
                });
            }
        }
        still_needed.remove(&current);
        rotation.still_needed = still_needed.into_iter().collect();
        Ok(rotation)
    }
}
