//! Attacks by a hostile hop, a colluding pair of hops, or a spoofing stranger, each as a test on
//! the in-memory network (SPEC.md §12, "Threat model", names the test that shows each claim).

use cellproto::cell::{CELL_LEN, Command, HEADER_LEN, LCID_LEN};
use cellproto::client::{CloseReason, Event};
use cellproto::command::Extend;
use cellproto::onion::{Direction, payload_mut};
use cellproto::relay::DropReason;
use cellproto::sim::*;
use std::net::SocketAddr;

/// The last cell the log shows going from `from` to `to`.
fn last_cell(net: &Net, from: SocketAddr, to: SocketAddr) -> Cell {
    net.log.iter().rev().find(|(f, t, _)| *f == from && *t == to).map(|(_, _, c)| *c).expect("no such cell in the log")
}

/// Flips bit `bit` (0 = least significant) of the protected counter in a cell's header.
fn flip_counter_bit(cell: &mut Cell, bit: usize) {
    let byte = HEADER_LEN - 1 - bit / 8;
    assert!(byte >= LCID_LEN);
    cell[byte] ^= 1 << (bit % 8);
}

/// A stranger who spoofs the exit's address and replays a backward cell with one counter bit
/// flipped must not move the middle's state: real backward cells keep flowing.
#[test]
fn spoofed_backward_counter_cannot_blind_the_middle() {
    let mut net = Net::new(3, 101, |_| true);
    net.build();
    net.send(b"first");
    let mut forged = last_cell(&net, addr(3), addr(2));
    flip_counter_bit(&mut forged, 15);
    let _ = net.relays[1].handle(net.now, addr(3), &mut forged);
    net.send(b"second");
    assert_eq!(net.data_events(), vec![b"tsrif".to_vec(), b"dnoces".to_vec()], "the real reply was dropped");
}

/// Hundreds of such forged cells must not kill the circuit either (today each one could jump the
/// window towards the usage limit).
#[test]
fn spoofed_backward_cells_cannot_kill_the_circuit() {
    let mut net = Net::new(3, 102, |_| true);
    net.build();
    net.send(b"first");
    let genuine = last_cell(&net, addr(3), addr(2));
    for k in 0..400 {
        let mut forged = genuine;
        flip_counter_bit(&mut forged, 19 + (k % 8));
        let _ = net.relays[1].handle(net.now, addr(3), &mut forged);
    }
    let idle = std::time::Duration::from_secs(3600);
    assert!(
        net.relays[1].node.circuits().iter().all(|c| !c.expired(net.now, idle)),
        "forged cells expired the circuit"
    );
    net.send(b"second");
    assert_eq!(net.data_events().last().map(Vec::as_slice), Some(&b"dnoces"[..]));
}

/// A hostile exit colluding with the guard must not be able to signal through the counters: the
/// counter values the guard sees do not depend on which counters the exit used. The exit encodes
/// bits by burning counters (sealing a cell and throwing it away); the guard must still see a
/// sequence with no gaps.
#[test]
fn exit_cannot_signal_the_guard_through_counters() {
    let mut net = Net::new(3, 103, |_| true);
    net.build();
    for relay in &mut net.relays {
        relay.terminal.echo = false;
    }
    let exit_circ = net.relays[2].node.circuits().iter().next().unwrap().prev().lcid_in;
    let secret: [bool; 24] = std::array::from_fn(|i| (0x5A_3C_96u32 >> i) & 1 == 1);
    let mut seen_by_guard = Vec::new();
    for bit in secret {
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..4].copy_from_slice(b"data");
        if bit {
            let circ = net.relays[2].node.circuits_mut().get_mut(exit_circ).unwrap();
            let _burned = circ.seal_backward(net.now, Command::Data, 4, &mut cell.clone()).unwrap();
        }
        let circ = net.relays[2].node.circuits_mut().get_mut(exit_circ).unwrap();
        let to = circ.seal_backward(net.now, Command::Data, 4, &mut cell).unwrap();
        assert_eq!(to, addr(2));
        let out = net.relays[1].handle(net.now, addr(3), &mut cell);
        let (to, mut cell) = out[0];
        assert_eq!(to, addr(1));
        let guard_circ = net.relays[0].node.circuits().iter().next().unwrap();
        seen_by_guard.push(guard_circ.peek_counter(Direction::Backward, &cell));
        let _ = net.relays[0].handle(net.now, addr(2), &mut cell);
    }
    let gaps: Vec<u32> = seen_by_guard.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|&g| g == gaps[0]), "the guard can read the exit's pattern from the counters: {gaps:?}");
}

