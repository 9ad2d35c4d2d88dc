//! Token buckets for per-circuit and per-exit bandwidth limits (bytes per second and burst) and
//! for ATTACH limits (requests). Time is an argument: tests drive them with an injected clock.

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
}
