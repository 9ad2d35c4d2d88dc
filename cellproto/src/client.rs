//! Client side: a [`Circuit`] built hop by hop (CREATE, then one EXTEND per hop), carrying
//! commands to any hop and IP packets to and from the exit.
//!
//! Sans-IO in the quinn-proto manner: the driver feeds received cells to
//! [`Circuit::handle_cell`], asks [`Circuit::poll_transmit`] for handshake cells to send,
//! sleeps until [`Circuit::poll_timeout`] and then calls [`Circuit::handle_timeout`]. Time is
//! always an argument, so tests can jump the clock.

use crate::cell::{
    CELL_LEN, CELL_LIMIT, Command, LINK_CONTROL_COUNTER, MAX_CIRCUIT_AGE_SECS, MAX_HOPS, backward_origin, is_valid_lcid,
};
use crate::command::{Extend, Extended, decode_destroy};
use crate::crypto::{KEY_LEN, Suite, local_aes_hw};
use crate::descriptor::RelayDescriptor;
use crate::handshake::{ClientHandshake, ClientRequest, HandshakeError, RelayKeys};
use crate::link::{LinkControl, decode_created, encode_create, open_link_control, seal_link_control};
use crate::onion::{
    Direction, HopKeys, LayerError, LinkKeys, open_backward, payload, payload_mut, seal_forward, unprotect_counter,
};
use crate::replay::ReplayWindow;
use rand_core::CryptoRngCore;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A relay on the client's chosen path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathHop {
    /// Identity and onion key from the relay's verified descriptor.
    pub keys: RelayKeys,
    /// The relay's UDP address.
    pub addr: SocketAddr,
}

impl PathHop {
    /// The hop for a relay from its verified descriptor: its onion key current at `now` and
    /// its first address of the family the client wants (`ipv6`), or `None` if it has neither.
    pub fn from_descriptor(desc: &RelayDescriptor, now: u64, ipv6: bool) -> Option<Self> {
        let onion = desc.current_onion_key(now)?;
        let addr = *desc.addresses.iter().find(|a| a.is_ipv6() == ipv6)?;
        Some(Self { keys: RelayKeys { identity: desc.identity.0, onion_key: onion.onion_key }, addr })
    }
}

/// Tunables of circuit construction.
#[derive(Debug, Clone, Copy)]
pub struct CircuitConfig {
    /// Wait this long for a hop's reply before sending the handshake again; doubles each time.
    pub handshake_timeout: Duration,
    /// Give up on a hop after this many sends.
    pub handshake_attempts: u32,
    /// Offer AES-256-GCM (this machine has AES hardware).
    pub offer_aes: bool,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        // One second covers a transatlantic RTT with margin; four sends span 15 s in all.
        Self { handshake_timeout: Duration::from_secs(1), handshake_attempts: 4, offer_aes: local_aes_hw() }
    }
}

/// Why a circuit is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The hop (1-based) never answered its handshake.
    HandshakeTimeout {
        /// Hop that did not answer.
        hop: usize,
    },
    /// A hop sent DESTROY (an onion command): the circuit is cut after `hop`.
    Destroyed {
        /// Hop that sent it.
        hop: usize,
        /// Its reason code.
        reason: u8,
    },
    /// The first hop sent a link-level DESTROY.
    LinkDestroyed {
        /// Its reason code.
        reason: u8,
    },
    /// Closed by this side.
    Local,
}

/// Something the driver should know about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Every hop is built; data may flow.
    Established,
    /// A command from hop `hop`; its payload is the first `len` bytes of the cell body.
    Delivered {
        /// Sending hop (1-based).
        hop: usize,
        /// The command.
        cmd: Command,
        /// Payload length.
        len: usize,
    },
    /// The circuit is closed.
    Closed(CloseReason),
}