/// A guard that drops backward cells from the hops beyond it (to mark a circuit for a colluder,
/// or to degrade it selectively) is noticed by the client, which stops using the circuit as
/// tampered instead of carrying on as if nothing happened.
#[test]
fn guard_dropping_relayed_cells_is_noticed() {
    let mut net = Net::new(3, 104, |_| true);
    net.build();
    let mut n = 0u64;
    let mut guard_drops_half = |from: SocketAddr, to: SocketAddr, _: &mut Cell| {
        if from == addr(1) && to == addr(CLIENT) {
            n += 1;
            return n % 2 == 0;
        }
        true
    };
    for i in 0..3000u32 {
        let (to, cell) = net.seal(&i.to_be_bytes());
        net.run(vec![(addr(CLIENT), to, cell)], &mut guard_drops_half);
    }
    assert!(net.circuit.is_open(), "loss on the client's own link was taken for tampering");
    // The drops above are on the guard's own link, which is ordinary loss. Now the guard drops
    // half of what the middle sends it, and forwards everything it originates.
    let mut net = Net::new(3, 105, |_| true);
    net.build();
    let mut n = 0u64;
    let mut guard_drops_relayed = |from: SocketAddr, to: SocketAddr, _: &mut Cell| {
        if from == addr(2) && to == addr(1) {
            n += 1;
            return n % 2 == 0;
        }
        true
    };
    for i in 0..3000u32 {
        if !net.circuit.is_open() {
            break;
        }
        let (to, cell) = net.seal(&i.to_be_bytes());
        net.run(vec![(addr(CLIENT), to, cell)], &mut guard_drops_relayed);
    }
    assert_eq!(
        net.circuit.close_reason(),
        Some(CloseReason::Tampered { hop: 2 }),
        "the client never noticed half of the middle's cells vanishing"
    );
}

/// A guard that modifies the cells it relays (the inner bytes it cannot authenticate, before
/// sealing its own layer correctly) makes the client close the circuit as tampered after a
/// handful, rather than silently dropping them for ever.
#[test]
fn tampering_guard_is_noticed() {
    let mut net = Net::new(3, 106, |_| true);
    net.build();
    net.relays[0].hostile = Some(Box::new(|cell: &mut Cell| cell[HEADER_LEN + 40] ^= 1));
    for i in 0..200u32 {
        if !net.circuit.is_open() {
            break;
        }
        let (to, cell) = net.seal(&i.to_be_bytes());
        net.run(vec![(addr(CLIENT), to, cell)], &mut |_, _, _| true);
    }
    assert_eq!(net.circuit.close_reason(), Some(CloseReason::Tampered { hop: 2 }));
    assert!(net.data_events().is_empty(), "a tampered reply was delivered");
}

/// The same modification made on the link between middle and guard by someone on that path is
/// caught by the guard's link check: the guard drops it and the client sees no tampering.
#[test]
fn modification_on_a_relay_link_is_caught_by_the_next_hop() {
    let mut net = Net::new(3, 110, |_| true);
    net.build();
    let mut flip = |from: SocketAddr, to: SocketAddr, cell: &mut Cell| {
        if from == addr(2) && to == addr(1) {
            cell[HEADER_LEN + 40] ^= 1;
        }
        true
    };
    for i in 0..20u32 {
        let (to, cell) = net.seal(&i.to_be_bytes());
        net.run(vec![(addr(CLIENT), to, cell)], &mut flip);
    }
    assert!(net.circuit.is_open());
    assert_eq!(net.relays[0].drops.iter().filter(|r| **r == DropReason::BadTag).count(), 20);
    assert!(net.circuit.evidence().violations.iter().all(|&v| v == 0));
}

/// A link-control DESTROY is acted on only when it comes from the neighbour of that link: a
/// valid one captured in flight and delivered from another address changes nothing.
#[test]
fn link_control_from_another_address_is_ignored() {
    let mut net = Net::new(3, 107, |_| true);
    net.build();
    let guard_lcid = net.relays[0].node.circuits().iter().next().unwrap().prev().lcid_in;
    let guard_circ = net.relays[0].node.circuits_mut().get_mut(guard_lcid).unwrap();
    let mut cell = [0u8; CELL_LEN];
    let to = guard_circ.seal_destroy(Direction::Forward, 0, &mut cell, &mut rng(9)).unwrap();
    assert_eq!(to, addr(2));
    let out = net.relays[1].handle(net.now, addr(77), &mut cell);
    assert!(out.is_empty());
    assert_eq!(net.relays[1].node.circuits().len(), 1, "a DESTROY from a stranger's address removed the circuit");
    net.send(b"still up");
    assert_eq!(net.data_events().last().map(Vec::as_slice), Some(&b"pu llits"[..]));
}

