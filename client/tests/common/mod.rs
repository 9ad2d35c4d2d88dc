//! The sans-IO tunnel against cellproto's in-memory relays (no sockets, no root), shared by
//! `tests/tunnel.rs` (honest network) and `tests/hostile.rs` (relays that attack the client).
//! Relays can die, drop the CREATE they should pass on, answer ATTACH with what a test says,
//! or originate any backward command with their own onion layer, as a hostile hop can.

#![allow(dead_code)] // each test file uses its own part of the harness

use cellproto::cell::{CELL_LEN, Command, HANDSHAKE_LCID, lcid};
use cellproto::command::{Attach, Attached, decode_ping};
use cellproto::descriptor::{ExitPolicySummary, FLAG_EXIT, RelayDescriptor};
use cellproto::identity::IdentityKey;
use cellproto::onion::{Direction, payload, payload_mut};
use cellproto::relay::{CircuitTable, Verdict};
use cellproto::sim::{TestRelay, rng};
use meshvpn::config::Timers;
use meshvpn::guards::Guards;
use meshvpn::relays::{PathRequest, Relay, Relays};
use meshvpn::tunnel::{Options, Tunnel, TunnelEvent};
use rand_chacha::ChaCha20Rng;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 1, 2)), 40000);

/// A relay's flags for a middle (neither guard nor exit).
pub const MIDDLE: u32 = 0;

type Cell = [u8; CELL_LEN];
type Queue = VecDeque<(SocketAddr, SocketAddr, Cell)>;

pub struct Lab {
    pub relays: Vec<TestRelay>,
    /// Relays that receive nothing (dead, or blocked by someone on the client's network).
    pub dead: HashSet<usize>,
    /// Relays that drop every CREATE they would send to the next hop (a hostile middle that
    /// makes the hop after it look dead).
    pub drop_creates: HashSet<usize>,
    /// When set, the exits answer ATTACH with this (a hostile or broken exit).
    pub attach_answer: Option<Attached>,
    /// Relays with the EXIT flag.
    exits: HashSet<usize>,
    pub tunnel: Tunnel,
    pub now: Instant,
    pub rng: ChaCha20Rng,
    /// Events, [`TunnelEvent::SaveGuards`] aside (counted in `saves`).
    pub events: Vec<TunnelEvent>,
    pub saves: usize,
    pub to_tun: Vec<Vec<u8>>,
}

/// The wall clock the simulated client starts at (unix seconds).
pub const START_UNIX: u64 = 1_700_000_000;

/// Relay `i` (1-based) at 10.i.0.1:9001, so every relay is in its own /16.
pub fn relay_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, i as u8, 0, 1], 9001))
}

/// The directory entry of a simulated relay.
pub fn listed(relay: &TestRelay, i: usize, flags: u32, bandwidth: u64) -> Relay {
    let desc = RelayDescriptor {
        identity: IdentityKey(relay.keys.identity),
        onion_keys: vec![],
        addresses: vec![relay.addr],
        nickname: format!("r{i}"),
        // Exits share an operator, so an exit is never a middle in front of another exit.
        operator: if flags & FLAG_EXIT != 0 { "exits".into() } else { format!("op{i}") },
        bandwidth,
        flags,
        exit_policy: (flags & FLAG_EXIT != 0).then(|| ExitPolicySummary { accept: false, ports: vec![(25, 25)] }),
        protocol_versions: vec![1],
        published: 0,
        expires: 1,
    };
    Relay { desc, hop: relay.path_hop(), rtt: None }
}

pub fn timers() -> Timers {
    Timers { keepalive_ms: 500, dead_after_ms: 2000, handshake_timeout_ms: 300, handshake_attempts: 3 }
}

impl Lab {
    /// `roles[i]`: the flags of relay i + 1 (GUARD, EXIT or 0 for a middle).
    pub fn new(roles: &[u32]) -> Self {
        let now = Instant::now();
        let mut relays = Vec::new();
        let mut entries = Vec::new();
        for (i, &flags) in roles.iter().enumerate() {
            let mut relay = TestRelay::new(i + 1, true, 100 + i as u64);
            relay.addr = relay_addr(i + 1);
            entries.push(listed(&relay, i + 1, flags, 1_000_000));
            relays.push(relay);
        }
        let request = PathRequest { hops: 3, exit_ports: vec![80, 443], ..Default::default() };
        let dir = Relays { relays: entries, published: START_UNIX - 60, expires: START_UNIX + 86_400 };
        let options = Options { timers: timers(), offer_aes: true, guards: Guards::default(), unix_now: START_UNIX };
        let tunnel = Tunnel::new(dir, request, options, now);
        Self {
            relays,
            dead: HashSet::new(),
            drop_creates: HashSet::new(),
            attach_answer: None,
            exits: roles.iter().enumerate().filter(|(_, f)| *f & FLAG_EXIT != 0).map(|(i, _)| i).collect(),
            tunnel,
            now,
            rng: rng(1),
            events: Vec::new(),
            saves: 0,
            to_tun: Vec::new(),
        }
    }

