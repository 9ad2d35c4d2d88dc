//! One relay node, sans-IO: every reaction of a relay (or an exit) to a cell, in one place, for
//! the daemon and the simulator alike.
//!
//! In the spirit of quinn-proto's `Endpoint`: a [`Node`] owns its circuits and the reply ids
//! of its EXTENDs in progress; it is given the time (`now`) and never reads a clock; it takes a
//! batch of received cells ([`Node::handle`]) and says per cell what became of it
//! ([`Routed`], with the circuit's handle); cells it originates (PONG, EXTENDED, DESTROY, the
//! exit's answers) are written into slots the caller lends it ([`Transmit`]), so nothing on the
//! per-cell path allocates; its timers are [`Node::poll_timeout`] and [`Node::handle_timeout`];
//! [`Node::shutdown`] ends every circuit.
//!
//! What a node does not decide itself goes to its [`Host`]: handshakes (CREATE, a pending
//! EXTEND's CREATED) and EXTEND, which cost X25519 operations and which relayd runs on its
//! control thread, and circuits that closed ([`Upcall`]). An exit's last hop plugs in as a
//! [`Terminal`]: DATA and ATTACH are delivered to it. [`SoloRelay`] composes a node with the
//! control plane in one value, as the simulator (and any single-threaded relay) uses it.

mod solo;

pub use solo::{Meddle, SoloRelay};

use crate::cell::{CELL_LEN, Command, HANDSHAKE_LCID, lcid, set_lcid};
use crate::command::{Extended, decode_ping, reason};
use crate::link::LinkControl;
use crate::onion::{Direction, payload, payload_mut};
use crate::relay::{CircuitMap, CircuitTable, DropReason, HopCircuit, Incoming, Link, Verdict};
use rand_core::CryptoRngCore;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often idle (and otherwise expired) circuits are looked for: a circuit lives at most this
/// much past its idle timeout (minutes), so a second is precise enough and costs one scan.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// A circuit's handle: its previous-link LCID, the key of its entry in the node's table (one
/// hash lookup, whichever link a cell arrived on).
pub type CircuitId = u32;

/// Where a node writes the cells it originates: slots the I/O layer lends it.
pub trait Transmit {
    /// A cell-sized slot for the next datagram, all zeros. Asking again before
    /// [`Transmit::commit`] gives a zeroed slot again (what was written is discarded).
    fn slot(&mut self) -> &mut [u8; CELL_LEN];
    /// Sends the cell written into the last slot to `to`.
    fn commit(&mut self, to: SocketAddr);
}

/// The last hop of an exit: what it does with the commands addressed to it that a relay does
/// not handle itself (DATA, ATTACH).
pub trait Terminal {
    /// A command for this hop on circuit `id`; `payload` is its body, still in the receive
    /// buffer. Answers are sealed with [`HopCircuit::seal_backward`] into a slot of `tx`.
    /// Returns `false` if this node takes no such command (it is then dropped as a protocol
    /// violation).
    fn deliver(
        &mut self,
        now: Instant,
        id: CircuitId,
        circ: &mut HopCircuit,
        cmd: Command,
        payload: &[u8],
        tx: &mut dyn Transmit,
    ) -> bool;

    /// Circuit `id` ended (called before its LCIDs are given back to the host).
    fn closed(&mut self, id: CircuitId);
}

/// A relay that is no exit: DATA and ATTACH are protocol violations.
impl Terminal for () {
    fn deliver(
        &mut self,
        _: Instant,
        _: CircuitId,
        _: &mut HopCircuit,
        _: Command,
        _: &[u8],
        _: &mut dyn Transmit,
    ) -> bool {
        false
    }

    fn closed(&mut self, _: CircuitId) {}
}

/// What a node hands its host to decide.
#[derive(Debug)]
pub enum Upcall<'a> {
    /// A CREATE (handshake LCID): for the control plane.
    Create {
        /// Its source.
        from: SocketAddr,
        /// The cell.
        cell: &'a [u8; CELL_LEN],
    },
    /// A cell on the reply id of an EXTEND in progress (a CREATED or a COOKIE): for the control
    /// plane, which answers with [`Node::extended`] or [`Node::extend_failed`].
    Created {
        /// Its source.
        from: SocketAddr,
        /// The cell.
        cell: &'a [u8; CELL_LEN],
    },
    /// An authenticated EXTEND on a circuit not yet extended: for the control plane.
    Extend {
        /// The circuit.
        circuit: CircuitId,
        /// The EXTEND body.
        body: &'a [u8],
    },
    /// A circuit ended: its LCIDs are free again (and an EXTEND pending for it is moot).
    Closed {
        /// The circuit (its previous-link LCID).
        circuit: CircuitId,
        /// Its next-link LCID, if it was extended.
        next: Option<u32>,
    },
}

