//! Rate limits on webhook calls, per api process: one for all calls, checked before anything
//! else (a flood of calls to flows that do not exist costs nothing), and one per flow, checked
//! once a call is admitted.

use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// A rate such as `100/s`, `20/min` or `500/h`; `0` (or `off`) means no limit. The count is
/// also the burst: that many calls may come at once, then they are spread over the period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    pub const OFF: Rate = Rate {
        count: 0,
        per: Duration::from_secs(1),
    };

    pub const fn per_second(count: u32) -> Self {
        Rate {
            count,
            per: Duration::from_secs(1),
        }
    }

    fn quota(self) -> Option<Quota> {
        let count = NonZeroU32::new(self.count)?;
        let quota = Quota::with_period(self.per / self.count)?;
        Some(quota.allow_burst(count))
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "0" || text == "off" {
            return Ok(Rate::OFF);
        }
        let bad = || format!("{text:?} is not a rate: write 100/s, 20/min or 500/h (0 for none)");
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count > 1_000_000 {
            return Err(format!(
                "{text:?}: at most 1000000 calls per period (0 for no limit)"
            ));
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return f.write_str("0");
        }
        let unit = match self.per.as_secs() {
            60 => "min",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

type KeyedLimiter = RateLimiter<
    String,
    governor::state::keyed::HashMapStateStore<String>,
    DefaultClock,
    governor::middleware::NoOpMiddleware,
>;

/// The limiters of one api process.
pub(crate) struct WebhookLimits {
    total: Option<DefaultDirectRateLimiter>,
    per_flow: Option<KeyedLimiter>,
}

impl WebhookLimits {
    pub(crate) fn new(total: Rate, per_flow: Rate) -> Self {
        Self {
            total: total.quota().map(RateLimiter::direct),
            per_flow: per_flow.quota().map(RateLimiter::hashmap),
        }
    }

    /// `Err(wait)` when a call now would exceed the total rate.
    pub(crate) fn check_total(&self) -> Result<(), Duration> {
        match &self.total {
            None => Ok(()),
            Some(limiter) => limiter
                .check()
                .map_err(|denied| denied.wait_time_from(DefaultClock::default().now())),
        }
    }

    /// `Err(wait)` when a call now would exceed `flow`'s rate.
    pub(crate) fn check_flow(&self, flow: &str) -> Result<(), Duration> {
        match &self.per_flow {
            None => Ok(()),
            Some(limiter) => limiter
                .check_key(&flow.to_owned())
                .map_err(|denied| denied.wait_time_from(DefaultClock::default().now())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_print_and_refuse_junk() {
        assert_eq!("100/s".parse(), Ok(Rate::per_second(100)));
        let per_minute: Rate = "20/min".parse().unwrap();
        assert_eq!(per_minute.per, Duration::from_secs(60));
        assert_eq!(per_minute.to_string(), "20/min");
        assert_eq!("off".parse(), Ok(Rate::OFF));
        let err = "fast".parse::<Rate>().unwrap_err();
        assert!(err.contains("\"fast\"") && err.contains("100/s"), "{err}");
        assert!("10/week".parse::<Rate>().is_err());
        assert!("2000000/s".parse::<Rate>().unwrap_err().contains("at most"));
    }

    #[test]
    fn the_burst_passes_then_calls_wait_per_flow_and_in_total() {
        let limits = WebhookLimits::new("3/min".parse().unwrap(), "2/min".parse().unwrap());
        assert!(limits.check_flow("a").is_ok());
        assert!(limits.check_flow("a").is_ok());
        let wait = limits.check_flow("a").unwrap_err();
        assert!(
            wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert!(limits.check_flow("b").is_ok(), "each flow has its own");
        for _ in 0..3 {
            assert!(limits.check_total().is_ok());
        }
        assert!(limits.check_total().is_err());
        let off = WebhookLimits::new(Rate::OFF, Rate::OFF);
        for _ in 0..1000 {
            assert!(off.check_total().is_ok() && off.check_flow("a").is_ok());
        }
    }
}