/// Errors of the client circuit; received cells that cause one are dropped and the circuit
/// goes on (a forged cell must not be able to close it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CircuitError {
    /// A path must have 1..=MAX_HOPS relays.
    #[error("a path needs between 1 and {MAX_HOPS} hops, got {0}")]
    BadPathLength(usize),
    /// The receive LCID is not a valid id.
    #[error("invalid receive LCID {0:#010x}")]
    BadLcid(u32),
    /// Not established yet, or closed.
    #[error("circuit is not open")]
    NotOpen,
    /// The counter reached the AEAD usage limit: build a new circuit.
    #[error("circuit reached its key usage limit; rebuild it")]
    KeyLimit,
    /// A layer operation failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A handshake reply failed.
    #[error("handshake with hop {hop} failed: {err}")]
    Handshake {
        /// The hop.
        hop: usize,
        /// What failed.
        err: HandshakeError,
    },
    /// A replayed or stale cell.
    #[error("replayed or stale cell")]
    Replay,
    /// A well-formed cell that makes no sense now.
    #[error("unexpected {0:?} from hop {1}")]
    Unexpected(Command, usize),
    /// A malformed command body or link-level cell.
    #[error("malformed cell")]
    Malformed,
}

#[derive(Debug)]
struct Pending {
    hop: usize,
    handshake: ClientHandshake,
    link_secret: Option<[u8; KEY_LEN]>,
    send_at: Instant,
    attempts: u32,
}

#[derive(Debug)]
enum Phase {
    Building(Box<Pending>),
    Open,
    Closed(CloseReason),
}

/// A client circuit through `path`.
#[derive(Debug)]
pub struct Circuit {
    path: Vec<PathHop>,
    hops: Vec<HopKeys>,
    lcid_in: u32,
    lcid_out: u32,
    /// `links[j]`: keys of the link into hop `j + 1` (the client's own link first).
    links: Vec<LinkKeys>,
    next_counter: u64,
    bwd_window: ReplayWindow,
    phase: Phase,
    config: CircuitConfig,
    started: Instant,
    build_time: Option<Duration>,
}

impl Circuit {
    /// Starts building a circuit. `lcid_in` is the id the first hop will write on cells to us
    /// (the driver picks it, unique among its circuits). The first CREATE is due at once.
    pub fn new(
        path: Vec<PathHop>,
        lcid_in: u32,
        config: CircuitConfig,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, CircuitError> {
        if path.is_empty() || path.len() > MAX_HOPS {
            return Err(CircuitError::BadPathLength(path.len()));
        }
        if !is_valid_lcid(lcid_in) {
            return Err(CircuitError::BadLcid(lcid_in));
        }
        let first = Self::start_hop(&path, 1, &config, now, rng)?;
        Ok(Self {
            path,
            hops: Vec::with_capacity(MAX_HOPS),
            lcid_in,
            lcid_out: 0,
            links: Vec::with_capacity(MAX_HOPS),
            next_counter: 1,
            bwd_window: ReplayWindow::new(),
            phase: Phase::Building(Box::new(first)),
            config,
            started: now,
            build_time: None,
        })
    }

    fn start_hop(
        path: &[PathHop],
        hop: usize,
        config: &CircuitConfig,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Pending, CircuitError> {
        let link_secret = (hop > 1).then(|| {
            let mut s = [0u8; KEY_LEN];
            rng.fill_bytes(&mut s);
            s
        });
        let req = ClientRequest { hop: hop as u8, offer_aes: config.offer_aes, link_secret };
        let handshake = ClientHandshake::start(&path[hop - 1].keys, &req, rng)
            .map_err(|err| CircuitError::Handshake { hop, err })?;
        Ok(Pending { hop, handshake, link_secret, send_at: now, attempts: 0 })
    }

    /// The id cells to us carry (to route received cells to this circuit).
    pub fn lcid_in(&self) -> u32 {
        self.lcid_in
    }

    /// Hops in the path.
    pub fn path(&self) -> &[PathHop] {
        &self.path
    }

    /// Whether every hop is built and the circuit is not closed.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    /// Why the circuit closed, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        match self.phase {
            Phase::Closed(r) => Some(r),
            _ => None,
        }
    }

