//! `every` and `cron`.

use piecework_sdk::prelude::*;

pub struct Every;

#[derive(serde::Deserialize)]
pub struct EveryInput {
    interval: String,
}

impl ScheduleTrigger for Every {
    type Input = EveryInput;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::schedule("every", "Every interval")
            .description("Fires at every multiple of the interval (e.g. every 5m: :00, :05, :10 …)")
            .prop(
                Prop::short_text("interval", "Interval")
                    .required()
                    .description("e.g. 30s, 5m, 1h"),
            )
    }

    fn schedule(&self, input: EveryInput) -> Result<Schedule, PieceError> {
        Schedule::parse_interval(&input.interval)
    }
}

pub struct Cron;

#[derive(serde::Deserialize)]
pub struct CronInput {
    expression: String,
}

impl ScheduleTrigger for Cron {
    type Input = CronInput;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::schedule("cron", "Cron")
            .description("Fires on a cron expression, evaluated in UTC")
            .prop(
                Prop::short_text("expression", "Expression")
                    .required()
                    .description("5 fields (minute hour day month weekday), or 6 with seconds"),
            )
    }

    fn schedule(&self, input: CronInput) -> Result<Schedule, PieceError> {
        Schedule::cron(&input.expression)
    }
}
