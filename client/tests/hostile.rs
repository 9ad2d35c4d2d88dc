//! Relays that attack the client, in cellproto's in-memory network: each test is named after
//! the attack and checks that the client does not move. A hop can originate any backward
//! command under its own onion layer, send DESTROY with any reason, or drop what it should
//! pass on; someone on the client's network can drop its UDP.

mod common;

use cellproto::cell::Command;
use cellproto::command::{Attached, reason};
use cellproto::descriptor::{FLAG_EXIT, FLAG_GUARD};
use common::{Lab, MIDDLE};
use meshvpn::tunnel::State;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// What an attacker would like the client to configure: its own addresses and, above all, its
/// own DNS resolver.
fn forged() -> Attached {
    Attached {
        token: [0x66; 32],
        ipv4: (Ipv4Addr::new(10, 66, 0, 2), 16),
        ipv6: (Ipv6Addr::new(0xfd66, 0, 0, 0, 0, 0, 0, 2), 64),
        dns: (Ipv4Addr::new(10, 66, 0, 1), Ipv6Addr::new(0xfd66, 0, 0, 0, 0, 0, 0, 1)),
    }
}

fn encode(a: &Attached) -> Vec<u8> {
    let mut body = [0u8; 256];
    let n = a.encode(&mut body).unwrap();
    body[..n].to_vec()
}

/// A lab whose tunnel is up; the session the exit gave.
fn up(roles: &[u32]) -> (Lab, Attached) {
    let mut lab = Lab::new(roles);
    lab.advance(Duration::from_millis(50));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    let session = *lab.tunnel.session().expect("a session");
    (lab, session)
}

/// The tunnel still carries packets with the exit's session.
fn still_serving(lab: &mut Lab, session: Attached) {
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    assert_eq!(lab.tunnel.session().copied(), Some(session), "the session changed");
    assert!(lab.send(b"still mine"));
    assert_eq!(lab.to_tun.last().map(Vec::as_slice), Some(&b"enim llits"[..]));
}

