//! Limits on ATTACH, sans-IO (time is an argument): a token bucket per circuit and one per
//! source, so that neither one circuit nor one source can churn the address pool.
//!
//! The source is the previous hop's address: the client itself on a 1-hop circuit, the middle
//! relay on a longer one (an exit sees no further). IPv4-mapped IPv6 sources count as IPv4 and
//! IPv6 sources are counted per /64, the block one host can usually choose addresses from.
//! The table of sources is bounded: when full, sources whose buckets are full again (idle ones)
//! are forgotten first, and a new source is refused until there is room: established sources
//! are never evicted to make room for new ones.

use crate::bucket::TokenBucket;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Instant;

/// Most sources tracked at once.
pub const MAX_SOURCES: usize = 65_536;

/// ATTACHes one circuit may send at once. A client sends one per circuit; a few more are
/// tolerated (a retry, a switch to a resumed session) and answered idempotently.
pub const CIRCUIT_BURST: f64 = 4.0;

/// ATTACHes per second one circuit earns back after its burst: one a minute.
pub const CIRCUIT_RATE: f64 = 1.0 / 60.0;

/// Where an ATTACH came from, aggregated as limits see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    /// The key for a previous hop's address.
    pub fn new(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => Self(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1)))),
            },
            v4 => Self(v4),
        }
    }
}

/// Why an ATTACH was refused by the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The circuit sent too many.
    Circuit,
    /// Its source sent too many (or the table of sources is full of active ones).
    Source,
}

/// Per-circuit and per-source ATTACH buckets.
#[derive(Debug)]
pub struct AttachLimiter {
    source_rate: f64,
    source_burst: f64,
    circuits: HashMap<u32, TokenBucket>,
    sources: HashMap<SourceKey, TokenBucket>,
}

impl AttachLimiter {
    /// `source_rate` ATTACHes per second per source after a burst of `source_burst`.
    pub fn new(source_rate: f64, source_burst: f64) -> Self {
        Self { source_rate, source_burst, circuits: HashMap::new(), sources: HashMap::new() }
    }

    /// Whether an ATTACH on `circuit` from `source` may be served now; spends a token from
    /// each bucket if so, and nothing if not.
    pub fn allow(&mut self, circuit: u32, source: SourceKey, now: Instant) -> Result<(), Refusal> {
        let circuit_ok = self
            .circuits
            .get(&circuit)
            .copied()
            .unwrap_or_else(|| TokenBucket::with_rate(CIRCUIT_RATE, CIRCUIT_BURST, now))
            .peek(1, now);
        if !circuit_ok {
            return Err(Refusal::Circuit);
        }
        if !self.sources.contains_key(&source) && self.sources.len() >= MAX_SOURCES {
            self.prune(now);
            if self.sources.len() >= MAX_SOURCES {
                return Err(Refusal::Source);
            }
        }
        let (rate, burst) = (self.source_rate, self.source_burst);
        let bucket = self.sources.entry(source).or_insert_with(|| TokenBucket::with_rate(rate, burst, now));
        if !bucket.take(1, now) {
            return Err(Refusal::Source);
        }
        let bucket =
            self.circuits.entry(circuit).or_insert_with(|| TokenBucket::with_rate(CIRCUIT_RATE, CIRCUIT_BURST, now));
        bucket.take(1, now);
        Ok(())
    }

