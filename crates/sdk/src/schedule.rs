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
    /// A cron expression (5 fields, or 6 with seconds), evaluated in UTC.
    Cron(Box<croner::Cron>),
}

/// On the wire (piece protocol) a schedule is `{"every": "5m"}` or `{"cron": "*/15 * * * *"}`.
impl serde::Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            Schedule::Every(interval) => {
                map.serialize_entry("every", &humantime::format_duration(*interval).to_string())?
            }
            Schedule::Cron(cron) => map.serialize_entry("cron", cron.as_str())?,
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "snake_case", deny_unknown_fields)]
        enum Wire {
            Every(String),
            Cron(String),
        }
        let parsed = match Wire::deserialize(deserializer)? {
            Wire::Every(text) => Schedule::parse_interval(&text),
            Wire::Cron(expression) => Schedule::cron(&expression),
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

    pub fn cron(expression: &str) -> Result<Self, PieceError> {
        let cron = croner::Cron::from_str(expression).map_err(|e| {
            PieceError::fatal(format!("invalid cron expression {expression:?}: {e}"))
        })?;
        Ok(Schedule::Cron(Box::new(cron)))
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
            Schedule::Cron(cron) => cron.find_next_occurrence(&after, false).ok(),
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

    #[test]
    fn schedules_round_trip_on_the_wire() {
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
