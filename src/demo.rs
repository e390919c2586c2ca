//! The demo of `piecework dev`: a local mock of the ticketing API that `my-company-api`
//! integrates with, filing a ticket every few seconds, and the connection `demo-tickets` to it,
//! so the shipped `auto-assign` flow runs with no network access.

use std::time::Duration;

use anyhow::Context as _;
use piecework_mock_ticketing::MockTicketing;
use piecework_runtime::{Actor, Runtime};
use serde_json::json;

pub const CONNECTION: &str = "demo-tickets";
const TOKEN: &str = "demo-token";

/// Starts the mock and saves the demo connection (validated and encrypted like any other).
pub async fn start(runtime: &Runtime, every: Duration) -> anyhow::Result<MockTicketing> {
    let mock = MockTicketing::start("127.0.0.1:0".parse()?, TOKEN)
        .await
        .context("cannot start the ticketing mock")?;
    let values = json!({ "api_key": TOKEN, "environment": "dev", "base_url": mock.url });
    runtime
        .save_connection(
            CONNECTION,
            piecework_piece_my_company_api::NAME,
            values,
            &Actor("dev".into()),
        )
        .await
        .context("cannot save the demo connection")?;
    mock.generate_tickets(every);
    Ok(mock)
}