    /// Negotiated suite of each built hop.
    pub fn suites(&self) -> Vec<Suite> {
        self.hops.iter().map(HopKeys::suite).collect()
    }

    /// Time from [`Circuit::new`] to the last hop's reply.
    pub fn build_time(&self) -> Option<Duration> {
        self.build_time
    }

    /// Whether the circuit is near its key usage limit or maximum age and should be replaced.
    pub fn needs_rebuild(&self, now: Instant) -> bool {
        let soon = CELL_LIMIT / 4 * 3;
        self.next_counter > soon
            || self.bwd_window.newest() > soon
            || now.saturating_duration_since(self.started) > Duration::from_secs(MAX_CIRCUIT_AGE_SECS - 300)
    }

    /// A handshake cell (CREATE or EXTEND) due now, written into `cell`; returns where to send it.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        cell: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Option<SocketAddr> {
        let Phase::Building(p) = &mut self.phase else { return None };
        if now < p.send_at || p.attempts >= self.config.handshake_attempts {
            return None;
        }
        p.attempts += 1;
        p.send_at = now + self.config.handshake_timeout * (1 << (p.attempts - 1).min(16));
        if p.hop == 1 {
            encode_create(cell, self.lcid_in, p.handshake.message(), rng);
            return Some(self.path[0].addr);
        }
        // EXTEND goes to the current last hop; each send is a fresh cell with a new counter.
        let hop = p.hop;
        let extend = Extend {
            target: self.path[hop - 1].addr,
            link_secret: p.link_secret.unwrap_or([0; KEY_LEN]),
            handshake: *p.handshake.message(),
        };
        let len = extend.encode(payload_mut(cell)).ok()?;
        self.seal(hop - 1, Command::Extend, len, cell).ok()
    }

    /// When [`Circuit::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Building(p) => Some(p.send_at),
            _ => None,
        }
    }

    /// Advances timers: closes the circuit when a hop used up its handshake attempts.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Event> {
        if let Phase::Building(p) = &self.phase
            && p.attempts >= self.config.handshake_attempts
            && now >= p.send_at
        {
            let reason = CloseReason::HandshakeTimeout { hop: p.hop };
            self.phase = Phase::Closed(reason);
            return Some(Event::Closed(reason));
        }
        None
    }

    /// Seals a command for hop `target` (1-based); the payload (`len` bytes) must already be at
    /// the start of the body ([`payload_mut`]). Returns where to send the cell.
    pub fn seal(
        &mut self,
        target: usize,
        cmd: Command,
        len: usize,
        cell: &mut [u8; CELL_LEN],
    ) -> Result<SocketAddr, CircuitError> {
        if self.links.is_empty() || matches!(self.phase, Phase::Closed(_)) {
            return Err(CircuitError::NotOpen);
        }
        if self.next_counter >= CELL_LIMIT {
            return Err(CircuitError::KeyLimit);
        }
        let counter = self.next_counter;
        seal_forward(cell, &self.hops, &self.links, target, counter, cmd, len, self.lcid_out)?;
        self.next_counter += 1;
        Ok(self.path[0].addr)
    }

    /// Seals one IP packet (already at the start of the body) for the exit.
    pub fn seal_data(&mut self, len: usize, cell: &mut [u8; CELL_LEN]) -> Result<SocketAddr, CircuitError> {
        if !self.is_open() {
            return Err(CircuitError::NotOpen);
        }
        self.seal(self.hops.len(), Command::Data, len, cell)
    }

    /// Closes the circuit and writes a link-level DESTROY for the first hop, which propagates
    /// it. Returns where to send it (`None` if no hop was built yet).
    pub fn close(&mut self, cell: &mut [u8; CELL_LEN], rng: &mut impl CryptoRngCore) -> Option<SocketAddr> {
        self.phase = Phase::Closed(CloseReason::Local);
        let link = self.links.first()?;
        seal_link_control(cell, link, Direction::Forward, self.lcid_out, LinkControl::Destroy { reason: 0 }, rng);
        Some(self.path[0].addr)
    }

    /// Processes a cell whose LCID is [`Circuit::lcid_in`], in place.
    pub fn handle_cell(
        &mut self,
        now: Instant,
        cell: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Option<Event>, CircuitError> {
        if matches!(self.phase, Phase::Closed(_)) {
            return Err(CircuitError::NotOpen);
        }
        let Some(link) = self.links.first() else { return self.handle_created(now, cell, rng) };
        let counter = unprotect_counter(cell, link.header(Direction::Backward));
        if counter == LINK_CONTROL_COUNTER {
            let LinkControl::Destroy { reason } = open_link_control(cell, link).map_err(|_| CircuitError::Malformed)?;
            let reason = CloseReason::LinkDestroyed { reason };
            self.phase = Phase::Closed(reason);
            return Ok(Some(Event::Closed(reason)));
        }
        self.bwd_window.check(counter).map_err(|_| CircuitError::Replay)?;
        let (hop, cmd, len) = open_backward(cell, &self.hops, counter)?;
        if backward_origin(counter) != hop {
            return Err(CircuitError::Unexpected(cmd, hop));
        }
        self.bwd_window.commit(counter);
        match cmd {
            Command::Extended => self.handle_extended(now, hop, payload(cell, len), rng),
            Command::Destroy => {
                let reason = decode_destroy(payload(cell, len)).map_err(|_| CircuitError::Malformed)?;
                let reason = CloseReason::Destroyed { hop, reason };
                self.phase = Phase::Closed(reason);
                Ok(Some(Event::Closed(reason)))
            }
            Command::Data | Command::Pong | Command::Attached | Command::Padding => {
                Ok(Some(Event::Delivered { hop, cmd, len }))
            }
            other => Err(CircuitError::Unexpected(other, hop)),
        }
    }

    fn handle_created(
        &mut self,
        now: Instant,
        cell: &[u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Option<Event>, CircuitError> {
        let Phase::Building(p) = &self.phase else { return Err(CircuitError::NotOpen) };
        let (responder_lcid, reply) = decode_created(cell).map_err(|_| CircuitError::Malformed)?;
        let out = p.handshake.finish(reply).map_err(|err| CircuitError::Handshake { hop: 1, err })?;
        self.lcid_out = responder_lcid;
        self.links.push(LinkKeys::derive(&out.link_secret));
        self.hops.push(HopKeys::from_material(out.suite, &out.keys));
        Ok(self.advance(now, rng))
    }

    fn handle_extended(
        &mut self,
        now: Instant,
        from_hop: usize,
        body: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Option<Event>, CircuitError> {
        let Phase::Building(p) = &self.phase else { return Err(CircuitError::Unexpected(Command::Extended, from_hop)) };
        if from_hop + 1 != p.hop {
            return Err(CircuitError::Unexpected(Command::Extended, from_hop));
        }
        let ext = Extended::decode(body).map_err(|_| CircuitError::Malformed)?;
        let out = p.handshake.finish(&ext.handshake).map_err(|err| CircuitError::Handshake { hop: p.hop, err })?;
        self.links.push(LinkKeys::derive(&out.link_secret));
        self.hops.push(HopKeys::from_material(out.suite, &out.keys));
        Ok(self.advance(now, rng))
    }

    /// After a hop is built: start the next one, or open the circuit.
    fn advance(&mut self, now: Instant, rng: &mut impl CryptoRngCore) -> Option<Event> {
        let built = self.hops.len();
        if built == self.path.len() {
            self.phase = Phase::Open;
            self.build_time = Some(now.saturating_duration_since(self.started));
            return Some(Event::Established);
        }
        match Self::start_hop(&self.path, built + 1, &self.config, now, rng) {
            Ok(p) => {
                self.phase = Phase::Building(Box::new(p));
                None
            }
            Err(_) => {
                let reason = CloseReason::HandshakeTimeout { hop: built + 1 };
                self.phase = Phase::Closed(reason);
                Some(Event::Closed(reason))
            }
        }
    }
}
