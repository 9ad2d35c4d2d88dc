//! The relay node (`cellproto::node`), driven as relayd drives it but with a clock the test
//! jumps: idle expiry, PING → PONG, DESTROY by handle, shutdown, an EXTEND to a silent relay,
//! an EXTEND replayed. The network is `cellproto::sim`, whose relays are these very nodes.

use cellproto::cell::{CELL_LEN, Command, lcid};
use cellproto::client::{CloseReason, Event};
use cellproto::command::reason;
use cellproto::node::{Outbox, Routed, SoloRelay};
use cellproto::onion::payload_mut;
use cellproto::relay::DropReason;
use cellproto::relay::control::HANDSHAKE_STATE_TTL;
use cellproto::sim::{CLIENT, Cell, IDLE, Net, SimExit, addr, rng};
use std::net::SocketAddr;
use std::time::Duration;

/// Hands the cells addressed to the client to it; returns its events.
fn to_client(net: &mut Net, cells: &[(SocketAddr, Cell)]) -> Vec<Event> {
    let mut events = Vec::new();
    for (_, cell) in cells.iter().filter(|(to, _)| *to == addr(CLIENT)) {
        let mut cell = *cell;
        if let Ok(Some(ev)) = net.circuit.handle_cell(net.now, &mut cell, &mut net.client_rng) {
            events.push(ev);
        }
    }
    events
}

/// Relay `i` handles one cell; what became of it and what the relay sent.
fn handle(net: &mut Net, i: usize, from: SocketAddr, cell: &mut Cell) -> (Routed, Vec<(SocketAddr, Cell)>) {
    let now = net.now;
    let mut out = Outbox::new();
    let solo: &mut SoloRelay<SimExit> = &mut net.relays[i];
    let routed = solo.handle(now, from, cell, &mut out);
    (routed, out.take())
}

#[test]
fn idle_circuits_expire_when_the_clock_jumps_past_the_timeout() {
    let mut net = Net::new(3, 1, |_| true);
    net.build();
    let start = net.now;
    // Just before the idle timeout nothing happens, however often the timers run.
    for step in [1, 60, 599] {
        net.now = start + Duration::from_secs(step);
        assert!(net.relays[1].handle_timeout(net.now).is_empty(), "expired early at {step} s");
        assert_eq!(net.relays[1].node.len(), 1);
    }
    // Past it: DESTROY (TIMEOUT) to both neighbours, and the circuit is gone.
    net.now = start + IDLE + Duration::from_secs(2);
    let sent = net.relays[1].handle_timeout(net.now);
    let mut to: Vec<SocketAddr> = sent.iter().map(|(to, _)| *to).collect();
    to.sort();
    assert_eq!(to, vec![addr(1), addr(3)]);
    assert!(net.relays[1].node.is_empty());
    // The guard's own DESTROY reaches the client with the reason.
    let sent = net.relays[0].handle_timeout(net.now);
    let events = to_client(&mut net, &sent);
    assert_eq!(events, vec![Event::Closed(CloseReason::LinkDestroyed { reason: reason::TIMEOUT })]);
}

#[test]
fn the_node_asks_for_its_timers_and_activity_postpones_expiry() {
    let mut net = Net::new(1, 2, |_| true);
    net.build();
    let deadline = net.relays[0].poll_timeout();
    assert!(deadline > net.now && deadline <= net.now + Duration::from_secs(1));
    // Traffic at 500 s keeps the circuit alive at 700 s (idle 600 s).
    net.now += Duration::from_secs(500);
    net.send(b"still here");
    net.now += Duration::from_secs(200);
    assert!(net.relays[0].handle_timeout(net.now).is_empty());
    assert_eq!(net.relays[0].node.len(), 1);
    net.now += Duration::from_secs(500);
    assert_eq!(net.relays[0].handle_timeout(net.now).len(), 1, "one DESTROY, to the client");
    assert!(net.relays[0].node.is_empty());
}

#[test]
fn ping_is_answered_with_pong_by_the_hop_it_names() {
    let mut net = Net::new(3, 3, |_| true);
    net.build();
    for hop in 1..=3usize {
        let id = 0x1122_3344_5566_7700u64 + hop as u64;
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..8].copy_from_slice(&id.to_be_bytes());
        let to = net.circuit.seal(hop, Command::Ping, 8, &mut cell).unwrap();
        net.events.clear();
        net.run(vec![(addr(CLIENT), to, cell)], &mut |_, _, _| true);
        let pongs: Vec<_> = net
            .events
            .iter()
            .filter(|(e, _)| matches!(e, Event::Delivered { cmd: Command::Pong, hop: h, .. } if *h == hop))
            .collect();
        assert_eq!(pongs.len(), 1, "hop {hop}: {:?}", net.events);
        assert_eq!(pongs[0].1, id.to_be_bytes());
    }
    assert!(net.relays.iter().all(|r| r.drops.is_empty()));
}

#[test]
fn a_malformed_ping_is_dropped_not_answered() {
    let mut net = Net::new(1, 4, |_| true);
    net.build();
    let mut cell = [0u8; CELL_LEN];
    let to = net.circuit.seal(1, Command::Ping, 3, &mut cell).unwrap();
    let (routed, sent) = handle(&mut net, 0, addr(CLIENT), &mut cell);
    assert_eq!(to, addr(1));
    assert_eq!(routed, Routed::Drop(DropReason::Malformed));
    assert!(sent.is_empty());
}

