//! The `data` piece: shape values inside a flow without calling anything. Useful for demos,
//! benchmarks, and glue between steps (templates do the transforming; these actions give the
//! result a name other steps can refer to).

mod actions;

use piecework_sdk::{Piece, PieceDefinitionError, category};

pub const NAME: &str = "data";

pub fn piece() -> Result<Piece, PieceDefinitionError> {
    Piece::builder(NAME, "Data")
        .description("Set, merge and pass along values between steps")
        .version("0.1.0")
        .categories([category::CORE])
        .authors(["piecework"])
        .action(actions::set::Set)
        .action(actions::merge::Merge)
        .build()
}
