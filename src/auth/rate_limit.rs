//! `login_rate_limit`: failed logins allowed per client address per minute. An address that
//! reaches the limit is refused before any password exchange until its minute is over, so
//! a password cannot be guessed faster than the limit allows.
//!
//! Addresses are counted in fixed one-minute windows that start at an address's first
//! failure. IPv6 addresses are counted per /64 (what one host usually gets). At most
//! [`MAX_TRACKED`] addresses are tracked; when that many have failed within the minute, new
//! ones are not limited (memory stays bounded whatever an attacker sends).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Most addresses tracked at once.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Failed logins per client address.
#[derive(Debug, Default)]
pub struct LoginLimiter {
    windows: Mutex<HashMap<IpAddr, Window>>,
}

/// The address as counted: IPv6 by its /64 prefix, IPv4-mapped IPv6 as IPv4.
fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl LoginLimiter {
    /// When `addr` has used up `limit` failures in its current window, how long until it
    /// may try again. `limit` 0 never limits.
    pub fn blocked(&self, addr: IpAddr, limit: u32, now: Instant) -> Option<Duration> {
        if limit == 0 {
            return None;
        }
        let map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.get(&key(addr))?;
        let elapsed = now.saturating_duration_since(w.started);
        (elapsed < WINDOW && w.failures >= limit).then(|| WINDOW - elapsed)
    }

    /// Counts a failed login from `addr`; true when this failure used up its allowance
    /// (the address is refused from now until its window ends).
    pub fn failed(&self, addr: IpAddr, limit: u32, now: Instant) -> bool {
        if limit == 0 {
            return false;
        }
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(addr);
        if !map.contains_key(&k) && map.len() >= MAX_TRACKED {
            map.retain(|_, w| now.saturating_duration_since(w.started) < WINDOW);
            if map.len() >= MAX_TRACKED {
                return false;
            }
        }
        let w = map.entry(k).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.saturating_duration_since(w.started) >= WINDOW {
            *w = Window {
                started: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
        w.failures == limit
    }

    /// Addresses tracked now (for tests and diagnostics).
    pub fn tracked(&self) -> usize {
        self.windows.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_after_the_allowed_failures_until_the_window_ends() {
        let l = LoginLimiter::default();
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        let b: IpAddr = "10.0.0.6".parse().unwrap();
        let t0 = Instant::now();
        for i in 1..=3 {
            assert_eq!(l.blocked(a, 3, t0), None);
            assert_eq!(
                l.failed(a, 3, t0),
                i == 3,
                "the third failure reaches the limit"
            );
        }
        let left = l.blocked(a, 3, t0 + Duration::from_secs(20)).unwrap();
        assert_eq!(left, Duration::from_secs(40));
        assert_eq!(
            l.blocked(b, 3, t0),
            None,
            "other addresses are not affected"
        );
        assert_eq!(l.blocked(a, 0, t0), None, "0 turns the limit off");
        assert_eq!(l.blocked(a, 3, t0 + WINDOW), None, "a new window");
        l.failed(a, 3, t0 + WINDOW);
        assert_eq!(l.blocked(a, 3, t0 + WINDOW), None, "counting starts again");
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = LoginLimiter::default();
        let t0 = Instant::now();
        l.failed("2001:db8:1:2::1".parse().unwrap(), 2, t0);
        l.failed("2001:db8:1:2:ffff::9".parse().unwrap(), 2, t0);
        assert!(l
            .blocked("2001:db8:1:2::77".parse().unwrap(), 2, t0)
            .is_some());
        assert!(l
            .blocked("2001:db8:1:3::1".parse().unwrap(), 2, t0)
            .is_none());
        l.failed("::ffff:10.1.1.1".parse().unwrap(), 1, t0);
        assert!(l.blocked("10.1.1.1".parse().unwrap(), 1, t0).is_some());
    }

    #[test]
    fn memory_is_bounded() {
        let l = LoginLimiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            l.failed(IpAddr::V4(i.into()), 5, t0);
        }
        assert_eq!(l.tracked(), MAX_TRACKED);
        // After the window, old entries make room.
        l.failed("192.0.2.1".parse().unwrap(), 5, t0 + WINDOW);
        assert_eq!(l.tracked(), 1);
    }
}
