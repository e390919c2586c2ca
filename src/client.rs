//! A small client of the piecework API, for the commands that manage an installation.

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cli::ApiClientArgs;

pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl ApiClient {
    pub fn new(args: &ApiClientArgs) -> anyhow::Result<Self> {
        piecework_sdk::http::install_crypto_provider();
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(300))
                .build()?,
            base: args.url.trim_end_matches('/').to_owned(),
            api_key: crate::config::api_key_from_env()?,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends and returns the JSON body; an API error becomes its message.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.answer(request).await
    }

    /// Sends `bytes` as the body with extra headers (publishing a bundle).
    pub async fn send_bytes(
        &self,
        method: reqwest::Method,
        path: &str,
        bytes: Vec<u8>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let mut request = self
            .request(method, path)
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(bytes);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        self.answer(request).await
    }

    /// Sends a document (a flow file) with its content type.
    pub async fn send_document(
        &self,
        method: reqwest::Method,
        path: &str,
        text: String,
        content_type: &str,
    ) -> anyhow::Result<Value> {
        let request = self
            .request(method, path)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(text);
        self.answer(request).await
    }

    async fn answer(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request.send().await.with_context(|| {
            format!(
                "cannot reach the piecework API at {} (set --api or PW_API_URL)",
                self.base
            )
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let json: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let message = json["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| json.to_string());
            bail!("{status}: {message}");
        }
        Ok(json)
    }
}
