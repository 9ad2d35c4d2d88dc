//! Relay and exit side: the per-circuit forwarding state a relay worker owns, and the batch
//! entry point of the hot path.
//!
//! A [`HopCircuit`] is plain data (no interior mutability, no references), so a worker thread
//! can own its share of circuits outright. An exit is a hop with no next link: the commands
//! addressed to it — above all [`Command::Data`], one IP packet — come out as
//! [`Verdict::Deliver`], and it answers with [`HopCircuit::seal_backward`].

pub mod control;
pub mod cookie;

use crate::cell::{
    CELL_LEN, CELL_LIMIT, COUNTER_START_MAX, FORGERY_LIMIT, LINK_CONTROL_COUNTER, MAX_CIRCUIT_AGE_SECS, lcid,
};
use crate::crypto::{KEY_LEN, Suite};
use crate::handshake::HandshakeOutput;
use crate::link::{LinkControl, open_link_control, seal_link_control};
use crate::onion::{
    Direction, HopKeys, Layer, LayerError, LinkKeys, check_link_tag, forward_to_next, open_forward,
    seal_backward_command, seal_backward_relay, unprotect_counter,
};
use crate::replay::ReplayWindow;
use rand_core::CryptoRngCore;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The AEAD of link tags on links between two relays. Relays are servers with AES hardware
/// (their descriptors say so); the client's own link uses the suite negotiated with hop 1.
pub const RELAY_LINK_SUITE: Suite = Suite::Aes256Gcm;

/// A source address as one value: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
/// dual-stack socket reports for IPv4 peers) becomes the IPv4 address it maps, so that every
/// comparison, limit and table treats one peer as one address.
pub fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// A random start for a counter sequence (SPEC.md §4.4).
pub(crate) fn counter_start(rng: &mut impl CryptoRngCore) -> u32 {
    1 + rng.next_u32() % COUNTER_START_MAX
}

/// One side of a circuit at a relay: the neighbour, the id it wants on cells we send it, the id
/// we receive on, and the link's keys.
#[derive(Debug)]
pub struct Link {
    /// The neighbour's UDP address.
    pub peer: SocketAddr,
    /// LCID the neighbour chose: written on cells we send it.
    pub lcid_out: u32,
    /// LCID we chose: cells from the neighbour carry it.
    pub lcid_in: u32,
    keys: LinkKeys,
    /// Link-control sequence numbers: the last one we sent, the highest we accepted.
    ctl_sent: u64,
    ctl_seen: u64,
}

