//! End-to-end protocol tests on an in-memory network: building through any hop count, data both
//! ways, tamper detection at every byte, replay, header unlinkability across links.

use cellproto::cell::{CELL_LEN, Command, HEADER_LEN, MAX_HOPS, payload_capacity};
use cellproto::client::{CircuitError, Event};
use cellproto::relay::DropReason;
use cellproto::sim::*;
use proptest::prelude::*;
use std::net::SocketAddr;
use std::time::Instant;

#[test]
fn three_hops_data_both_ways() {
    let mut net = Net::new(3, 1, |_| true);
    net.build();
    net.send(b"hello exit");
    assert_eq!(net.relays[2].terminal.delivered.len(), 1);
    assert_eq!(net.relays[2].terminal.delivered[0].1, b"hello exit");
    assert_eq!(net.data_events(), vec![b"tixe olleh".to_vec()]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any hop count, any payload up to the capacity at that hop count, both directions, both
    /// suites (each relay with or without AES hardware).
    #[test]
    fn build_and_send_any_hops(hops in 1usize..=MAX_HOPS, seed in any::<u64>(), aes_mask in any::<u8>(),
                               payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..=payload_capacity(MAX_HOPS)), 1..4)) {
        let mut net = Net::new(hops, seed, |i| aes_mask & (1 << (i - 1)) != 0);
        net.build();
        for (i, suite) in net.circuit.suites().iter().enumerate() {
            let expect = if aes_mask & (1 << i) != 0 { "aes-256-gcm" } else { "chacha20-poly1305" };
            prop_assert_eq!(suite.name(), expect);
        }
        for p in &payloads {
            net.send(p);
        }
        let exit = &net.relays[hops - 1];
        prop_assert_eq!(exit.terminal.delivered.iter().map(|d| d.1.clone()).collect::<Vec<_>>(), payloads.clone());
        let back: Vec<Vec<u8>> = payloads.iter().map(|p| p.iter().rev().copied().collect()).collect();
        prop_assert_eq!(net.data_events(), back);
    }
}

/// The largest payload at each hop count fits; one byte more is refused by the sender.
#[test]
fn capacity_is_exact() {
    for hops in 1..=MAX_HOPS {
        let mut net = Net::new(hops, 7, |_| true);
        net.build();
        let max = payload_capacity(hops);
        net.send(&vec![0xAB; max]);
        assert_eq!(net.relays[hops - 1].terminal.delivered[0].1.len(), max);
        let mut cell = [0u8; CELL_LEN];
        assert!(net.circuit.seal_data(max + 1, &mut cell).is_err());
    }
}

/// Flips bit `bit` of byte `pos`.
fn flipped(cell: &Cell, pos: usize, bit: u8) -> Cell {
    let mut c = *cell;
    c[pos] ^= 1 << bit;
    c
}

/// Hands `relay` (from `from`) every single-bit flip of `cell` and checks that each is dropped
/// and counted under a reason a flip can cause (one in the LCID may reach no circuit at all);
/// `link` names the link in the failure messages. Returns how many flips it tried.
fn assert_every_flip_dropped(relay: &mut TestRelay, now: Instant, from: SocketAddr, cell: &Cell, link: &str) -> usize {
    let mut tried = 0;
    for pos in 0..CELL_LEN {
        for bit in 0..8 {
            let before = relay.drops.len();
            let out = relay.handle(now, from, &mut flipped(cell, pos, bit));
            assert!(out.is_empty(), "flip at byte {pos} bit {bit} {link} went through");
            assert_eq!(relay.drops.len(), before + 1, "flip at {pos} not counted");
            let reason = *relay.drops.last().unwrap();
            let allowed: &[DropReason] = if pos < 4 {
                &[DropReason::UnknownCircuit, DropReason::BadTag, DropReason::Replay]
            } else {
                &[DropReason::BadTag, DropReason::Replay]
            };
            assert!(allowed.contains(&reason), "flip at {pos}: {reason:?}");
            tried += 1;
        }
    }
    tried
}

/// Forward: a cell with any single bit flipped, on any link, is dropped by the next hop (and
/// counted); the genuine cell still goes through afterwards, so nothing was committed.
#[test]
fn flipped_bit_anywhere_is_rejected_by_next_hop_forward() {
    let hops = 3;
    let mut net = Net::new(hops, 11, |i| i != 2);
    net.build();
    let (mut to, mut cell) = net.seal(b"probe");
    let mut from = addr(CLIENT);
    for hop in 0..hops {
        assert_eq!(net.relay_index(to), Some(hop));
        let relay = &mut net.relays[hop];
        assert_every_flip_dropped(relay, net.now, from, &cell, &format!("on the link into hop {}", hop + 1));
        let mut genuine = cell;
        let out = relay.handle(net.now, from, &mut genuine);
        if hop + 1 < hops {
            assert_eq!(out.len(), 1, "genuine cell refused at hop {}", hop + 1);
            from = to;
            (to, cell) = out[0];
        } else {
            assert_eq!(relay.terminal.delivered.last().unwrap().1, b"probe");
        }
    }
}

