//! Instants as nanoseconds of `CLOCK_MONOTONIC`, the clock `Instant` reads
//! on Linux: a number that means the same to every process on the host and
//! survives `execve`, so that state with timestamps can be handed over.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::time::{ClockId, clock_gettime};

/// An `Instant` and the monotonic clock read together, once.
fn base() -> (Instant, u64) {
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    *BASE.get_or_init(|| {
        let now = clock_gettime(ClockId::Monotonic);
        let at = Instant::now();
        let ns = u64::try_from(now.tv_sec)
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0));
        (at, ns)
    })
}

/// `at` as nanoseconds of `CLOCK_MONOTONIC`.
pub fn monotonic_ns(at: Instant) -> u64 {
    let (base_at, base_ns) = base();
    if at >= base_at {
        let after = u64::try_from((at - base_at).as_nanos()).unwrap_or(u64::MAX);
        base_ns.saturating_add(after)
    } else {
        let before = u64::try_from((base_at - at).as_nanos()).unwrap_or(u64::MAX);
        base_ns.saturating_sub(before)
    }
}

/// The `Instant` of `ns` nanoseconds of `CLOCK_MONOTONIC` (saturating at
/// what `Instant` can hold).
pub fn instant(ns: u64) -> Instant {
    let (base_at, base_ns) = base();
    if ns >= base_ns {
        let after = Duration::from_nanos(ns - base_ns);
        base_at.checked_add(after).unwrap_or(base_at)
    } else {
        let before = Duration::from_nanos(base_ns - ns);
        base_at.checked_sub(before).unwrap_or(base_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let now = Instant::now();
        for at in [
            now,
            now + Duration::from_secs(3600),
            now - Duration::from_millis(5),
        ] {
            assert_eq!(instant(monotonic_ns(at)), at);
        }
        assert!(monotonic_ns(now + Duration::from_secs(1)) > monotonic_ns(now));
    }
}
