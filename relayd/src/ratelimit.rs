//! Per-source limits on circuit creation: a token bucket of CREATEs and a cap on live circuits
//! per source IP, as Tor's DoS defences (3 circuits/s, burst 90). Exempt prefixes (the other
//! relays) skip both. State for idle sources is pruned so spoofed sources cannot grow it forever.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most sources tracked at once; beyond it, new sources are refused until pruning frees room.
const MAX_SOURCES: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The limits and their state.
#[derive(Debug)]
pub struct SourceLimits {
    rate: f64,
    burst: f64,
    max_circuits: u32,
    exempt: Vec<IpNet>,
    buckets: HashMap<IpAddr, Bucket>,
    circuits: HashMap<IpAddr, u32>,
}

impl SourceLimits {
    /// Limits with `rate` CREATEs per second, `burst`, and `max_circuits` live per source.
    pub fn new(rate: f64, burst: u32, max_circuits: u32, exempt: Vec<IpNet>) -> Self {
        Self { rate, burst: f64::from(burst), max_circuits, exempt, buckets: HashMap::new(), circuits: HashMap::new() }
    }

    /// New limits for a running relay (SIGHUP). Sources keep their state: live circuits are
    /// still counted, and no bucket holds more than the new burst.
    pub fn reconfigure(&mut self, rate: f64, burst: u32, max_circuits: u32, exempt: Vec<IpNet>) {
        self.rate = rate;
        self.burst = f64::from(burst);
        self.max_circuits = max_circuits;
        self.exempt = exempt;
        for b in self.buckets.values_mut() {
            b.tokens = b.tokens.min(self.burst);
        }
    }

    /// Whether a CREATE from `ip` may proceed now (spends a token if so).
    pub fn allow_create(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.exempt.iter().any(|net| net.contains(&ip)) {
            return true;
        }
        if self.circuits.get(&ip).copied().unwrap_or(0) >= self.max_circuits {
            return false;
        }
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= MAX_SOURCES {
            return false;
        }
        let bucket = self.buckets.entry(ip).or_insert(Bucket { tokens: self.burst, last: now });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A circuit from `ip` was created.
    pub fn opened(&mut self, ip: IpAddr) {
        *self.circuits.entry(ip).or_insert(0) += 1;
    }

    /// A circuit from `ip` ended.
    pub fn closed(&mut self, ip: IpAddr) {
        if let Some(n) = self.circuits.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.circuits.remove(&ip);
            }
        }
    }

    /// Forgets buckets that have been full (idle) for a while.
    pub fn prune(&mut self, now: Instant) {
        let full_after = Duration::from_secs_f64(self.burst / self.rate) + Duration::from_secs(60);
        self.buckets.retain(|_, b| now.saturating_duration_since(b.last) < full_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_and_exempt_and_cap() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        let relay: IpAddr = "203.0.113.5".parse().unwrap();
        let mut l = SourceLimits::new(3.0, 90, 100, vec!["203.0.113.0/24".parse().unwrap()]);
        let t0 = Instant::now();
        assert_eq!((0..200).filter(|_| l.allow_create(ip, t0)).count(), 90);
        assert!(l.allow_create(other, t0), "another source is unaffected");
        assert_eq!((0..10).filter(|_| l.allow_create(ip, t0 + Duration::from_secs(1))).count(), 3);
        assert_eq!((0..500).filter(|_| l.allow_create(relay, t0)).count(), 500);
        for _ in 0..100 {
            l.opened(other);
        }
        assert!(!l.allow_create(other, t0 + Duration::from_secs(100)), "circuit cap");
        l.closed(other);
        assert!(l.allow_create(other, t0 + Duration::from_secs(100)));
    }

    #[test]
    fn reconfigure_applies_at_once() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut l = SourceLimits::new(3.0, 90, 100, Vec::new());
        let t0 = Instant::now();
        assert_eq!((0..5).filter(|_| l.allow_create(ip, t0)).count(), 5);
        l.reconfigure(1.0, 2, 100, Vec::new());
        assert_eq!((0..10).filter(|_| l.allow_create(ip, t0)).count(), 2, "tokens clamped to the new burst");
        l.reconfigure(1.0, 2, 100, vec!["192.0.2.0/24".parse().unwrap()]);
        assert_eq!((0..10).filter(|_| l.allow_create(ip, t0)).count(), 10, "now exempt");
    }
}
