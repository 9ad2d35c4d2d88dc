//! EXTEND at a real relay over loopback: one per circuit, bounded pending state and CREATE
//! resends whatever a client sends, every table entry freed when the circuit closes, and
//! CREATEs only to the relays of the configured directory.

mod common;

use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::{CloseReason, Event};
use cellproto::command::{Extend, reason};
use cellproto::directory::Directory;
use cellproto::handshake::CREATE_LEN;
use cellproto::identity::RelayIdentity;
use common::*;
use rand_core::OsRng;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const METRICS: &str = "[extend]\nallow_private = true\n[metrics]\nlisten = \"127.0.0.1:1\"\n";

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gauge(r: &TestRelay, name: &str) -> f64 {
    sum(&metrics(r.handle.metrics_addr.unwrap()), name, "")
}

fn extend_body(target: std::net::SocketAddr, tag: u8) -> Vec<u8> {
    let mut body = vec![0u8; 256];
    let extend = Extend { target, link_secret: [tag; 32], handshake: [tag; CREATE_LEN] };
    let n = extend.encode(&mut body).unwrap();
    body.truncate(n);
    body
}

/// A client floods one circuit with EXTENDs (the same one again and again, and others naming
/// other hosts). The relay keeps one pending EXTEND, sends its CREATE at most six times in all,
/// and frees the pending entry and both LCIDs when the circuit closes.
#[test]
fn extend_flood_on_one_circuit_keeps_state_bounded_and_frees_it() {
    let r = start_relay("xflood", 1, "auto", METRICS);
    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    target.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut client = UdpClient::new("127.0.0.1:0", vec![r.hop]);
    client.build(Duration::from_secs(5));
    let same = extend_body(target.local_addr().unwrap(), 1);
    for i in 0..2000u16 {
        let body = if i % 2 == 0 { same.clone() } else { extend_body(([127, 0, 0, 1], 20_000 + i).into(), 2) };
        client.send(1, Command::Extend, &body);
    }
    wait_until("one pending EXTEND", Duration::from_secs(5), || gauge(&r, "relayd_pending_extends") == 1.0);
    // Count the CREATEs that reached the target until it has been quiet for a second.
    let mut creates = 0;
    let mut buf = [0u8; 2048];
    let mut quiet_since = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(20);
    while quiet_since.elapsed() < Duration::from_secs(1) && Instant::now() < give_up {
        if let Ok((n, _)) = target.recv_from(&mut buf) {
            assert_eq!(n, CELL_LEN);
            creates += 1;
            quiet_since = Instant::now();
        }
    }
    assert!((1..=6).contains(&creates), "{creates} CREATEs for one EXTEND");
    assert_eq!(gauge(&r, "relayd_lcids_in_use"), 2.0, "the circuit's id and the EXTEND's reply id");
    let mut cell = [0u8; CELL_LEN];
    let to = client.circuit.close(&mut cell, &mut OsRng).unwrap();
    client.socket.send_to(&cell, to).unwrap();
    wait_until("every table empty", Duration::from_secs(5), || {
        gauge(&r, "relayd_pending_extends") == 0.0
            && gauge(&r, "relayd_lcids_in_use") == 0.0
            && gauge(&r, "relayd_circuits") == 0.0
    });
    r.handle.shutdown();
}

/// With `extend.directory` set, EXTEND reaches only the relays the directory lists: a host a
/// client names is refused with DESTROY (policy), a listed relay is extended to.
#[test]
fn extend_goes_only_to_the_directorys_relays() {
    let b = start_relay("xdirb", 1, "auto", "");
    // B's descriptor, signed with B's key, in a directory signed by a test authority.
    let b_key_dir = std::env::temp_dir().join(format!("relayd-test-xdirb-{}", std::process::id()));
    let b_keys = relayd::keys::load(&b_key_dir).unwrap();
    let now = daemonkit::unix_now();
    let b_config = relayd::config::Config::parse(
        &format!("listen = \"{}\"\nkey_dir = \"k\"\nnickname = \"xdirb\"\n", b.handle.local_addr),
        std::path::Path::new("b.toml"),
    )
    .unwrap();
    let desc = relayd::descriptor::signed(&b_config, &b_keys, now - 60, None).unwrap();
    let authority = RelayIdentity::from_seed(&[0x5A; 32]);
    let directory = Directory::sign(&[desc], now - 60, now + 3600, &authority).unwrap();
    let dir = std::env::temp_dir().join(format!("relayd-test-xdir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("directory");
    std::fs::write(&path, directory).unwrap();
    let a = start_relay(
        "xdira",
        1,
        "auto",
        &format!(
            "[extend]\nallow_private = true\ndirectory = \"{}\"\nauthority = \"{}\"\n",
            path.display(),
            authority.public()
        ),
    );

    // A host the client names: refused, and the client is told why.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut client = UdpClient::new("127.0.0.1:0", vec![a.hop]);
    client.build(Duration::from_secs(5));
    client.send(1, Command::Extend, &extend_body(stranger.local_addr().unwrap(), 3));
    let ev = client.recv_event(Duration::from_secs(5)).map(|e| e.0);
    assert_eq!(ev, Some(Event::Closed(CloseReason::Destroyed { hop: 1, reason: reason::POLICY })));
    stranger.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    assert!(stranger.recv_from(&mut [0u8; 2048]).is_err(), "the relay sent the stranger a CREATE");

    // The directory's relay: a two-hop circuit builds through A to B.
    let mut client = UdpClient::new("127.0.0.1:0", vec![a.hop, b.hop]);
    client.build(Duration::from_secs(10));
    assert!(client.ping(2, 7), "no PONG from B through A");
    a.handle.shutdown();
    b.handle.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