/// The node's environment: transmit slots, and the decisions it leaves to its host.
pub trait Host: Transmit {
    /// A cell or event for the control plane (see [`Upcall`]).
    fn upcall(&mut self, now: Instant, up: Upcall<'_>);

    /// Sees a backward cell after this hop accepted it and before it seals its own layer. The
    /// default does nothing; the simulator's hostile relays rewrite the cell here.
    #[inline(always)]
    fn inspect_backward(&mut self, _cell: &mut [u8; CELL_LEN]) {}
}

/// What became of a received cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Rewritten in place: send it to `to`.
    Send {
        /// Destination.
        to: SocketAddr,
        /// The circuit it travels on.
        circuit: CircuitId,
    },
    /// Consumed by this node (a command for this hop, a DESTROY, a handshake for the host).
    Local {
        /// The circuit it was for, if any.
        circuit: Option<CircuitId>,
    },
    /// Dropped; count it under this reason.
    Drop(DropReason),
}

/// A relay node: its circuits and its EXTENDs in progress (see the module docs).
#[derive(Debug)]
pub struct Node {
    circuits: CircuitMap,
    /// Reply LCIDs of EXTENDs in progress: cells on them are for the control plane.
    pending: HashSet<u32>,
    idle: Duration,
    next_expiry: Instant,
    null_forwarder: bool,
}

impl Node {
    /// An empty node whose circuits expire after `idle` without traffic.
    pub fn new(now: Instant, idle: Duration) -> Self {
        Self {
            circuits: CircuitMap::new(),
            pending: HashSet::new(),
            idle,
            next_expiry: now + EXPIRE_EVERY,
            null_forwarder: false,
        }
    }

    /// Benchmark only: relays cells by LCID without cryptography (relayd's `[bench]
    /// null_forwarder`, which only a `bench` build accepts), to measure the I/O ceiling. Cells
    /// for this hop (a circuit not yet extended) still take the normal path.
    pub fn set_null_forwarder(&mut self, on: bool) {
        self.null_forwarder = on;
    }

    /// The circuits.
    pub fn circuits(&self) -> &CircuitMap {
        &self.circuits
    }

    /// The circuits, to change by hand (tests, diagnostics): a circuit removed here ends
    /// without DESTROY or [`Upcall::Closed`].
    pub fn circuits_mut(&mut self) -> &mut CircuitMap {
        &mut self.circuits
    }

    /// The circuit `id`.
    pub fn circuit_mut(&mut self, id: CircuitId) -> Option<&mut HopCircuit> {
        self.circuits.get_mut(id)
    }

    /// Number of circuits.
    pub fn len(&self) -> usize {
        self.circuits.len()
    }

    /// Whether the node has no circuit.
    pub fn is_empty(&self) -> bool {
        self.circuits.is_empty()
    }

    /// Whether `lcid` is in use here (by a circuit or an EXTEND in progress).
    pub fn uses_lcid(&self, lcid: u32) -> bool {
        self.circuits.contains_lcid(lcid) || self.pending.contains(&lcid)
    }

    /// Owns a new circuit (the control plane's answer to a CREATE).
    pub fn install(&mut self, circ: HopCircuit) {
        self.circuits.insert(circ);
    }

    /// Cells on `reply_lcid` are for the control plane until [`Node::extended`],
    /// [`Node::extend_failed`] or [`Node::forget_created`].
    pub fn expect_created(&mut self, reply_lcid: u32) {
        self.pending.insert(reply_lcid);
    }

    /// Cells on `reply_lcid` are no longer for the control plane.
    pub fn forget_created(&mut self, reply_lcid: u32) {
        self.pending.remove(&reply_lcid);
    }

    /// An EXTEND completed: `link` becomes the next link of `circuit` and EXTENDED goes to the
    /// client. Nothing happens if the circuit is gone or already extended.
    pub fn extended(
        &mut self,
        now: Instant,
        circuit: CircuitId,
        link: Link,
        extended: &Extended,
        reply_lcid: u32,
        tx: &mut (impl Transmit + ?Sized),
    ) {
        self.pending.remove(&reply_lcid);
        if !self.circuits.set_next(circuit, link) {
            return;
        }
        if let Some(circ) = self.circuits.get_mut(circuit) {
            originate(now, circ, Command::Extended, tx, |p| extended.encode(p).ok());
        }
    }