    /// The circuit ended: its bucket goes (its LCID may be reused by another circuit).
    pub fn forget_circuit(&mut self, circuit: u32) {
        self.circuits.remove(&circuit);
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// Forgets sources whose bucket is full again: they have been idle long enough that a
    /// fresh bucket is the same.
    fn prune(&mut self, now: Instant) {
        self.sources.retain(|_, b| !b.is_full(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> SourceKey {
        SourceKey::new(s.parse().unwrap())
    }

    #[test]
    fn sources_aggregate_per_family() {
        assert_eq!(ip("::ffff:192.0.2.1"), ip("192.0.2.1"));
        assert_eq!(ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::2"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_ne!(ip("192.0.2.1"), ip("192.0.2.2"));
    }

    #[test]
    fn one_circuit_is_held_to_its_burst_then_one_a_minute() {
        let t0 = Instant::now();
        let mut l = AttachLimiter::new(1000.0, 1000.0);
        let src = ip("192.0.2.1");
        let allowed = (0..10).filter(|_| l.allow(7, src, t0).is_ok()).count();
        assert_eq!(allowed, CIRCUIT_BURST as usize);
        assert_eq!(l.allow(7, src, t0 + Duration::from_secs(30)), Err(Refusal::Circuit));
        assert_eq!(l.allow(7, src, t0 + Duration::from_secs(61)), Ok(()));
        assert_eq!(l.allow(7, src, t0 + Duration::from_secs(62)), Err(Refusal::Circuit));
        assert_eq!(l.allow(8, src, t0 + Duration::from_secs(62)), Ok(()), "another circuit has its own");
        // A circuit that ended and whose LCID is reused starts afresh.
        l.forget_circuit(7);
        assert_eq!(l.allow(7, src, t0 + Duration::from_secs(62)), Ok(()));
    }

    #[test]
    fn one_source_is_held_to_its_rate_across_circuits() {
        let t0 = Instant::now();
        let mut l = AttachLimiter::new(2.0, 10.0);
        let src = ip("2001:db8::1");
        // A new circuit per ATTACH, over 10 s at 100 per second: burst + 10 s × rate pass.
        let mut passed = 0;
        for i in 0..1000u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 10);
            let other_host_same_64 = SourceKey::new(format!("2001:db8::{:x}", i + 2).parse().unwrap());
            let key = if i % 2 == 0 { src } else { other_host_same_64 };
            if l.allow(i, key, now).is_ok() {
                passed += 1;
            }
        }
        assert!((29..=31).contains(&passed), "{passed}");
        assert_eq!(l.allow(5000, ip("2001:db8:0:1::1"), t0 + Duration::from_secs(10)), Ok(()), "another /64");
    }

    #[test]
    fn a_refused_attach_spends_nothing() {
        let t0 = Instant::now();
        let mut l = AttachLimiter::new(0.0, 1.0);
        assert_eq!(l.allow(1, ip("192.0.2.1"), t0), Ok(()));
        for _ in 0..10 {
            assert_eq!(l.allow(2, ip("192.0.2.1"), t0), Err(Refusal::Source));
        }
        // Circuit 2's bucket was not spent by those refusals: its whole burst is left.
        for i in 0..CIRCUIT_BURST as u8 {
            assert_eq!(l.allow(2, ip(&format!("198.51.100.{i}")), t0), Ok(()));
        }
        assert_eq!(l.allow(2, ip("198.51.100.99"), t0), Err(Refusal::Circuit));
        assert!(l.allow(3, ip("198.51.100.99"), t0).is_ok(), "nor was the source's, refused by the circuit");
    }

    #[test]
    fn the_source_table_is_bounded_and_keeps_active_sources() {
        let t0 = Instant::now();
        let mut l = AttachLimiter::new(1.0, 2.0);
        // Every slot taken by a source that is still active (its bucket is not full).
        for i in 0..MAX_SOURCES as u32 {
            let key = SourceKey::new(IpAddr::V4(i.into()));
            assert!(l.allow(i, key, t0).is_ok());
        }
        assert_eq!(l.sources(), MAX_SOURCES);
        let newcomer = ip("203.0.113.9");
        assert_eq!(l.allow(u32::MAX - 1, newcomer, t0), Err(Refusal::Source), "no room, nobody evicted");
        assert_eq!(l.sources(), MAX_SOURCES);
        // Once the others are idle (buckets full again) they make room.
        assert_eq!(l.allow(u32::MAX - 1, newcomer, t0 + Duration::from_secs(2)), Ok(()));
        assert_eq!(l.sources(), 1);
    }
}
