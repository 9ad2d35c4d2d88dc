//! Sliding-window replay protection (RFC 6479), one window per circuit and direction.
//!
//! The window is a ring of 64-bit words. A counter is accepted once if it is newer than anything
//! seen or inside the window and not yet seen; reordering within the window is normal on UDP.
//! `check` and `commit` are separate so that authenticated directions commit only after the tag
//! verified: a forged cell must never move the window.

use thiserror::Error;

/// Window width in counters: RFC 6479 layout with 64 usable words (4096 bits) plus one spare
/// word, so sliding never clears bits that are still inside the window. Every sequence is one
/// link's (or one layer's) alone, so all of it is available for reordering.
pub const REPLAY_WINDOW: u32 = 4096;
const WORDS: usize = (REPLAY_WINDOW / 64) as usize + 1;
/// How far ahead of the newest counter a cell may jump: a small multiple of the window. Only
/// authenticated cells move a window, so this is not what stops forgeries; it bounds what an
/// authenticated but hostile sender can do with counters (skip most of the window at once,
/// or encode much in the jumps), and a circuit that lost more cells than this in one burst is
/// rebuilt rather than resynchronised.
pub const MAX_COUNTER_JUMP: u32 = 4 * REPLAY_WINDOW;
const _: () = assert!(MAX_COUNTER_JUMP >= REPLAY_WINDOW && MAX_COUNTER_JUMP <= 8 * REPLAY_WINDOW);

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReplayError {
    /// Counter 0 is never sent (sequences start at 1 or above).
    #[error("counter zero is not valid")]
    Zero,
    /// Already seen.
    #[error("duplicate counter")]
    Duplicate,
    /// Older than the window: it may or may not have been seen, so it is refused.
    #[error("counter older than the replay window")]
    TooOld,
    /// Further ahead of the newest counter than [`MAX_COUNTER_JUMP`].
    #[error("counter too far ahead")]
    TooFarAhead,
}

/// One sequence's replay window. The first accepted counter sets where it starts, since every
/// sequence starts at a random value the receiver does not know in advance; commit only what
/// authenticated, so a forged cell can never place or move it.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    newest: u32,
    accepted: u32,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window: nothing seen; the first counter committed may be any non-zero value.
    pub const fn new() -> Self {
        Self { newest: 0, accepted: 0, bits: [0; WORDS] }
    }

    /// The newest counter accepted so far (0 if none).
    pub fn newest(&self) -> u32 {
        self.newest
    }

    /// How many counters were committed: the receiving side's count towards the usage limit.
    pub fn accepted(&self) -> u32 {
        self.accepted
    }

    /// Whether `counter` would be accepted now.
    pub fn check(&self, counter: u32) -> Result<(), ReplayError> {
        if counter == 0 {
            return Err(ReplayError::Zero);
        }
        if self.newest == 0 {
            return Ok(());
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

    /// Marks `counter` as seen. Call only after [`check`](Self::check) succeeded and the cell
    /// authenticated.
    pub fn commit(&mut self, counter: u32) {
        if counter > self.newest {
            if self.newest != 0 {
                let old_word = self.newest / 64;
                let new_word = counter / 64;
                // Clear the words the window slides over (at most the whole ring).
                let steps = (new_word - old_word).min(WORDS as u32);
                for i in 1..=steps {
                    self.bits[((old_word + i) as usize) % WORDS] = 0;
                }
            }
            self.newest = counter;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= bit;
        self.accepted = self.accepted.saturating_add(1);
    }

    fn slot(counter: u32) -> (usize, u64) {
        (((counter / 64) as usize) % WORDS, 1u64 << (counter % 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn accept(w: &mut ReplayWindow, c: u32) -> Result<(), ReplayError> {
        w.check(c)?;
        w.commit(c);
        Ok(())
    }

    #[test]
    fn in_order_reordered_duplicate_old() {
        let mut w = ReplayWindow::new();
        assert_eq!(accept(&mut w, 0), Err(ReplayError::Zero));
        // The first counter may be anywhere: sequences start at random values.
        accept(&mut w, 1_000_001).unwrap();
        for c in 1_000_002..=1_000_100 {
            accept(&mut w, c).unwrap();
        }
        assert_eq!(accept(&mut w, 1_000_050), Err(ReplayError::Duplicate));
        accept(&mut w, 1_005_000).unwrap();
        // Inside the window (1_005_000 - 4095) but never seen: accepted once, out of order.
        accept(&mut w, 1_001_500).unwrap();
        assert_eq!(accept(&mut w, 1_001_500), Err(ReplayError::Duplicate));
        assert_eq!(accept(&mut w, 1_000_100), Err(ReplayError::TooOld));
        assert_eq!(accept(&mut w, 1_005_000 + MAX_COUNTER_JUMP + 1), Err(ReplayError::TooFarAhead));
        accept(&mut w, 1_005_000 + MAX_COUNTER_JUMP).unwrap();
        assert_eq!(w.accepted(), 100 + 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Against a model (a set of seen counters): accepted iff not seen, within the window
        /// and within the jump limit. Steps are drawn so that the model often reaches the jump
        /// limit, the edge of the window and duplicates.
        #[test]
        fn matches_model(start in 1u32..1_000_000, steps in proptest::collection::vec(
            prop_oneof![
                0u32..64,
                (REPLAY_WINDOW - 2)..(REPLAY_WINDOW + 2),
                (MAX_COUNTER_JUMP - 2)..(MAX_COUNTER_JUMP + 3),
                0u32..(2 * MAX_COUNTER_JUMP),
            ].prop_flat_map(|d| (Just(d), any::<bool>())), 1..300)) {
            let mut w = ReplayWindow::new();
            let mut seen = std::collections::BTreeSet::new();
            let mut newest = 0u32;
            for (delta, back) in steps {
                // Either ahead of the newest or behind it, by `delta`.
                let c = if newest == 0 { start } else if back { newest.saturating_sub(delta) } else { newest + delta };
                let fresh = c != 0 && !seen.contains(&c);
                let in_window = newest == 0 || c > newest || newest - c < REPLAY_WINDOW;
                let jump_ok = newest == 0 || c <= newest || c - newest <= MAX_COUNTER_JUMP;
                let expect = fresh && in_window && jump_ok;
                prop_assert_eq!(accept(&mut w, c).is_ok(), expect, "counter {} newest {}", c, newest);
                if expect {
                    seen.insert(c);
                    newest = newest.max(c);
                }
            }
        }
    }
}