    /// An EXTEND failed or was refused: DESTROY with `why` goes to the client, which rebuilds.
    pub fn extend_failed(
        &mut self,
        now: Instant,
        circuit: CircuitId,
        why: u8,
        reply_lcid: Option<u32>,
        tx: &mut (impl Transmit + ?Sized),
    ) {
        if let Some(id) = reply_lcid {
            self.pending.remove(&id);
        }
        if let Some(circ) = self.circuits.get_mut(circuit) {
            originate(now, circ, Command::Destroy, tx, |p| {
                p[0] = why;
                Some(1)
            });
        }
    }

    /// Handles a batch of received cells in place, one [`Routed`] per cell into `routed`
    /// (which must be at least as long as `batch`).
    pub fn handle<H: Host, T: Terminal>(
        &mut self,
        now: Instant,
        batch: &mut [Incoming<'_>],
        routed: &mut [Routed],
        host: &mut H,
        term: &mut T,
        rng: &mut impl CryptoRngCore,
    ) {
        for (incoming, out) in batch.iter_mut().zip(routed.iter_mut()) {
            *out = self.handle_one(now, incoming.from, incoming.cell, host, term, rng);
        }
    }

    /// Handles one received cell in place.
    pub fn handle_one<H: Host, T: Terminal>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        cell: &mut [u8; CELL_LEN],
        host: &mut H,
        term: &mut T,
        rng: &mut impl CryptoRngCore,
    ) -> Routed {
        let id = lcid(cell);
        if id == HANDSHAKE_LCID {
            host.upcall(now, Upcall::Create { from, cell });
            return Routed::Local { circuit: None };
        }
        if self.pending.contains(&id) {
            host.upcall(now, Upcall::Created { from, cell });
            return Routed::Local { circuit: None };
        }
        let Some((circ, dir)) = self.circuits.lookup(id) else { return Routed::Drop(DropReason::UnknownCircuit) };
        let circuit = circ.prev().lcid_in;
        if self.null_forwarder
            && let Some(link) = match dir {
                Direction::Forward => circ.next(),
                Direction::Backward => Some(circ.prev()),
            }
        {
            set_lcid(cell, link.lcid_out);
            return Routed::Send { to: link.peer, circuit };
        }
        let verdict = match dir {
            Direction::Forward => circ.handle_forward(now, from, cell),
            Direction::Backward => match circ.accept_backward(now, from, cell) {
                Ok(inner) => {
                    host.inspect_backward(cell);
                    circ.relay_backward(now, inner, cell)
                }
                Err(verdict) => verdict,
            },
        };
        let (why, skip) = match verdict {
            Verdict::Send(to) => return Routed::Send { to, circuit },
            Verdict::Drop(r) => return Routed::Drop(r),
            // A neighbour tore the circuit down: on to the other side.
            Verdict::Control { from, msg: LinkControl::Destroy { reason } } => (reason, opposite(from)),
            Verdict::Deliver { cmd, len } => match cmd {
                Command::Extend => {
                    // One EXTEND per circuit: refused once it is extended (the control plane
                    // keeps at most one pending and resends its CREATE sparingly).
                    if circ.next().is_some() {
                        return Routed::Drop(DropReason::Protocol);
                    }
                    host.upcall(now, Upcall::Extend { circuit, body: payload(cell, len) });
                    return Routed::Local { circuit: Some(circuit) };
                }
                Command::Ping => {
                    let Ok(ping) = decode_ping(payload(cell, len)) else { return Routed::Drop(DropReason::Malformed) };
                    originate(now, circ, Command::Pong, host, |p| {
                        p[..8].copy_from_slice(&ping.to_be_bytes());
                        Some(8)
                    });
                    return Routed::Local { circuit: Some(circuit) };
                }
                Command::Padding => return Routed::Local { circuit: Some(circuit) },
                // The client ends the circuit: DESTROY on to the next hop.
                Command::Destroy => (reason::REQUESTED, Direction::Backward),
                Command::Data | Command::Attach => {
                    return if term.deliver(now, circuit, circ, cmd, payload(cell, len), host) {
                        Routed::Local { circuit: Some(circuit) }
                    } else {
                        Routed::Drop(DropReason::Protocol)
                    };
                }
                _ => return Routed::Drop(DropReason::Protocol),
            },
        };
        if let Some(circ) = self.circuits.remove(circuit) {
            teardown(circ, why, Some(skip), host, term, rng, now);
        }
        Routed::Local { circuit: Some(circuit) }
    }

