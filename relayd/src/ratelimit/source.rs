//! Per-source limits on circuit creation: a token bucket of CREATEs and a cap on live circuits
//! per source (IPv4 /32, IPv6 /64; see [`PrefixTable`] for the /48 bound), as Tor's DoS
//! defences (3 circuits/s, burst 90). Exempt prefixes (the other relays) skip both — but not
//! the cookie under load nor the global circuit cap, which are checked elsewhere for everyone.
//!
//! The table is bounded ([`MAX_SOURCES`]). When it is full, idle sources (no live circuit) are
//! evicted, least recently seen first; a source with live circuits is never evicted (its count
//! is what enforces its cap). Only when every entry has live circuits is a new source refused.
//! With [`MAX_SOURCES`] above the global circuit cap that cannot happen at the default settings.

use super::{Bucket, PrefixTable, SourceKey, canonical_ip};
use ipnet::IpNet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most sources tracked at once: 2^18 entries of about 64 bytes with the hash tables' overhead,
/// some 32 MiB at most. Far above the default global cap (`limits.max_circuits`, 50,000), so the
/// table cannot be full of sources that all hold circuits.
pub const MAX_SOURCES: usize = 1 << 18;
/// Most /64 entries per IPv6 /48 (a site): beyond it the /48's /64s share one entry.
pub const PER_SITE: u32 = 256;
/// Share of the table evicted at once when it is full (amortises the scan).
const EVICT_FRACTION: usize = 8;

/// Why a CREATE was refused (a metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source's CREATE bucket is empty.
    Rate,
    /// The source holds `max_circuits_per_ip` live circuits.
    SourceCircuits,
    /// The source table is full of sources with live circuits.
    Table,
}

impl Refusal {
    /// Every refusal, in metric order.
    pub const ALL: [Refusal; 3] = [Refusal::Rate, Refusal::SourceCircuits, Refusal::Table];

    /// Stable metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Refusal::Rate => "source_rate",
            Refusal::SourceCircuits => "source_circuits",
            Refusal::Table => "source_table",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Source {
    bucket: Bucket,
    circuits: u32,
}

/// The limits and their state.
#[derive(Debug)]
pub struct SourceLimits {
    rate: f64,
    burst: f64,
    max_circuits: u32,
    exempt: Vec<IpNet>,
    table: PrefixTable<Source>,
}

impl SourceLimits {
    /// Limits with `rate` CREATEs per second, `burst`, and `max_circuits` live per source.
    pub fn new(rate: f64, burst: u32, max_circuits: u32, exempt: Vec<IpNet>) -> Self {
        Self::with_table(rate, burst, max_circuits, exempt, MAX_SOURCES, PER_SITE)
    }

    /// The same with a table of `capacity` entries and `per_site` /64s per /48 (tests).
    pub fn with_table(
        rate: f64,
        burst: u32,
        max_circuits: u32,
        exempt: Vec<IpNet>,
        capacity: usize,
        per_site: u32,
    ) -> Self {
        Self { rate, burst: f64::from(burst), max_circuits, exempt, table: PrefixTable::new(capacity, per_site) }
    }

    /// New limits for a running relay (SIGHUP). Sources keep their state: live circuits are
    /// still counted, and no bucket holds more than the new burst.
    pub fn reconfigure(&mut self, rate: f64, burst: u32, max_circuits: u32, exempt: Vec<IpNet>) {
        self.rate = rate;
        self.burst = f64::from(burst);
        self.max_circuits = max_circuits;
        self.exempt = exempt;
        for s in self.table.values_mut() {
            s.bucket.clamp(self.burst);
        }
    }

    /// Whether `ip` is in `limits.exempt`.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.exempt.iter().any(|net| net.contains(&ip))
    }

    /// Whether a CREATE from `ip` may proceed now; spends a token if so. `Ok(Some(key))`: the
    /// circuit, once made, is charged to `key` ([`SourceLimits::opened`]); `Ok(None)`: exempt.
    pub fn check_create(&mut self, ip: IpAddr, now: Instant) -> Result<Option<SourceKey>, Refusal> {
        if self.is_exempt(ip) {
            return Ok(None);
        }
        let key = self.table.key(ip);
        if self.table.get_mut(&key).is_none() && self.table.is_full() {
            self.make_room();
        }
        let burst = self.burst;
        let Some(source) = self.table.get_or_insert(key, || Source { bucket: Bucket::full(burst, now), circuits: 0 })
        else {
            return Err(Refusal::Table);
        };
        if source.circuits >= self.max_circuits {
            return Err(Refusal::SourceCircuits);
        }
        if source.bucket.take(self.rate, self.burst, now) { Ok(Some(key)) } else { Err(Refusal::Rate) }
    }

    /// Whether a CREATE from `ip` may proceed now (spends a token if so).
    pub fn allow_create(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.check_create(ip, now).is_ok()
    }

    /// A circuit charged to `key` was created.
    pub fn opened(&mut self, key: SourceKey) {
        if let Some(s) = self.table.get_mut(&key) {
            s.circuits += 1;
        }
    }

    /// A circuit charged to `key` ended.
    pub fn closed(&mut self, key: SourceKey) {
        if let Some(s) = self.table.get_mut(&key) {
            s.circuits = s.circuits.saturating_sub(1);
        }
    }

