//! The demo of `piecework dev`: the `my-company-api` piece as a bundle (built from the
//! checkout, like any private piece, and run over the protocol), a local mock of the ticketing
//! API it integrates with, filing a ticket every few seconds, and the connection
//! `demo-tickets` to it, so the shipped `auto-assign` flow runs with no network access.

use std::time::Duration;

use anyhow::Context as _;
use piecework_mock_ticketing::MockTicketing;
use piecework_runtime::{Actor, Runtime};
use serde_json::json;

pub const CONNECTION: &str = "demo-tickets";
/// The demo's piece: a bundle, like any private piece.
pub const PIECE: &str = "my-company-api";
const TOKEN: &str = "demo-token";

/// The demo piece's bundle, built now from `pieces/custom/my-company-api` of the checkout
/// (quietly, in the dev profile, which shares this binary's dependencies); when there is no
/// checkout or no cargo, a bundle built before. `None`: the demo cannot run here.
pub async fn bundle() -> anyhow::Result<Option<std::path::PathBuf>> {
    let Some(checkout) = crate::scaffold::checkout() else {
        return Ok(None);
    };
    let source = checkout.join("pieces/custom").join(PIECE);
    let out = checkout.join("target/pieces");
    let options = crate::bundles::BuildOptions {
        out: Some(&out),
        profile: crate::bundles::Profile::Dev,
        sign: None,
        quiet: true,
    };
    match crate::bundles::build(&source, &options).await {
        Ok(built) => Ok(Some(built.path)),
        Err(err) => {
            let built_before = std::fs::read_dir(&out).ok().and_then(|entries| {
                entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("{PIECE}-")) && n.ends_with(".piece.tgz")
                    })
                })
            });
            match built_before {
                Some(path) => Ok(Some(path)),
                None => {
                    Err(err.context(format!("cannot build the demo piece {}", source.display())))
                }
            }
        }
    }
}

/// Starts the mock and saves the demo connection (validated and encrypted like any other).
pub async fn start(runtime: &Runtime, every: Duration) -> anyhow::Result<MockTicketing> {
    let mock = MockTicketing::start("127.0.0.1:0".parse()?, TOKEN)
        .await
        .context("cannot start the ticketing mock")?;
    let values = json!({ "api_key": TOKEN, "environment": "dev", "base_url": mock.url });
    runtime
        .save_connection(CONNECTION, PIECE, values, &Actor("dev".into()))
        .await
        .context("cannot save the demo connection")?;
    mock.generate_tickets(every);
    Ok(mock)
}