#[test]
fn destroy_tears_down_by_handle_and_goes_on_away_from_its_sender() {
    let mut net = Net::new(3, 5, |_| true);
    net.build();
    let handles: Vec<u32> =
        net.relays.iter().map(|r| r.node.circuits().iter().next().unwrap().prev().lcid_in).collect();
    let mut cell = [0u8; CELL_LEN];
    let to = net.circuit.close(&mut cell, &mut rng(9)).unwrap();
    // Hop by hop: each names the circuit it ended and sends DESTROY only onward.
    let (mut from, mut cell, mut at) = (addr(CLIENT), cell, to);
    for (i, &handle_of) in handles.iter().enumerate() {
        assert_eq!(at, addr(i + 1));
        let (routed, sent) = handle(&mut net, i, from, &mut cell);
        assert_eq!(routed, Routed::Local { circuit: Some(handle_of) }, "relay {i}");
        assert!(net.relays[i].node.is_empty(), "relay {i} kept the circuit");
        if i < 2 {
            assert_eq!(sent.len(), 1, "relay {i}: {sent:?}");
            assert_eq!(sent[0].0, addr(i + 2), "DESTROY went back, not on");
            (from, cell, at) = (addr(i + 1), sent[0].1, sent[0].0);
        } else {
            assert!(sent.is_empty(), "the exit has no one to tell");
        }
    }
    // The LCIDs are free: the control plane forgot nothing it should have (no pending EXTEND).
    assert!(net.relays.iter().all(|r| r.control.pending_len() == 0));
}

#[test]
fn shutdown_sends_destroy_both_ways_and_empties_the_node() {
    let mut net = Net::new(3, 6, |_| true);
    net.build();
    let mut out = Outbox::new();
    let now = net.now;
    net.relays[1].shutdown(now, &mut out);
    assert!(net.relays[1].node.is_empty());
    let mut to: Vec<SocketAddr> = out.cells().iter().map(|(to, _)| *to).collect();
    to.sort();
    assert_eq!(to, vec![addr(1), addr(3)]);
    // The exit accepts the DESTROY from its previous hop and ends the circuit too.
    let mut cell = out.cells().iter().find(|(to, _)| *to == addr(3)).unwrap().1;
    let (routed, _) = handle(&mut net, 2, addr(2), &mut cell);
    assert!(matches!(routed, Routed::Local { circuit: Some(_) }));
    assert!(net.relays[2].node.is_empty());
    // The guard shuts down: the client learns why.
    let mut out = Outbox::new();
    net.relays[0].shutdown(now, &mut out);
    let events = to_client(&mut net, out.cells());
    assert_eq!(events, vec![Event::Closed(CloseReason::LinkDestroyed { reason: reason::SHUTDOWN })]);
}

#[test]
fn extend_to_a_silent_relay_ends_in_destroy_with_the_reason() {
    let mut net = Net::new(2, 7, |_| true);
    // Relay 2 hears nothing.
    net.run(vec![], &mut |_, to, _| to != addr(2));
    assert!(!net.circuit.is_open());
    assert_eq!(net.relays[0].control.pending_len(), 1, "the EXTEND waits for its CREATED");
    // Nothing before the handshake state's lifetime…
    net.now += HANDSHAKE_STATE_TTL - Duration::from_secs(1);
    assert!(net.relays[0].handle_timeout(net.now).is_empty());
    // …then DESTROY (CONNECT_FAILED) from hop 1 to the client, and the EXTEND is forgotten.
    net.now += Duration::from_secs(2);
    let sent = net.relays[0].handle_timeout(net.now);
    let events = to_client(&mut net, &sent);
    assert_eq!(events, vec![Event::Closed(CloseReason::Destroyed { hop: 1, reason: reason::CONNECT_FAILED })]);
    assert_eq!(net.relays[0].control.pending_len(), 0);
}

#[test]
fn an_extend_is_carried_out_once() {
    let mut net = Net::new(2, 8, |_| true);
    net.build();
    // The client's EXTEND (the third cell it sent: CREATE, then EXTEND) and every CREATE relay 1
    // sent to relay 2.
    let creates = |net: &Net| net.log.iter().filter(|(f, t, _)| *f == addr(1) && *t == addr(2)).count();
    assert_eq!(creates(&net), 1);
    let extend = net.log.iter().filter(|(f, _, _)| *f == addr(CLIENT)).nth(1).unwrap().2;
    assert_eq!(lcid(&extend), net.relays[0].node.circuits().iter().next().unwrap().prev().lcid_in);
    // Replayed: refused before any EXTEND logic runs, and no second CREATE.
    let mut cell = extend;
    let (routed, sent) = handle(&mut net, 0, addr(CLIENT), &mut cell);
    assert_eq!(routed, Routed::Drop(DropReason::Replay));
    assert!(sent.is_empty());
    // A fresh EXTEND on the extended circuit: refused as a protocol violation.
    let mut cell = [0u8; CELL_LEN];
    let to = net.circuit.seal(1, Command::Extend, 0, &mut cell).unwrap();
    assert_eq!(to, addr(1));
    let (routed, sent) = handle(&mut net, 0, addr(CLIENT), &mut cell);
    assert_eq!(routed, Routed::Drop(DropReason::Protocol));
    assert!(sent.is_empty());
    assert_eq!(net.relays[0].control.pending_len(), 0);
}
