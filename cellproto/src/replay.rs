//! Sliding-window replay protection (RFC 6479), one window per circuit and direction.
//!
//! The window is a ring of 64-bit words. A counter is accepted once if it is newer than anything
//! seen or inside the window and not yet seen; reordering within the window is normal on UDP.
//! `check` and `commit` are separate so that authenticated directions commit only after the tag
//! verified: a forged cell must never move the window.

use thiserror::Error;

/// Window width in counters: RFC 6479 layout with 64 usable words (4096 bits) plus one spare
/// word, so sliding never clears bits that are still inside the window. Backward counters are
/// split among up to 8 originating hops, so the exit's stream alone still tolerates 512 cells of
/// reordering.
pub const REPLAY_WINDOW: u64 = 4096;
const WORDS: usize = (REPLAY_WINDOW / 64) as usize + 1;
/// How far ahead of the newest counter a cell may jump. Unauthenticated directions (a relay's
/// backward traffic) would otherwise let one forged cell slide the window past every real cell.
pub const MAX_COUNTER_JUMP: u64 = 1 << 20;

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReplayError {
    /// Counter 0 is never sent (counters start at 1).
    #[error("counter zero is not valid")]
    Zero,
    /// Already seen.
    #[error("duplicate counter")]
    Duplicate,
    /// Older than the window: it may or may not have been seen, so it is refused.
    #[error("counter older than the replay window")]
    TooOld,
    /// Implausibly far ahead of the newest counter.
    #[error("counter too far ahead")]
    TooFarAhead,
}

/// One direction's replay window.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    newest: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window: nothing seen, the next accepted counter can be anything in `1..=2²⁰`.
    pub const fn new() -> Self {
        Self { newest: 0, bits: [0; WORDS] }
    }

    /// The newest counter accepted so far (0 if none).
    pub fn newest(&self) -> u64 {
        self.newest
    }

    /// Whether `counter` would be accepted now.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter == 0 {
            return Err(ReplayError::Zero);
        }
        if counter > self.newest {
            return if counter - self.newest > MAX_COUNTER_JUMP { Err(ReplayError::TooFarAhead) } else { Ok(()) };
        }
        if self.newest - counter >= REPLAY_WINDOW {
            return Err(ReplayError::TooOld);
        }
        let (word, bit) = Self::slot(counter);
        if self.bits[word] & bit != 0 { Err(ReplayError::Duplicate) } else { Ok(()) }
    }

    /// Marks `counter` as seen. Call only after [`check`](Self::check) succeeded (and, where the
    /// direction is authenticated, after the tag verified).
    pub fn commit(&mut self, counter: u64) {
        if counter > self.newest {
            let old_word = self.newest / 64;
            let new_word = counter / 64;
            // Clear the words the window slides over (at most the whole ring).
            let steps = (new_word - old_word).min(WORDS as u64);
            for i in 1..=steps {
                self.bits[((old_word + i) % WORDS as u64) as usize] = 0;
            }
            self.newest = counter;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= bit;
    }

    /// Check and commit in one step, for directions that cannot be authenticated first.
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        self.commit(counter);
        Ok(())
    }

    /// Takes the next counter after the newest one that is ≡ `hop` (mod `MAX_HOPS`), for a hop
    /// that originates backward cells in the space it also relays (see `cell::backward_origin`).
    pub fn take_next(&mut self, hop: usize) -> u64 {
        let m = crate::cell::MAX_HOPS as u64;
        let want = hop as u64 % m;
        let mut next = self.newest + 1;
        next += (want + m - next % m) % m;
        self.commit(next);
        next
    }

    fn slot(counter: u64) -> (usize, u64) {
        (((counter / 64) % WORDS as u64) as usize, 1u64 << (counter % 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_reordered_duplicate_old() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(0), Err(ReplayError::Zero));
        for c in 1..=100 {
            w.accept(c).unwrap();
        }
        assert_eq!(w.accept(50), Err(ReplayError::Duplicate));
        w.accept(5000).unwrap();
        // Inside the window (5000 - 4095 = 905) but never seen: accepted once, out of order.
        w.accept(1500).unwrap();
        assert_eq!(w.accept(1500), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(100), Err(ReplayError::TooOld));
        assert_eq!(w.accept(5000 + MAX_COUNTER_JUMP + 1), Err(ReplayError::TooFarAhead));
        assert_eq!(w.take_next(1), 5001);
        assert_eq!(w.accept(5001), Err(ReplayError::Duplicate));
        assert_eq!(w.take_next(8), 5008);
        assert_eq!(w.take_next(3), 5011);
        assert_eq!(crate::cell::backward_origin(5008), 8);
        assert_eq!(crate::cell::backward_origin(5011), 3);
    }

    proptest! {
        /// Against a model (a set of seen counters): accepted iff not seen and within the window.
        #[test]
        fn matches_model(steps in proptest::collection::vec(1u64..12000, 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = std::collections::BTreeSet::new();
            let mut newest = 0u64;
            for c in steps {
                let fresh = !seen.contains(&c);
                let in_window = c > newest || newest - c < REPLAY_WINDOW;
                let jump_ok = c <= newest || c - newest <= MAX_COUNTER_JUMP;
                let expect = fresh && in_window && jump_ok;
                prop_assert_eq!(w.accept(c).is_ok(), expect, "counter {} newest {}", c, newest);
                if expect {
                    seen.insert(c);
                    newest = newest.max(c);
                }
            }
        }
    }
}
