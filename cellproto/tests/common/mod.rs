//! An in-memory network of sans-IO relays for the protocol tests: the same composition of
//! cellproto pieces (handshake responder, circuit table, EXTEND bookkeeping) that relayd does
//! with real sockets, driven by hand so tests can capture, drop, flip and replay any cell.
#![allow(dead_code)]

use cellproto::cell::{CELL_LEN, Command, HANDSHAKE_LCID, lcid};
use cellproto::client::{Circuit, CircuitConfig, Event, PathHop};
use cellproto::command::{Extend, Extended, decode_ping};
use cellproto::handshake::{OnionSecret, RelayKeys, respond};
use cellproto::link::{LinkControl, decode_create, decode_created, encode_create, encode_created};
use cellproto::onion::{Direction, payload, payload_mut};
use cellproto::relay::{CircuitMap, CircuitTable, HopCircuit, Link, Verdict};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

pub type Cell = [u8; CELL_LEN];

pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

pub fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))
}

pub const CLIENT: usize = 0;

/// One relay: its keys, its circuits, and the EXTENDs waiting for a CREATED.
pub struct TestRelay {
    pub addr: SocketAddr,
    pub identity: [u8; 32],
    pub onion: OnionSecret,
    pub aes_hw: bool,
    pub circuits: CircuitMap,
    /// reply LCID we put in a CREATE → (circuit's prev LCID, next address, link secret).
    pending_extends: HashMap<u32, (u32, SocketAddr, [u8; 32])>,
    /// (creator, its reply LCID) → the CREATED we sent, resent on a retransmitted CREATE.
    created_cache: HashMap<(SocketAddr, u32), Cell>,
    /// Data delivered to this hop as the exit: (prev LCID, payload).
    pub delivered: Vec<(u32, Vec<u8>)>,
    pub drops: Vec<cellproto::relay::DropReason>,
    pub echo: bool,
    rng: ChaCha20Rng,
}

impl TestRelay {
    pub fn new(i: usize, aes_hw: bool, seed: u64) -> Self {
        let mut rng = rng(seed);
        let mut identity = [0u8; 32];
        rng.fill_bytes(&mut identity);
        Self {
            addr: addr(i),
            identity,
            onion: OnionSecret::generate(&mut rng),
            aes_hw,
            circuits: CircuitMap::new(),
            pending_extends: HashMap::new(),
            created_cache: HashMap::new(),
            delivered: Vec::new(),
            drops: Vec::new(),
            echo: true,
            rng,
        }
    }

    pub fn path_hop(&self) -> PathHop {
        PathHop { keys: RelayKeys { identity: self.identity, onion_key: *self.onion.public() }, addr: self.addr }
    }

    fn fresh_lcid(&mut self) -> u32 {
        loop {
            let id = self.rng.next_u32() | 0x4000_0000;
            if cellproto::cell::is_valid_lcid(id)
                && !self.circuits.contains_lcid(id)
                && !self.pending_extends.contains_key(&id)
            {
                return id;
            }
        }
    }

