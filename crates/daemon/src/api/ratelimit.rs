//! Failed authentication, limited per source address: a token bucket per IP that only
//! failures drain. While a source's bucket is empty its wrong tokens are answered 429 (with
//! `Retry-After`) instead of 401; a right token from it is still served, so one tenant's
//! bad token does not lock out its neighbours behind the same address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures a source may make in a burst.
pub const BURST: f64 = 10.0;
/// Failures per second a source earns back.
pub const REFILL_PER_SEC: f64 = 0.5;
/// Above this many tracked sources, those back at a full bucket are forgotten.
const MAX_TRACKED: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant, burst: f64, per_sec: f64) -> Bucket {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * per_sec;
        Bucket {
            tokens: (self.tokens + earned).min(burst),
            at: now,
        }
    }
}

#[derive(Debug)]
pub struct FailedAuthLimiter {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Default for FailedAuthLimiter {
    fn default() -> Self {
        FailedAuthLimiter::new(BURST, REFILL_PER_SEC)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl FailedAuthLimiter {
    pub fn new(burst: f64, per_sec: f64) -> FailedAuthLimiter {
        FailedAuthLimiter {
            burst,
            per_sec,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when `source` has used up its failures.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = buckets.get_mut(&canonical(source)) else {
            return Ok(());
        };
        *b = b.refilled(now, self.burst, self.per_sec);
        if b.tokens >= 1.0 {
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / self.per_sec;
            Err(Duration::from_secs_f64(wait.max(0.0)).max(Duration::from_secs(1)))
        }
    }

    /// Counts one failed authentication from `source`.
    pub fn failed(&self, source: IpAddr, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED {
            let (burst, per_sec) = (self.burst, self.per_sec);
            buckets.retain(|_, b| b.refilled(now, burst, per_sec).tokens < burst);
        }
        let b = buckets.entry(canonical(source)).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        *b = b.refilled(now, self.burst, self.per_sec);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_beyond_the_burst_are_refused_until_earned_back() {
        let l = FailedAuthLimiter::new(3.0, 1.0);
        let a: IpAddr = "198.51.100.10".parse().unwrap();
        let b: IpAddr = "198.51.100.11".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(a, t0).is_ok());
            l.failed(a, t0);
        }
        let retry = l.check(a, t0).unwrap_err();
        assert_eq!(retry, Duration::from_secs(1));
        // Another source is not affected; the same source as IPv4-mapped IPv6 is.
        assert!(l.check(b, t0).is_ok());
        let mapped: IpAddr = "::ffff:198.51.100.10".parse().unwrap();
        assert!(l.check(mapped, t0).is_err());
        // One second earns one more try.
        assert!(l.check(a, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn the_table_stays_bounded() {
        let l = FailedAuthLimiter::new(2.0, 1.0);
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            l.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        // Long after, the old sources are forgotten when a new one comes.
        l.failed("203.0.113.9".parse().unwrap(), t0 + Duration::from_secs(10));
        assert!(l.buckets.lock().unwrap().len() < 20);
    }
}