fn extend_body(target: SocketAddr) -> (Cell, usize) {
    let mut cell = [0u8; CELL_LEN];
    let extend = Extend { target, link_secret: [7; 32], handshake: [9; cellproto::handshake::CREATE_LEN] };
    let len = extend.encode(payload_mut(&mut cell)).unwrap();
    (cell, len)
}

/// EXTEND is accepted once per circuit: a second one on a circuit that is already extended
/// sends nothing.
#[test]
fn second_extend_on_a_circuit_is_refused() {
    let mut net = Net::new(3, 108, |_| true);
    net.build();
    let (mut cell, len) = extend_body(addr(3));
    let to = net.circuit.seal(2, Command::Extend, len, &mut cell).unwrap();
    let out = net.relays[0].handle(net.now, addr(CLIENT), &mut cell);
    let (to2, mut cell) = out[0];
    assert_eq!((to, to2), (addr(1), addr(2)));
    let sent = net.relays[1].handle(net.now, addr(1), &mut cell);
    assert!(sent.iter().all(|(to, _)| *to != addr(3)), "the middle sent a second CREATE for an extended circuit");
}

/// An EXTEND flood on one circuit that is not yet extended keeps at most one pending EXTEND.
#[test]
fn extend_flood_keeps_one_pending_entry() {
    let mut net = Net::new(1, 109, |_| true);
    net.build();
    for i in 0..10_000u16 {
        let (mut cell, len) = extend_body(SocketAddr::from(([198, 51, 100, 1], 1000 + i)));
        let to = net.circuit.seal(1, Command::Extend, len, &mut cell).unwrap();
        let _ = net.relays[0].handle(net.now, addr(CLIENT), &mut cell);
        assert_eq!(to, addr(1));
    }
    let debug = format!("{:?}", net.relays[0].control);
    let pending: usize =
        debug.split("pending: ").nth(1).and_then(|s| s.split([' ', ',', '}']).next()).unwrap().parse().unwrap();
    assert!(pending <= 1, "pending EXTEND state grew: {debug}");
}

/// Someone who recorded the CREATE that hop 1 sent hop 2 and later steals hop 2's onion key can
/// read the client's extensions (ntor's first phase is not forward-secret), but must not get the
/// keys of the link between hop 1 and hop 2 from them: that link's header protection still hides
/// its counters from the thief.
#[test]
fn onion_key_thief_cannot_unmask_a_relay_link() {
    let onion_bytes = [0x42; 32];
    let mut relays: Vec<TestRelay> = (1..=3).map(|i| TestRelay::new(i, true, 300 + i as u64)).collect();
    let identity = relays[1].keys.identity;
    relays[1] =
        TestRelay::with_keys(2, identity, cellproto::handshake::OnionSecret::from_bytes(&onion_bytes), true, 302);
    let path = relays.iter().map(TestRelay::path_hop).collect();
    let mut net = Net::with_path(relays, path, 111);
    net.build();
    net.send(b"recorded");
    let create = net
        .log
        .iter()
        .find(|(f, t, c)| *f == addr(1) && *t == addr(2) && cellproto::cell::lcid(c) == cellproto::cell::HANDSHAKE_LCID)
        .map(|(_, _, c)| *c)
        .expect("hop 1's CREATE");
    let forward = last_cell(&net, addr(1), addr(2));
    // The thief answers the recorded CREATE with the stolen key, as hop 2 did, and so learns
    // everything the client put in it.
    let stolen = cellproto::handshake::OnionSecret::from_bytes(&onion_bytes);
    let message: [u8; cellproto::handshake::CREATE_LEN] = create[HEADER_LEN..HEADER_LEN + 144].try_into().unwrap();
    let (_, out) = cellproto::handshake::respond(&identity, &[&stolen], true, &message, &mut rng(5)).unwrap();
    let thief_keys = cellproto::onion::LinkKeys::derive(&out.link_secret, cellproto::crypto::Suite::Aes256Gcm);
    let thief_sees = cellproto::onion::unprotect_counter(&forward, thief_keys.header(Direction::Forward));
    let hop2 = net.relays[1].node.circuits().iter().next().unwrap();
    let true_counter = hop2.peek_counter(Direction::Forward, &forward);
    assert_ne!(thief_sees, true_counter, "the client's seed alone gave the thief the link's keys");
}

