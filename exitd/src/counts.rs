//! A worker's packet counters: one fixed slot per outcome (no map, no string hashing, no
//! allocation on the packet path), published to the metrics every 100 ms, and a log of drops
//! at most every [`DROP_LOG_EVERY`] per reason (counting is exact, logging is not per packet).

use crate::policy::RULES;
use std::time::{Duration, Instant};
use tracing::info;

/// Every label of `exitd_packets_total{what}`, in slot order: five of delivery (the first four
/// are not drops), the exit policy's rules ([`crate::policy::RULES`], listed once, there), then
/// fragments, malformed packets, circuits, the backward path and `other`.
pub const LABELS: [&str; N_LABELS] = labels();

/// How many labels there are.
const N_LABELS: usize = BEFORE_RULES.len() + RULES.len() + AFTER_RULES.len();

/// The labels before the policy's rules.
const BEFORE_RULES: [&str; 5] = [
    // Delivered or handed on.
    "to_tun",
    "from_tun",
    "dns",
    "handed_off",
    // Bytes, not packets (of `rate_limited`).
    "rate_limited_bytes",
];

/// The labels after the policy's rules.
const AFTER_RULES: [&str; 21] = [
    // Fragments (crate::filter).
    "fragment_unmatched",
    "fragments_full",
    // Malformed packets (crate::packet::PacketError).
    "empty",
    "bad_version",
    "truncated",
    "bad_length",
    "truncated_transport",
    "bad_extensions",
    // Circuits.
    "spoofed_source",
    "not_attached",
    "rate_limited",
    "bad_attach",
    "attach_refused",
    "pool_poisoned",
    // The backward path and the TUN device.
    "bad_tun_packet",
    "no_circuit",
    "handoff_full",
    "too_big",
    "seal_failed",
    "tun_write_error",
    // Anything not listed above (a new label not added here yet).
    "other",
];

/// [`BEFORE_RULES`], [`RULES`] and [`AFTER_RULES`] in one array (at compile time).
const fn labels() -> [&'static str; N_LABELS] {
    let mut out = [""; N_LABELS];
    let mut i = 0;
    while i < out.len() {
        out[i] = if i < BEFORE_RULES.len() {
            BEFORE_RULES[i]
        } else if i < BEFORE_RULES.len() + RULES.len() {
            RULES[i - BEFORE_RULES.len()]
        } else {
            AFTER_RULES[i - BEFORE_RULES.len() - RULES.len()]
        };
        i += 1;
    }
    out
}

/// Slots of the counters the packet path touches on every packet (no lookup).
pub mod slot {
    /// A packet written to the TUN device.
    pub const TO_TUN: usize = 0;
    /// A packet from the TUN device sealed to a circuit.
    pub const FROM_TUN: usize = 1;
    /// DNS to the tunnel resolver.
    pub const DNS: usize = 2;
    /// A packet handed to the worker that owns its circuit.
    pub const HANDED_OFF: usize = 3;
    /// Bytes refused by the rate limits.
    pub const RATE_LIMITED_BYTES: usize = 4;
}

/// Drops of one reason are logged at most this often (with the count since the last line).
pub const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// The slot of `label` (a drop: only on the refusal path, never per forwarded packet).
pub fn slot_of(label: &str) -> usize {
    LABELS.iter().position(|l| *l == label).unwrap_or(OTHER)
}

const OTHER: usize = LABELS.len() - 1;

/// A worker's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts(pub [u64; LABELS.len()]);

impl Default for Counts {
    fn default() -> Self {
        Self([0; LABELS.len()])
    }
}

impl Counts {
    /// Adds `n` to `slot`.
    pub fn add(&mut self, slot: usize, n: u64) {
        if let Some(c) = self.0.get_mut(slot) {
            *c += n;
        }
    }

    /// Counts one packet refused under `label`.
    pub fn drop(&mut self, label: &str) {
        self.add(slot_of(label), 1);
    }

    /// The count under `label`.
    pub fn get(&self, label: &str) -> u64 {
        self.0[slot_of(label)]
    }

    /// (label, count) for every label.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        LABELS.iter().copied().zip(self.0)
    }
}

/// Logs each drop reason at most every [`DROP_LOG_EVERY`], with the count since its last line.
#[derive(Debug)]
pub struct DropLog {
    logged: Counts,
    last: [Option<Instant>; LABELS.len()],
}

impl Default for DropLog {
    fn default() -> Self {
        Self { logged: Counts::default(), last: [None; LABELS.len()] }
    }
}

impl DropLog {
    /// The reasons to log now (label, dropped since the last line, total), marked as logged.
    pub fn due(&mut self, counts: &Counts, now: Instant) -> Vec<(&'static str, u64, u64)> {
        let mut out = Vec::new();
        // Delivered packets and the byte count are not drops.
        let slots = LABELS.iter().zip(counts.0).zip(self.logged.0.iter_mut().zip(self.last.iter_mut()));
        for ((label, total), (logged, last)) in slots.skip(slot::RATE_LIMITED_BYTES + 1) {
            if total == *logged || last.is_some_and(|t| now.saturating_duration_since(t) < DROP_LOG_EVERY) {
                continue;
            }
            out.push((*label, total - *logged, total));
            *logged = total;
            *last = Some(now);
        }
        out
    }

    /// Logs what is due for `worker`.
    pub fn log(&mut self, worker: usize, counts: &Counts, now: Instant) {
        for (reason, dropped, total) in self.due(counts, now) {
            info!(worker, reason, dropped, total, "exit dropped packets");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_has_a_slot_and_the_hot_slots_are_right() {
        for label in crate::policy::RULES {
            assert_ne!(slot_of(label), OTHER, "{label}");
        }
        for (slot, label) in [
            (slot::TO_TUN, "to_tun"),
            (slot::FROM_TUN, "from_tun"),
            (slot::DNS, "dns"),
            (slot::HANDED_OFF, "handed_off"),
        ] {
            assert_eq!(LABELS[slot], label);
        }
        assert_eq!(LABELS[slot::RATE_LIMITED_BYTES], "rate_limited_bytes");
        assert_eq!(LABELS[OTHER], "other");
        let mut sorted = LABELS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), LABELS.len(), "labels are unique");
        let mut c = Counts::default();
        c.drop("no such label");
        assert_eq!(c.get("other"), 1);
    }

    #[test]
    fn drops_are_logged_at_most_every_ten_seconds_with_what_happened_since() {
        let t0 = Instant::now();
        let (mut c, mut log) = (Counts::default(), DropLog::default());
        c.add(slot::TO_TUN, 1000);
        c.drop("private");
        c.drop("private");
        assert_eq!(log.due(&c, t0), vec![("private", 2, 2)], "delivered packets are not drops");
        c.drop("private");
        c.drop("spoofed_source");
        assert_eq!(log.due(&c, t0 + Duration::from_secs(1)), vec![("spoofed_source", 1, 1)]);
        assert_eq!(log.due(&c, t0 + Duration::from_secs(9)), vec![]);
        assert_eq!(log.due(&c, t0 + DROP_LOG_EVERY), vec![("private", 1, 3)]);
        assert_eq!(log.due(&c, t0 + DROP_LOG_EVERY * 5), vec![], "nothing new, nothing logged");
    }
}
