//! "Under load": when a CREATE must carry a cookie (a MAC under a cookie bound to its source
//! address, which only a sender that receives at that address has) before it costs a handshake.
//!
//! The relay is under load when CREATEs arrive faster than `limits.load_create_rate` (all
//! sources together, counted by the workers as they arrive, cookie or not), or when the
//! worker → control queue holds [`QUEUE_HIGH`] messages or more (the control thread is not
//! keeping up, whatever the rate). It leaves that state only after [`LOAD_HOLD`] during which
//! the rate stayed below half the threshold and the queue below [`QUEUE_LOW`]: a flood that
//! pauses does not flip it back and forth, and honest clients that got a cookie find it still
//! needed.
//!
//! Entering is fast: a worker that alone sees more than the threshold's worth of CREATEs within
//! [`LOCAL_WINDOW`] sets the shared flag itself (one relaxed store), so a sudden flood reaches
//! the control thread for at most that long. The control thread also sets it, from the sum
//! over all workers and the queue depth every [`LOAD_TICK`], and is the only one to clear it.
//! Workers read the flag with one relaxed load per CREATE (CREATE is not the per-cell path).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the control thread measures the CREATE rate.
pub const LOAD_TICK: Duration = Duration::from_millis(100);
/// How long the relay must be calm before it leaves the under-load state.
pub const LOAD_HOLD: Duration = Duration::from_secs(5);
/// Control queue depth that means "under load" at once (an eighth of the queue).
pub const QUEUE_HIGH: usize = 1024;
/// Control queue depth below which the relay may leave the under-load state.
pub const QUEUE_LOW: usize = 64;
/// A worker's own measuring window for the fast entry.
pub const LOCAL_WINDOW: Duration = Duration::from_millis(100);

/// The flag and threshold shared by the control thread and the workers.
#[derive(Debug)]
pub struct LoadState {
    under_load: AtomicBool,
    threshold: AtomicU64,
    entered: AtomicU64,
}

impl LoadState {
    /// For a threshold of `threshold` CREATEs per second; 0 means always under load.
    pub fn new(threshold: f64) -> Self {
        let s = Self {
            under_load: AtomicBool::new(false),
            threshold: AtomicU64::new(threshold.to_bits()),
            entered: AtomicU64::new(0),
        };
        if threshold <= 0.0 {
            s.enter();
        }
        s
    }

    /// Whether CREATEs need a cookie now.
    pub fn under_load(&self) -> bool {
        self.under_load.load(Ordering::Relaxed)
    }

    /// CREATEs per second above which the relay is under load (0: always).
    pub fn threshold(&self) -> f64 {
        f64::from_bits(self.threshold.load(Ordering::Relaxed))
    }

    /// A new threshold (SIGHUP).
    pub fn set_threshold(&self, threshold: f64) {
        self.threshold.store(threshold.to_bits(), Ordering::Relaxed);
    }

