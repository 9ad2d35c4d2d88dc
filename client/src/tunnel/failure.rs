//! Who is blamed when a circuit fails, so that no single hop, and nobody on the client's
//! network, can steer path selection:
//!
//! | what happened | what the client concludes |
//! | --- | --- |
//! | the guard's handshake timed out | the guard set counts a failure; the same guard is retried with backoff ([`crate::guards`]) |
//! | a middle's handshake timed out | that middle (or the hop before it) is left out for [`AVOID_FOR`](super::AVOID_FOR) |
//! | the exit's handshake or ATTACH went unanswered | a strike against the exit *through the hop before it*, which is left out for [`AVOID_FOR`](super::AVOID_FOR) |
//! | the exit sent DESTROY, or an unusable or changed ATTACHED | a strike against the exit itself |
//! | a guard or middle sent DESTROY (any reason) | nothing about the hops after it: the sender, if a middle, is left out; the guard and exit are kept |
//! | a link-level DESTROY, or silence | nothing about anyone: the middles are avoided if the network allows |
//!
//! The exit is given up (and another chosen, with new inner addresses) only when it failed
//! through two different middles, refused twice itself, or, on paths of one or two hops where
//! the hop before it cannot vary, failed three times.

use super::{State, Strike, Tunnel};
use crate::guards::retry_delay;
use crate::relays::Relay;
use cellproto::client::CloseReason;
use cellproto::identity::IdentityKey;
use rand_core::CryptoRngCore;
use std::collections::HashSet;
use std::time::Instant;
use tracing::warn;

/// Tampered circuits through one guard that count as a failure of that guard.
pub const TAMPER_STRIKES: usize = 3;
/// How long a tampered circuit counts against its guard.
pub const TAMPER_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

impl Tunnel {
    pub(super) fn circuit_failed(&mut self, now: Instant, why: CloseReason, rng: &mut impl CryptoRngCore) {
        let n = self.path.len();
        match why {
            CloseReason::HandshakeTimeout { hop } if hop == n => {
                self.exit_unreached(now, "did not answer the handshake", rng)
            }
            CloseReason::HandshakeTimeout { hop: 1 } => self.guard_failed(now, rng),
            CloseReason::HandshakeTimeout { hop } => self.middle_failed(now, hop, "did not answer the handshake", rng),
            CloseReason::Destroyed { hop, reason } if hop == n => {
                self.exit_refused(now, &format!("closed the circuit (reason {reason})"), rng)
            }
            CloseReason::Destroyed { hop: 1, reason } => {
                // The guard's word about the middle is not trusted either way: avoid the
                // middles if the network allows, keep the guard.
                self.suspects = self.middles();
                self.note(&format!("guard {} closed the circuit (reason {reason})", self.name(1)));
                self.rebuild(now, rng);
            }
            CloseReason::Destroyed { hop, reason } => {
                self.middle_failed(now, hop, &format!("closed the circuit (reason {reason})"), rng)
            }
            CloseReason::LinkDestroyed { reason } => {
                // Whichever hop started it, the guard only passed it on.
                self.suspects = self.middles();
                self.note(&format!("the circuit was closed (link DESTROY, reason {reason})"));
                self.rebuild(now, rng);
            }
            CloseReason::Tampered { hop } => self.tampered(now, hop, rng),
            CloseReason::Local => self.rebuild(now, rng),
        }
    }

    /// The backward cells showed something up to hop `hop` dropping or altering what it
    /// relays (cellproto's tamper evidence). No one relay can be blamed: the middles are
    /// suspected for the next path, and the guard, on every circuit, is counted: tampering on
    /// [`TAMPER_STRIKES`] circuits through one guard within [`TAMPER_WINDOW`] counts as a failure
    /// of that guard in the guard set (path-bias accounting, as Tor does).
    fn tampered(&mut self, now: Instant, hop: usize, rng: &mut impl CryptoRngCore) {
        self.counters.tampered += 1;
        self.suspects = self.middles();
        let Some(guard) = self.path.first().map(Relay::id) else { return self.rebuild(now, rng) };
        self.tamper_log.retain(|(_, at)| now.saturating_duration_since(*at) < TAMPER_WINDOW);
        self.tamper_log.push((guard, now));
        let strikes = self.tamper_log.iter().filter(|(g, _)| *g == guard).count();
        self.note(&format!(
            "the circuit showed tampering up to hop {hop} ({strikes} such circuits through {} in the last hour); rebuilding",
            self.name(1)
        ));
        if strikes >= TAMPER_STRIKES {
            let unix = self.unix(now);
            self.guards.failed(&guard, unix);
            self.tamper_log.retain(|(g, _)| *g != guard);
        }
        self.rebuild(now, rng);
    }

