//! The connection: an API key and an environment, as in the guide, plus an optional base URL
//! override so tests and the demo can point a connection at a local server.

use piecework_sdk::prelude::*;
use serde::Deserialize;

pub const API_KEY_HELP: &str = "Generate a key at https://internal.company.example/settings";

pub fn definition() -> PieceAuth {
    PieceAuth::custom(
        "Connection",
        [
            Prop::secret_text("api_key", "API Key")
                .required()
                .description(API_KEY_HELP),
            Prop::static_dropdown(
                "environment",
                "Environment",
                [
                    ("Production", "prod"),
                    ("Staging", "staging"),
                    ("Development", "dev"),
                ],
            )
            .required(),
            Prop::short_text("base_url", "Base URL").description(
                "Overrides the environment's URL (e.g. a local mock); leave empty normally",
            ),
        ],
    )
}

/// The connection's values, as `ctx.auth()` returns them.
#[derive(Deserialize)]
pub struct MyCompanyAuth {
    pub api_key: String,
    pub environment: String,
    #[serde(default)]
    pub base_url: Option<String>,
}

impl MyCompanyAuth {
    /// The guide's `getApiUrl(environment)`, unless the connection overrides it.
    pub fn api_url(&self) -> String {
        if let Some(url) = self.base_url.as_deref().filter(|u| !u.is_empty()) {
            return url.trim_end_matches('/').to_owned();
        }
        match self.environment.as_str() {
            "prod" => "https://api.company.example",
            "staging" => "https://api-staging.company.example",
            _ => "http://localhost:3000",
        }
        .to_owned()
    }

    /// The guide's `getApiVersion(environment)`: production runs v2, everything else v1.
    pub fn api_version(&self) -> &'static str {
        if self.environment == "prod" {
            "v2"
        } else {
            "v1"
        }
    }

    /// `<url>/<version><path>`.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}/{}{path}", self.api_url(), self.api_version())
    }
}

/// Checks the key against `/me` when a connection is saved.
pub struct CheckKey;

impl ValidateAuth for CheckKey {
    async fn validate(&self, ctx: &Context) -> Result<(), PieceError> {
        let auth: MyCompanyAuth = ctx.auth()?;
        let request = ctx
            .http
            .get(&auth.endpoint("/me"))?
            .bearer_auth(&auth.api_key);
        match ctx.http.send(request).await {
            Ok(_) => Ok(()),
            Err(err) if err.message().starts_with("HTTP 401") => Err(PieceError::fatal(format!(
                "the API key was rejected ({API_KEY_HELP})"
            ))),
            Err(err) => Err(err.context(format!("cannot reach {}", auth.api_url()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(environment: &str, base_url: Option<&str>) -> MyCompanyAuth {
        MyCompanyAuth {
            api_key: "k".into(),
            environment: environment.into(),
            base_url: base_url.map(Into::into),
        }
    }

    #[test]
    fn the_environment_selects_url_and_version() {
        assert_eq!(
            auth("prod", None).endpoint("/tickets"),
            "https://api.company.example/v2/tickets"
        );
        assert_eq!(
            auth("staging", None).endpoint("/tickets"),
            "https://api-staging.company.example/v1/tickets"
        );
        assert_eq!(
            auth("dev", None).endpoint("/tickets"),
            "http://localhost:3000/v1/tickets"
        );
        assert_eq!(
            auth("prod", Some("http://127.0.0.1:9/")).endpoint("/me"),
            "http://127.0.0.1:9/v2/me"
        );
        assert_eq!(auth("dev", Some("")).api_url(), "http://localhost:3000");
    }
}