    /// Enters the under-load state.
    pub fn enter(&self) {
        if !self.under_load.swap(true, Ordering::Relaxed) {
            self.entered.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn leave(&self) {
        self.under_load.store(false, Ordering::Relaxed);
    }

    /// How many times the relay went under load.
    pub fn times_entered(&self) -> u64 {
        self.entered.load(Ordering::Relaxed)
    }
}

/// The control thread's view: rate over all workers, queue depth, hysteresis.
#[derive(Debug)]
pub struct LoadMonitor {
    last_tick: Instant,
    last_creates: u64,
    calm_since: Option<Instant>,
}

impl LoadMonitor {
    /// A monitor starting at `now`.
    pub fn new(now: Instant) -> Self {
        Self { last_tick: now, last_creates: 0, calm_since: None }
    }

    /// Takes the CREATEs counted by the workers so far (`creates`, a running total) and the
    /// control queue's depth; returns the new state when it changed.
    pub fn observe(&mut self, state: &LoadState, now: Instant, creates: u64, queue: usize) -> Option<bool> {
        let was = state.under_load();
        let threshold = state.threshold();
        if threshold <= 0.0 {
            return (!was).then(|| {
                state.enter();
                true
            });
        }
        let elapsed = now.saturating_duration_since(self.last_tick);
        let rate = (elapsed >= LOAD_TICK).then(|| {
            let rate = creates.saturating_sub(self.last_creates) as f64 / elapsed.as_secs_f64();
            self.last_tick = now;
            self.last_creates = creates;
            rate
        });
        if queue >= QUEUE_HIGH || rate.is_some_and(|r| r > threshold) {
            self.calm_since = None;
            return (!was).then(|| {
                state.enter();
                true
            });
        }
        if !was {
            self.calm_since = None;
            return None;
        }
        let rate = rate?;
        if queue >= QUEUE_LOW || rate >= threshold / 2.0 {
            self.calm_since = None;
            return None;
        }
        let since = *self.calm_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= LOAD_HOLD {
            self.calm_since = None;
            state.leave();
            return Some(false);
        }
        None
    }
}

/// A worker's fast entry into the under-load state (see the module doc).
#[derive(Debug)]
pub struct LocalTrigger {
    window_start: Instant,
    count: u32,
}

impl LocalTrigger {
    /// A trigger starting at `now`.
    pub fn new(now: Instant) -> Self {
        Self { window_start: now, count: 0 }
    }

    /// A CREATE arrived at `now`: whether the relay is under load (entering it if this worker
    /// alone sees more than the threshold's worth of CREATEs in [`LOCAL_WINDOW`]).
    pub fn create(&mut self, state: &LoadState, now: Instant) -> bool {
        if state.under_load() {
            return true;
        }
        if now.saturating_duration_since(self.window_start) >= LOCAL_WINDOW {
            self.window_start = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        if f64::from(self.count) > state.threshold() * LOCAL_WINDOW.as_secs_f64() {
            state.enter();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rate_above_threshold_enters_and_calm_leaves_after_hold() {
        let state = LoadState::new(1000.0);
        let t0 = Instant::now();
        let mut m = LoadMonitor::new(t0);
        assert_eq!(m.observe(&state, t0 + 100 * MS, 50, 0), None, "500/s is not load");
        assert_eq!(m.observe(&state, t0 + 200 * MS, 250, 0), Some(true), "2000/s is");
        assert!(state.under_load());
        // Below the threshold but above half of it: still under load, however long.
        let mut t = t0 + 200 * MS;
        let mut n = 250;
        for _ in 0..100 {
            t += 100 * MS;
            n += 60;
            assert_eq!(m.observe(&state, t, n, 0), None);
        }
        // Calm (under half): leaves only after LOAD_HOLD.
        let calm_start = t + 100 * MS;
        let mut left = None;
        for _ in 0..100 {
            t += 100 * MS;
            n += 10;
            if m.observe(&state, t, n, 0) == Some(false) {
                left = Some(t);
                break;
            }
        }
        let left = left.expect("never left load");
        assert!(left.duration_since(calm_start) >= LOAD_HOLD);
        assert!(left.duration_since(calm_start) < LOAD_HOLD + 200 * MS);
        assert!(!state.under_load());
        assert_eq!(state.times_entered(), 1);
    }

    #[test]
    fn deep_queue_enters_and_blocks_leaving() {
        let state = LoadState::new(1000.0);
        let t0 = Instant::now();
        let mut m = LoadMonitor::new(t0);
        assert_eq!(m.observe(&state, t0 + MS, 0, QUEUE_HIGH), Some(true), "at once, not at the next tick");
        let mut t = t0;
        for _ in 0..100 {
            t += 100 * MS;
            assert_eq!(m.observe(&state, t, 0, QUEUE_LOW), None, "queue not drained: stays");
        }
    }

    #[test]
    fn zero_threshold_is_always_under_load() {
        let state = LoadState::new(0.0);
        assert!(state.under_load());
        let t0 = Instant::now();
        let mut m = LoadMonitor::new(t0);
        for i in 1..100u32 {
            assert_eq!(m.observe(&state, t0 + i * LOAD_HOLD, 0, 0), None);
        }
        assert!(state.under_load());
        // A reload to a threshold lets it leave; back to 0 enters again.
        state.set_threshold(10.0);
        let mut t = t0 + 100 * LOAD_HOLD;
        let mut left = false;
        for _ in 0..100 {
            t += 100 * MS;
            left |= m.observe(&state, t, 0, 0) == Some(false);
        }
        assert!(left);
        state.set_threshold(0.0);
        assert_eq!(m.observe(&state, t, 0, 0), Some(true));
    }

    #[test]
    fn a_worker_enters_within_its_window() {
        let state = LoadState::new(1000.0);
        let t0 = Instant::now();
        let mut w = LocalTrigger::new(t0);
        // 100 CREATEs in a window is the threshold's worth: not yet.
        assert!((0..100).all(|_| !w.create(&state, t0 + MS)));
        assert!(w.create(&state, t0 + MS), "the 101st within 100 ms enters");
        assert!(state.under_load());
        // Spread out (one window each), the same count does not.
        let state = LoadState::new(1000.0);
        let mut w = LocalTrigger::new(t0);
        assert!((0..1000u32).all(|i| !w.create(&state, t0 + i * 2 * MS)));
    }
}