fn forged_attached_from_hop(hop: usize) {
    let (mut lab, session) = up(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    let mark = lab.events.len();
    lab.originate(hop, Command::Attached, &encode(&forged()));
    lab.advance(Duration::from_millis(100));
    assert!(lab.ups_since(mark).is_empty(), "hop {hop} reconfigured the client: {:?}", &lab.events[mark..]);
    assert_eq!(lab.tunnel.counters().control_refused, 1, "the forged ATTACHED was not counted as refused");
    still_serving(&mut lab, session);
}

#[test]
fn guard_originating_attached_changes_nothing() {
    forged_attached_from_hop(1);
}

#[test]
fn middle_originating_attached_changes_nothing() {
    forged_attached_from_hop(2);
}

#[test]
fn exit_attached_nobody_asked_for_changes_nothing() {
    forged_attached_from_hop(3);
}

#[test]
fn pong_from_a_middle_is_refused() {
    let (mut lab, session) = up(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    let rtt = lab.tunnel.rtt();
    lab.originate(2, Command::Pong, &7u64.to_be_bytes());
    assert_eq!(lab.tunnel.counters().control_refused, 1);
    assert_eq!(lab.tunnel.rtt(), rtt);
    still_serving(&mut lab, session);
}

#[test]
fn exit_answering_attach_with_unusable_addresses_is_refused() {
    let good = forged();
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let cases = [
        ("IPv6 multicast", Attached { ipv6: (v6("ff02::1"), 64), ..good }),
        ("IPv4 multicast", Attached { ipv4: (v4("224.0.0.1"), 4), ..good }),
        ("IPv4 loopback", Attached { ipv4: (v4("127.0.0.2"), 8), dns: (v4("127.0.0.1"), good.dns.1), ..good }),
        ("IPv6 loopback", Attached { ipv6: (Ipv6Addr::LOCALHOST, 128), ..good }),
        ("IPv4 unspecified", Attached { ipv4: (Ipv4Addr::UNSPECIFIED, 16), ..good }),
        ("IPv6 link-local", Attached { ipv6: (v6("fe80::2"), 64), dns: (good.dns.0, v6("fe80::1")), ..good }),
        ("IPv4 link-local", Attached { ipv4: (v4("169.254.0.2"), 16), dns: (v4("169.254.0.1"), good.dns.1), ..good }),
        ("IPv4 broadcast of its prefix", Attached { ipv4: (v4("10.66.255.255"), 16), ..good }),
        ("IPv4 DNS outside the pool", Attached { dns: (v4("203.0.113.53"), good.dns.1), ..good }),
        ("IPv6 DNS outside the pool", Attached { dns: (good.dns.0, v6("2001:db8::53")), ..good }),
        ("DNS is the client's own address", Attached { dns: (good.ipv4.0, good.dns.1), ..good }),
        ("IPv4 prefix /0", Attached { ipv4: (good.ipv4.0, 0), dns: (v4("198.51.100.1"), good.dns.1), ..good }),
        ("IPv6 prefix /0", Attached { ipv6: (good.ipv6.0, 0), dns: (good.dns.0, v6("2001:db8::1")), ..good }),
    ];
    for (what, answer) in cases {
        let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
        lab.attach_answer = Some(answer);
        lab.advance(Duration::from_millis(200));
        assert!(lab.ups_since(0).is_empty(), "{what}: the client took {answer:?}");
        assert_ne!(lab.tunnel.state(), State::Up, "{what}");
        assert!(!lab.send(b"nothing may leave"), "{what}: a packet was sealed");
        assert!(lab.tunnel.counters().control_refused >= 1, "{what}");
        assert!(lab.tunnel.reason().is_some_and(|r| r.contains("exit")), "{what}: {:?}", lab.tunnel.reason());
    }
    // The same exit with a usable answer: the client comes up (the checks refuse only what
    // they should).
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.attach_answer = Some(good);
    lab.advance(Duration::from_millis(200));
    assert_eq!(lab.ups_since(0), vec![good]);
}

#[test]
fn resumed_session_with_other_addresses_is_refused() {
    let (mut lab, session) = up(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    // The exit keeps the token but hands out other addresses when the session is resumed.
    let exit = lab.index_of(lab.path_ids()[2]);
    *lab.relays[exit].terminal.sessions.get_mut(&session.token).unwrap() = 77;
    let middle = lab.index_of(lab.path_ids()[1]);
    lab.dead.insert(middle);
    let mark = lab.events.len();
    lab.advance(Duration::from_secs(5));
    let ups = lab.ups_since(mark);
    assert!(ups.iter().all(|a| (a.ipv4, a.ipv6) == (session.ipv4, session.ipv6)), "took changed addresses: {ups:?}");
}

#[test]
fn middle_blaming_the_exit_does_not_change_the_exit() {
    let (mut lab, session) = up(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT, FLAG_EXIT]);
    let before = lab.path_ids();
    // The middle closes the circuit saying the exit cannot be reached.
    lab.originate(2, Command::Destroy, &[reason::CONNECT_FAILED]);
    lab.advance(Duration::from_secs(3));
    let after = lab.path_ids();
    assert_eq!(after[2], before[2], "the exit changed on the middle's word");
    assert_eq!(lab.tunnel.counters().exit_changes, 0);
    assert_ne!(after[1], before[1], "the middle that closed the circuit is used again at once");
    still_serving(&mut lab, session);
}

#[test]
fn middle_hiding_the_exit_does_not_change_the_exit() {
    let (mut lab, session) = up(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT, FLAG_EXIT]);
    let ids = lab.path_ids();
    let (hostile, exit) = (lab.index_of(ids[1]), ids[2]);
    let other = if hostile == 1 { 2 } else { 1 };
    // Both middles are unreachable for 3 s (the circuit goes silent and is rebuilt); then the
    // one that was on the path drops every CREATE it should send to the exit, so the exit
    // looks dead through it, while the other middle stays down for 10 s more.
    lab.dead.extend([hostile, other]);
    lab.advance(Duration::from_secs(3));
    lab.dead.remove(&hostile);
    lab.drop_creates.insert(hostile);
    lab.advance(Duration::from_secs(10));
    lab.dead.clear();
    lab.advance(Duration::from_secs(40));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    assert_eq!(lab.path_ids()[2], exit, "the exit changed because one middle hid it");
    assert_eq!(lab.tunnel.counters().exit_changes, 0);
    still_serving(&mut lab, session);
}

#[test]
fn middle_link_destroy_does_not_rotate_the_guard() {
    let (mut lab, session) = up(&[FLAG_GUARD, FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    let guard = lab.tunnel.guard();
    // The middle tears the circuit down at the link level; the guard passes DESTROY on.
    lab.link_destroy(2, reason::PROTOCOL);
    lab.advance(Duration::from_secs(3));
    assert_eq!(lab.tunnel.guard(), guard, "a middle's DESTROY rotated the guard");
    assert!(lab.guards_used().iter().all(|g| Some(*g) == guard), "{:?}", lab.guards_used());
    still_serving(&mut lab, session);
}

#[test]
fn blocking_udp_for_seconds_does_not_rotate_the_guard() {
    let (mut lab, _) = up(&[FLAG_GUARD, FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    let guard = lab.tunnel.guard();
    // Someone on the client's network drops all its UDP for 5 s: the circuit goes silent, and
    // the rebuild's handshake with the guard times out.
    lab.dead = (0..lab.relays.len()).collect();
    lab.advance(Duration::from_secs(5));
    lab.dead.clear();
    lab.advance(Duration::from_secs(20));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    assert!(lab.guards_used().iter().all(|g| Some(*g) == guard), "the guard rotated: {:?}", lab.guards_used());
}

#[test]
fn blocking_udp_at_start_does_not_rotate_the_guard() {
    let mut lab = Lab::new(&[FLAG_GUARD, FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.dead = (0..lab.relays.len()).collect();
    lab.advance(Duration::from_secs(3));
    lab.dead.clear();
    lab.advance(Duration::from_secs(20));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    let used = lab.guards_used();
    assert!(used.iter().all(|g| *g == used[0]), "the guard rotated: {used:?}");
}

#[test]
fn blocking_one_guard_for_minutes_moves_the_client_only_to_a_kept_guard() {
    let (mut lab, session) = up(&[FLAG_GUARD, FLAG_GUARD, FLAG_GUARD, FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    let kept: Vec<_> = lab.tunnel.guards().entries().iter().map(|g| g.id).collect();
    assert_eq!(kept.len(), 3, "three primary guards out of four");
    let first = lab.path_ids()[0];
    assert_eq!(first, kept[0]);
    // Someone drops everything to and from the guard, and only the guard, for five minutes.
    let g = lab.index_of(first);
    lab.dead.insert(g);
    lab.advance_by_timers(Duration::from_secs(300));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    let now_on = lab.path_ids()[0];
    assert_ne!(now_on, first);
    assert!(kept.contains(&now_on), "a guard outside the kept set: {now_on}");
    assert_eq!(lab.tunnel.session().copied(), Some(session), "same exit, same session");
    // The block ends; the next circuit (at the latest when this one ages out) goes back to the
    // first guard, and the set never changed.
    lab.dead.clear();
    lab.advance_by_timers(Duration::from_secs(3600));
    assert_eq!(lab.path_ids()[0], first);
    let after: Vec<_> = lab.tunnel.guards().entries().iter().map(|g| g.id).collect();
    assert_eq!(after, kept);
    assert!(lab.saves >= 1, "the guard set was never saved");
}

/// A guard that alters what it relays (after its own checks, under a valid outer layer) makes
/// every circuit through it close as tampered. The client blames no middle for it and keeps
/// the guard at first, but three such circuits within the hour count as a failure of the guard
/// in the guard set (path-bias accounting).
#[test]
fn tampering_guard_is_counted_against_the_guard_not_a_middle() {
    let (mut lab, _session) = up(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    let guard = lab.path_ids()[0];
    let g = lab.index_of(guard);
    assert_eq!(lab.tunnel.guards().failures(&guard), 0);
    lab.relays[g].hostile =
        Some(Box::new(|cell: &mut [u8; cellproto::cell::CELL_LEN]| cell[cellproto::cell::HEADER_LEN + 40] ^= 1));
    let mut guards_seen = std::collections::HashSet::new();
    for _ in 0..200 {
        lab.send(b"to be tampered with");
        lab.advance(Duration::from_millis(100));
        if let Some(first) = lab.path_ids().first() {
            guards_seen.insert(*first);
        }
        if lab.tunnel.counters().tampered >= 3 {
            break;
        }
    }
    assert!(lab.tunnel.counters().tampered >= 3, "circuits through the guard never closed as tampered");
    assert_eq!(guards_seen.len(), 1, "one tampered circuit moved the client off its guard");
    assert!(lab.tunnel.guards().failures(&guard) >= 1, "repeated tampering did not count against the guard");
    assert!(
        lab.tunnel.reason().is_some_and(|r| r.contains("tampering")),
        "status does not say why: {:?}",
        lab.tunnel.reason()
    );
}
