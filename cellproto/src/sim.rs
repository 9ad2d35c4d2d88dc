//! A deterministic in-memory network of sans-IO relays: the composition of cellproto pieces
//! (control plane, circuit table, workers' verdicts) that relayd performs with real sockets,
//! driven by hand so tests, benches, fuzz targets and the demo can capture, drop, flip and
//! replay any cell. Addresses are labels (127.0.0.1:10000 + i); nothing is sent anywhere.

use crate::cell::{CELL_LEN, Command, HANDSHAKE_LCID, is_valid_lcid, lcid};
use crate::client::{Circuit, CircuitConfig, Event, PathHop};
use crate::command::{Attach, Attached, decode_ping};
use crate::handshake::{OnionSecret, RelayKeys};
use crate::link::LinkControl;
use crate::onion::{Direction, payload, payload_mut};
use crate::relay::control::{Answer, ControlPlane, Created};
use crate::relay::cookie::CookieJar;
use crate::relay::{CircuitMap, CircuitTable, DropReason, Verdict};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

/// A cell buffer.
pub type Cell = [u8; CELL_LEN];

/// What a hostile relay does to a cell it relays.
pub type Meddle = Box<dyn FnMut(&mut Cell)>;

/// A deterministic RNG from a seed.
pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// The address label of node `i` (0 is the client).
pub fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))
}

/// Index of the client in [`addr`].
pub const CLIENT: usize = 0;

/// One relay: its control plane, its circuits, and what it delivered as an exit.
pub struct TestRelay {
    /// Its address label.
    pub addr: SocketAddr,
    /// Its identity and onion key as a client sees them.
    pub keys: RelayKeys,
    /// Handshakes and EXTENDs.
    pub control: ControlPlane,
    /// Its circuits.
    pub circuits: CircuitMap,
    /// DATA delivered to this hop as the exit: (circuit LCID, payload).
    pub delivered: Vec<(u32, Vec<u8>)>,
    /// Every drop, in order.
    pub drops: Vec<DropReason>,
    /// Whether the exit answers DATA with the reversed packet.
    pub echo: bool,
    /// Sessions ATTACH made, by token: the number in their inner addresses.
    pub sessions: HashMap<[u8; 32], u8>,
    /// A hostile relay's meddling with the backward cells it relays: applied after the cell
    /// passed this relay's checks and before it seals its own layer.
    pub hostile: Option<Meddle>,
    /// Under load: CREATEs without a valid cookie get a COOKIE answer instead of a handshake.
    pub cookies: Option<CookieJar>,
    rng: ChaCha20Rng,
}

impl TestRelay {
    /// Relay number `i`, with or without AES hardware, keys from `seed`.
    pub fn new(i: usize, aes_hw: bool, seed: u64) -> Self {
        let mut rng = rng(seed);
        let mut identity = [0u8; 32];
        rng.fill_bytes(&mut identity);
        let onion = OnionSecret::generate(&mut rng);
        Self::with_keys(i, identity, onion, aes_hw, seed)
    }

    /// Relay number `i` with the given identity (public key) and onion key.
    pub fn with_keys(i: usize, identity: [u8; 32], onion: OnionSecret, aes_hw: bool, seed: u64) -> Self {
        let rng = rng(seed ^ 0x5eed);
        let keys = RelayKeys { identity, onion_key: *onion.public() };
        Self {
            addr: addr(i),
            keys,
            control: ControlPlane::new(identity, vec![onion], aes_hw),
            circuits: CircuitMap::new(),
            delivered: Vec::new(),
            drops: Vec::new(),
            echo: true,
            sessions: HashMap::new(),
            hostile: None,
            cookies: None,
            rng,
        }
    }

    /// This relay as a hop of a client's path.
    pub fn path_hop(&self) -> PathHop {
        PathHop { keys: self.keys, addr: self.addr }
    }

