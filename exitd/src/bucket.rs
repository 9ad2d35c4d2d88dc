//! Token buckets for per-circuit and per-exit bandwidth limits (bytes per second and burst) and
//! for ATTACH limits (requests). Time is an argument: tests drive them with an injected clock.

use std::collections::HashMap;
use std::time::Instant;

/// A token bucket of bytes.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` bytes per second, holding at most `burst` bytes; starts full.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self { rate: rate as f64, burst: burst as f64, tokens: burst as f64, last: now }
    }

    /// A bucket of `rate` tokens per second (fractions allowed), holding at most `burst`; starts full.
    pub fn with_rate(rate: f64, burst: f64, now: Instant) -> Self {
        Self { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes `bytes` if available now; otherwise leaves the bucket as it was.
    pub fn take(&mut self, bytes: usize, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }

    /// Whether `bytes` could be taken now (takes nothing).
    pub fn peek(mut self, bytes: usize, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= bytes as f64
    }

    /// Whether the bucket has refilled to its burst by `now`.
    pub fn is_full(mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// A worker's byte limits: a bucket per circuit and the worker's share of the exit's limit.
/// A packet passes only if both buckets hold it, and then costs both; a packet refused by
/// either costs neither (a full exit does not drain the circuits that tried to send).
#[derive(Debug)]
pub struct RateLimits {
    circuit: (u64, u64),
    circuits: HashMap<u32, TokenBucket>,
    total: TokenBucket,
}

impl RateLimits {
    /// Per circuit `circuit` = (bytes per second, burst); for everything, `total`.
    pub fn new(circuit: (u64, u64), total: (u64, u64), now: Instant) -> Self {
        Self { circuit, circuits: HashMap::new(), total: TokenBucket::new(total.0, total.1, now) }
    }

    /// Whether `bytes` from `circuit` may pass at `now` (and spends them if so).
    pub fn admit(&mut self, circuit: u32, bytes: usize, now: Instant) -> bool {
        let (rate, burst) = self.circuit;
        let bucket = self.circuits.entry(circuit).or_insert_with(|| TokenBucket::new(rate, burst, now));
        if !bucket.peek(bytes, now) || !self.total.peek(bytes, now) {
            return false;
        }
        bucket.take(bytes, now) && self.total.take(bytes, now)
    }

    /// The circuit ended (its LCID may come back as another circuit with a full bucket).
    pub fn forget(&mut self, circuit: u32) {
        self.circuits.remove(&circuit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn holds_to_rate_after_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100_000, 10_000, t0);
        let mut passed = 0usize;
        // 10 s of offered load at 10× the rate, in 1000-byte packets every millisecond.
        for ms in 0..10_000u64 {
            for _ in 0..10 {
                if b.take(1000, t0 + Duration::from_millis(ms)) {
                    passed += 1000;
                }
            }
        }
        // Burst + 10 s × rate, within one packet.
        let expect = 10_000 + 10 * 100_000;
        assert!(passed.abs_diff(expect) <= 1000, "{passed} vs {expect}");
    }

    /// 10 s of offered load at `offered` packets of 1000 bytes per millisecond from each of
    /// `circuits`: what passed, per circuit.
    fn offer(limits: &mut RateLimits, t0: Instant, circuits: u32, offered: usize) -> Vec<usize> {
        let mut passed = vec![0usize; circuits as usize];
        for ms in 0..10_000u64 {
            for c in 0..circuits {
                for _ in 0..offered {
                    if limits.admit(c, 1000, t0 + Duration::from_millis(ms)) {
                        passed[c as usize] += 1000;
                    }
                }
            }
        }
        passed
    }

    #[test]
    fn each_circuit_is_held_to_its_rate() {
        let t0 = Instant::now();
        let mut l = RateLimits::new((100_000, 10_000), (u64::MAX / 4, u64::MAX / 4), t0);
        for passed in offer(&mut l, t0, 3, 1) {
            assert!(passed.abs_diff(10_000 + 1_000_000) <= 1000, "{passed}");
        }
    }

    #[test]
    fn the_exit_limit_is_shared_and_refusals_cost_nothing() {
        let t0 = Instant::now();
        // Circuits may send 1 MB/s each, the exit 300 kB/s in all: 3 circuits together get the
        // exit's rate (first come, first served: the exit limit is a cap, not a scheduler).
        let mut l = RateLimits::new((1_000_000, 100_000), (300_000, 30_000), t0);
        let passed = offer(&mut l, t0, 3, 1);
        let total: usize = passed.iter().sum();
        assert!(total.abs_diff(30_000 + 3_000_000) <= 1000, "{passed:?}");
        // A circuit refused by the exit limit kept its own tokens: with the exit idle again,
        // its whole burst passes at once.
        let later = t0 + Duration::from_secs(20);
        let burst = (0..200).filter(|_| l.admit(0, 1000, later)).count();
        assert_eq!(burst, 30, "the exit's burst, then the exit is the limit");
        let mut fresh = RateLimits::new((1_000_000, 100_000), (u64::MAX / 4, u64::MAX / 4), t0);
        assert!(!fresh.admit(1, 200_000, t0), "larger than the circuit's burst");
        assert_eq!((0..200).filter(|_| fresh.admit(1, 1000, t0)).count(), 100, "the refusal cost nothing");
        fresh.forget(1);
        assert_eq!((0..200).filter(|_| fresh.admit(1, 1000, t0)).count(), 100, "a forgotten circuit starts full");
    }

    /// The old composition (`circuit.take() && total.take()`) spent a circuit's tokens on
    /// packets the exit's limit then refused, starving the circuit after the exit was busy.
    #[test]
    fn a_packet_the_exit_refuses_costs_its_circuit_nothing() {
        let t0 = Instant::now();
        let mut l = RateLimits::new((1, 10_000), (1_000_000, 5_000), t0);
        assert_eq!((0..10).filter(|_| l.admit(7, 1000, t0)).count(), 5, "the exit's burst");
        let soon = t0 + Duration::from_millis(10);
        assert_eq!((0..10).filter(|_| l.admit(7, 1000, soon)).count(), 5, "the circuit kept the other half");
        assert!(!l.admit(7, 1000, soon + Duration::from_millis(10)), "and now it is spent");
    }
}
