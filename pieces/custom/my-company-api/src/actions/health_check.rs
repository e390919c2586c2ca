//! `health_check`: the guide's monitoring action. It never fails: an unreachable API is a
//! result (`unhealthy`), so a scheduled flow records it instead of retrying.

use std::time::Instant;

use piecework_sdk::prelude::*;
use serde_json::{Value, json};

use crate::auth::MyCompanyAuth;

pub struct HealthCheck;

impl Action for HealthCheck {
    type Input = Value;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("health_check", "Health Check")
            .description("Check API connectivity")
            .output("`status` (healthy or unhealthy), `latency_ms`, `api_version`, or `error` when unhealthy")
            .require_auth()
            .health_check()
    }

    async fn run(&self, ctx: &Context, _input: Value) -> Result<Value, PieceError> {
        let auth: MyCompanyAuth = ctx.auth()?;
        let started = Instant::now();
        let request = ctx
            .http
            .get(&auth.endpoint("/health"))?
            .bearer_auth(&auth.api_key);
        let latency = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(match ctx.http.send(request).await {
            Ok(response) => {
                let version = response
                    .headers()
                    .get("x-api-version")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                json!({ "status": "healthy", "latency_ms": latency(), "api_version": version })
            }
            Err(err) => {
                json!({ "status": "unhealthy", "error": err.message(), "latency_ms": latency() })
            }
        })
    }
}