    fn fresh_lcid(rng: &mut ChaCha20Rng, circuits: &CircuitMap, control: &ControlPlane) -> u32 {
        loop {
            let id = rng.next_u32() | 0x4000_0000;
            if is_valid_lcid(id) && !circuits.contains_lcid(id) && !control.is_pending(id) {
                return id;
            }
        }
    }

    /// Handles one datagram; returns the datagrams it sends.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, cell: &mut Cell) -> Vec<(SocketAddr, Cell)> {
        let id = lcid(cell);
        if id == HANDSHAKE_LCID {
            if let Some(jar) = &self.cookies
                && !jar.check(from, cell)
            {
                let mut out = [0u8; CELL_LEN];
                return match jar.reply(from, cell, &mut out, &mut self.rng) {
                    Ok(()) => vec![(from, out)],
                    Err(_) => vec![],
                };
            }
            let lcid = Self::fresh_lcid(&mut self.rng, &self.circuits, &self.control);
            return match self.control.handle_create(now, from, cell, || lcid, &mut self.rng) {
                Ok(Created::New { reply, circuit }) => {
                    self.circuits.insert(*circuit);
                    vec![(from, *reply)]
                }
                Ok(Created::Repeat { reply }) => vec![(from, *reply)],
                Err(_) => {
                    self.drops.push(DropReason::Malformed);
                    vec![]
                }
            };
        }
        if self.control.is_pending(id) {
            return match self.control.handle_created(now, from, cell, &mut self.rng) {
                Ok(Answer::Retry { to, create }) => vec![(to, *create)],
                Ok(Answer::Extended(ext)) => {
                    let ext = *ext;
                    if !self.circuits.set_next(ext.circuit, ext.link) {
                        return vec![];
                    }
                    let Some(circ) = self.circuits.get_mut(ext.circuit) else { return vec![] };
                    let mut out = [0u8; CELL_LEN];
                    let Ok(len) = ext.extended.encode(payload_mut(&mut out)) else { return vec![] };
                    circ.seal_backward(now, Command::Extended, len, &mut out)
                        .map(|to| vec![(to, out)])
                        .unwrap_or_default()
                }
                Err(_) => {
                    self.drops.push(DropReason::Malformed);
                    vec![]
                }
            };
        }
        let Some((circ, dir)) = self.circuits.lookup(id) else {
            self.drops.push(DropReason::UnknownCircuit);
            return vec![];
        };
        let prev_lcid = circ.prev().lcid_in;
        let verdict = match dir {
            Direction::Forward => circ.handle_forward(now, from, cell),
            Direction::Backward => match circ.accept_backward(now, from, cell) {
                Ok(inner) => {
                    if let Some(meddle) = self.hostile.as_mut() {
                        meddle(cell);
                    }
                    circ.relay_backward(now, inner, cell)
                }
                Err(verdict) => verdict,
            },
        };
        match verdict {
            Verdict::Send(to) => vec![(to, *cell)],
            Verdict::Drop(r) => {
                self.drops.push(r);
                vec![]
            }
            Verdict::Control { msg: LinkControl::Destroy { reason }, from: side } => {
                // Propagate away from the side it came from.
                let Some(mut circ) = self.circuits.remove(prev_lcid) else { return vec![] };
                let mut out = [0u8; CELL_LEN];
                circ.seal_destroy(side, reason, &mut out, &mut self.rng).map(|to| vec![(to, out)]).unwrap_or_default()
            }
            Verdict::Deliver { cmd, len } => self.deliver(now, prev_lcid, cmd, len, cell),
        }
    }

    fn deliver(
        &mut self,
        now: Instant,
        prev_lcid: u32,
        cmd: Command,
        len: usize,
        cell: &mut Cell,
    ) -> Vec<(SocketAddr, Cell)> {
        match cmd {
            Command::Extend => {
                // One EXTEND per circuit: none once it is extended.
                if self.circuits.get_mut(prev_lcid).is_none_or(|c| c.next().is_some()) {
                    self.drops.push(DropReason::Protocol);
                    return vec![];
                }
                let lcid = Self::fresh_lcid(&mut self.rng, &self.circuits, &self.control);
                match self.control.handle_extend(now, prev_lcid, payload(cell, len), || lcid, &mut self.rng) {
                    Ok(Some((target, create))) => vec![(target, *create)],
                    Ok(None) => vec![],
                    Err(_) => {
                        self.drops.push(DropReason::Protocol);
                        vec![]
                    }
                }
            }
            Command::Ping => {
                let Ok(id) = decode_ping(payload(cell, len)) else { return vec![] };
                let Some(circ) = self.circuits.get_mut(prev_lcid) else { return vec![] };
                let mut out = [0u8; CELL_LEN];
                payload_mut(&mut out)[..8].copy_from_slice(&id.to_be_bytes());
                circ.seal_backward(now, Command::Pong, 8, &mut out).map(|to| vec![(to, out)]).unwrap_or_default()
            }
            Command::Attach => {
                let Ok(request) = Attach::decode(payload(cell, len)) else { return vec![] };
                let token = match request.resume {
                    Some(t) if self.sessions.contains_key(&t) => t,
                    _ => {
                        let mut t = [0u8; 32];
                        self.rng.fill_bytes(&mut t);
                        let n = u8::try_from(self.sessions.len() + 2).unwrap_or(u8::MAX);
                        self.sessions.insert(t, n);
                        t
                    }
                };
                let n = self.sessions.get(&token).copied().unwrap_or(0);
                let reply = Attached {
                    token,
                    ipv4: (Ipv4Addr::new(10, 8, 0, n), 16),
                    ipv6: (Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, 0, u16::from(n)), 64),
                    dns: (Ipv4Addr::new(10, 8, 0, 1), Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, 0, 1)),
                };
                let Some(circ) = self.circuits.get_mut(prev_lcid) else { return vec![] };
                let mut out = [0u8; CELL_LEN];
                let Ok(len) = reply.encode(payload_mut(&mut out)) else { return vec![] };
                circ.seal_backward(now, Command::Attached, len, &mut out).map(|to| vec![(to, out)]).unwrap_or_default()
            }
            Command::Data => {
                let data = payload(cell, len).to_vec();
                self.delivered.push((prev_lcid, data.clone()));
                if !self.echo {
                    return vec![];
                }
                // Echo the reversed packet, so the backward direction carries different bytes.
                let Some(circ) = self.circuits.get_mut(prev_lcid) else { return vec![] };
                let mut out = [0u8; CELL_LEN];
                for (dst, src) in payload_mut(&mut out)[..len].iter_mut().zip(data.iter().rev()) {
                    *dst = *src;
                }
                circ.seal_backward(now, Command::Data, len, &mut out).map(|to| vec![(to, out)]).unwrap_or_default()
            }
            _ => vec![],
        }
    }
}