/// Backward: every link carries a link tag, so a cell with any single bit flipped on any
/// backward link is dropped (and counted) by the node that receives it, relay or client; the
/// genuine cell still goes through afterwards, so nothing was committed. Every bit of every byte
/// on every link is tried, and the test counts that it tried them all.
#[test]
fn flipped_bit_anywhere_is_rejected_by_next_node_backward() {
    let hops = 3;
    let mut net = Net::new(hops, 12, |i| i != 2);
    net.build();
    for relay in &mut net.relays {
        relay.terminal.echo = false;
    }
    let exit = hops - 1;
    let circ_lcid = net.relays[exit].node.circuits().iter().next().unwrap().prev().lcid_in;
    let mut cell = [0u8; CELL_LEN];
    cellproto::onion::payload_mut(&mut cell)[..4].copy_from_slice(b"back");
    let circ = net.relays[exit].node.circuits_mut().get_mut(circ_lcid).unwrap();
    let mut to = circ.seal_backward(net.now, Command::Data, 4, &mut cell).unwrap();
    let mut from = net.relays[exit].addr;
    let mut tried = 0usize;
    while to != addr(CLIENT) {
        let index = net.relay_index(to).unwrap();
        let relay = &mut net.relays[index];
        tried += assert_every_flip_dropped(relay, net.now, from, &cell, &format!("into {to}"));
        let out = relay.handle(net.now, from, &mut cell);
        assert_eq!(out.len(), 1, "genuine cell refused at {to}");
        from = to;
        (to, cell) = out[0];
    }
    // At the client, the driver routes by LCID: a flipped LCID reaches no circuit at all.
    for pos in 0..CELL_LEN {
        for bit in 0..8 {
            let mut c = flipped(&cell, pos, bit);
            tried += 1;
            if cellproto::cell::lcid(&c) != net.circuit.lcid_in() {
                continue;
            }
            let res = net.circuit.handle_cell(net.now, &mut c, &mut net.client_rng);
            assert!(
                matches!(res, Err(CircuitError::Forged | CircuitError::Replay)),
                "flip at byte {pos} bit {bit} on the client's link: {res:?}"
            );
        }
    }
    assert!(net.circuit.evidence().violations.iter().all(|&v| v == 0), "a flip counted as tampering");
    let res = net.circuit.handle_cell(net.now, &mut cell, &mut net.client_rng);
    assert_eq!(res, Ok(Some(Event::Delivered { hop: hops, cmd: Command::Data, len: 4 })));
    assert_eq!(tried, hops * CELL_LEN * 8);
}

#[test]
fn replays_rejected_and_reordering_accepted() {
    let mut net = Net::new(2, 13, |_| true);
    net.build();
    for relay in &mut net.relays {
        relay.terminal.echo = false;
    }
    let cells: Vec<_> = (0..50u8).map(|i| net.seal(&[i; 10])).collect();
    // Deliver in reverse order: all inside the window, all accepted exactly once.
    for (to, cell) in cells.iter().rev() {
        net.run(vec![(addr(CLIENT), *to, *cell)], &mut |_, _, _| true);
    }
    assert_eq!(net.relays[1].terminal.delivered.len(), 50);
    // Every one of them again: all replays, dropped by the first hop.
    for (to, cell) in &cells {
        net.run(vec![(addr(CLIENT), *to, *cell)], &mut |_, _, _| true);
    }
    assert_eq!(net.relays[1].terminal.delivered.len(), 50);
    assert_eq!(net.relays[0].drops.iter().filter(|r| **r == DropReason::Replay).count(), 50);
    // A cell held back until the window moved past it is refused as too old.
    let (to, old) = net.seal(b"late");
    for _ in 0..cellproto::replay::REPLAY_WINDOW {
        let (t, c) = net.seal(b"x");
        net.relays[0].handle(net.now, addr(CLIENT), &mut c.clone());
        let _ = t;
    }
    let drops = net.relays[0].drops.len();
    assert!(net.relays[0].handle(net.now, addr(CLIENT), &mut old.clone()).is_empty());
    assert_eq!(net.relays[0].drops.len(), drops + 1);
    assert_eq!(*net.relays[0].drops.last().unwrap(), DropReason::Replay);
    let _ = to;
}

