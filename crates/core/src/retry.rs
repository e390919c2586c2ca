//! The retry policy of a step and the delay before each retry.
//!
//! Delays come from the `backoff` crate's exponential backoff. That crate is unmaintained
//! upstream (RUSTSEC-2025-0012), so it is used only here, behind [`RetryPolicy::delay_after`],
//! where it can be swapped without touching callers.
//!
//! Workers are stateless: the attempt number comes from the broker's delivery count, so the
//! delay for attempt `n` is computed from scratch rather than kept in memory between attempts.

use std::time::Duration;

use backoff::backoff::Backoff;
use serde::{Deserialize, Serialize};

/// The longest delay between two attempts.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// How often and how patiently a step is retried after a retryable error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in total, the first included. 1 disables retries.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub initial_interval: Duration,
    /// Each further delay is the previous one times this.
    pub multiplier: f64,
    /// Upper bound of a single delay.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_interval: Duration,
    /// Randomisation of each delay, as a fraction (0.1 = ±10%), so retries of many runs failing
    /// together do not hit the recovering service in lockstep.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(60),
            jitter: 0.1,
        }
    }
}

impl RetryPolicy {
    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.max_attempts > 100 {
            return Err("max_attempts must be at most 100".into());
        }
        if self.initial_interval.is_zero() {
            return Err("initial_interval must be greater than zero".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err("multiplier must be a number of at least 1".into());
        }
        if self.max_interval < self.initial_interval {
            return Err("max_interval must not be shorter than initial_interval".into());
        }
        if self.max_interval > MAX_INTERVAL {
            return Err("max_interval must be at most 24h".into());
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err("jitter must be at least 0 and less than 1".into());
        }
        Ok(())
    }

    /// Whether another attempt follows a failed attempt number `attempt` (1-based).
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay between failed attempt `attempt` (1-based) and the next one.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let mut backoff = backoff::ExponentialBackoff {
            current_interval: self.initial_interval,
            initial_interval: self.initial_interval,
            randomization_factor: self.jitter,
            multiplier: self.multiplier,
            max_interval: self.max_interval,
            max_elapsed_time: None,
            ..backoff::ExponentialBackoff::default()
        };
        let mut delay = self.initial_interval;
        for _ in 0..attempt.max(1) {
            delay = backoff.next_backoff().unwrap_or(self.max_interval);
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_interval: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(5),
            jitter: 0.0,
        }
    }

    #[test]
    fn delays_grow_and_cap() {
        let p = exact();
        let delays: Vec<u64> = (1..=5).map(|n| p.delay_after(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..exact()
        };
        for _ in 0..50 {
            let d = p.delay_after(2).as_secs_f64();
            assert!((1.0..=3.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn attempts_are_bounded() {
        let p = RetryPolicy {
            max_attempts: 2,
            ..exact()
        };
        assert!(p.allows_retry_after(1));
        assert!(!p.allows_retry_after(2));
    }

    #[test]
    fn bad_values_name_the_field() {
        let bad = RetryPolicy {
            max_attempts: 0,
            ..exact()
        };
        assert!(bad.validate().unwrap_err().contains("max_attempts"));
        let bad = RetryPolicy {
            multiplier: 0.5,
            ..exact()
        };
        assert!(bad.validate().unwrap_err().contains("multiplier"));
        let bad = RetryPolicy {
            max_interval: Duration::from_millis(1),
            ..exact()
        };
        assert!(bad.validate().unwrap_err().contains("max_interval"));
    }
}
