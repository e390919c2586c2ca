//! The `http` piece: call any HTTP API. Requests go through the installation's egress policy;
//! 5xx, 429 and network errors are retryable, other 4xx fail the step. A step may take a
//! connection (bearer token, basic auth, or a header), so credentials live encrypted in a
//! connection rather than in flow files — and are masked in whatever the step records.

mod actions;

use piecework_sdk::{Piece, PieceDefinitionError, category};

pub const NAME: &str = "http";

pub fn piece() -> Result<Piece, PieceDefinitionError> {
    Piece::builder(NAME, "HTTP")
        .description("Send HTTP requests")
        .version("0.2.0") // 0.2: an optional connection
        .categories([category::CORE, category::DEVELOPER_TOOLS])
        .authors(["piecework"])
        .auth(actions::auth())
        .action(actions::SendRequest)
        .build()
}
