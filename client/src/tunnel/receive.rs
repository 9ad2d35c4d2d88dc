//! Received cells: each authentic command is accepted only from the hop that may send it and
//! only as an answer to something the client asked.
//!
//! | command | accepted from | only if |
//! | --- | --- | --- |
//! | DATA | the exit | the circuit is attached |
//! | ATTACHED | the exit | an ATTACH is outstanding, and its addresses pass [`session::validate`]; a resumed session keeps its addresses |
//! | PONG | the exit | it echoes the outstanding PING's id |
//! | PADDING | any hop | (ignored) |
//! | EXTENDED, DESTROY | checked by cellproto's circuit (EXTENDED only from the hop being extended) | |
//!
//! cellproto's circuit already refuses DATA and ATTACHED from any hop but the exit (and counts
//! it as evidence of tampering); the tunnel checks again, and counts both refusals alike.
//!
//! Everything else is refused, counted in [`Counters::control_refused`](super::Counters) and
//! logged (at powers of two, so a flood cannot fill the log).

use super::{Phase, Tunnel, TunnelEvent};
use crate::relays::Relay;
use crate::session;
use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::{CircuitError, Event};
use cellproto::command::{Attached, decode_ping};
use cellproto::onion::payload;
use rand_core::CryptoRngCore;
use std::net::SocketAddr;
use std::time::Instant;
use tracing::{info, warn};

impl Tunnel {
    /// A datagram from `from`. Returns the length of an IP packet for the TUN device, which is
    /// then at `payload(cell, len)`.
    pub fn handle_cell(
        &mut self,
        now: Instant,
        from: SocketAddr,
        cell: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Option<usize> {
        let circ = self.phase.circuit_mut().filter(|_| Some(from) == self.guard);
        let Some(circ) = circ else {
            self.counters.dropped_bad_cells += 1;
            return None;
        };
        if cellproto::cell::lcid(cell) != circ.lcid_in() {
            self.counters.dropped_bad_cells += 1;
            return None;
        }
        let event = match circ.handle_cell(now, cell, rng) {
            Ok(e) => e,
            // Authentic, but a hop sent what it may not (cellproto refuses e.g. ATTACHED or DATA
            // from any hop but the exit), or the path altered it: refused, not merely bad.
            Err(CircuitError::Unexpected(cmd, hop)) => {
                self.refuse(hop, cmd, "not a command this hop may send");
                return None;
            }
            Err(CircuitError::Tampered(hop)) => {
                self.refuse(hop, Command::Relay, "the path altered or replayed it");
                return None;
            }
            Err(_) => {
                self.counters.dropped_bad_cells += 1;
                return None;
            }
        };
        let exit = self.path.len();
        match event? {
            Event::Established => {
                if let Some(t) = self.phase.circuit().and_then(|c| c.build_time()) {
                    info!(ms = t.as_secs_f64() * 1e3, "circuit built");
                }
                if self.request.hops > 1
                    && let Some(guard) = self.path.first().map(Relay::id)
                {
                    let unix = self.unix(now);
                    self.guards.succeeded(&guard, unix);
                }
                self.last_rx = now;
                self.send_attach(now);
                None
            }
            Event::Delivered { cmd: Command::Data, len, hop } if hop == exit && self.phase.is_up() => {
                self.last_rx = now;
                self.counters.packets_received += 1;
                self.counters.bytes_received += len as u64;
                Some(len)
            }
            Event::Delivered { cmd: Command::Attached, len, hop } => {
                if hop != exit {
                    self.refuse(hop, Command::Attached, "only the exit may configure the client");
                } else if !matches!(self.phase, Phase::Attaching { .. }) {
                    self.refuse(hop, Command::Attached, "no ATTACH is outstanding");
                } else {
                    self.last_rx = now;
                    self.on_attached(now, payload(cell, len), rng);
                }
                None
            }
            Event::Delivered { cmd: Command::Pong, len, hop } => {
                let ping = match &mut self.phase {
                    Phase::Up { ping, .. } => ping,
                    _ => &mut None,
                };
                match (decode_ping(payload(cell, len)), *ping) {
                    (Ok(id), Some((sent, at))) if hop == exit && id == sent => {
                        *ping = None;
                        self.last_rx = now;
                        self.rtt = Some(now.saturating_duration_since(at));
                    }
                    _ if hop != exit => self.refuse(hop, Command::Pong, "only the exit answers PING"),
                    _ => self.refuse(hop, Command::Pong, "it answers no outstanding PING"),
                }
                None
            }
            Event::Delivered { cmd: Command::Padding, .. } => None,
            Event::Delivered { cmd, hop, .. } => {
                self.refuse(hop, cmd, "not expected from this hop now");
                None
            }
            Event::Closed(why) => {
                self.circuit_failed(now, why, rng);
                None
            }
        }
    }

    /// Counts and logs (at powers of two) an authentic cell the client does not act on.
    fn refuse(&mut self, hop: usize, cmd: Command, why: &str) {
        self.counters.control_refused += 1;
        let n = self.counters.control_refused;
        if n.is_power_of_two() {
            let who = self.path.get(hop.saturating_sub(1)).map(|r| r.desc.nickname.as_str()).unwrap_or("?");
            warn!(hop, relay = who, refused = n, "refused {cmd:?} from hop {hop}: {why}");
        }
    }

    /// The exit's answer to our ATTACH (the caller checked it is the exit's and expected).
    fn on_attached(&mut self, now: Instant, body: &[u8], rng: &mut impl CryptoRngCore) {
        let Phase::Attaching { attach: pending, .. } = self.phase else { return };
        let exit = self.path.len();
        let attached = match Attached::decode(body) {
            Ok(a) => a,
            Err(e) => {
                self.refuse(exit, Command::Attached, "malformed");
                return self.exit_refused(now, &format!("sent a malformed ATTACHED ({e})"), rng);
            }
        };
        if let Err(e) = session::validate(&attached) {
            self.refuse(exit, Command::Attached, "unusable addresses");
            return self.exit_refused(now, &format!("sent unusable inner addresses: {e}"), rng);
        }
        let same = |old: &Attached| (old.ipv4, old.ipv6, old.dns) == (attached.ipv4, attached.ipv6, attached.dns);
        if let (Some(token), Some(old)) = (pending.resume, self.session) {
            if attached.token == token && !same(&old) {
                self.refuse(exit, Command::Attached, "resumed session with other addresses");
                return self.exit_refused(now, "resumed the session with other addresses", rng);
            }
            if attached.token != token {
                warn!(
                    inner4 = %attached.ipv4.0, inner6 = %attached.ipv6.0,
                    "the exit did not resume the session (it may have restarted): a new session with new inner addresses; open connections break"
                );
                self.counters.session_changes += 1;
            }
        }
        if self.been_up {
            self.counters.rebuilds += 1;
        }
        let exit_id = self.path.last().map(Relay::id);
        if let Some(id) = exit_id {
            self.exit_succeeded(id);
        }
        self.session = Some(attached);
        self.session_exit = exit_id;
        self.suspects.clear();
        self.phase = match std::mem::replace(&mut self.phase, Phase::Stopped) {
            Phase::Attaching { circuit, .. } => Phase::Up { circuit, since: now, ping: None },
            other => other,
        };
        self.been_up = true;
        self.reason = None;
        self.events.push_back(TunnelEvent::Up(attached));
    }
}
