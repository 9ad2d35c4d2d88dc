//! The client's one endpoint against fake relays on loopback: the RTT probes leave from the
//! data socket, so a relay sees STUN and cells come from one and the same port (one NAT
//! mapping, which hole punching needs); answers come back through the endpoint's
//! demultiplexer, and whatever is neither a relay's cell nor an answer to our STUN is counted
//! as stray, not lost silently. The fakes answer STUN with `cellproto::stun::server::reply`, as a relay
//! does.

use cellproto::cell::CELL_LEN;
use cellproto::client::PathHop;
use cellproto::descriptor::RelayDescriptor;
use cellproto::handshake::RelayKeys;
use cellproto::identity::IdentityKey;
use cellproto::stun::{self, Message};
use meshvpn::endpoint::Endpoint;
use meshvpn::relays::{Relay, Relays};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a fake relay received: (was it STUN, from where).
type Seen = Arc<Mutex<Vec<(bool, SocketAddr)>>>;

/// A relay on `ip` that answers STUN, records every datagram's source, and never stops (the
/// test process ends it).
fn fake_relay(ip: &str) -> (SocketAddr, Seen, UdpSocket) {
    let socket = UdpSocket::bind((ip, 0)).unwrap();
    let addr = socket.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let (s, log) = (socket.try_clone().unwrap(), seen.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let is_stun = stun::is_stun(&buf[..n]);
            log.lock().unwrap().push((is_stun, from));
            if let Some(answer) = cellproto::stun::server::reply(from, addr, None, &buf[..n]) {
                let _ = s.send_to(&answer.data, from);
            }
        }
    });
    (addr, seen, socket)
}

fn listed(n: u8, addr: SocketAddr) -> Relay {
    let desc = RelayDescriptor {
        identity: IdentityKey([n; 32]),
        onion_keys: vec![],
        addresses: vec![addr],
        nickname: format!("r{n}"),
        operator: String::new(),
        bandwidth: 1000,
        flags: 0,
        exit_policy: None,
        protocol_versions: vec![1],
        published: 0,
        expires: u64::MAX,
    };
    let hop = PathHop { keys: RelayKeys { identity: [n; 32], onion_key: [n; 32] }, addr };
    Relay { desc, hop, rtt: None }
}

#[tokio::test]
async fn rtt_probes_leave_from_the_data_socket_and_strays_are_counted() {
    let (a, seen_a, socket_a) = fake_relay("127.0.0.1");
    let (b, seen_b, _socket_b) = fake_relay("127.0.0.2");
    let mut relays = Relays { relays: vec![listed(1, a), listed(2, b)], published: 0, expires: u64::MAX };
    let mut endpoint = Endpoint::bind(&relays).await.unwrap();
    let port = endpoint.local_addr().unwrap().port();

    endpoint.measure_rtts(&mut relays, Duration::from_secs(2), |_, _| {}).await;
    for r in &relays.relays {
        assert!(r.rtt.is_some(), "{} did not answer the probe", r.desc.nickname);
    }
    assert_eq!(endpoint.counters().stun_answers, 2);
    assert_eq!(endpoint.counters().stray, 0);

    // A cell to relay A, from the same endpoint.
    let cell = [0x41u8; CELL_LEN];
    endpoint.socket().send(a, &cell).await.unwrap();
    endpoint.socket().flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !seen_a.lock().unwrap().iter().any(|(is_stun, _)| !is_stun) {
        assert!(std::time::Instant::now() < deadline, "relay A never got the cell");
        std::thread::sleep(Duration::from_millis(10));
    }
    for (relay, seen) in [("A", &seen_a), ("B", &seen_b)] {
        let seen = seen.lock().unwrap();
        assert!(seen.iter().any(|(is_stun, _)| *is_stun), "relay {relay} got no STUN request");
        for (is_stun, from) in seen.iter() {
            let what = if *is_stun { "STUN" } else { "a cell" };
            assert_eq!(from.port(), port, "relay {relay} got {what} from port {}, not the data socket's", from.port());
        }
    }

    // Back to the endpoint: a cell from a relay goes to the circuit; garbage, a cell from no
    // relay and STUN that answers nothing asked are counted as stray.
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    socket_a.send_to(&cell, to).unwrap();
    socket_a.send_to(b"not a cell, not STUN", to).unwrap();
    let mut foreign = [0u8; 128];
    let n = Message::binding_success([0xee; 12], a).encode(&mut foreign, true).unwrap();
    socket_a.send_to(&foreign[..n], to).unwrap();
    let stranger = UdpSocket::bind("127.0.0.3:0").unwrap();
    stranger.send_to(&cell, to).unwrap();
    let mut cells = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while endpoint.counters().stray < 3 || cells.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "stray {:?}, cells {cells:?}", endpoint.counters());
        let _ = tokio::time::timeout(Duration::from_millis(50), endpoint.readable()).await;
        endpoint.receive(std::time::Instant::now(), |from, _| cells.push(from));
    }
    assert_eq!(cells, vec![a], "only relay A's cell reaches the circuit");
    assert_eq!(endpoint.counters().stray, 3, "{:?}", endpoint.counters());
}