    /// When [`Node::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_expiry
    }

    /// Runs the timers due at `now`: circuits idle longer than the idle timeout, older than the
    /// maximum age or at their usage limits are torn down (DESTROY with reason TIMEOUT both ways).
    pub fn handle_timeout<H: Host, T: Terminal>(
        &mut self,
        now: Instant,
        host: &mut H,
        term: &mut T,
        rng: &mut impl CryptoRngCore,
    ) {
        if now < self.next_expiry {
            return;
        }
        self.next_expiry = now + EXPIRE_EVERY;
        let idle = self.idle;
        for circ in self.circuits.remove_where(|c| c.expired(now, idle)) {
            teardown(circ, reason::TIMEOUT, None, host, term, rng, now);
        }
    }

    /// Ends every circuit: DESTROY (reason SHUTDOWN) to both neighbours of each.
    pub fn shutdown<H: Host, T: Terminal>(
        &mut self,
        now: Instant,
        host: &mut H,
        term: &mut T,
        rng: &mut impl CryptoRngCore,
    ) {
        for circ in self.circuits.remove_where(|_| true) {
            teardown(circ, reason::SHUTDOWN, None, host, term, rng, now);
        }
        self.pending.clear();
    }
}

/// Seals a command from this hop to the client on `circ` into a slot of `tx`; `fill` writes
/// the payload and returns its length (`None`: nothing is sent). Returns whether it was sent.
pub fn originate(
    now: Instant,
    circ: &mut HopCircuit,
    cmd: Command,
    tx: &mut (impl Transmit + ?Sized),
    fill: impl FnOnce(&mut [u8]) -> Option<usize>,
) -> bool {
    let cell = tx.slot();
    let Some(len) = fill(payload_mut(cell)) else { return false };
    match circ.seal_backward(now, cmd, len, cell) {
        Ok(to) => {
            tx.commit(to);
            true
        }
        Err(_) => false,
    }
}

/// Sends DESTROY to the neighbours of a removed circuit (except `skip`), then tells the
/// terminal and the host it ended.
fn teardown<H: Host, T: Terminal>(
    mut circ: HopCircuit,
    why: u8,
    skip: Option<Direction>,
    host: &mut H,
    term: &mut T,
    rng: &mut impl CryptoRngCore,
    now: Instant,
) {
    for side in [Direction::Backward, Direction::Forward] {
        if Some(side) == skip {
            continue;
        }
        if let Some(to) = circ.seal_destroy(side, why, host.slot(), rng) {
            host.commit(to);
        }
    }
    let circuit = circ.prev().lcid_in;
    term.closed(circuit);
    host.upcall(now, Upcall::Closed { circuit, next: circ.next().map(|n| n.lcid_in) });
}

/// A [`Transmit`] into a reused vector of whole cells (the simulator's, and tests'): its
/// capacity stays, so a steady flow of cells allocates nothing.
#[derive(Debug, Default)]
pub struct Outbox {
    cells: Vec<(SocketAddr, [u8; CELL_LEN])>,
    open: bool,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// The committed cells: (destination, cell), in order.
    pub fn cells(&self) -> &[(SocketAddr, [u8; CELL_LEN])] {
        let n = self.cells.len() - usize::from(self.open);
        &self.cells[..n]
    }

    /// Number of committed cells.
    pub fn len(&self) -> usize {
        self.cells().len()
    }

    /// Whether no cell is committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every cell, keeping the memory.
    pub fn clear(&mut self) {
        self.cells.clear();
        self.open = false;
    }

    /// Takes the committed cells out (for callers that want owned values).
    pub fn take(&mut self) -> Vec<(SocketAddr, [u8; CELL_LEN])> {
        if self.open {
            self.cells.pop();
            self.open = false;
        }
        std::mem::take(&mut self.cells)
    }
}

impl Transmit for Outbox {
    fn slot(&mut self) -> &mut [u8; CELL_LEN] {
        if self.open {
            let last = self.cells.len() - 1;
            self.cells[last].1 = [0u8; CELL_LEN];
        } else {
            self.cells.push((SocketAddr::from(([0, 0, 0, 0], 0)), [0u8; CELL_LEN]));
            self.open = true;
        }
        let last = self.cells.len() - 1;
        &mut self.cells[last].1
    }

    fn commit(&mut self, to: SocketAddr) {
        if self.open {
            let last = self.cells.len() - 1;
            self.cells[last].0 = to;
            self.open = false;
        }
    }
}

/// A link-control message from side `from` goes on to the other side.
fn opposite(from: Direction) -> Direction {
    match from {
        Direction::Forward => Direction::Backward,
        Direction::Backward => Direction::Forward,
    }
}
