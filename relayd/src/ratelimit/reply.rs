//! Limits on answers a spoofed source could aim at someone else: STUN (a 20-byte request gets
//! up to 124 bytes back) and COOKIE (the size of the CREATE it answers). A bucket per source
//! (/32, /64) bounds what one victim receives; a bucket over all sources bounds what the relay
//! sends in all. The table is bounded: when full, the least recently used sources are
//! forgotten (a flooder who cycles through that many sources to refill one victim's bucket
//! pays for each datagram it reflects).

use super::{Bucket, PrefixTable};
use std::net::IpAddr;
use std::time::Instant;

/// Most sources one limiter tracks (about 4 MiB).
pub const REPLY_SOURCES: usize = 1 << 16;
/// Most /64 entries per IPv6 /48.
const PER_SITE: u32 = 256;
/// Share of the table forgotten at once when it is full.
const EVICT_FRACTION: usize = 8;

/// Why an answer was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyRefusal {
    /// The source's bucket is empty.
    Source,
    /// The bucket over all sources is empty.
    Global,
}

/// Rates of one kind of answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplyLimits {
    /// Answers per second per source.
    pub rate: f64,
    /// Burst per source.
    pub burst: u32,
    /// Answers per second over all sources (one limiter: one worker).
    pub global_rate: f64,
}

/// A per-source and global token bucket for answers.
#[derive(Debug)]
pub struct ReplyLimiter {
    rate: f64,
    burst: f64,
    global_rate: f64,
    global_burst: f64,
    global: Bucket,
    table: PrefixTable<Bucket>,
}

impl ReplyLimiter {
    /// `limits.rate` answers per second per source with `limits.burst`, and
    /// `limits.global_rate` per second in all (with a tenth of a second's worth as its burst).
    pub fn new(limits: ReplyLimits, now: Instant) -> Self {
        Self::with_capacity(limits, now, REPLY_SOURCES)
    }

    /// The same tracking at most `capacity` sources (tests).
    pub fn with_capacity(limits: ReplyLimits, now: Instant, capacity: usize) -> Self {
        let global_burst = (limits.global_rate / 10.0).max(1.0);
        Self {
            rate: limits.rate,
            burst: f64::from(limits.burst),
            global_rate: limits.global_rate,
            global_burst,
            global: Bucket::full(global_burst, now),
            table: PrefixTable::new(capacity, PER_SITE),
        }
    }

    /// New rates for a running relay (SIGHUP); sources keep their state.
    pub fn reconfigure(&mut self, limits: ReplyLimits) {
        self.rate = limits.rate;
        self.burst = f64::from(limits.burst);
        self.global_rate = limits.global_rate;
        self.global_burst = (limits.global_rate / 10.0).max(1.0);
        self.global.clamp(self.global_burst);
        for b in self.table.values_mut() {
            b.clamp(self.burst);
        }
    }

    /// Whether an answer to `ip` may be sent now (spends a token of both buckets if so).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> Result<(), ReplyRefusal> {
        let key = self.table.key(ip);
        if self.table.get(&key).is_none() && self.table.is_full() {
            let n = self.table.capacity().div_ceil(EVICT_FRACTION);
            self.table.evict_oldest(n, |_| true, |b| b.last());
        }
        let burst = self.burst;
        let Some(bucket) = self.table.get_or_insert(key, || Bucket::full(burst, now)) else {
            return Err(ReplyRefusal::Source);
        };
        if !bucket.ready(self.rate, self.burst, now) {
            return Err(ReplyRefusal::Source);
        }
        if !self.global.take(self.global_rate, self.global_burst, now) {
            return Err(ReplyRefusal::Global);
        }
        bucket.spend();
        Ok(())
    }

    /// Whether an answer to a source with no per-source limit (exempt) may be sent now: only
    /// the bucket over all sources applies.
    pub fn allow_global(&mut self, now: Instant) -> Result<(), ReplyRefusal> {
        if self.global.take(self.global_rate, self.global_burst, now) { Ok(()) } else { Err(ReplyRefusal::Global) }
    }

    /// Forgets sources whose bucket is full again (nothing to remember about them).
    pub fn prune(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.table.retain(|_, b| !b.is_idle(rate, burst, now));
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_source_gets_at_most_its_bucket() {
        let t0 = Instant::now();
        let mut l = ReplyLimiter::new(ReplyLimits { rate: 10.0, burst: 20, global_rate: 1e6 }, t0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!((0..1000).filter(|_| l.allow(ip, t0).is_ok()).count(), 20);
        assert_eq!(l.allow(ip, t0), Err(ReplyRefusal::Source));
        assert_eq!((0..1000).filter(|_| l.allow(ip, t0 + Duration::from_secs(1)).is_ok()).count(), 10);
        assert!(l.allow("192.0.2.2".parse().unwrap(), t0).is_ok(), "another source is unaffected");
        // The mapped form of the address is the same source.
        assert_eq!(
            l.allow("::ffff:192.0.2.1".parse().unwrap(), t0 + Duration::from_secs(1)),
            Err(ReplyRefusal::Source)
        );
        // One /64 is one source.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert_eq!((0..15).filter(|_| l.allow(a, t0).is_ok()).count(), 15);
        assert_eq!((0..15).filter(|_| l.allow(b, t0).is_ok()).count(), 5);
    }

    #[test]
    fn global_cap_over_many_sources() {
        let t0 = Instant::now();
        let mut l = ReplyLimiter::new(ReplyLimits { rate: 10.0, burst: 20, global_rate: 100.0 }, t0);
        let ok = (0..1000u32).filter(|i| l.allow(IpAddr::from((0xC000_0200 + i).to_be_bytes()), t0).is_ok()).count();
        assert_eq!(ok, 10, "a tenth of a second's worth of the global rate");
        let refused = l.allow("198.51.100.1".parse().unwrap(), t0);
        assert_eq!(refused, Err(ReplyRefusal::Global));
        // A source refused by the global bucket kept its own token.
        assert!(l.allow("198.51.100.1".parse().unwrap(), t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn bounded_table_forgets_least_recent_and_prunes() {
        let t0 = Instant::now();
        let mut l = ReplyLimiter::with_capacity(ReplyLimits { rate: 1.0, burst: 2, global_rate: 1e9 }, t0, 64);
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            assert!(l.allow(IpAddr::from((0xC633_0000u32 + i).to_be_bytes()), now).is_ok(), "a new source got nothing");
            assert!(l.len() <= 64);
        }
        l.prune(t0 + Duration::from_secs(3600));
        assert!(l.is_empty());
    }
}
