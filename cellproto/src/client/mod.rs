//! Client side: a [`Circuit`] built hop by hop (CREATE, then one EXTEND per hop), carrying
//! commands to any hop and IP packets to and from the exit.
//!
//! Only the hop that may send a command is heard: DATA and ATTACHED only from the last hop of
//! an open circuit, EXTENDED only from the hop being extended. The client chooses a forward
//! counter sequence per hop and checks one backward sequence per hop ([`tamper`]); evidence
//! that a hop dropped or altered what it relayed closes the circuit as tampered.
//!
//! Sans-IO in the quinn-proto manner: the driver feeds received cells to
//! [`Circuit::handle_cell`], asks [`Circuit::poll_transmit`] for handshake cells to send,
//! sleeps until [`Circuit::poll_timeout`] and then calls [`Circuit::handle_timeout`]. Time is
//! always an argument, so tests can jump the clock.

pub mod tamper;

use crate::cell::{CELL_LEN, CELL_LIMIT, Command, LINK_CONTROL_COUNTER, MAX_CIRCUIT_AGE_SECS, MAX_HOPS, is_valid_lcid};
use crate::command::{Extend, Extended, decode_destroy};
use crate::crypto::{KEY_LEN, Suite, local_aes_hw};
use crate::descriptor::RelayDescriptor;
use crate::handshake::{ClientHandshake, ClientRequest, HandshakeError, RelayKeys};
use crate::link::{
    COOKIE_LEN, LinkControl, decode_cookie_reply, decode_created, encode_create, open_link_control, seal_link_control,
};
use crate::onion::{
    Direction, HopKeys, Layer, LayerError, LinkKeys, check_link_tag, open_backward, payload, payload_mut, seal_forward,
    unprotect_counter,
};
use crate::relay::counter_start;
use rand_core::CryptoRngCore;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tamper::{HopSequence, PathEvidence};
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
    /// The backward cells showed that something on the path up to hop `hop` drops or alters
    /// what it relays ([`tamper`]). No single relay is to blame: hop `hop`, the link into it, or
    /// any hop before could be the culprit.
    Tampered {
        /// The hop at which the evidence showed.
        hop: usize,
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
    /// A datagram on our id that the first hop did not send (its link tag failed).
    #[error("not from the first hop (link tag failed)")]
    Forged,
    /// A cell the first hop sent whose inner layers show tampering on the path (counted).
    #[error("tampered cell from the path at hop {0}")]
    Tampered(usize),
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
    /// A cookie hop 1 sent under load: CREATE is resent with its MAC.
    cookie: Option<[u8; COOKIE_LEN]>,
}