/// A client and a line of relays, with every datagram passing through `deliver_all`.
pub struct Net {
    /// Relays 1..=n, at addr(1..=n).
    pub relays: Vec<TestRelay>,
    /// The client's circuit through all of them.
    pub circuit: Circuit,
    /// The client's RNG.
    pub client_rng: ChaCha20Rng,
    /// The time every node is given.
    pub now: Instant,
    /// Every datagram sent, in order: (from, to, bytes).
    pub log: Vec<(SocketAddr, SocketAddr, Cell)>,
    /// Events the client saw, with the payload of Delivered events.
    pub events: Vec<(Event, Vec<u8>)>,
    /// Cells the client refused.
    pub client_drops: usize,
}

impl Net {
    /// Relays 1..=n at addr(1..=n); a circuit through all of them.
    pub fn new(n: usize, seed: u64, aes: impl Fn(usize) -> bool) -> Self {
        let relays: Vec<TestRelay> =
            (1..=n).map(|i| TestRelay::new(i, aes(i), seed.wrapping_mul(100).wrapping_add(i as u64))).collect();
        let path = relays.iter().map(TestRelay::path_hop).collect();
        Self::with_path(relays, path, seed)
    }

    /// The given relays, and a circuit along `path` (hops the client learned elsewhere, e.g.
    /// from a directory).
    pub fn with_path(relays: Vec<TestRelay>, path: Vec<PathHop>, seed: u64) -> Self {
        let mut client_rng = rng(seed);
        let now = Instant::now();
        let config = CircuitConfig { offer_aes: true, ..CircuitConfig::default() };
        let circuit = Circuit::new(path, 0x5000_0001, config, now, &mut client_rng).expect("circuit");
        Self { relays, circuit, client_rng, now, log: Vec::new(), events: Vec::new(), client_drops: 0 }
    }

