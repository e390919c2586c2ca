//! `send_request`.

use std::collections::BTreeMap;
use std::time::Duration;

use piecework_sdk::prelude::*;
use piecework_sdk::reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

pub struct SendRequest;

/// How a request authenticates, when its step names a connection.
pub fn auth() -> PieceAuth {
    let kinds = [
        ("Bearer token", "bearer"),
        ("Basic auth", "basic"),
        ("A header", "header"),
    ];
    PieceAuth::custom(
        "HTTP credentials",
        [
            Prop::static_dropdown("kind", "Kind", kinds).required(),
            Prop::secret_text("token", "Token")
                .description("The bearer token, or the header's value"),
            Prop::short_text("username", "Username"),
            Prop::secret_text("password", "Password"),
            Prop::short_text("header", "Header name")
                .description("For `header`: the header that carries the token (default X-Api-Key)"),
        ],
    )
}

#[derive(Deserialize)]
struct Credentials {
    kind: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    header: Option<String>,
}

/// Adds the connection's credentials to `request`; errors name what is missing, never a value.
fn authenticate(
    request: piecework_sdk::reqwest::RequestBuilder,
    credentials: Credentials,
) -> Result<piecework_sdk::reqwest::RequestBuilder, PieceError> {
    let missing = |field: &str| {
        PieceError::fatal(format!(
            "the connection is of kind `{}` but has no `{field}`",
            credentials.kind
        ))
    };
    match credentials.kind.as_str() {
        "bearer" => Ok(request.bearer_auth(
            credentials
                .token
                .as_deref()
                .ok_or_else(|| missing("token"))?,
        )),
        "basic" => Ok(request.basic_auth(
            credentials
                .username
                .as_deref()
                .ok_or_else(|| missing("username"))?,
            Some(
                credentials
                    .password
                    .as_deref()
                    .ok_or_else(|| missing("password"))?,
            ),
        )),
        "header" => {
            let name = credentials.header.as_deref().unwrap_or("X-Api-Key");
            let token = credentials
                .token
                .as_deref()
                .ok_or_else(|| missing("token"))?;
            Ok(request.header(name, token))
        }
        other => Err(PieceError::fatal(format!(
            "connection kind {other:?}: expected bearer, basic or header"
        ))),
    }
}

#[derive(Deserialize)]
pub struct Input {
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    query: BTreeMap<String, Value>,
    #[serde(default)]
    body: Option<Value>,
    timeout_seconds: f64,
    fail_on_error: bool,
}

impl Action for SendRequest {
    type Input = Input;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        let methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"].map(|m| (m, m));
        ActionSpec::new("send_request", "Send request")
            .description("Sends a request; outputs {status, headers, body} (body parsed as JSON when it is JSON)")
            .prop(Prop::static_dropdown("method", "Method", methods).default_value("GET"))
            .prop(Prop::short_text("url", "URL").required())
            .prop(Prop::object("headers", "Headers"))
            .prop(Prop::object("query", "Query parameters"))
            .prop(Prop::json("body", "Body").description("Sent as JSON; a string is sent as text"))
            .prop(Prop::number("timeout_seconds", "Timeout (seconds)").default_value(30))
            .prop(
                Prop::checkbox("fail_on_error", "Fail on error status")
                    .default_value(true)
                    .description("When off, 4xx and 5xx responses are outputs instead of errors"),
            )
    }

    async fn run(&self, ctx: &Context, input: Input) -> Result<Value, PieceError> {
        let method = Method::from_bytes(input.method.as_bytes()).map_err(|_| {
            PieceError::fatal(format!(
                "prop `method`: {:?} is not an HTTP method",
                input.method
            ))
        })?;
        if !(input.timeout_seconds > 0.0 && input.timeout_seconds <= 3600.0) {
            return Err(PieceError::fatal(
                "prop `timeout_seconds`: must be between 0 and 3600",
            ));
        }
        let query: Vec<(String, String)> = input
            .query
            .into_iter()
            .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
            .collect();
        let mut request = ctx
            .http
            .request(method, &input.url)?
            .timeout(Duration::from_secs_f64(input.timeout_seconds))
            .query(&query)
            .header("Idempotency-Key", &ctx.run.idempotency_key);
        for (name, value) in &input.headers {
            request = request.header(name, value);
        }
        if ctx.auth_value().is_some() {
            request = authenticate(request, ctx.auth()?)?;
        }
        request = match input.body {
            None | Some(Value::Null) => request,
            Some(Value::String(text)) => request.body(text),
            Some(json) => request.json(&json),
        };
        let response = if input.fail_on_error {
            ctx.http.send(request).await?
        } else {
            ctx.http.fetch(request).await?
        };
        let status = response.status().as_u16();
        let headers: BTreeMap<String, String> = response
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(json!({ "status": status, "headers": headers, "body": body }))
    }
}