    /// Handles one datagram; returns the datagrams it sends.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, cell: &mut Cell) -> Vec<(SocketAddr, Cell)> {
        let id = lcid(cell);
        if id == HANDSHAKE_LCID {
            return self.handle_create(now, from, cell);
        }
        if let Some((prev_lcid, next_addr, secret)) = self.pending_extends.get(&id).copied() {
            if from == next_addr
                && let Ok((responder, reply)) = decode_created(cell)
            {
                let handshake = *reply;
                self.pending_extends.remove(&id);
                self.circuits.set_next(prev_lcid, Link::new(next_addr, responder, id, &secret));
                let circ = self.circuits.get_mut(prev_lcid).expect("circuit");
                let mut out = [0u8; CELL_LEN];
                let len = Extended { handshake }.encode(payload_mut(&mut out)).unwrap();
                let to = circ.seal_backward(now, Command::Extended, len, &mut out).unwrap();
                return vec![(to, out)];
            }
            return vec![];
        }
        let Some((circ, dir)) = self.circuits.lookup(id) else {
            self.drops.push(cellproto::relay::DropReason::UnknownCircuit);
            return vec![];
        };
        let prev_lcid = circ.prev().lcid_in;
        let verdict = match dir {
            Direction::Forward => circ.handle_forward(now, from, cell),
            Direction::Backward => circ.handle_backward(now, from, cell),
        };
        match verdict {
            Verdict::Send(to) => vec![(to, *cell)],
            Verdict::Drop(r) => {
                self.drops.push(r);
                vec![]
            }
            Verdict::Control { msg: LinkControl::Destroy { reason }, from: side } => {
                let circ = self.circuits.remove(prev_lcid).expect("circuit");
                let mut out = [0u8; CELL_LEN];
                let to_side = match side {
                    Direction::Forward => Direction::Forward,
                    Direction::Backward => Direction::Backward,
                };
                circ.seal_destroy(to_side, reason, &mut out, &mut self.rng)
                    .map(|to| vec![(to, out)])
                    .unwrap_or_default()
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
                let Ok(ext) = Extend::decode(payload(cell, len)) else { return vec![] };
                // A retransmitted EXTEND: resend the CREATE with the same reply id.
                let existing = self.pending_extends.iter().find(|(_, v)| v.0 == prev_lcid).map(|(k, _)| *k);
                let reply_lcid = existing.unwrap_or_else(|| self.fresh_lcid());
                self.pending_extends.insert(reply_lcid, (prev_lcid, ext.target, ext.link_secret));
                let mut out = [0u8; CELL_LEN];
                encode_create(&mut out, reply_lcid, &ext.handshake, &mut self.rng);
                vec![(ext.target, out)]
            }
            Command::Ping => {
                let Ok(id) = decode_ping(payload(cell, len)) else { return vec![] };
                let circ = self.circuits.get_mut(prev_lcid).expect("circuit");
                let mut out = [0u8; CELL_LEN];
                payload_mut(&mut out)[..8].copy_from_slice(&id.to_be_bytes());
                let to = circ.seal_backward(now, Command::Pong, 8, &mut out).unwrap();
                vec![(to, out)]
            }
            Command::Data => {
                let data = payload(cell, len).to_vec();
                self.delivered.push((prev_lcid, data.clone()));
                if !self.echo {
                    return vec![];
                }
                // Echo the reversed packet, so the backward direction carries different bytes.
                let circ = self.circuits.get_mut(prev_lcid).expect("circuit");
                let mut out = [0u8; CELL_LEN];
                let rev: Vec<u8> = data.iter().rev().copied().collect();
                payload_mut(&mut out)[..len].copy_from_slice(&rev);
                let to = circ.seal_backward(now, Command::Data, len, &mut out).unwrap();
                vec![(to, out)]
            }
            _ => vec![],
        }
    }

    fn handle_create(&mut self, now: Instant, from: SocketAddr, cell: &Cell) -> Vec<(SocketAddr, Cell)> {
        let Ok((reply_lcid, hs)) = decode_create(cell) else { return vec![] };
        if let Some(cached) = self.created_cache.get(&(from, reply_lcid)) {
            return vec![(from, *cached)];
        }
        let Ok((reply, out)) = respond(&self.identity, &[&self.onion], self.aes_hw, hs, &mut self.rng) else {
            return vec![];
        };
        let my_lcid = self.fresh_lcid();
        self.circuits.insert(HopCircuit::new(&out, from, reply_lcid, my_lcid, now));
        let mut created = [0u8; CELL_LEN];
        encode_created(&mut created, reply_lcid, my_lcid, &reply, &mut self.rng);
        self.created_cache.insert((from, reply_lcid), created);
        vec![(from, created)]
    }
}

/// A client and a line of relays, with every datagram passing through `deliver_all`.
pub struct Net {
    pub relays: Vec<TestRelay>,
    pub circuit: Circuit,
    pub client_rng: ChaCha20Rng,
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
        let mut client_rng = rng(seed);
        let now = Instant::now();
        let config = CircuitConfig { offer_aes: true, ..CircuitConfig::default() };
        let circuit = Circuit::new(path, 0x5000_0001, config, now, &mut client_rng).expect("circuit");
        Self { relays, circuit, client_rng, now, log: Vec::new(), events: Vec::new(), client_drops: 0 }
    }

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

    /// Sends one payload as DATA to the exit and runs the network until quiet.
    pub fn send(&mut self, data: &[u8]) {
        let (to, cell) = self.seal(data);
        self.run(vec![(addr(CLIENT), to, cell)], &mut |_, _, _| true);
    }
}
