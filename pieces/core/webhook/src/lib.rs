//! The `webhook` piece: start a run from an HTTP request (`catch`) and answer a synchronous
//! webhook call (`return_response`).

mod actions;
mod triggers;

use piecework_sdk::{Piece, PieceDefinitionError, category};

pub const NAME: &str = "webhook";

pub fn piece() -> Result<Piece, PieceDefinitionError> {
    Piece::builder(NAME, "Webhook")
        .description("Receive HTTP requests and answer them")
        .version("0.1.0")
        .categories([category::CORE])
        .authors(["piecework"])
        .webhook_trigger(triggers::Catch)
        .action(actions::ReturnResponse)
        .build()
}
