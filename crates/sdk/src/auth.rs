//! How a piece authenticates against the system it integrates with.
//!
//! A connection holds the values for one of these kinds; the worker decrypts them and hands
//! them to the action as `ctx.auth()`. The shapes of the values are fixed per kind, so actions
//! can deserialize them into a typed struct.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::prop::{Check, Prop, PropError, check_props};

/// The auth a piece declares, mirroring `PieceAuth.*` of the pieces framework.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PieceAuth {
    /// The piece needs no connection.
    None,
    /// A single secret string (an API key, a token). Value: `"…"`.
    SecretText {
        display_name: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        description: String,
    },
    /// Username and password. Value: `{"username": "…", "password": "…"}`.
    Basic {
        display_name: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        description: String,
    },
    /// A set of props, e.g. an API key plus an environment dropdown. Value: an object keyed by
    /// prop name.
    Custom {
        display_name: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        description: String,
        props: Vec<Prop>,
    },
    /// OAuth2 tokens. Value: `{"access_token": "…", "refresh_token"?: "…", "token_type"?: "…",
    /// "expires_at"?: "RFC 3339"}`.
    OAuth2 {
        display_name: String,
        auth_url: String,
        token_url: String,
        #[serde(default)]
        scopes: Vec<String>,
    },
}

impl PieceAuth {
    pub fn secret_text(display_name: impl Into<String>) -> Self {
        Self::SecretText {
            display_name: display_name.into(),
            description: String::new(),
        }
    }

    pub fn basic(display_name: impl Into<String>) -> Self {
        Self::Basic {
            display_name: display_name.into(),
            description: String::new(),
        }
    }

    pub fn custom(display_name: impl Into<String>, props: impl IntoIterator<Item = Prop>) -> Self {
        Self::Custom {
            display_name: display_name.into(),
            description: String::new(),
            props: props.into_iter().collect(),
        }
    }

    pub fn oauth2(
        display_name: impl Into<String>,
        auth_url: impl Into<String>,
        token_url: impl Into<String>,
        scopes: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self::OAuth2 {
            display_name: display_name.into(),
            auth_url: auth_url.into(),
            token_url: token_url.into(),
            scopes: scopes.into_iter().map(Into::into).collect(),
        }
    }

    pub fn is_required(&self) -> bool {
        !matches!(self, PieceAuth::None)
    }

    /// Checks connection values against this auth's shape. Errors name the field, never its
    /// value.
    pub fn check_value(&self, value: &Value) -> Result<(), PropError> {
        fn object(value: &Value) -> Result<&Map<String, Value>, PropError> {
            value
                .as_object()
                .ok_or_else(|| PropError::new("(connection)", "expected an object of values"))
        }
        fn string_field(map: &Map<String, Value>, field: &str) -> Result<(), PropError> {
            match map.get(field) {
                Some(Value::String(s)) if !s.is_empty() => Ok(()),
                Some(_) => Err(PropError::new(field, "expected non-empty text")),
                None => Err(PropError::new(field, "is required")),
            }
        }
        match self {
            PieceAuth::None => Ok(()),
            PieceAuth::SecretText { .. } => match value {
                Value::String(s) if !s.is_empty() => Ok(()),
                _ => Err(PropError::new("(secret)", "expected non-empty text")),
            },
            PieceAuth::Basic { .. } => {
                let map = object(value)?;
                string_field(map, "username")?;
                string_field(map, "password")
            }
            PieceAuth::OAuth2 { .. } => string_field(object(value)?, "access_token"),
            PieceAuth::Custom { props, .. } => {
                match check_props(props, object(value)?, Check::Runtime)
                    .into_iter()
                    .next()
                {
                    Some(err) => Err(err),
                    None => Ok(()),
                }
            }
        }
    }
}

impl PieceAuth {
    /// The secret parts of connection values of this kind — a secret text, a password, tokens,
    /// the custom props declared secret — for masking wherever text may echo them. Values
    /// shorter than 4 characters are left out: masking them would garble ordinary text.
    pub fn secret_values<'v>(&self, value: &'v Value) -> Vec<&'v str> {
        let field = |name: &str| value.get(name).and_then(Value::as_str);
        let found: Vec<&str> = match self {
            PieceAuth::None => Vec::new(),
            PieceAuth::SecretText { .. } => value.as_str().into_iter().collect(),
            PieceAuth::Basic { .. } => field("password").into_iter().collect(),
            PieceAuth::OAuth2 { .. } => ["access_token", "refresh_token"]
                .into_iter()
                .filter_map(field)
                .collect(),
            PieceAuth::Custom { props, .. } => props
                .iter()
                .filter(|p| p.is_secret())
                .filter_map(|p| field(&p.name))
                .collect(),
        };
        found.into_iter().filter(|s| s.len() >= 4).collect()
    }
}

/// A check of connection values against the real system (e.g. calling `/me` with the key),
/// run when a connection is saved, after the values matched the auth's shape.
pub trait ValidateAuth: Send + Sync + 'static {
    /// `ctx.auth()` holds the values being saved. Return a fatal error whose message says
    /// what is wrong (never the values).
    fn validate(
        &self,
        ctx: &crate::Context,
    ) -> impl Future<Output = Result<(), crate::PieceError>> + Send;
}

/// The object-safe form of [`ValidateAuth`].
pub trait DynValidateAuth: Send + Sync {
    fn validate<'a>(
        &'a self,
        ctx: &'a crate::Context,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::PieceError>>;
}

impl<T: ValidateAuth> DynValidateAuth for T {
    fn validate<'a>(
        &'a self,
        ctx: &'a crate::Context,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::PieceError>> {
        Box::pin(ValidateAuth::validate(self, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn custom_auth_checks_its_props() {
        let auth = PieceAuth::custom(
            "Connection",
            [
                Prop::secret_text("api_key", "API Key").required(),
                Prop::static_dropdown(
                    "environment",
                    "Environment",
                    [("Prod", "prod"), ("Dev", "dev")],
                )
                .required(),
            ],
        );
        assert!(
            auth.check_value(&json!({"api_key": "k", "environment": "prod"}))
                .is_ok()
        );
        let err = auth
            .check_value(&json!({"api_key": "k", "environment": "moon"}))
            .unwrap_err();
        assert_eq!(err.prop, "environment");
        let err = auth
            .check_value(&json!({"environment": "dev"}))
            .unwrap_err();
        assert_eq!(err.to_string(), "prop `api_key`: is required");
    }

    #[test]
    fn secret_values_are_the_secret_parts_only() {
        let auth = PieceAuth::custom(
            "Connection",
            [
                Prop::secret_text("api_key", "API Key").required(),
                Prop::short_text("environment", "Environment"),
            ],
        );
        let value = json!({"api_key": "k-123456", "environment": "production"});
        assert_eq!(auth.secret_values(&value), ["k-123456"]);
        let basic = PieceAuth::basic("Login");
        let value = json!({"username": "ada", "password": "hunter22"});
        assert_eq!(basic.secret_values(&value), ["hunter22"]);
        assert_eq!(
            PieceAuth::secret_text("Key").secret_values(&json!("abc")),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn errors_never_echo_secret_values() {
        let auth = PieceAuth::basic("Login");
        let err = auth
            .check_value(&json!({"username": "u", "password": 12345}))
            .unwrap_err();
        assert!(!err.to_string().contains("12345"));
    }
}
