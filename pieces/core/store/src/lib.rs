//! The `store` piece: keep small values between runs, scoped to the flow (default) or shared by
//! all flows.

mod actions;

use piecework_sdk::{Piece, PieceDefinitionError, category};

pub const NAME: &str = "store";

pub fn piece() -> Result<Piece, PieceDefinitionError> {
    Piece::builder(NAME, "Store")
        .description("Get, put and delete values that outlive a run")
        .version("0.1.0")
        .categories([category::CORE])
        .authors(["piecework"])
        .action(actions::Get)
        .action(actions::Put)
        .action(actions::Delete)
        .build()
}
