//! The `http` piece: call any HTTP API. Requests go through the installation's egress policy;
//! 5xx, 429 and network errors are retryable, other 4xx fail the step.

mod actions;

use piecework_sdk::{Piece, PieceDefinitionError, category};

pub const NAME: &str = "http";

pub fn piece() -> Result<Piece, PieceDefinitionError> {
    Piece::builder(NAME, "HTTP")
        .description("Send HTTP requests")
        .version("0.1.0")
        .categories([category::CORE, category::DEVELOPER_TOOLS])
        .authors(["piecework"])
        .action(actions::SendRequest)
        .build()
}