    /// Which relay has address `a`.
    pub fn relay_index(&self, a: SocketAddr) -> Option<usize> {
        self.relays.iter().position(|r| r.addr == a)
    }

    /// Delivers datagrams until the network is quiet; `tamper` may rewrite or drop each one.
    pub fn run(
        &mut self,
        mut queue: Vec<(SocketAddr, SocketAddr, Cell)>,
        tamper: &mut dyn FnMut(SocketAddr, SocketAddr, &mut Cell) -> bool,
    ) {
        let mut out = [0u8; CELL_LEN];
        while let Some(dst) = self.circuit.poll_transmit(self.now, &mut out, &mut self.client_rng) {
            queue.push((addr(CLIENT), dst, out));
        }
        while !queue.is_empty() {
            let mut next = Vec::new();
            for (from, to, mut cell) in queue.drain(..) {
                if !tamper(from, to, &mut cell) {
                    continue;
                }
                self.log.push((from, to, cell));
                if to == addr(CLIENT) {
                    match self.circuit.handle_cell(self.now, &mut cell, &mut self.client_rng) {
                        Ok(Some(ev @ Event::Delivered { len, .. })) => {
                            self.events.push((ev, payload(&cell, len).to_vec()))
                        }
                        Ok(Some(ev)) => self.events.push((ev, vec![])),
                        Ok(None) => {}
                        Err(_) => self.client_drops += 1,
                    }
                } else if let Some(i) = self.relay_index(to) {
                    for (dst, out) in self.relays[i].handle(self.now, from, &mut cell) {
                        next.push((to, dst, out));
                    }
                }
            }
            // Handshake cells the client has due after what it just received.
            let mut out = [0u8; CELL_LEN];
            while let Some(dst) = self.circuit.poll_transmit(self.now, &mut out, &mut self.client_rng) {
                next.push((addr(CLIENT), dst, out));
            }
            queue = next;
        }
    }

    /// Builds the circuit with no loss; panics if it does not open.
    pub fn build(&mut self) {
        self.run(vec![], &mut |_, _, _| true);
        assert!(self.circuit.is_open(), "circuit did not open: {:?}", self.events);
    }

    /// Seals one payload as DATA for the exit without sending it.
    pub fn seal(&mut self, data: &[u8]) -> (SocketAddr, Cell) {
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..data.len()].copy_from_slice(data);
        let to = self.circuit.seal_data(data.len(), &mut cell).expect("seal");
        (to, cell)
    }

    /// The payloads of the DATA the client received, in order.
    pub fn data_events(&self) -> Vec<Vec<u8>> {
        self.events
            .iter()
            .filter(|(e, _)| matches!(e, Event::Delivered { cmd: Command::Data, .. }))
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Sends one payload as DATA to the exit and runs the network until quiet.
    pub fn send(&mut self, data: &[u8]) {
        let (to, cell) = self.seal(data);
        self.run(vec![(addr(CLIENT), to, cell)], &mut |_, _, _| true);
    }
}
