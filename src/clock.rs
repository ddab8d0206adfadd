//! Microsecond stamps of the monotonic clock: what the hot path reads instead of `Instant`.
//!
//! A stamp is a `u64` of microseconds since a process-wide origin, plus 1 (so that 0 can mean
//! "none" in an atomic). It is read from `CLOCK_MONOTONIC` (what `Instant` reads on Linux)
//! with integer arithmetic only; differences between stamps are integer subtractions. An
//! `Instant` costs a `Duration` difference (about 37 instructions, with its normalisation)
//! each time it is compared or stamped; a transaction reads the clock twice and compares
//! three times (its request, its end, the server's age at check-in), so the clients'
//! registry, the relay's transaction counts and the servers' `created` / `last_used` all
//! keep stamps.

use std::time::{Duration, Instant};

/// Time origin of the stamps, shared by all: an `Instant` (for [`stamp`]) and, read right
/// after it, the monotonic clock's own microseconds (for [`stamp_now`]). Read together, so
/// that the two kinds of stamps agree whichever is asked first.
static BASE: std::sync::LazyLock<(Instant, u64)> = std::sync::LazyLock::new(|| {
    let at = Instant::now();
    #[cfg(target_os = "linux")]
    let us = monotonic_us();
    #[cfg(not(target_os = "linux"))]
    let us = 0;
    (at, us)
});

/// CLOCK_MONOTONIC, which `Instant` reads on Linux, in whole microseconds.
#[cfg(target_os = "linux")]
#[inline]
fn monotonic_us() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The stamp of the present, read without an `Instant`. Within a microsecond of
/// `stamp(Instant::now())`.
#[inline]
pub fn stamp_now() -> u64 {
    #[cfg(target_os = "linux")]
    {
        monotonic_us().saturating_sub(BASE.1) + 1
    }
    #[cfg(not(target_os = "linux"))]
    {
        stamp(Instant::now())
    }
}

/// The stamp of `at` (never 0; an `at` before the origin is stamped 1).
#[inline]
pub fn stamp(at: Instant) -> u64 {
    at.saturating_duration_since(BASE.0).as_micros() as u64 + 1
}

/// The time from stamp `earlier` to stamp `later` (zero if `later` is not later).
#[inline]
pub fn between(earlier: u64, later: u64) -> Duration {
    Duration::from_micros(later.saturating_sub(earlier))
}

/// The time since stamp `earlier`.
pub fn since(earlier: u64) -> Duration {
    between(earlier, stamp_now())
}

/// `d` in whole microseconds, as stamps count (saturating: `Duration::MAX` is never reached).
#[inline]
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stamp read from the raw clock falls between stamps of `Instant`s read around it
    /// (the two origins are read a moment apart: allowed a millisecond).
    #[test]
    fn stamp_now_agrees_with_instant_stamps() {
        for _ in 0..1000 {
            let before = stamp(Instant::now());
            let now = stamp_now();
            let after = stamp(Instant::now());
            assert!(now <= after + 1, "{now} after {after}");
            assert!(before <= now + 1_000, "{before} after {now}");
        }
        let first = stamp_now();
        std::thread::sleep(Duration::from_millis(20));
        let later = stamp_now();
        assert!(later - first >= 20_000, "{first} then {later}");
        assert!(since(first) >= Duration::from_millis(20));
        assert_eq!(between(later, first), Duration::ZERO, "never negative");
    }

    #[test]
    fn micros_saturates() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), u64::MAX);
    }
}
