//! The `schedule` piece: start a run every N (aligned to the clock) or on a cron expression in
//! a time zone.
//! Each run's trigger output is `{scheduled_at, fired_at}`.

mod triggers;

use piecework_sdk::{Piece, PieceDefinitionError, category};

pub const NAME: &str = "schedule";

pub fn piece() -> Result<Piece, PieceDefinitionError> {
    Piece::builder(NAME, "Schedule")
        .description("Start runs at an interval or on a cron schedule")
        .version("0.1.0")
        .categories([category::CORE])
        .authors(["piecework"])
        .schedule_trigger(triggers::Every)
        .schedule_trigger(triggers::Cron)
        .build()
}
