//! Limits against floods and spoofing.
//!
//! - [`SourceLimits`] (control thread): CREATEs per source (token bucket) and live circuits per
//!   source, as Tor's DoS defences (3 circuits/s, burst 90).
//! - [`ReplyLimiter`] (each worker, and the alternate STUN port): answers that a spoofed source
//!   could turn against someone else, STUN (up to 6× amplification) and COOKIE (1:1), per source
//!   and in all.
//! - [`LoadState`] / [`LoadMonitor`] / [`LocalTrigger`]: whether the relay is "under load",
//!   when CREATEs need a cookie.
//!
//! Every table keys on a [`SourceKey`]: an IPv4 /32 or an IPv6 /64 (one IPv6 host gets a whole
//! /64, so an address is not a host), IPv4-mapped IPv6 folded into IPv4. A [`PrefixTable`] is
//! bounded in entries and in /64 entries per IPv6 /48 (beyond its quota a /48's /64s share one
//! entry), so neither a /64 nor a /48 can fill it.

mod load;
mod reply;
mod source;
mod table;

pub use load::{LOAD_HOLD, LOAD_TICK, LOCAL_WINDOW, LoadMonitor, LoadState, LocalTrigger, QUEUE_HIGH, QUEUE_LOW};
pub use reply::{ReplyLimiter, ReplyLimits, ReplyRefusal};
pub use source::{Refusal, SourceLimits};
pub use table::{PrefixTable, SourceKey};

use std::net::IpAddr;
use std::time::Instant;

/// `ip` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports
/// for an IPv4 peer) turned into the IPv4 address, so one peer is one key everywhere.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A token bucket: up to `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> Self {
        Self { tokens: burst, last: now }
    }

    /// Refills for the time since the last call.
    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = self.last.max(now);
    }

    /// Whether a token is there (after refilling); does not spend it.
    pub fn ready(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= 1.0
    }

    /// Spends a token if there is one.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        if self.ready(rate, burst, now) {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Spends a token that [`Bucket::ready`] found.
    pub(crate) fn spend(&mut self) {
        self.tokens -= 1.0;
    }

    /// Whether the bucket would be full at `now`: its state says nothing a fresh one would not.
    pub fn is_idle(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * rate >= burst
    }

    /// Caps the tokens at `burst` (after a reload lowered it).
    fn clamp(&mut self, burst: f64) {
        self.tokens = self.tokens.min(burst);
    }

    /// When the bucket was last used.
    fn last(&self) -> Instant {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3.0, t0);
        assert_eq!((0..10).filter(|_| b.take(2.0, 3.0, t0)).count(), 3);
        assert!(!b.is_idle(2.0, 3.0, t0));
        assert_eq!((0..10).filter(|_| b.take(2.0, 3.0, t0 + Duration::from_secs(1))).count(), 2);
        assert!(b.is_idle(2.0, 3.0, t0 + Duration::from_secs(3)));
        // A clock that goes backwards (an older `now`) neither refills nor panics.
        assert!(!b.take(2.0, 3.0, t0));
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(canonical_ip(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(canonical_ip(v6), v6);
    }
}