    /// "ROLE NAME (ID)" of hop `hop` (1-based) of the current path.
    fn name(&self, hop: usize) -> String {
        let Some(r) = self.path.get(hop.saturating_sub(1)) else { return format!("hop {hop}") };
        let role = if hop == self.path.len() {
            "exit"
        } else if hop == 1 {
            "guard"
        } else {
            "middle"
        };
        format!("{role} {} ({})", r.desc.nickname, r.id())
    }

    /// Logs `why` and makes it the status reason.
    fn note(&mut self, why: &str) {
        warn!("{why}");
        self.reason = Some(why.to_owned());
    }

    /// The guard did not answer: counted in the guard set, which decides whether the next
    /// attempt goes to the same guard (after [`retry_delay`]) or to the next kept one.
    fn guard_failed(&mut self, now: Instant, rng: &mut impl CryptoRngCore) {
        let Some(id) = self.path.first().map(Relay::id) else { return self.rebuild(now, rng) };
        let unix = self.unix(now);
        self.guards.failed(&id, unix);
        let failures = self.guards.failures(&id);
        let delay = retry_delay(failures);
        let why = format!(
            "{} did not answer the handshake ({failures} failures in a row); retrying in {} s",
            self.name(1),
            delay.as_secs()
        );
        self.note(&why);
        self.rebuild_at(now + delay, rng);
    }

    /// A middle failed or closed the circuit: it is left out for a while.
    fn middle_failed(&mut self, now: Instant, hop: usize, what: &str, rng: &mut impl CryptoRngCore) {
        if let Some(id) = self.path.get(hop.saturating_sub(1)).map(Relay::id) {
            self.avoid_relay(id, now);
        }
        self.note(&format!("{} {what}", self.name(hop)));
        self.rebuild(now, rng);
    }

    /// The exit did not answer (its handshake, or ATTACH): a strike through the hop in front
    /// of it, which is left out for a while (it may be the one dropping).
    pub(super) fn exit_unreached(&mut self, now: Instant, what: &str, rng: &mut impl CryptoRngCore) {
        let n = self.path.len();
        let before = n.checked_sub(2).and_then(|i| self.path.get(i)).map(Relay::id);
        if let Some(id) = before.filter(|_| n > 2) {
            self.avoid_relay(id, now);
        }
        self.exit_struck(now, Strike::Unreached(before), what, rng);
    }

    /// The exit itself answered wrongly.
    pub(super) fn exit_refused(&mut self, now: Instant, what: &str, rng: &mut impl CryptoRngCore) {
        self.exit_struck(now, Strike::Refused, what, rng);
    }

    fn exit_struck(&mut self, now: Instant, strike: Strike, what: &str, rng: &mut impl CryptoRngCore) {
        let Some(exit) = self.path.last().map(Relay::id) else { return self.rebuild(now, rng) };
        self.exit_strikes.push((exit, strike));
        self.note(&format!("{} {what}", self.name(self.path.len())));
        if self.exit_is_dead(&exit) {
            // Left out like any failed relay: the next build switches exits if another fits
            // (see `choose_path`), or keeps retrying this one after AVOID_FOR.
            self.avoid_relay(exit, now);
        }
        self.rebuild(now, rng);
    }

    /// Whether the evidence against `exit` is more than one other hop can fabricate.
    fn exit_is_dead(&self, exit: &IdentityKey) -> bool {
        let strikes: Vec<Strike> = self.exit_strikes.iter().filter(|(e, _)| e == exit).map(|(_, s)| *s).collect();
        let refused = strikes.iter().filter(|s| **s == Strike::Refused).count();
        let via: HashSet<Option<IdentityKey>> = strikes
            .iter()
            .filter_map(|s| match s {
                Strike::Unreached(v) => Some(*v),
                Strike::Refused => None,
            })
            .collect();
        let fixed_predecessor = self.request.hops <= 2;
        refused >= 2 || via.len() >= 2 || (fixed_predecessor && strikes.len() >= 3)
    }

    /// The exit attached the circuit: the evidence against it is spent.
    pub(super) fn exit_succeeded(&mut self, exit: IdentityKey) {
        self.exit_strikes.retain(|(e, _)| *e != exit);
        if self.state() != State::Up {
            self.reason = None;
        }
    }
}
