//! Relay and exit side: the per-circuit forwarding state a relay worker owns, and the batch
//! entry point of the hot path.
//!
//! A [`HopCircuit`] is plain data (no interior mutability, no references), so a worker thread
//! can own its share of circuits outright. An exit is a hop with no next link: the commands
//! addressed to it — above all [`Command::Data`], one IP packet — come out as
//! [`Verdict::Deliver`], and it answers with [`HopCircuit::seal_backward`].

pub mod control;

use crate::cell::{
    CELL_LEN, CELL_LIMIT, Command, FORGERY_LIMIT, LINK_CONTROL_COUNTER, MAX_CIRCUIT_AGE_SECS, backward_origin, lcid,
};
use crate::crypto::{KEY_LEN, Suite};
use crate::handshake::HandshakeOutput;
use crate::link::{LinkControl, open_link_control, seal_link_control};
use crate::onion::{
    Direction, HopKeys, LayerError, LinkKeys, backward_pad_start, forward_to_next, open_forward, protect_header,
    seal_backward_command, seal_backward_relay, unprotect_counter,
};
use crate::replay::ReplayWindow;
use rand_core::CryptoRngCore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One side of a circuit at a relay: the neighbour, the id it wants on cells we send it, the id
/// we receive on, and the link's header keys.
#[derive(Debug)]
pub struct Link {
    /// The neighbour's UDP address.
    pub peer: SocketAddr,
    /// LCID the neighbour chose: written on cells we send it.
    pub lcid_out: u32,
    /// LCID we chose: cells from the neighbour carry it.
    pub lcid_in: u32,
    keys: LinkKeys,
}

impl Link {
    /// A link from its addresses, ids and 32-byte link secret.
    pub fn new(peer: SocketAddr, lcid_out: u32, lcid_in: u32, secret: &[u8; KEY_LEN]) -> Self {
        Self { peer, lcid_out, lcid_in, keys: LinkKeys::derive(secret) }
    }
}

/// Why a cell was dropped: every reason is a metric label (SPEC.md, "Drops").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No circuit has this LCID.
    UnknownCircuit,
    /// Not a cell at all (wrong size) or an invalid field.
    Malformed,
    /// Failed authentication.
    BadTag,
    /// Duplicate, too old, or implausibly new counter.
    Replay,
    /// Authenticated, but the command is unknown.
    UnknownCommand,
    /// Authenticated, but not allowed here (e.g. RELAY at the last hop).
    Protocol,
    /// A backward cell from an address that is not the next hop.
    WrongPeer,
    /// The circuit reached its AEAD usage or forgery limit.
    Limit,
}

impl DropReason {
    /// Stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::UnknownCircuit => "unknown_circuit",
            DropReason::Malformed => "malformed",
            DropReason::BadTag => "bad_tag",
            DropReason::Replay => "replay",
            DropReason::UnknownCommand => "unknown_command",
            DropReason::Protocol => "protocol",
            DropReason::WrongPeer => "wrong_peer",
            DropReason::Limit => "limit",
        }
    }
}

/// What to do with a cell after [`HopCircuit`] processed it in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the rewritten cell to this address.
    Send(SocketAddr),
    /// A command for this hop; its payload is the first `len` bytes of the body.
    Deliver {
        /// The command.
        cmd: Command,
        /// Payload length.
        len: usize,
    },
    /// An authenticated link-control message from the neighbour on the side `from`
    /// ([`Direction::Forward`]: from the previous hop).
    Control {
        /// Which neighbour sent it.
        from: Direction,
        /// The message.
        msg: LinkControl,
    },
    /// Dropped; count it under this reason.
    Drop(DropReason),
}

/// A circuit as one relay (or the exit) sees it.
#[derive(Debug)]
pub struct HopCircuit {
    hop: usize,
    keys: HopKeys,
    prev: Link,
    next: Option<Link>,
    fwd_window: ReplayWindow,
    bwd_window: ReplayWindow,
    forgeries: u64,
    created: Instant,
    last_active: Instant,
}

impl HopCircuit {
    /// A circuit from a completed handshake that arrived from `peer` with reply id `lcid_out`;
    /// `lcid_in` is the id this relay chose for it.
    pub fn new(hs: &HandshakeOutput, peer: SocketAddr, lcid_out: u32, lcid_in: u32, now: Instant) -> Self {
        Self {
            hop: usize::from(hs.hop),
            keys: HopKeys::from_material(hs.suite, &hs.keys),
            prev: Link::new(peer, lcid_out, lcid_in, &hs.link_secret),
            next: None,
            fwd_window: ReplayWindow::new(),
            bwd_window: ReplayWindow::new(),
            forgeries: 0,
            created: now,
            last_active: now,
        }
    }

    /// Adds the next hop once it answered our CREATE (the circuit was extended through us).
    pub fn set_next(&mut self, next: Link) {
        self.next = Some(next);
    }

    /// This relay's position in the circuit (1-based).
    pub fn hop(&self) -> usize {
        self.hop
    }

    /// The negotiated suite.
    pub fn suite(&self) -> Suite {
        self.keys.suite()
    }

