//! A deterministic in-memory network of sans-IO relays, driven by hand so tests, benches, fuzz
//! targets and the demo can capture, drop, flip and replay any cell. Each relay is a
//! [`SoloRelay`]: the same [`crate::node::Node`] that relayd's workers drive, with its control
//! plane on the same thread; nothing here decides how a relay reacts to a cell. Addresses are
//! labels (127.0.0.1:10000 + i); nothing is sent anywhere. Behind the `sim` feature: tests,
//! benches, fuzz targets and the demo enable it; no binary does.

use crate::cell::{CELL_LEN, Command};
use crate::client::{Circuit, CircuitConfig, Event, PathHop};
use crate::command::{Attach, Attached};
use crate::handshake::{OnionSecret, RelayKeys};
use crate::node::{CircuitId, Outbox, Routed, SoloRelay, Terminal, Transmit, originate};
use crate::onion::{payload, payload_mut};
use crate::relay::control::ControlPlane;
use crate::relay::{DropReason, HopCircuit};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// A cell buffer.
pub type Cell = [u8; CELL_LEN];

pub use crate::node::Meddle;

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

/// How long the simulator's relays keep an idle circuit (relayd's default).
pub const IDLE: Duration = Duration::from_secs(600);

/// The simulator's exit: records DATA and echoes it reversed; answers ATTACH from a toy pool.
pub struct SimExit {
    /// DATA delivered to this hop as the exit: (circuit LCID, payload).
    pub delivered: Vec<(u32, Vec<u8>)>,
    /// Whether the exit answers DATA with the reversed packet.
    pub echo: bool,
    /// Sessions ATTACH made, by token: the number in their inner addresses.
    pub sessions: HashMap<[u8; 32], u8>,
    rng: ChaCha20Rng,
}

impl Terminal for SimExit {
    fn deliver(
        &mut self,
        now: Instant,
        id: CircuitId,
        circ: &mut HopCircuit,
        cmd: Command,
        body: &[u8],
        tx: &mut dyn Transmit,
    ) -> bool {
        match cmd {
            Command::Data => {
                self.delivered.push((id, body.to_vec()));
                if self.echo {
                    // The reversed packet, so the backward direction carries different bytes.
                    originate(now, circ, Command::Data, tx, |p| {
                        for (dst, src) in p[..body.len()].iter_mut().zip(body.iter().rev()) {
                            *dst = *src;
                        }
                        Some(body.len())
                    });
                }
            }
            Command::Attach => {
                let Ok(request) = Attach::decode(body) else { return true };
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
                originate(now, circ, Command::Attached, tx, |p| reply.encode(p).ok());
            }
            _ => return false,
        }
        true
    }

    fn closed(&mut self, _: CircuitId) {}
}

/// One relay: the very node relayd runs ([`SoloRelay`], reached through `Deref`: `control`,
/// `node`, `terminal`, `hostile`, `cookies`), its address and keys, and every drop.
pub struct TestRelay {
    /// Its address label.
    pub addr: SocketAddr,
    /// Its identity and onion key as a client sees them.
    pub keys: RelayKeys,
    /// Every drop, in order.
    pub drops: Vec<DropReason>,
    relay: SoloRelay<SimExit>,
    outbox: Outbox,
}

impl std::ops::Deref for TestRelay {
    type Target = SoloRelay<SimExit>;

    fn deref(&self) -> &Self::Target {
        &self.relay
    }
}

impl std::ops::DerefMut for TestRelay {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.relay
    }
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
        let keys = RelayKeys { identity, onion_key: *onion.public() };
        let exit = SimExit { delivered: Vec::new(), echo: true, sessions: HashMap::new(), rng: rng(seed ^ 0xe417) };
        let control = ControlPlane::new(identity, vec![onion], aes_hw);
        let relay = SoloRelay::new(control, exit, Instant::now(), IDLE, rng(seed ^ 0x5eed));
        Self { addr: addr(i), keys, drops: Vec::new(), relay, outbox: Outbox::new() }
    }

    /// This relay as a hop of a client's path.
    pub fn path_hop(&self) -> PathHop {
        PathHop { keys: self.keys, addr: self.addr }
    }

    /// Handles one datagram; returns the datagrams it sends.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, cell: &mut Cell) -> Vec<(SocketAddr, Cell)> {
        let routed = self.relay.handle(now, from, cell, &mut self.outbox);
        self.drops.append(&mut self.relay.refused);
        let mut out = self.outbox.take();
        match routed {
            Routed::Send { to, .. } => out.insert(0, (to, *cell)),
            Routed::Drop(r) => self.drops.push(r),
            Routed::Local { .. } => {}
        }
        out
    }

    /// Runs the relay's timers at `now`; returns the datagrams it sends.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<(SocketAddr, Cell)> {
        self.relay.handle_timeout(now, &mut self.outbox);
        self.drops.append(&mut self.relay.refused);
        self.outbox.take()
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
