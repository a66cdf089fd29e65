//! Restart backoff, one rule for a crashed generation and a crashed
//! worker: the delay doubles with each consecutive failure, from
//! `--restart-delay` up to `--restart-delay-max`; a run of at least
//! `stable_after` resets it; and at most `--start-limit` restarts fit in
//! its interval, after which the caller gives up (baton stops, or the worker
//! stays down). Pure: the caller passes the time.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::stamp;
use crate::knobs::{PolicyConfig, later};
use crate::spec::StartLimit;

/// Consecutive failures and recent restarts of one restartable thing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Consecutive failures (the delay's exponent).
    pub failures: u32,
    /// When recent restarts began, for the start limit.
    #[serde(with = "stamp::vec")]
    pub recent: Vec<Instant>,
}

/// What follows a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Restart at `at`, `delay` from now.
    Restart {
        /// When.
        at: Instant,
        /// How long from now.
        delay: Duration,
    },
    /// The start limit is hit: `restarts` within `interval`.
    Limit {
        /// Restarts within the interval.
        restarts: usize,
        /// The limit's interval.
        interval: Duration,
    },
}

impl Backoff {
    /// Something that ran for `lived` (unknown: `None`) failed at `now`:
    /// when its replacement may start, or that it may not.
    pub fn failed(&mut self, now: Instant, lived: Option<Duration>, cfg: &PolicyConfig) -> Next {
        if lived.is_some_and(|lived| lived >= cfg.stable_after) {
            self.failures = 0;
        }
        if let StartLimit::Limit { burst, interval } = cfg.start_limit {
            self.recent
                .retain(|t| now.saturating_duration_since(*t) < interval);
            if self.recent.len() >= burst as usize {
                return Next::Limit {
                    restarts: self.recent.len(),
                    interval,
                };
            }
        }
        let factor = 2u32.saturating_pow(self.failures.min(20));
        let delay = cfg
            .restart_delay
            .saturating_mul(factor)
            .min(cfg.restart_delay_max);
        self.failures = self.failures.saturating_add(1);
        Next::Restart {
            at: later(now, delay),
            delay,
        }
    }

    /// A replacement started at `now` (it counts toward the start limit).
    pub fn restarted(&mut self, now: Instant) {
        self.recent.push(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(limit: StartLimit) -> PolicyConfig {
        PolicyConfig {
            restart_delay: 100 * MS,
            restart_delay_max: 800 * MS,
            stable_after: 5000 * MS,
            start_limit: limit,
            ..PolicyConfig::default()
        }
    }

    fn delay(next: Next) -> Duration {
        match next {
            Next::Restart { delay, .. } => delay,
            Next::Limit { .. } => panic!("limited"),
        }
    }

    #[test]
    fn the_delay_doubles_up_to_its_ceiling_and_a_stable_run_resets_it() {
        let cfg = cfg(StartLimit::Off);
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..6)
            .map(|i| delay(b.failed(t0 + i * 10 * MS, Some(10 * MS), &cfg)))
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 800, 800].map(|ms| ms * MS).to_vec()
        );
        // A long run starts over; a huge count does not overflow.
        assert_eq!(delay(b.failed(t0, Some(6000 * MS), &cfg)), 100 * MS);
        b.failures = u32::MAX;
        assert_eq!(delay(b.failed(t0, None, &cfg)), 800 * MS);
        let Next::Restart { at, .. } = b.failed(t0, None, &cfg) else {
            panic!("limited")
        };
        assert_eq!(at, t0 + 800 * MS);
    }

    #[test]
    fn the_start_limit_counts_restarts_within_its_interval() {
        let cfg = cfg(StartLimit::Limit {
            burst: 2,
            interval: 1000 * MS,
        });
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for i in 0..2 {
            delay(b.failed(t0 + i * 100 * MS, None, &cfg));
            b.restarted(t0 + i * 100 * MS);
        }
        assert_eq!(
            b.failed(t0 + 300 * MS, None, &cfg),
            Next::Limit {
                restarts: 2,
                interval: 1000 * MS
            }
        );
        // Once the first restart is older than the interval, one more fits.
        assert!(matches!(
            b.failed(t0 + 1050 * MS, None, &cfg),
            Next::Restart { .. }
        ));
    }
}
