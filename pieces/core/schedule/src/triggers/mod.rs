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
    #[serde(default)]
    timezone: Option<String>,
}

impl ScheduleTrigger for Cron {
    type Input = CronInput;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::schedule("cron", "Cron")
            .description("Fires on a cron expression, in UTC or an IANA time zone")
            .prop(
                Prop::short_text("expression", "Expression")
                    .required()
                    .description("5 fields (minute hour day month weekday), or 6 with seconds"),
            )
            .prop(Prop::short_text("timezone", "Time zone").description(
                "IANA name such as Europe/Berlin (default UTC); local times keep across daylight saving changes",
            ))
    }

    fn schedule(&self, input: CronInput) -> Result<Schedule, PieceError> {
        Schedule::cron_in(
            &input.expression,
            input.timezone.as_deref().unwrap_or("UTC"),
        )
    }
}

#[cfg(test)]
mod tests {
    use piecework_sdk::ScheduleTrigger as _;

    use super::*;

    #[test]
    fn cron_takes_an_iana_time_zone_and_names_an_unknown_one() {
        let input = |timezone: Option<&str>| CronInput {
            expression: "0 9 * * *".into(),
            timezone: timezone.map(str::to_owned),
        };
        let at = |rfc: &str| chrono::DateTime::parse_from_rfc3339(rfc).unwrap().to_utc();
        let utc = Cron.schedule(input(None)).unwrap();
        assert_eq!(
            utc.next_after(at("2026-07-01T00:00:00Z")),
            Some(at("2026-07-01T09:00:00Z"))
        );
        let ny = Cron.schedule(input(Some("America/New_York"))).unwrap();
        assert_eq!(
            ny.next_after(at("2026-07-01T00:00:00Z")),
            Some(at("2026-07-01T13:00:00Z"))
        );
        let err = Cron.schedule(input(Some("CEST"))).unwrap_err();
        assert!(
            err.to_string().contains("unknown time zone \"CEST\""),
            "{err}"
        );
    }
}