    /// Relay `i` handles one datagram, honestly or as the test made it.
    fn relay_handle(&mut self, i: usize, from: SocketAddr, cell: &mut Cell) -> Vec<(SocketAddr, Cell)> {
        if let Some(answer) = self.attach_answer
            && self.exits.contains(&i)
            && let Some(out) = answer_attach(&mut self.relays[i], self.now, from, cell, answer)
        {
            return out;
        }
        let mut out = self.relays[i].handle(self.now, from, cell);
        if self.drop_creates.contains(&i) {
            out.retain(|(_, c)| lcid(c) != HANDSHAKE_LCID);
        }
        out
    }

    /// Delivers `queue` and everything it causes until the network is quiet.
    pub fn deliver(&mut self, mut queue: Queue) {
        for _ in 0..10_000 {
            while let Some(e) = self.tunnel.poll_event() {
                match e {
                    TunnelEvent::SaveGuards => self.saves += 1,
                    e => self.events.push(e),
                }
            }
            let mut cell = [0u8; CELL_LEN];
            while let Some(to) = self.tunnel.poll_transmit(self.now, &mut cell, &mut self.rng) {
                queue.push_back((CLIENT, to, cell));
            }
            let Some((from, to, mut cell)) = queue.pop_front() else { return };
            if to == CLIENT {
                if let Some(len) = self.tunnel.handle_cell(self.now, from, &mut cell, &mut self.rng) {
                    self.to_tun.push(payload(&cell, len).to_vec());
                }
                continue;
            }
            let Some(i) = self.relays.iter().position(|r| r.addr == to) else { continue };
            if self.dead.contains(&i) {
                continue;
            }
            let addr = self.relays[i].addr;
            for (next, out) in self.relay_handle(i, from, &mut cell) {
                queue.push_back((addr, next, out));
            }
        }
        panic!("the network never went quiet");
    }

    /// Delivers every datagram until the network is quiet.
    pub fn pump(&mut self) {
        self.deliver(Queue::new());
    }