    /// Live circuits charged to `key`.
    pub fn circuits(&self, key: &SourceKey) -> u32 {
        self.table.get(key).map_or(0, |s| s.circuits)
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Forgets sources with no live circuit whose bucket has been full (idle) for a while.
    pub fn prune(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        let grace = Duration::from_secs(60);
        self.table
            .retain(|_, s| s.circuits > 0 || !s.bucket.is_idle(rate, burst, now.checked_sub(grace).unwrap_or(now)));
    }

    /// Evicts the least recently seen sources without live circuits, an eighth of the table.
    fn make_room(&mut self) {
        let n = self.table.capacity().div_ceil(EVICT_FRACTION);
        self.table.evict_oldest(n, |s| s.circuits == 0, |s| s.bucket.last());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn burst_then_rate_and_exempt_and_cap() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        let relay: IpAddr = "203.0.113.5".parse().unwrap();
        let mut l = SourceLimits::new(3.0, 90, 100, vec!["203.0.113.0/24".parse().unwrap()]);
        let t0 = Instant::now();
        assert_eq!((0..200).filter(|_| l.allow_create(ip, t0)).count(), 90);
        assert_eq!(l.check_create(ip, t0), Err(Refusal::Rate));
        assert!(l.allow_create(other, t0), "another source is unaffected");
        assert_eq!((0..10).filter(|_| l.allow_create(ip, t0 + Duration::from_secs(1))).count(), 3);
        assert_eq!((0..500).filter(|_| l.allow_create(relay, t0)).count(), 500);
        assert_eq!(l.check_create(relay, t0), Ok(None), "exempt sources are not tracked");
        let key = SourceKey::of(other);
        for _ in 0..100 {
            l.opened(key);
        }
        let later = t0 + Duration::from_secs(100);
        assert_eq!(l.check_create(other, later), Err(Refusal::SourceCircuits));
        l.closed(key);
        assert!(l.allow_create(other, later));
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

    #[test]
    fn mapped_and_plain_ipv4_are_one_source_and_exempt_alike() {
        let mut l = SourceLimits::new(1.0, 3, 100, vec!["203.0.113.0/24".parse().unwrap()]);
        let t0 = Instant::now();
        let plain: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!((0..2).filter(|_| l.allow_create(plain, t0)).count(), 2);
        assert_eq!((0..5).filter(|_| l.allow_create(mapped, t0)).count(), 1, "one bucket for both forms");
        assert_eq!(l.len(), 1);
        assert!(l.is_exempt("::ffff:203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn a_48_gets_a_bounded_number_of_entries() {
        let mut l = SourceLimits::new(3.0, 90, 100, Vec::new());
        let t0 = Instant::now();
        let base = u128::from("2001:db8:5::".parse::<Ipv6Addr>().unwrap());
        for i in 0..65_536u128 {
            l.allow_create(IpAddr::V6(Ipv6Addr::from(base + (i << 64))), t0);
        }
        assert_eq!(l.len(), PER_SITE as usize + 1, "a /48's /64s beyond the quota share one entry");
        assert!(l.allow_create("2001:db8:6::1".parse().unwrap(), t0), "another /48 is unaffected");
    }

    /// The attack: one IPv6 host holds a /64 (2^64 addresses). CREATEs from 2^20 of them must
    /// not fill the source table and lock every new source out.
    #[test]
    fn one_ipv6_64_cannot_fill_the_table_and_lock_out_new_sources() {
        let mut l = SourceLimits::new(3.0, 90, 1000, Vec::new());
        let t0 = Instant::now();
        let base = u128::from("2001:db8:1:2::".parse::<Ipv6Addr>().unwrap());
        for i in 0..(1u128 << 20) {
            l.allow_create(IpAddr::V6(Ipv6Addr::from(base + i)), t0);
        }
        assert!(l.allow_create("198.51.100.7".parse().unwrap(), t0), "a new IPv4 source is locked out");
        assert!(l.allow_create("2001:db8:99::1".parse().unwrap(), t0), "a new IPv6 source is locked out");
        assert_eq!(l.len(), 3, "one entry per /64");
    }

    /// The attack: sources flood the table (spoofed, or many real ones) to push out a source
    /// with live circuits and reset its count. Idle sources go first; new sources still enter.
    #[test]
    fn a_full_table_evicts_idle_sources_never_ones_with_circuits() {
        let mut l = SourceLimits::with_table(3.0, 90, 2, Vec::new(), 64, 256);
        let t0 = Instant::now();
        let holder: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..2 {
            let key = l.check_create(holder, t0).unwrap().unwrap();
            l.opened(key);
        }
        for i in 0..10_000u32 {
            let ip = IpAddr::from((0xC633_0000u32 + i).to_be_bytes());
            assert!(l.allow_create(ip, t0 + Duration::from_millis(u64::from(i))), "new source {ip} refused");
            assert!(l.len() <= 64);
        }
        assert_eq!(l.circuits(&SourceKey::of(holder)), 2, "the source with circuits was evicted");
        assert_eq!(l.check_create(holder, t0 + Duration::from_secs(60)), Err(Refusal::SourceCircuits));
        // Only when every entry holds circuits is a new source refused.
        let mut l = SourceLimits::with_table(3.0, 90, 2, Vec::new(), 4, 256);
        for i in 0..4u8 {
            let key = l.check_create(IpAddr::from([192, 0, 2, i]), t0).unwrap().unwrap();
            l.opened(key);
        }
        assert_eq!(l.check_create("198.51.100.1".parse().unwrap(), t0), Err(Refusal::Table));
    }

    #[test]
    fn prune_keeps_sources_with_circuits() {
        let mut l = SourceLimits::new(3.0, 90, 100, Vec::new());
        let t0 = Instant::now();
        let busy: IpAddr = "192.0.2.1".parse().unwrap();
        let key = l.check_create(busy, t0).unwrap().unwrap();
        l.opened(key);
        l.allow_create("192.0.2.2".parse().unwrap(), t0);
        l.prune(t0 + Duration::from_secs(3600));
        assert_eq!(l.len(), 1);
        assert_eq!(l.circuits(&key), 1);
    }
}
