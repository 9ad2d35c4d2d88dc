//! The sans-IO tunnel against cellproto's in-memory relays (no sockets, no root): it comes
//! up, carries packets, rebuilds around a dead middle to the same exit with the same inner
//! addresses, switches exits only when the exit is dead, and says why when it cannot.

mod common;

use cellproto::descriptor::{FLAG_EXIT, FLAG_GUARD};
use common::{Lab, MIDDLE, START_UNIX, relay_addr};
use meshvpn::tunnel::{State, TunnelEvent};
use std::time::Duration;

#[test]
fn comes_up_after_guard_set_up_and_carries_packets() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    assert!(matches!(lab.events.first(), Some(TunnelEvent::Guard(g)) if *g == relay_addr(1)), "{:?}", lab.events);
    assert!(matches!(lab.events.get(1), Some(TunnelEvent::Up(_))), "{:?}", lab.events);
    assert_eq!(lab.tunnel.state(), State::Up);
    assert_eq!(lab.tunnel.path().len(), 3);
    assert!(lab.send(b"hello exit"));
    assert_eq!(lab.to_tun, vec![b"tixe olleh".to_vec()]);
    let c = lab.tunnel.counters();
    assert_eq!((c.packets_sent, c.packets_received), (1, 1));
}

#[test]
fn dead_middle_is_replaced_and_the_session_resumed_at_the_same_exit() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let Some(TunnelEvent::Up(first)) = lab.events.get(1).cloned() else { panic!("{:?}", lab.events) };
    let before = lab.path_ids();
    let middle = lab.index_of(before[1]);
    lab.dead.insert(middle);
    // Keepalive keeps the quiet circuit checked; silence for dead_after (2 s) rebuilds it.
    lab.advance(Duration::from_secs(5));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    let after = lab.path_ids();
    assert_eq!((after[0], after[2]), (before[0], before[2]), "same guard and exit");
    assert_ne!(after[1], before[1], "through the other middle");
    let Some(TunnelEvent::Up(again)) = lab.events.last().cloned() else { panic!("{:?}", lab.events) };
    assert_eq!((again.ipv4, again.ipv6, again.token), (first.ipv4, first.ipv6, first.token));
    assert!(lab.events.contains(&TunnelEvent::Down));
    assert_eq!(lab.tunnel.counters().rebuilds, 1);
    assert_eq!(lab.tunnel.counters().exit_changes, 0);
    assert!(lab.send(b"still here"));
    assert_eq!(lab.to_tun.last().unwrap(), b"ereh llits");
}

#[test]
fn dead_exit_makes_the_client_switch_exits() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let exit = lab.path_ids()[2];
    lab.dead.insert(lab.index_of(exit));
    lab.advance(Duration::from_secs(15));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    assert_ne!(lab.path_ids()[2], exit);
    assert_eq!(lab.tunnel.counters().exit_changes, 1);
}

#[test]
fn dead_only_exit_is_named_in_the_reason_and_packets_are_held() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    lab.dead.insert(3);
    lab.advance(Duration::from_secs(12));
    assert_eq!(lab.tunnel.state(), State::Rebuilding);
    let reason = lab.tunnel.reason().unwrap_or_default().to_owned();
    assert!(reason.contains("exit r4") && reason.contains("does not answer"), "{reason}");
    assert!(!lab.send(b"dropped"));
    assert!(lab.tunnel.counters().dropped_no_circuit >= 1);
    // It comes back: the client finds it again by itself.
    lab.dead.clear();
    lab.advance(Duration::from_secs(12));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
}

#[test]
fn old_circuits_are_replaced_in_time_and_timers_never_spin() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let Some(TunnelEvent::Up(first)) = lab.events.get(1).cloned() else { panic!("{:?}", lab.events) };
    // A circuit may live an hour; the client replaces it 5 minutes before, same session.
    let runs = lab.advance_by_timers(Duration::from_secs(3400));
    assert!(runs < 20_000, "{runs} timer runs for 3400 s of keepalive");
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    assert_eq!(lab.tunnel.counters().rebuilds, 1);
    let Some(TunnelEvent::Up(again)) = lab.events.last().cloned() else { panic!("{:?}", lab.events) };
    assert_eq!((again.ipv4, again.token), (first.ipv4, first.token));
    // With the only exit dead, the client retries without spinning.
    lab.dead.insert(3);
    let runs = lab.advance_by_timers(Duration::from_secs(60));
    assert!(runs < 1_000, "{runs} timer runs in 60 s while the exit is dead");
    assert_eq!(lab.tunnel.state(), State::Rebuilding);
}

#[test]
fn expired_directory_keeps_the_circuit_but_builds_no_new_one() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let expires = lab.tunnel.relays().expires;
    assert!(!lab.tunnel.directory_expired(lab.now));
    // The directory expires while the tunnel is up: traffic goes on.
    lab.tunnel.set_unix_time(lab.now, expires);
    assert!(lab.tunnel.directory_expired(lab.now));
    lab.advance(Duration::from_secs(1));
    assert_eq!(lab.tunnel.state(), State::Up);
    assert!(lab.send(b"still up"));
    // A relay dies: no circuit is built through the expired directory.
    let middle = lab.index_of(lab.path_ids()[1]);
    lab.dead.insert(middle);
    lab.advance(Duration::from_secs(5));
    assert_eq!(lab.tunnel.state(), State::Rebuilding);
    let reason = lab.tunnel.reason().unwrap_or_default().to_owned();
    assert!(reason.contains("directory expired"), "{reason}");
    assert!(!lab.send(b"held"));
    // A fresh directory (SIGHUP) lets it rebuild.
    let mut fresh = lab.tunnel.relays().clone();
    fresh.published = expires;
    fresh.expires = expires + 86_400;
    lab.tunnel.set_relays(fresh);
    lab.advance(Duration::from_secs(3));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
}

#[test]
fn restarted_exit_gives_a_new_session_explicitly() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let first = *lab.tunnel.session().unwrap();
    // The exit forgets its sessions (a restart); the middle dies, so the client resumes.
    let exit = lab.index_of(lab.path_ids()[2]);
    lab.relays[exit].terminal.sessions.clear();
    let middle = lab.index_of(lab.path_ids()[1]);
    lab.dead.insert(middle);
    lab.advance(Duration::from_secs(5));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    let now = *lab.tunnel.session().unwrap();
    assert_ne!(now.token, first.token);
    assert_eq!(lab.tunnel.counters().session_changes, 1);
    assert_eq!(lab.tunnel.counters().exit_changes, 0);
    let Some(TunnelEvent::Up(last)) = lab.events.last().cloned() else { panic!("{:?}", lab.events) };
    assert_eq!(last, now);
}

#[test]
fn the_guard_set_is_drawn_once_and_saved() {
    let mut lab = Lab::new(&[FLAG_GUARD, FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let guards = lab.tunnel.guards().entries();
    assert_eq!(guards.len(), 2, "every guard-flagged relay, up to three");
    assert!(guards.iter().all(|g| g.added == START_UNIX && g.failures == 0));
    assert_eq!(lab.path_ids()[0], guards[0].id);
    assert!(lab.saves >= 1);
}