impl Link {
    /// A link from its addresses, ids, 32-byte link secret and the suite of its link tags.
    pub fn new(peer: SocketAddr, lcid_out: u32, lcid_in: u32, secret: &[u8; KEY_LEN], suite: Suite) -> Self {
        Self {
            peer: canonical_addr(peer),
            lcid_out,
            lcid_in,
            keys: LinkKeys::derive(secret, suite),
            ctl_sent: 0,
            ctl_seen: 0,
        }
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
    /// Authenticated, but not allowed here (e.g. RELAY at the last hop, a second EXTEND).
    Protocol,
    /// A cell from an address that is not the neighbour of its link.
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
        cmd: crate::cell::Command,
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

/// The counters this hop seals its own backward layers under: its outgoing link counter.
#[derive(Debug)]
struct Sequence {
    next: u32,
    used: u32,
}

impl Sequence {
    fn new(rng: &mut impl CryptoRngCore) -> Self {
        Self { next: counter_start(rng), used: 0 }
    }

    fn take(&mut self) -> Result<u32, LayerError> {
        if self.used >= CELL_LIMIT {
            return Err(LayerError::KeyLimit);
        }
        let c = self.next;
        self.next += 1;
        self.used += 1;
        Ok(c)
    }
}

/// A circuit as one relay (or the exit) sees it.
#[derive(Debug)]
pub struct HopCircuit {
    hop: usize,
    keys: HopKeys,
    prev: Link,
    next: Option<Link>,
    /// This hop's forward layer counters, which are the previous link's forward counters.
    fwd_window: ReplayWindow,
    /// The next link's backward counters.
    bwd_window: ReplayWindow,
    /// This hop's backward layer counters, which are the previous link's backward counters.
    bwd_out: Sequence,
    forgeries: u64,
    created: Instant,
    last_active: Instant,
}

impl HopCircuit {
    /// A circuit from a completed handshake on `prev`, the link it arrived on.
    pub fn new(hs: &HandshakeOutput, prev: Link, now: Instant, rng: &mut impl CryptoRngCore) -> Self {
        Self {
            hop: usize::from(hs.hop),
            keys: HopKeys::from_material(hs.suite, &hs.keys),
            prev,
            next: None,
            fwd_window: ReplayWindow::new(),
            bwd_window: ReplayWindow::new(),
            bwd_out: Sequence::new(rng),
            forgeries: 0,
            created: now,
            last_active: now,
        }
    }

    /// Adds the next hop once it answered our CREATE. A circuit is extended once: returns
    /// `false` (and changes nothing) if it already has a next hop.
    pub fn set_next(&mut self, next: Link) -> bool {
        if self.next.is_some() {
            return false;
        }
        self.next = Some(next);
        true
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
            || self.fwd_window.accepted() >= CELL_LIMIT
            || self.bwd_window.accepted() >= CELL_LIMIT
            || self.bwd_out.used >= CELL_LIMIT
            || self.forgeries >= FORGERY_LIMIT
    }

    /// The counter this hop reads from a cell arriving from side `from` (what a hop, honest or
    /// colluding, learns of a cell's counter). For tests and diagnostics.
    pub fn peek_counter(&self, from: Direction, cell: &[u8; CELL_LEN]) -> u32 {
        match (from, &self.next) {
            (Direction::Forward, _) => unprotect_counter(cell, self.prev.keys.header(Direction::Forward)),
            (Direction::Backward, Some(next)) => unprotect_counter(cell, next.keys.header(Direction::Backward)),
            (Direction::Backward, None) => 0,
        }
    }

    /// Processes a cell received from the previous hop, in place.
    pub fn handle_forward(&mut self, now: Instant, from: SocketAddr, cell: &mut [u8; CELL_LEN]) -> Verdict {
        let from = canonical_addr(from);
        // Relays do not move: after hop 1 only the previous hop's address may send on this
        // link, link control included. Hop 1's neighbour, the client, may roam, once a cell from
        // its new address authenticates.
        if self.hop > 1 && from != self.prev.peer {
            return Verdict::Drop(DropReason::WrongPeer);
        }
        let counter = unprotect_counter(cell, self.prev.keys.header(Direction::Forward));
        if counter == LINK_CONTROL_COUNTER {
            return control(cell, &mut self.prev, Direction::Forward, Direction::Forward);
        }
        if self.fwd_window.check(counter).is_err() {
            return Verdict::Drop(DropReason::Replay);
        }
        if self.fwd_window.accepted() >= CELL_LIMIT || self.forgeries >= FORGERY_LIMIT {
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
            Ok(Layer::Relay(next_counter)) => match &self.next {
                Some(next) => {
                    forward_to_next(cell, self.hop, &self.keys, next_counter, &next.keys, next.lcid_out);
                    Verdict::Send(next.peer)
                }
                None => Verdict::Drop(DropReason::Protocol),
            },
            Ok(Layer::Terminal(cmd, len)) => Verdict::Deliver { cmd, len },
            Err(LayerError::UnknownCommand(_)) => Verdict::Drop(DropReason::UnknownCommand),
            Err(_) => Verdict::Drop(DropReason::Malformed),
        }
    }

    /// Processes a cell received from the next hop, in place: [`Self::accept_backward`], then
    /// [`Self::relay_backward`].
    pub fn handle_backward(&mut self, now: Instant, from: SocketAddr, cell: &mut [u8; CELL_LEN]) -> Verdict {
        match self.accept_backward(now, from, cell) {
            Ok(inner) => self.relay_backward(now, inner, cell),
            Err(verdict) => verdict,
        }
    }

    /// First half of [`Self::handle_backward`]: checks that a cell comes from the next hop
    /// (address, link tag, replay window) and commits its counter. Returns that counter, or the
    /// verdict for a cell that goes no further (a drop or a link-control message). A forged or
    /// replayed datagram changes nothing here.
    pub fn accept_backward(
        &mut self,
        now: Instant,
        from: SocketAddr,
        cell: &mut [u8; CELL_LEN],
    ) -> Result<u32, Verdict> {
        let Some(next) = &mut self.next else { return Err(Verdict::Drop(DropReason::UnknownCircuit)) };
        if canonical_addr(from) != next.peer {
            return Err(Verdict::Drop(DropReason::WrongPeer));
        }
        let counter = unprotect_counter(cell, next.keys.header(Direction::Backward));
        if counter == LINK_CONTROL_COUNTER {
            return Err(control(cell, next, Direction::Backward, Direction::Backward));
        }
        if self.bwd_window.check(counter).is_err() {
            return Err(Verdict::Drop(DropReason::Replay));
        }
        if check_link_tag(cell, &next.keys, counter).is_err() {
            return Err(Verdict::Drop(DropReason::BadTag));
        }
        if self.bwd_window.accepted() >= CELL_LIMIT {
            return Err(Verdict::Drop(DropReason::Limit));
        }
        self.bwd_window.commit(counter);
        self.last_active = now;
        Ok(counter)
    }

    /// Second half of [`Self::handle_backward`]: seals the accepted cell (which arrived with
    /// counter `inner`) under this hop's layer and its own next counter, for the previous hop.
    pub fn relay_backward(&mut self, now: Instant, inner: u32, cell: &mut [u8; CELL_LEN]) -> Verdict {
        let Ok(counter) = self.bwd_out.take() else { return Verdict::Drop(DropReason::Limit) };
        if seal_backward_relay(cell, self.hop, &self.keys, counter, inner, &self.prev.keys, self.prev.lcid_out).is_err()
        {
            return Verdict::Drop(DropReason::Malformed);
        }
        self.last_active = now;
        Verdict::Send(self.prev.peer)
    }

    /// Originates a command towards the client (DATA from the exit's TUN, PONG, EXTENDED, …).
    /// The payload (`len` bytes) must already be at the start of the body; returns where to send.
    /// Fails with [`LayerError::KeyLimit`] once this hop sealed [`CELL_LIMIT`] cells.
    pub fn seal_backward(
        &mut self,
        now: Instant,
        cmd: crate::cell::Command,
        len: usize,
        cell: &mut [u8; CELL_LEN],
    ) -> Result<SocketAddr, LayerError> {
        let counter = self.bwd_out.take()?;
        seal_backward_command(cell, self.hop, &self.keys, counter, cmd, len, &self.prev.keys, self.prev.lcid_out)?;
        self.last_active = now;
        Ok(self.prev.peer)
    }

    /// Writes a link-level DESTROY for the neighbour on side `to` (Backward: the previous hop).
    /// Returns where to send it, or `None` if there is no such neighbour.
    pub fn seal_destroy(
        &mut self,
        to: Direction,
        reason: u8,
        cell: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Option<SocketAddr> {
        let link = match to {
            Direction::Backward => &mut self.prev,
            Direction::Forward => self.next.as_mut()?,
        };
        link.ctl_sent += 1;
        seal_link_control(cell, &link.keys, to, link.lcid_out, link.ctl_sent, LinkControl::Destroy { reason }, rng);
        Some(link.peer)
    }

    #[cfg(test)]
    pub(crate) fn exhaust_backward_for_test(&mut self) {
        self.bwd_out.used = CELL_LIMIT;
    }
}

/// Opens a link-control cell that travelled `dir` on `link` and came from side `from`.
fn control(cell: &mut [u8; CELL_LEN], link: &mut Link, dir: Direction, from: Direction) -> Verdict {
    match open_link_control(cell, &link.keys, dir, &mut link.ctl_seen) {
        Ok(msg) => Verdict::Control { from, msg },
        Err(crate::link::LinkError::Replay) => Verdict::Drop(DropReason::Replay),
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

    /// Records the next link of the circuit whose previous-link LCID is `lcid`. Refused (false)
    /// if there is no such circuit or it is already extended.
    pub fn set_next(&mut self, lcid: u32, next: Link) -> bool {
        let Some(circ) = self.circuits.get_mut(&lcid) else { return false };
        let next_lcid = next.lcid_in;
        if !circ.set_next(next) {
            return false;
        }
        self.by_next.insert(next_lcid, lcid);
        true
    }

    /// Removes the circuit that receives on `lcid` on either of its links.
    pub fn remove_any(&mut self, lcid: u32) -> Option<HopCircuit> {
        let prev = self.by_next.get(&lcid).copied().unwrap_or(lcid);
        self.remove(prev)
    }

    /// Number of next-link entries (one per extended circuit; for tests that count tables).
    pub fn next_links(&self) -> usize {
        self.by_next.len()
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

#[cfg(all(test, feature = "sim"))]
mod tests {
    use crate::cell::{CELL_LEN, Command};
    use crate::onion::LayerError;
    use crate::sim::Net;

    /// A hop refuses to seal once its backward key reached the usage limit, whoever asks.
    #[test]
    fn seal_backward_enforces_the_cell_limit() {
        let mut net = Net::new(1, 1, |_| true);
        net.build();
        let lcid = net.relays[0].node.circuits().iter().next().map(|c| c.prev().lcid_in).unwrap_or_default();
        let circ = net.relays[0].node.circuits_mut().get_mut(lcid).expect("circuit");
        let mut cell = [0u8; CELL_LEN];
        assert!(circ.seal_backward(net.now, Command::Padding, 0, &mut cell).is_ok());
        circ.exhaust_backward_for_test();
        assert_eq!(circ.seal_backward(net.now, Command::Padding, 0, &mut cell), Err(LayerError::KeyLimit));
        assert!(circ.expired(net.now, std::time::Duration::from_secs(3600)));
    }
}