/// The client's forward counters for one hop: the sequence of that hop's layer.
#[derive(Debug, Clone, Copy)]
struct Sequence {
    next: u32,
    used: u32,
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
    /// The keys of the client's own link (to hop 1), once hop 1 answered.
    link0: Option<LinkKeys>,
    /// Link-control sequence numbers on the client's link: last sent, highest accepted.
    ctl_sent: u64,
    ctl_seen: u64,
    /// `fwd[j]`: the forward counters of hop `j + 1`'s layer.
    fwd: [Sequence; MAX_HOPS],
    /// Every hop's backward sequence, and the evidence against the path.
    evidence: PathEvidence,
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
        let fwd = std::array::from_fn(|_| Sequence { next: counter_start(rng), used: 0 });
        Ok(Self {
            path,
            hops: Vec::with_capacity(MAX_HOPS),
            lcid_in,
            lcid_out: 0,
            link0: None,
            ctl_sent: 0,
            ctl_seen: 0,
            fwd,
            evidence: PathEvidence::default(),
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
        Ok(Pending { hop, handshake, link_secret, send_at: now, attempts: 0, cookie: None })
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
        self.fwd.iter().any(|s| s.used > soon)
            || self.evidence.hops.iter().any(|h| h.accepted() > soon)
            || now.saturating_duration_since(self.started) > Duration::from_secs(MAX_CIRCUIT_AGE_SECS - 300)
    }

    /// The per-hop backward sequences and the evidence of tampering seen so far.
    pub fn evidence(&self) -> &PathEvidence {
        &self.evidence
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
            encode_create(cell, self.lcid_in, p.handshake.message(), None, p.cookie.as_ref(), rng);
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

    /// Advances timers: closes the circuit when a hop used up its handshake attempts (as
    /// [`CloseReason::Tampered`] if replies arrived altered meanwhile).
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Event> {
        if let Phase::Building(p) = &self.phase
            && p.attempts >= self.config.handshake_attempts
            && now >= p.send_at
        {
            // Replies that arrived altered (evidence at some hop) mean the path is meddling,
            // not that the hop being built is silent: say so rather than blame that hop.
            let reason = match self.evidence.violations.iter().position(|&v| v > 0) {
                Some(i) => CloseReason::Tampered { hop: i + 1 },
                None => CloseReason::HandshakeTimeout { hop: p.hop },
            };
            return Some(self.close_with(reason));
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
        let Some(link0) = &self.link0 else { return Err(CircuitError::NotOpen) };
        if matches!(self.phase, Phase::Closed(_)) {
            return Err(CircuitError::NotOpen);
        }
        if target == 0 || target > self.hops.len() {
            return Err(CircuitError::Layer(LayerError::BadHop(target)));
        }
        let seqs = &mut self.fwd[..target];
        if seqs.iter().any(|s| s.used >= CELL_LIMIT) {
            return Err(CircuitError::KeyLimit);
        }
        let mut counters = [0u32; MAX_HOPS];
        for (c, s) in counters.iter_mut().zip(seqs.iter()) {
            *c = s.next;
        }
        seal_forward(cell, &self.hops, link0, &counters[..target], cmd, len, self.lcid_out)?;
        for s in seqs {
            s.next += 1;
            s.used += 1;
        }
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
        let link = self.link0.as_ref()?;
        self.ctl_sent += 1;
        let msg = LinkControl::Destroy { reason: 0 };
        seal_link_control(cell, link, Direction::Forward, self.lcid_out, self.ctl_sent, msg, rng);
        Some(self.path[0].addr)
    }

    /// Processes a cell whose LCID is [`Circuit::lcid_in`], in place.
    ///
    /// A datagram the first hop did not send changes nothing ([`CircuitError::Forged`]). A cell
    /// it did send whose inner layers do not open, or a command from a hop that may not send it,
    /// counts as evidence against the path; enough evidence closes the circuit
    /// ([`CloseReason::Tampered`]).
    pub fn handle_cell(
        &mut self,
        now: Instant,
        cell: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Option<Event>, CircuitError> {
        if matches!(self.phase, Phase::Closed(_)) {
            return Err(CircuitError::NotOpen);
        }
        let Some(link) = &self.link0 else { return self.handle_created(now, cell, rng) };
        let counter = unprotect_counter(cell, link.header(Direction::Backward));
        if counter == LINK_CONTROL_COUNTER {
            let opened = open_link_control(cell, link, Direction::Backward, &mut self.ctl_seen);
            let LinkControl::Destroy { reason } = opened.map_err(|_| CircuitError::Forged)?;
            return Ok(Some(self.close_with(CloseReason::LinkDestroyed { reason })));
        }
        self.evidence.hops[0].check(counter).map_err(|_| CircuitError::Replay)?;
        check_link_tag(cell, link, counter).map_err(|_| CircuitError::Forged)?;
        // From here on the first hop vouched for the cell.
        let mut counter = counter;
        for hop in 1..=self.hops.len() {
            if hop > 1 && self.evidence.hops[hop - 1].check(counter).is_err() {
                return self.violation(hop);
            }
            let layer = match open_backward(cell, hop, &self.hops[hop - 1], counter) {
                Ok(layer) => layer,
                Err(_) => return self.violation(hop),
            };
            self.evidence.hops[hop - 1].commit(counter);
            match layer {
                Layer::Relay(inner) if hop < self.hops.len() => counter = inner,
                Layer::Relay(_) => return self.violation(hop),
                Layer::Terminal(cmd, len) => {
                    let delivered = self.dispatch(now, hop, cmd, len, cell, rng);
                    // Loss that the evidence now shows closes the circuit before anything else.
                    return match self.check_tampering() {
                        Some(closed) => Ok(Some(closed)),
                        None => delivered,
                    };
                }
            }
        }
        Err(CircuitError::Malformed)
    }

    /// Evidence against the path at `hop`: an error for this cell, or the circuit's closing once
    /// the evidence is enough.
    fn violation(&mut self, hop: usize) -> Result<Option<Event>, CircuitError> {
        self.evidence.violation(hop);
        match self.check_tampering() {
            Some(closed) => Ok(Some(closed)),
            None => Err(CircuitError::Tampered(hop)),
        }
    }

    fn close_with(&mut self, reason: CloseReason) -> Event {
        self.phase = Phase::Closed(reason);
        Event::Closed(reason)
    }

    /// A command from `hop`: acted on only if that hop may send it now.
    fn dispatch(
        &mut self,
        now: Instant,
        hop: usize,
        cmd: Command,
        len: usize,
        cell: &[u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Option<Event>, CircuitError> {
        let exit = hop == self.path.len();
        let result = match cmd {
            Command::Extended => match &self.phase {
                Phase::Building(p) if p.hop == hop + 1 => self.handle_extended(now, hop, payload(cell, len), rng),
                _ => Err(CircuitError::Unexpected(cmd, hop)),
            },
            Command::Destroy => {
                let reason = decode_destroy(payload(cell, len)).map_err(|_| CircuitError::Malformed)?;
                Ok(Some(self.close_with(CloseReason::Destroyed { hop, reason })))
            }
            Command::Data | Command::Attached if !(exit && self.is_open()) => Err(CircuitError::Unexpected(cmd, hop)),
            Command::Data | Command::Attached | Command::Pong | Command::Padding => {
                Ok(Some(Event::Delivered { hop, cmd, len }))
            }
            other => Err(CircuitError::Unexpected(other, hop)),
        };
        if let Err(CircuitError::Unexpected(..)) = result {
            // An authenticated command a hop may not send: evidence, like a failed layer.
            self.evidence.violation(hop);
        }
        result
    }

    /// Closes the circuit if the evidence against the path crossed a threshold.
    fn check_tampering(&mut self) -> Option<Event> {
        let hop = self.evidence.tampered_at()?;
        Some(self.close_with(CloseReason::Tampered { hop }))
    }

    fn handle_created(
        &mut self,
        now: Instant,
        cell: &[u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Option<Event>, CircuitError> {
        let Phase::Building(p) = &mut self.phase else { return Err(CircuitError::NotOpen) };
        // Hop 1 under load answers with a cookie: send CREATE again at once, with its MAC.
        if let Ok(cookie) = decode_cookie_reply(cell, p.handshake.message()) {
            p.cookie = Some(cookie);
            p.send_at = now;
            return Ok(None);
        }
        let created = decode_created(cell).map_err(|_| CircuitError::Malformed)?;
        let out = p.handshake.finish(created.message).map_err(|err| CircuitError::Handshake { hop: 1, err })?;
        self.lcid_out = created.responder_lcid;
        self.link0 = Some(LinkKeys::derive(&out.link_secret, out.suite));
        self.hops.push(HopKeys::from_material(out.suite, &out.keys));
        self.evidence.hops.push(HopSequence::default());
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
        self.hops.push(HopKeys::from_material(out.suite, &out.keys));
        self.evidence.hops.push(HopSequence::default());
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