    /// The previous hop's link.
    pub fn prev(&self) -> &Link {
        &self.prev
    }

    /// The next hop's link, if extended.
    pub fn next(&self) -> Option<&Link> {
        self.next.as_ref()
    }

    /// Last time an authenticated cell arrived or a cell was sent backward.
    pub fn last_active(&self) -> Instant {
        self.last_active
    }

    /// Whether the circuit should be torn down: idle longer than `idle`, older than the
    /// maximum age, or at its usage limits.
    pub fn expired(&self, now: Instant, idle: Duration) -> bool {
        now.saturating_duration_since(self.last_active) > idle
            || now.saturating_duration_since(self.created) > Duration::from_secs(MAX_CIRCUIT_AGE_SECS)
            || self.fwd_window.newest() >= CELL_LIMIT
            || self.bwd_window.newest() >= CELL_LIMIT
            || self.forgeries >= FORGERY_LIMIT
    }

    /// Processes a cell received from the previous hop, in place.
    pub fn handle_forward(&mut self, now: Instant, from: SocketAddr, cell: &mut [u8; CELL_LEN]) -> Verdict {
        let counter = unprotect_counter(cell, self.prev.keys.header(Direction::Forward));
        if counter == LINK_CONTROL_COUNTER {
            return control(cell, &self.prev.keys, Direction::Forward);
        }
        // Only the client (hop 1's neighbour) may roam to a new address, and only once a cell
        // from there authenticates; relays do not move.
        if self.hop > 1 && from != self.prev.peer {
            return Verdict::Drop(DropReason::WrongPeer);
        }
        if self.fwd_window.check(counter).is_err() {
            return Verdict::Drop(DropReason::Replay);
        }
        if counter >= CELL_LIMIT || self.forgeries >= FORGERY_LIMIT {
            return Verdict::Drop(DropReason::Limit);
        }
        let opened = open_forward(cell, self.hop, &self.keys, counter);
        if let Err(LayerError::BadTag) = opened {
            self.forgeries += 1;
            return Verdict::Drop(DropReason::BadTag);
        }
        // The tag verified: the counter is spent whatever the command turns out to be.
        self.fwd_window.commit(counter);
        self.last_active = now;
        self.prev.peer = from;
        match opened {
            Ok((Command::Relay, _)) => match &self.next {
                Some(next) => {
                    forward_to_next(cell, self.hop, counter, &next.keys, next.lcid_out);
                    Verdict::Send(next.peer)
                }
                None => Verdict::Drop(DropReason::Protocol),
            },
            Ok((cmd, len)) => Verdict::Deliver { cmd, len },
            Err(LayerError::UnknownCommand(_)) => Verdict::Drop(DropReason::UnknownCommand),
            Err(_) => Verdict::Drop(DropReason::Malformed),
        }
    }

    /// Processes a cell received from the next hop, in place.
    pub fn handle_backward(&mut self, now: Instant, from: SocketAddr, cell: &mut [u8; CELL_LEN]) -> Verdict {
        let Some(next) = &self.next else { return Verdict::Drop(DropReason::UnknownCircuit) };
        if from != next.peer {
            return Verdict::Drop(DropReason::WrongPeer);
        }
        let counter = unprotect_counter(cell, next.keys.header(Direction::Backward));
        if counter == LINK_CONTROL_COUNTER {
            return control(cell, &next.keys, Direction::Backward);
        }
        // Only hops beyond this one may originate what arrives from the next hop.
        if backward_origin(counter) <= self.hop {
            return Verdict::Drop(DropReason::Protocol);
        }
        if self.bwd_window.check(counter).is_err() {
            return Verdict::Drop(DropReason::Replay);
        }
        if counter >= CELL_LIMIT {
            return Verdict::Drop(DropReason::Limit);
        }
        // Backward cells cannot be authenticated here (only the client shares keys with the
        // hops beyond), but every counter is sealed under at most once: that is what keeps
        // this hop's backward nonces unique.
        self.bwd_window.commit(counter);
        if seal_backward_relay(cell, self.hop, &self.keys, counter).is_err() {
            return Verdict::Drop(DropReason::Malformed);
        }
        protect_header(
            cell,
            self.prev.keys.header(Direction::Backward),
            self.prev.lcid_out,
            counter,
            backward_pad_start(self.hop),
        );
        self.last_active = now;
        Verdict::Send(self.prev.peer)
    }

    /// Originates a command towards the client (DATA from the exit's TUN, PONG, EXTENDED, …).
    /// The payload (`len` bytes) must already be at the start of the body; returns where to send.
    pub fn seal_backward(
        &mut self,
        now: Instant,
        cmd: Command,
        len: usize,
        cell: &mut [u8; CELL_LEN],
    ) -> Result<SocketAddr, LayerError> {
        // The counter comes from the same window as relayed cells, in this hop's own residue
        // class, so it is never used twice.
        let counter = self.bwd_window.take_next(self.hop);
        seal_backward_command(cell, self.hop, &self.keys, counter, cmd, len, &self.prev.keys, self.prev.lcid_out)?;
        self.last_active = now;
        Ok(self.prev.peer)
    }

