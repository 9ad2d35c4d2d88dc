//! What the client learns about its path from the backward counters, and when it stops
//! trusting a circuit.
//!
//! Every backward cell carries, layer inside layer, the outgoing counter of every hop it went
//! through: hop 1's on the client's link, then inside each layer the counter of the link
//! before. A hop that drops the cells it relays leaves gaps in the next hop's sequence that its
//! own sequence does not show; a hop that alters them makes an inner layer fail to open although
//! the layers around it (and the client's link tag) are intact. Neither can be told apart from a
//! fault of the link before that hop, so the client does not blame one relay: it counts the
//! evidence per position and, past a threshold, closes the circuit as tampered (path-bias
//! accounting, as Tor does for the whole path).

use crate::cell::MAX_HOPS;
use crate::replay::{ReplayError, ReplayWindow};

/// Inner layers that may fail to open (or inner counters that may repeat) on one circuit before
/// it is closed as tampered. An honest path never produces one: the link tag already caught
/// damage on the client's link, and every hop checked the link before it.
pub const TAMPER_EVIDENCE_LIMIT: u32 = 8;
/// Cells from a hop after which its sequence is judged for loss the previous hop does not explain.
pub const LOSS_SAMPLE: u64 = 256;
/// Share (in percent) of a hop's cells that may vanish between it and the hop before, beyond
/// what the later links lost too, before the circuit is closed as tampered. Links between relays
/// lose far less; a hop dropping this much is either attacking the circuit or unusable.
pub const INTERIOR_LOSS_PERCENT: u64 = 20;

/// One hop's backward sequence as the client received it.
#[derive(Debug, Clone, Default)]
pub struct HopSequence {
    window: ReplayWindow,
    first: u32,
    received: u64,
}

impl HopSequence {
    /// Cells accepted from this hop's sequence.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Counters between the first and the newest that never arrived (still in flight included).
    pub fn missing(&self) -> u64 {
        if self.received == 0 {
            return 0;
        }
        let span = u64::from(self.window.newest().saturating_sub(self.first)) + 1;
        span.saturating_sub(self.received)
    }

    /// Cells the window accepted (towards the usage limit).
    pub fn accepted(&self) -> u32 {
        self.window.accepted()
    }

    pub(crate) fn check(&self, counter: u32) -> Result<(), ReplayError> {
        self.window.check(counter)
    }

    pub(crate) fn commit(&mut self, counter: u32) {
        if self.received == 0 || counter < self.first {
            self.first = counter;
        }
        self.window.commit(counter);
        self.received += 1;
    }
}

/// Per-hop sequences and the evidence of tampering on one circuit.
#[derive(Debug, Clone, Default)]
pub struct PathEvidence {
    /// `hops[h - 1]`: hop `h`'s backward sequence.
    pub hops: Vec<HopSequence>,
    /// Inner layers that failed, inner counters replayed, and commands a hop may not send,
    /// each at the hop (1-based) where it showed.
    pub violations: [u32; MAX_HOPS],
}

impl PathEvidence {
    /// Records evidence against the path at hop `hop` (1-based; it shows a fault of hop `hop`,
    /// the link into it, or any hop before).
    pub fn violation(&mut self, hop: usize) {
        if let Some(v) = self.violations.get_mut(hop.saturating_sub(1)) {
            *v += 1;
        }
    }

    /// Cells of hop `hop`'s sequence lost between it and hop `hop - 1` beyond what the links
    /// after hop `hop - 1` lost (0 for hop 1, whose losses are on the client's own link).
    pub fn interior_loss(&self, hop: usize) -> u64 {
        if hop < 2 || hop > self.hops.len() {
            return 0;
        }
        self.hops[hop - 1].missing().saturating_sub(self.hops[hop - 2].missing())
    }

    /// The first hop at which the evidence crosses a threshold, if any.
    pub fn tampered_at(&self) -> Option<usize> {
        for hop in 1..=self.hops.len() {
            if self.violations[hop - 1] >= TAMPER_EVIDENCE_LIMIT {
                return Some(hop);
            }
            if hop >= 2 {
                let seq = &self.hops[hop - 1];
                let span = seq.received() + seq.missing();
                if span >= LOSS_SAMPLE && self.interior_loss(hop) * 100 > span * INTERIOR_LOSS_PERCENT {
                    return Some(hop);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(first: u32, got: impl IntoIterator<Item = u32>) -> HopSequence {
        let mut s = HopSequence::default();
        for c in got {
            s.check(c).unwrap();
            s.commit(c);
        }
        let _ = first;
        s
    }

    #[test]
    fn loss_on_the_clients_link_is_not_interior() {
        // Every other cell lost after the guard: both sequences show the same gaps.
        let guard = seq(10, (10..1010).step_by(2));
        let middle = seq(500, (500..1500).step_by(2));
        let ev = PathEvidence { hops: vec![guard, middle], violations: [0; MAX_HOPS] };
        assert_eq!(ev.interior_loss(2), 0);
        assert_eq!(ev.tampered_at(), None);
    }

    #[test]
    fn loss_before_the_guard_is_interior() {
        // The guard forwarded every other middle cell, and lost none of its own.
        let guard = seq(10, 10..510);
        let middle = seq(500, (500..1500).step_by(2));
        let ev = PathEvidence { hops: vec![guard, middle], violations: [0; MAX_HOPS] };
        assert_eq!(ev.interior_loss(2), 499);
        assert_eq!(ev.tampered_at(), Some(2));
    }

    #[test]
    fn violations_cross_the_threshold() {
        let mut ev = PathEvidence { hops: vec![HopSequence::default(); 3], violations: [0; MAX_HOPS] };
        for _ in 0..TAMPER_EVIDENCE_LIMIT - 1 {
            ev.violation(3);
        }
        assert_eq!(ev.tampered_at(), None);
        ev.violation(3);
        assert_eq!(ev.tampered_at(), Some(3));
    }
}