/// A relay under load answers CREATE with a cookie; the client resends with it and the circuit
/// builds. A spoofed CREATE (whose sender never sees the cookie) costs the relay no handshake.
#[test]
fn cookies_under_load() {
    let mut net = Net::new(2, 112, |_| true);
    for relay in &mut net.relays {
        relay.cookies = Some(cellproto::relay::cookie::CookieJar::new(net.now, &mut rng(7)));
    }
    net.build();
    net.send(b"through cookies");
    assert_eq!(net.data_events(), vec![b"seikooc hguorht".to_vec()]);
    let mut spoofed = [0u8; CELL_LEN];
    let req = cellproto::handshake::ClientRequest { hop: 1, offer_aes: true, link_secret: None };
    let hs = cellproto::handshake::ClientHandshake::start(&net.relays[0].keys, &req, &mut rng(8)).unwrap();
    cellproto::link::encode_create(&mut spoofed, 0x4444_4444, hs.message(), None, None, &mut rng(9));
    let answered = net.relays[0].control.answered_len();
    let out = net.relays[0].handle(net.now, SocketAddr::from(([203, 0, 113, 9], 4000)), &mut spoofed);
    assert_eq!(out.len(), 1, "a cookie goes back to the claimed source");
    assert_eq!(net.relays[0].control.answered_len(), answered, "a spoofed CREATE cost a handshake");
    assert_eq!(net.relays[0].node.circuits().len(), 1);
}

/// After a rotation the previous onion key answers handshakes only until the last certificate
/// that named it has expired: a thief of that old key cannot keep impersonating the relay to
/// clients with a stale descriptor for ever.
#[test]
fn previous_onion_key_expires_with_its_certificate() {
    use cellproto::handshake::{ClientHandshake, ClientRequest, OnionSecret, RelayKeys};
    use cellproto::relay::control::ControlPlane;
    let identity = [0x61; 32];
    let (current, previous) = ([0x62; 32], [0x63; 32]);
    let mut plane = ControlPlane::new(identity, Vec::new(), true);
    let now = std::time::Instant::now();
    let until = now + std::time::Duration::from_secs(3600);
    plane.set_onion_keys(vec![OnionSecret::from_bytes(&current), OnionSecret::from_bytes(&previous)], Some(until));
    let old = RelayKeys { identity, onion_key: *OnionSecret::from_bytes(&previous).public() };
    let create = |seed: u64| {
        let req = ClientRequest { hop: 1, offer_aes: true, link_secret: None };
        let hs = ClientHandshake::start(&old, &req, &mut rng(seed)).unwrap();
        let mut cell = [0u8; CELL_LEN];
        cellproto::link::encode_create(&mut cell, 0x4100_0000 + seed as u32, hs.message(), None, None, &mut rng(seed));
        cell
    };
    let mut n = 0u32;
    let mut alloc = || {
        n += 1;
        0x4200_0000 + n
    };
    let from = SocketAddr::from(([198, 51, 100, 2], 5000));
    assert!(plane.handle_create(now, from, &create(1), &mut alloc, &mut rng(1)).is_ok(), "before expiry");
    let late = plane.handle_create(until, from, &create(2), &mut alloc, &mut rng(2));
    assert!(late.is_err(), "the previous key still answered after its certificate expired");
    assert_eq!(plane.onion_key_count(), 1);
}

/// A guard that alters the EXTENDED it relays keeps the circuit from being built; the client
/// says the path was tampered with instead of blaming the hop it was extending to.
#[test]
fn tampering_during_a_build_is_not_blamed_on_the_next_hop() {
    let mut net = Net::new(3, 113, |_| true);
    net.relays[0].hostile = Some(Box::new(|cell: &mut Cell| cell[HEADER_LEN + 7] ^= 0x80));
    net.run(vec![], &mut |_, _, _| true);
    for _ in 0..10 {
        net.now += std::time::Duration::from_secs(16);
        if let Some(ev) = net.circuit.handle_timeout(net.now) {
            assert_eq!(ev, Event::Closed(CloseReason::Tampered { hop: 2 }));
            return;
        }
        net.run(vec![], &mut |_, _, _| true);
    }
    panic!("the circuit neither opened nor closed");
}