    /// Writes a link-level DESTROY for the neighbour on side `to` (Backward: the previous hop).
    /// Returns where to send it, or `None` if there is no such neighbour.
    pub fn seal_destroy(
        &self,
        to: Direction,
        reason: u8,
        cell: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Option<SocketAddr> {
        let (link, dir) = match to {
            Direction::Backward => (&self.prev, Direction::Backward),
            Direction::Forward => (self.next.as_ref()?, Direction::Forward),
        };
        seal_link_control(cell, &link.keys, dir, link.lcid_out, LinkControl::Destroy { reason }, rng);
        Some(link.peer)
    }
}

fn control(cell: &mut [u8; CELL_LEN], keys: &LinkKeys, from: Direction) -> Verdict {
    match open_link_control(cell, keys) {
        Ok(msg) => Verdict::Control { from, msg },
        Err(_) => Verdict::Drop(DropReason::BadTag),
    }
}

/// Where a worker finds the circuit for an LCID. Generic, so the batch loop is monomorphized
/// for the worker's own table (no dynamic dispatch per cell).
pub trait CircuitTable {
    /// The circuit with this receive LCID and the direction cells on it travel.
    fn lookup(&mut self, lcid: u32) -> Option<(&mut HopCircuit, Direction)>;
}

/// A received datagram in a caller-owned buffer.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// Sender address.
    pub from: SocketAddr,
    /// The cell, rewritten in place.
    pub cell: &'a mut [u8; CELL_LEN],
}

/// The hot path: processes a batch of cells in place and writes one verdict per cell.
/// `verdicts` must be at least as long as `batch`.
pub fn process_batch<T: CircuitTable>(
    table: &mut T,
    now: Instant,
    batch: &mut [Incoming<'_>],
    verdicts: &mut [Verdict],
) {
    for (incoming, verdict) in batch.iter_mut().zip(verdicts.iter_mut()) {
        *verdict = match table.lookup(lcid(incoming.cell)) {
            Some((circ, Direction::Forward)) => circ.handle_forward(now, incoming.from, incoming.cell),
            Some((circ, Direction::Backward)) => circ.handle_backward(now, incoming.from, incoming.cell),
            None => Verdict::Drop(DropReason::UnknownCircuit),
        };
    }
}

/// A simple table of circuits by receive LCID, for workers and tests.
#[derive(Debug, Default)]
pub struct CircuitMap {
    circuits: HashMap<u32, HopCircuit>,
    by_next: HashMap<u32, u32>,
}

impl CircuitMap {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a circuit under its previous-link receive LCID.
    pub fn insert(&mut self, circ: HopCircuit) {
        if let Some(next) = &circ.next {
            self.by_next.insert(next.lcid_in, circ.prev.lcid_in);
        }
        self.circuits.insert(circ.prev.lcid_in, circ);
    }

    /// Records the next link of the circuit whose previous-link LCID is `lcid`.
    pub fn set_next(&mut self, lcid: u32, next: Link) -> bool {
        let Some(circ) = self.circuits.get_mut(&lcid) else { return false };
        self.by_next.insert(next.lcid_in, lcid);
        circ.set_next(next);
        true
    }

    /// The circuit whose previous-link LCID is `lcid`.
    pub fn get_mut(&mut self, lcid: u32) -> Option<&mut HopCircuit> {
        self.circuits.get_mut(&lcid)
    }

    /// Whether an LCID is in use on either side of any circuit.
    pub fn contains_lcid(&self, lcid: u32) -> bool {
        self.circuits.contains_key(&lcid) || self.by_next.contains_key(&lcid)
    }

    /// Removes the circuit whose previous-link LCID is `lcid`.
    pub fn remove(&mut self, lcid: u32) -> Option<HopCircuit> {
        let circ = self.circuits.remove(&lcid)?;
        if let Some(next) = &circ.next {
            self.by_next.remove(&next.lcid_in);
        }
        Some(circ)
    }

    /// Removes and returns the circuits for which `expired` holds.
    pub fn remove_where(&mut self, mut expired: impl FnMut(&HopCircuit) -> bool) -> Vec<HopCircuit> {
        let ids: Vec<u32> = self.circuits.iter().filter(|(_, c)| expired(c)).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Every circuit (e.g. to send DESTROY for each at shutdown).
    pub fn iter(&self) -> impl Iterator<Item = &HopCircuit> {
        self.circuits.values()
    }

    /// Number of circuits.
    pub fn len(&self) -> usize {
        self.circuits.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.circuits.is_empty()
    }
}

impl CircuitTable for CircuitMap {
    fn lookup(&mut self, lcid: u32) -> Option<(&mut HopCircuit, Direction)> {
        if let Some(&prev) = self.by_next.get(&lcid) {
            return self.circuits.get_mut(&prev).map(|c| (c, Direction::Backward));
        }
        self.circuits.get_mut(&lcid).map(|c| (c, Direction::Forward))
    }
}