/// No two links of a circuit show the same header bytes for the same cell, and no 16-byte run
/// of a cell crosses two links unchanged.
#[test]
fn links_are_unlinkable_by_bytes() {
    for hops in 2..=MAX_HOPS {
        let mut net = Net::new(hops, 14 + hops as u64, |_| true);
        net.build();
        let start = net.log.len();
        for i in 0..20u8 {
            net.send(&[i; 100]);
        }
        let log = &net.log[start..];
        // Group the cells by the data round trip they belong to: 2*hops cells per send.
        for round in log.chunks(2 * hops) {
            for (i, a) in round.iter().enumerate() {
                for b in &round[i + 1..] {
                    assert_ne!(a.2[..HEADER_LEN], b.2[..HEADER_LEN], "same header on two links");
                    assert_ne!(a.2[4..HEADER_LEN], b.2[4..HEADER_LEN], "same protected counter on two links");
                    let runs: std::collections::HashSet<&[u8]> = a.2.chunks(16).collect();
                    for chunk in b.2.chunks(16) {
                        assert!(
                            !runs.contains(chunk) || chunk.iter().all(|&x| x == 0),
                            "a 16-byte run crossed two links"
                        );
                    }
                }
            }
        }
    }
}

/// Lost handshake cells are retransmitted: the CREATED and then an EXTENDED are dropped once
/// each; the client resends, the relay answers a repeated CREATE with the same CREATED and a
/// repeated EXTEND with the same CREATE, and the circuit opens.
#[test]
fn lost_handshake_cells_are_retransmitted() {
    let mut net = Net::new(3, 21, |_| true);
    let mut dropped = 0;
    let mut lose_first_two_replies = |from: std::net::SocketAddr, to: std::net::SocketAddr, _: &mut Cell| {
        if to == addr(CLIENT) && from == addr(1) && dropped < 2 {
            dropped += 1;
            return false;
        }
        true
    };
    net.run(vec![], &mut lose_first_two_replies);
    assert!(!net.circuit.is_open());
    for step in 1..=3u32 {
        net.now += std::time::Duration::from_secs(1 << step);
        net.run(vec![], &mut lose_first_two_replies);
    }
    assert!(net.circuit.is_open(), "circuit did not open after retransmissions");
    // One circuit per relay: the repeated CREATE did not create a second one.
    assert!(net.relays.iter().all(|r| r.node.circuits().len() == 1));
    net.send(b"after loss");
    assert_eq!(net.relays[2].terminal.delivered[0].1, b"after loss");
}

/// A hop that never answers closes the circuit after the configured attempts.
#[test]
fn silent_hop_times_out() {
    let mut net = Net::new(2, 22, |_| true);
    let mut blackhole = |_: std::net::SocketAddr, to: std::net::SocketAddr, _: &mut Cell| to != addr(2);
    net.run(vec![], &mut blackhole);
    for _ in 0..10 {
        net.now += std::time::Duration::from_secs(16);
        if let Some(ev) = net.circuit.handle_timeout(net.now) {
            assert_eq!(ev, Event::Closed(cellproto::client::CloseReason::HandshakeTimeout { hop: 2 }));
            return;
        }
        net.run(vec![], &mut blackhole);
    }
    panic!("no timeout");
}

/// The client's DESTROY travels hop by hop, each relay removing the circuit.
#[test]
fn destroy_propagates() {
    let mut net = Net::new(3, 23, |_| true);
    net.build();
    let mut cell = [0u8; CELL_LEN];
    let to = net.circuit.close(&mut cell, &mut net.client_rng).unwrap();
    net.run(vec![(addr(CLIENT), to, cell)], &mut |_, _, _| true);
    assert!(net.relays.iter().all(|r| r.node.circuits().is_empty()), "a relay kept the circuit");
    assert!(net.circuit.seal_data(1, &mut [0u8; CELL_LEN]).is_err());
}

/// PING to every hop gets a PONG from that hop.
#[test]
fn ping_any_hop() {
    let mut net = Net::new(4, 24, |_| false);
    net.build();
    for hop in 1..=4usize {
        let mut cell = [0u8; CELL_LEN];
        cellproto::onion::payload_mut(&mut cell)[..8].copy_from_slice(&(hop as u64 * 77).to_be_bytes());
        let to = net.circuit.seal(hop, Command::Ping, 8, &mut cell).unwrap();
        net.run(vec![(addr(CLIENT), to, cell)], &mut |_, _, _| true);
        let (ev, body) = net.events.last().unwrap().clone();
        assert_eq!(ev, Event::Delivered { hop, cmd: Command::Pong, len: 8 });
        assert_eq!(body, (hop as u64 * 77).to_be_bytes());
    }
}
