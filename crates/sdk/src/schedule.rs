//! When a schedule or polling trigger fires.
//!
//! Ticks are computed from the wall clock alone — an interval's ticks are multiples of the
//! interval since the Unix epoch, a cron's ticks are its matches — so every scheduler in a fleet
//! computes the same ticks and the broker deduplicates their publishes by `<flow>:<tick>`.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::PieceError;

/// A recurring schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every `Duration`, aligned to the Unix epoch.
    Every(Duration),
    /// A cron expression (5 fields, or 6 with seconds), evaluated in UTC or in an IANA time
    /// zone: `0 9 * * 1-5` in `Europe/Berlin` is 9:00 Berlin time, summer and winter. The zone
    /// rules come from the time zone database bundled into the binary (jiff), so a host
    /// without `tzdata` evaluates them the same.
    Cron(Box<croner::Cron>, Option<jiff::tz::TimeZone>),
}

/// On the wire (piece protocol) a schedule is `{"every": "5m"}` or `{"cron": "*/15 * * * *"}`,
/// with `"timezone": "Europe/Berlin"` for a cron evaluated outside UTC.
impl serde::Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        match self {
            Schedule::Every(interval) => {
                map.serialize_entry("every", &humantime::format_duration(*interval).to_string())?
            }
            Schedule::Cron(cron, tz) => {
                map.serialize_entry("cron", cron.as_str())?;
                if let Some(name) = tz.as_ref().and_then(jiff::tz::TimeZone::iana_name) {
                    map.serialize_entry("timezone", name)?;
                }
            }
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wire {
            every: Option<String>,
            cron: Option<String>,
            timezone: Option<String>,
        }
        let wire = Wire::deserialize(deserializer)?;
        let parsed = match (wire.every, wire.cron, wire.timezone) {
            (Some(text), None, None) => Schedule::parse_interval(&text),
            (None, Some(expression), timezone) => {
                Schedule::cron_in(&expression, timezone.as_deref().unwrap_or("UTC"))
            }
            _ => Err(PieceError::fatal(
                "a schedule is {\"every\": …} or {\"cron\": …} with an optional \"timezone\"",
            )),
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

/// The shortest interval a schedule may have.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

impl Schedule {
    pub fn every(interval: Duration) -> Result<Self, PieceError> {
        if interval < MIN_INTERVAL {
            return Err(PieceError::fatal(format!(
                "interval {} is shorter than the minimum of 1s",
                humantime::format_duration(interval)
            )));
        }
        Ok(Schedule::Every(interval))
    }

    /// Parses `"5m"`, `"1h 30m"`, `"10s"`.
    pub fn parse_interval(text: &str) -> Result<Self, PieceError> {
        let interval = humantime::parse_duration(text.trim()).map_err(|e| {
            PieceError::fatal(format!(
                "invalid interval {text:?}: {e} (e.g. \"30s\", \"5m\", \"1h\")"
            ))
        })?;
        Self::every(interval)
    }

    /// A cron expression evaluated in UTC.
    pub fn cron(expression: &str) -> Result<Self, PieceError> {
        Self::cron_in(expression, "UTC")
    }

    /// A cron expression evaluated in the IANA time zone `timezone` (`Europe/Berlin`). A
    /// local time that a change to summer time skips fires at the first instant after the
    /// gap; one that a change back repeats fires once.
    pub fn cron_in(expression: &str, timezone: &str) -> Result<Self, PieceError> {
        let cron = croner::Cron::from_str(expression).map_err(|e| {
            PieceError::fatal(format!("invalid cron expression {expression:?}: {e}"))
        })?;
        let name = timezone.trim();
        let tz = if name.eq_ignore_ascii_case("UTC") {
            None
        } else {
            Some(jiff::tz::TimeZone::get(name).map_err(|_| {
                PieceError::fatal(format!(
                    "unknown time zone {timezone:?}: use an IANA name such as \"Europe/Berlin\" or \"America/New_York\""
                ))
            })?)
        };
        Ok(Schedule::Cron(Box::new(cron), tz))
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(interval) => {
                let step = i64::try_from(interval.as_millis()).ok()?.max(1);
                let now = after.timestamp_millis();
                let next = (now.div_euclid(step) + 1) * step;
                DateTime::from_timestamp_millis(next)
            }
            Schedule::Cron(cron, None) => cron.find_next_occurrence(&after, false).ok(),
            Schedule::Cron(cron, Some(tz)) => {
                let at = jiff::Timestamp::from_microsecond(after.timestamp_micros()).ok()?;
                let next = cron
                    .find_next_occurrence(&at.to_zoned(tz.clone()), false)
                    .ok()?;
                DateTime::from_timestamp_micros(next.timestamp().as_microsecond())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn intervals_align_to_the_epoch() {
        let s = Schedule::parse_interval("5m").unwrap();
        assert_eq!(
            s.next_after(at("2026-11-25T10:02:13Z")),
            Some(at("2026-11-25T10:05:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-11-25T10:05:00Z")),
            Some(at("2026-11-25T10:10:00Z"))
        );
    }

    #[test]
    fn cron_accepts_five_fields() {
        let s = Schedule::cron("*/15 * * * *").unwrap();
        assert_eq!(
            s.next_after(at("2026-11-25T10:02:13Z")),
            Some(at("2026-11-25T10:15:00Z"))
        );
    }

    /// The ticks of `s` after `from`, `n` of them.
    fn ticks(s: &Schedule, from: &str, n: usize) -> Vec<DateTime<Utc>> {
        let mut at = at(from);
        (0..n)
            .map(|_| {
                at = s.next_after(at).unwrap();
                at
            })
            .collect()
    }

    #[test]
    fn cron_in_a_time_zone_keeps_local_time_across_daylight_saving_changes() {
        // 09:00 in Berlin: 08:00 UTC in summer (CEST), 09:00 UTC in winter (CET).
        let nine = Schedule::cron_in("0 9 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            ticks(&nine, "2026-03-28T12:00:00Z", 2),
            [at("2026-03-29T07:00:00Z"), at("2026-03-30T07:00:00Z")],
            "summer time starts on 2026-03-29: 09:00 CEST is 07:00 UTC"
        );
        assert_eq!(
            ticks(&nine, "2026-10-24T12:00:00Z", 2),
            [at("2026-10-25T08:00:00Z"), at("2026-10-26T08:00:00Z")],
            "and ends on 2026-10-25: 09:00 CET is 08:00 UTC"
        );
        // 02:30 does not exist on 2026-03-29 in Berlin (02:00 → 03:00): it fires right after
        // the gap, once; and it exists twice on 2026-10-25: it fires once.
        let half_past_two = Schedule::cron_in("30 2 * * *", "Europe/Berlin").unwrap();
        let spring = ticks(&half_past_two, "2026-03-28T12:00:00Z", 2);
        assert_eq!(spring[1], at("2026-03-30T00:30:00Z"));
        assert!(
            spring[0] >= at("2026-03-29T01:00:00Z") && spring[0] <= at("2026-03-29T01:30:00Z"),
            "{spring:?}"
        );
        assert_eq!(
            ticks(&half_past_two, "2026-10-24T12:00:00Z", 2),
            [at("2026-10-25T00:30:00Z"), at("2026-10-26T01:30:00Z")],
            "the repeated 02:30 fires once (its first instant)"
        );
        let err = Schedule::cron_in("0 9 * * *", "Mars/Olympus").unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown time zone \"Mars/Olympus\""),
            "{err}"
        );
    }

    #[test]
    fn schedules_round_trip_on_the_wire() {
        let berlin = Schedule::cron_in("0 9 * * *", "Europe/Berlin").unwrap();
        let wire = serde_json::to_value(&berlin).unwrap();
        assert_eq!(
            wire,
            serde_json::json!({"cron": "0 9 * * *", "timezone": "Europe/Berlin"})
        );
        let back: Schedule = serde_json::from_value(wire).unwrap();
        assert_eq!(
            back.next_after(at("2026-07-01T00:00:00Z")),
            Some(at("2026-07-01T07:00:00Z"))
        );
        let every = serde_json::to_value(Schedule::parse_interval("5m").unwrap()).unwrap();
        assert_eq!(every, serde_json::json!({"every": "5m"}));
        let cron = serde_json::to_value(Schedule::cron("*/15 * * * *").unwrap()).unwrap();
        assert_eq!(cron, serde_json::json!({"cron": "*/15 * * * *"}));
        let back: Schedule = serde_json::from_value(cron).unwrap();
        assert_eq!(
            back.next_after(at("2026-11-25T10:02:13Z")),
            Some(at("2026-11-25T10:15:00Z"))
        );
        let err = serde_json::from_value::<Schedule>(serde_json::json!({"every": "1ms"}));
        assert!(err.is_err());
    }

    #[test]
    fn bad_schedules_say_why() {
        let err = Schedule::cron("every tuesday").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid cron expression \"every tuesday\""),
            "{err}"
        );
        let err = Schedule::parse_interval("10").unwrap_err();
        assert!(err.to_string().contains("invalid interval"), "{err}");
        assert!(Schedule::parse_interval("100ms").is_err());
    }
}
