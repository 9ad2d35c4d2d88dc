//! The relay path allocates nothing per cell: 100 000 DATA cells go client → guard → middle →
//! exit and their echoes come back, through the three relays' `Node`s driven as relayd's
//! workers drive them (batch in place, transmit slots lent by the caller), with zero heap
//! allocations once the outbox has grown. A positive control shows the counter does count.
//!
//! `allocation_counter` replaces the global allocator of this test binary only.

use allocation_counter::measure;
use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::Event;
use cellproto::node::{CircuitId, Host, Node, Outbox, Routed, Terminal, Transmit, Upcall, originate};
use cellproto::onion::{payload, payload_mut};
use cellproto::relay::HopCircuit;
use cellproto::sim::{CLIENT, Net, addr, rng};
use rand_chacha::ChaCha20Rng;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Cells in the measured run.
const CELLS: usize = 100_000;
/// Payload of each DATA cell: a small IP packet.
const PACKET: usize = 64;

/// What relayd's worker is to its node, without a control thread: upcalls are counted only
/// (none comes in steady state).
#[derive(Default)]
struct Driver {
    out: Outbox,
    upcalls: usize,
}

impl Transmit for Driver {
    fn slot(&mut self) -> &mut [u8; CELL_LEN] {
        self.out.slot()
    }

    fn commit(&mut self, to: SocketAddr) {
        self.out.commit(to);
    }
}

impl Host for Driver {
    fn upcall(&mut self, _: Instant, _: Upcall<'_>) {
        self.upcalls += 1;
    }
}

/// An exit that echoes DATA reversed, allocating nothing.
struct Echo {
    delivered: usize,
}

impl Terminal for Echo {
    fn deliver(
        &mut self,
        now: Instant,
        _: CircuitId,
        circ: &mut HopCircuit,
        cmd: Command,
        body: &[u8],
        tx: &mut dyn Transmit,
    ) -> bool {
        if cmd != Command::Data {
            return false;
        }
        self.delivered += 1;
        originate(now, circ, Command::Data, tx, |p| {
            for (d, s) in p.iter_mut().zip(body.iter().rev()) {
                *d = *s;
            }
            Some(body.len())
        })
    }

    fn closed(&mut self, _: CircuitId) {}
}

/// A built 3-hop circuit with the relays' nodes taken out of the simulator.
struct Path {
    net: Net,
    nodes: Vec<Node>,
    driver: Driver,
    exit: Echo,
    rng: ChaCha20Rng,
}

impl Path {
    fn new() -> Self {
        let mut net = Net::new(3, 42, |_| true);
        net.build();
        let now = net.now;
        let idle = Duration::from_secs(600);
        let nodes = net.relays.iter_mut().map(|r| std::mem::replace(&mut r.node, Node::new(now, idle))).collect();
        Self { net, nodes, driver: Driver::default(), exit: Echo { delivered: 0 }, rng: rng(7) }
    }

    /// Relay `i` (0-based) handles `cell` from `from`; returns where it sends it.
    fn hop(&mut self, i: usize, from: SocketAddr, cell: &mut [u8; CELL_LEN]) -> Routed {
        let now = self.net.now;
        if i == 2 {
            self.nodes[i].handle_one(now, from, cell, &mut self.driver, &mut self.exit, &mut self.rng)
        } else {
            self.nodes[i].handle_one(now, from, cell, &mut self.driver, &mut (), &mut self.rng)
        }
    }

    /// One DATA cell to the exit and its echo back to the client; returns the echo's length.
    fn round_trip(&mut self, n: u32) -> usize {
        let mut cell = [0u8; CELL_LEN];
        let body = payload_mut(&mut cell);
        body[..4].copy_from_slice(&n.to_be_bytes());
        let to = self.net.circuit.seal_data(PACKET, &mut cell).expect("seal");
        assert_eq!(to, addr(1));
        // Forward: guard and middle relay it in place, the exit takes it.
        let mut from = addr(CLIENT);
        for i in 0..2 {
            match self.hop(i, from, &mut cell) {
                Routed::Send { to, .. } => assert_eq!(to, addr(i + 2)),
                other => panic!("relay {i}: {other:?}"),
            }
            from = addr(i + 1);
        }
        assert!(matches!(self.hop(2, from, &mut cell), Routed::Local { circuit: Some(_) }));
        // The echo, from the exit's transmit slot, back through middle and guard.
        let (to, mut cell) = self.driver.out.cells()[0];
        self.driver.out.clear();
        assert_eq!(to, addr(2));
        for (i, from) in [(1, addr(3)), (0, addr(2))] {
            match self.hop(i, from, &mut cell) {
                Routed::Send { to, .. } => assert_eq!(to, addr(i)),
                other => panic!("relay {i} backward: {other:?}"),
            }
        }
        let event = self.net.circuit.handle_cell(self.net.now, &mut cell, &mut self.net.client_rng);
        let Ok(Some(Event::Delivered { cmd: Command::Data, hop: 3, len })) = event else { panic!("{event:?}") };
        assert_eq!(payload(&cell, len)[len - 4..], n.to_le_bytes());
        len
    }
}

#[test]
fn a_hundred_thousand_cells_round_trip_three_hops_without_allocating() {
    let mut path = Path::new();
    // Warm-up: the outbox grows to its one slot.
    for n in 0..100 {
        path.round_trip(n);
    }
    let mut bytes = 0;
    let info = measure(|| {
        for n in 0..CELLS as u32 {
            bytes += path.round_trip(n);
        }
    });
    assert_eq!(bytes, CELLS * PACKET);
    assert_eq!(path.exit.delivered, CELLS + 100);
    assert_eq!(path.driver.upcalls, 0);
    assert_eq!(info.count_total, 0, "the relay path allocated: {info:?}");
}

#[test]
fn positive_control_an_allocation_in_the_measured_region_is_counted() {
    let mut path = Path::new();
    for n in 0..100 {
        path.round_trip(n);
    }
    let info = measure(|| {
        for n in 0..1000 {
            path.round_trip(n);
            if n == 500 {
                // What a per-cell `Vec` (the old `Outgoing`) would do, once.
                std::hint::black_box(vec![0u8; CELL_LEN]);
            }
        }
    });
    assert_eq!(info.count_total, 1, "{info:?}");
}