    /// Lets `d` pass in 10 ms steps, running timers and delivering everything.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(10);
            if self.now >= self.tunnel.poll_timeout() {
                self.tunnel.handle_timeout(self.now, &mut self.rng);
            }
            self.pump();
        }
    }

    /// Lets `d` pass jumping from timer to timer, as the driver sleeps; returns how many
    /// timers ran (a spinning driver would run millions).
    pub fn advance_by_timers(&mut self, d: Duration) -> usize {
        let end = self.now + d;
        let mut runs = 0;
        let mut immediate = 0;
        while self.now < end {
            let next = self.tunnel.poll_timeout();
            // Once in a row is allowed: a new guard is announced first and the circuit to it
            // starts at the next timeout, at once.
            immediate = if next <= self.now { immediate + 1 } else { 0 };
            assert!(immediate <= 1 || runs == 0, "poll_timeout in the past twice: the driver would spin");
            self.now = next.min(end);
            self.tunnel.handle_timeout(self.now, &mut self.rng);
            self.pump();
            runs += 1;
        }
        runs
    }

    /// Sends one packet into the tunnel; whether it was sealed (a circuit is up).
    pub fn send(&mut self, data: &[u8]) -> bool {
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..data.len()].copy_from_slice(data);
        let Some(to) = self.tunnel.seal_packet(data.len(), &mut cell) else { return false };
        assert_eq!(Some(to), self.tunnel.guard());
        self.deliver(Queue::from([(CLIENT, to, cell)]));
        true
    }

    pub fn path_ids(&self) -> Vec<IdentityKey> {
        self.tunnel.path().iter().map(Relay::id).collect()
    }

    pub fn index_of(&self, id: IdentityKey) -> usize {
        self.relays.iter().position(|r| IdentityKey(r.keys.identity) == id).unwrap()
    }

    /// The relay at `hop` (1-based) of the client's current circuit, and the LCID under which
    /// it keeps that circuit, found by following the circuit's links from the client.
    pub fn circuit_at(&mut self, hop: usize) -> (usize, u32) {
        let ids = self.path_ids();
        let mut want = self.tunnel.circuit().expect("a circuit").lcid_in();
        let mut found = None;
        for (h, id) in ids.iter().enumerate().take(hop) {
            let i = self.index_of(*id);
            let circ = if h == 0 {
                self.relays[i].node.circuits().iter().find(|c| c.prev().lcid_out == want)
            } else {
                self.relays[i].node.circuits().iter().find(|c| c.prev().lcid_in == want)
            }
            .unwrap_or_else(|| panic!("hop {} has no circuit for the client's", h + 1));
            found = Some((i, circ.prev().lcid_in));
            want = circ.next().map(|n| n.lcid_out).unwrap_or(0);
        }
        found.expect("hop >= 1")
    }

    /// Hop `hop` of the current circuit originates `cmd` with `body` towards the client, with
    /// its own onion layer (what any hop can do), and the network delivers it.
    pub fn originate(&mut self, hop: usize, cmd: Command, body: &[u8]) {
        let (i, lcid) = self.circuit_at(hop);
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..body.len()].copy_from_slice(body);
        let now = self.now;
        let relay = &mut self.relays[i];
        let to =
            relay.node.circuits_mut().get_mut(lcid).unwrap().seal_backward(now, cmd, body.len(), &mut cell).unwrap();
        let from = relay.addr;
        self.deliver(Queue::from([(from, to, cell)]));
    }

    /// Hop `hop` sends a link-level DESTROY to the hop before it, as if the circuit broke
    /// there; the guard passes it on to the client.
    pub fn link_destroy(&mut self, hop: usize, reason: u8) {
        let (i, lcid) = self.circuit_at(hop);
        let mut cell = [0u8; CELL_LEN];
        let relay = &mut self.relays[i];
        let mut circ = relay.node.circuits_mut().remove(lcid).unwrap();
        let to = circ.seal_destroy(Direction::Backward, reason, &mut cell, &mut self.rng).unwrap();
        let from = relay.addr;
        self.deliver(Queue::from([(from, to, cell)]));
    }

    /// The Up events since event number `from`.
    pub fn ups_since(&self, from: usize) -> Vec<Attached> {
        self.events[from..]
            .iter()
            .filter_map(|e| match e {
                TunnelEvent::Up(a) => Some(*a),
                _ => None,
            })
            .collect()
    }

    /// Every guard address the tunnel was told to use, in order.
    pub fn guards_used(&self) -> Vec<SocketAddr> {
        self.events
            .iter()
            .filter_map(|e| match e {
                TunnelEvent::Guard(g) => Some(*g),
                _ => None,
            })
            .collect()
    }
}

/// An exit that answers ATTACH with `answer` (and PING and DATA as an honest one): the cells
/// it does not recognise as a circuit's forward cells go to the honest relay code.
fn answer_attach(
    relay: &mut TestRelay,
    now: Instant,
    from: SocketAddr,
    cell: &mut Cell,
    answer: Attached,
) -> Option<Vec<(SocketAddr, Cell)>> {
    let id = lcid(cell);
    if id == HANDSHAKE_LCID || relay.control.is_pending(id) {
        return None;
    }
    let (circ, Direction::Forward) = relay.node.circuits_mut().lookup(id)? else { return None };
    if circ.next().is_some() {
        return None; // not the last hop of this circuit
    }
    let mut out = [0u8; CELL_LEN];
    let (cmd, len) = match circ.handle_forward(now, from, cell) {
        Verdict::Deliver { cmd: Command::Attach, len } => {
            Attach::decode(payload(cell, len)).ok()?;
            (Command::Attached, answer.encode(payload_mut(&mut out)).ok()?)
        }
        Verdict::Deliver { cmd: Command::Ping, len } => {
            let id = decode_ping(payload(cell, len)).ok()?;
            payload_mut(&mut out)[..8].copy_from_slice(&id.to_be_bytes());
            (Command::Pong, 8)
        }
        Verdict::Deliver { cmd: Command::Data, len } => {
            for (d, s) in payload_mut(&mut out)[..len].iter_mut().zip(payload(cell, len).iter().rev()) {
                *d = *s;
            }
            (Command::Data, len)
        }
        _ => return Some(vec![]),
    };
    circ.seal_backward(now, cmd, len, &mut out).ok().map(|to| vec![(to, out)])
}
