//! Wall-clock time derived from the runtime's monotonic clock.
//!
//! Anchoring once and advancing with `tokio::time::Instant` keeps ticks monotonic (a wall-clock
//! step back cannot replay a tick) and lets tests drive schedules, delays and the timers of waiting runs with a paused clock.

use chrono::{DateTime, Utc};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: DateTime<Utc>,
    mono: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self {
            wall: Utc::now(),
            mono: Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        let elapsed = chrono::Duration::from_std(self.mono.elapsed()).unwrap_or_default();
        self.wall + elapsed
    }
}
