//! An exit never delivers one user's packets to another through the kernel's connection
//! tracking, as root in namespaces (see `common`).
//!
//! The attack: user A's flows through the exit are masqueraded, and conntrack keeps their NAT
//! state after A's session ends (an established TCP connection for 5 days by default). Once A's
//! inner address is leased to user B, a late reply from the internet on one of A's flows —
//! sent to the exit's WAN address and A's masqueraded port — is translated back to that inner
//! address and sealed to B. Whoever can send to A's old flows (any server A talked to) then
//! talks to B, and B reads the rest of A's traffic.
//!
//! Here the pool has 5 addresses; A has a UDP flow over each family and an established TCP
//! connection to the internet host, which answers on all three while A holds the address (the
//! positive control: the late packet would reach the address). Four other users hold the other
//! addresses; A's circuit ends; its session either expires (grace 1 s) or, when B comes while
//! A is in its grace period, is reclaimed for B (the pool is full). B gets A's addresses, the
//! internet host sends on A's three flows again, then B sends a datagram of its own: its echo
//! must be the first thing B receives (every packet before it was sent earlier, on one TUN
//! queue), and nothing else may follow.

mod common;

use cellproto::cell::Command;
use common::*;
use pnet_packet::Packet;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;
use pnet_packet::tcp::TcpPacket;
use pnet_packet::udp::UdpPacket;
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A packet the tunnel delivered: protocol, source address and port, payload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    proto: &'static str,
    from: IpAddr,
    sport: u16,
    seq: u32,
    payload: String,
}

fn describe(packet: &[u8]) -> Seen {
    let (from, next, body) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new(packet).expect("an IPv4 packet");
            (IpAddr::V4(ip.get_source()), ip.get_next_level_protocol(), ip.payload().to_vec())
        }
        Some(6) => {
            let ip = Ipv6Packet::new(packet).expect("an IPv6 packet");
            (IpAddr::V6(ip.get_source()), ip.get_next_header(), ip.payload().to_vec())
        }
        _ => panic!("not an IP packet: {packet:02x?}"),
    };
    let seen = |proto, sport, seq, payload: &[u8]| Seen {
        proto,
        from,
        sport,
        seq,
        payload: String::from_utf8_lossy(payload).into_owned(),
    };
    if next == IpNextHeaderProtocols::Udp {
        let udp = UdpPacket::new(&body).expect("a UDP header");
        seen("udp", udp.get_source(), 0, udp.payload())
    } else if next == IpNextHeaderProtocols::Tcp {
        let tcp = TcpPacket::new(&body).expect("a TCP header");
        seen("tcp", tcp.get_source(), tcp.get_sequence(), tcp.payload())
    } else {
        seen("other", 0, 0, &body)
    }
}

/// The internet host: a UDP echo on port 7 of both families and a TCP server on port 80. The
/// first peer of each family (A's flow, as masqueraded) is remembered; asked `Some(tag)`, it
/// sends `tag` to both and on the TCP connection it accepted, as late replies would come, and
/// answers which of the three it sent on. `None` stops it.
fn internet(lab: &Lab) -> (Sender<Option<&'static str>>, Receiver<[bool; 3]>, JoinHandle<()>) {
    let (asks, requests) = mpsc::channel::<Option<&'static str>>();
    let (answer, done) = mpsc::channel();
    let host = Lab::run_in(&lab.internet, move || {
        let u4 = UdpSocket::bind((INTERNET4, 7)).unwrap();
        let u6 = UdpSocket::bind((INTERNET6, 7)).unwrap();
        let tcp = TcpListener::bind((INTERNET4, 80)).unwrap();
        for s in [&u4, &u6] {
            s.set_nonblocking(true).unwrap();
        }
        tcp.set_nonblocking(true).unwrap();
        let (mut first4, mut first6): (Option<SocketAddr>, Option<SocketAddr>) = (None, None);
        let mut stream: Option<TcpStream> = None;
        let mut buf = [0u8; 2048];
        loop {
            let mut idle = true;
            for (s, first) in [(&u4, &mut first4), (&u6, &mut first6)] {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    first.get_or_insert(from);
                    let _ = s.send_to(&buf[..n], from);
                    idle = false;
                }
            }
            let accept = |stream: &mut Option<TcpStream>| {
                if stream.is_none()
                    && let Ok((s, _)) = tcp.accept()
                {
                    // Each write goes out at once, not held behind unacknowledged data.
                    s.set_nodelay(true).unwrap();
                    *stream = Some(s);
                }
            };
            accept(&mut stream);
            match requests.try_recv() {
                Ok(Some(tag)) => {
                    // A's ACK may still be on its way: the connection is accepted within WAIT.
                    let deadline = Instant::now() + WAIT;
                    while stream.is_none() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                        accept(&mut stream);
                    }
                    let v4 = first4.is_some_and(|p| u4.send_to(tag.as_bytes(), p).is_ok());
                    let v6 = first6.is_some_and(|p| u6.send_to(tag.as_bytes(), p).is_ok());
                    let tcp = stream.as_mut().is_some_and(|s| s.write_all(tag.as_bytes()).is_ok());
                    answer.send([v4, v6, tcp]).unwrap();
                }
                Ok(None) | Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {}
            }
            if idle {
                // Paces the polling loop only; nothing is decided by it.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    (asks, done, host)
}

fn metric(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// What B saw: whether its own echo came, and everything else it received; and the exit's
/// metrics at the end.
struct Outcome {
    own_echo: bool,
    leaked: Vec<Seen>,
    metrics: HashMap<String, f64>,
}

/// Runs the attack; `grace_secs` 1 lets A's session expire before B comes, 600 makes B's
/// ATTACH reclaim it (the pool is full).
fn late_replies_after_reuse(tag: &str, grace_secs: u64) -> Outcome {
    let lab = Lab::new(tag);
    let hop = lab.hop();
    let expire = grace_secs <= 1;
    let config = lab.write_config(1, &format!("pool_v4 = \"10.9.0.0/29\"\nsession_grace_secs = {grace_secs}\n"));
    let notify = lab.notify_socket();
    let _exitd = lab.exitd(&config);
    notify.ready();
    let (asks, done, host) = internet(&lab);

    let outcome = Lab::run_in(&lab.client, move || {
        // User A: UDP over both families and a TCP connection (the handshake finished by hand).
        let mut a = Client::connect(hop, 0x7c11_0001);
        let lease = a.attach(None, WAIT).expect("A's ATTACH is answered");
        let (v4, v6) = (lease.ipv4.0, lease.ipv6.0);
        a.send(Command::Data, &udp4(v4, INTERNET4, 7, b"a v4"));
        assert_eq!(describe(&a.recv_data(WAIT).expect("A's IPv4 echo")).payload, "a v4");
        a.send(Command::Data, &udp6(v6, INTERNET6, 7, b"a v6"));
        assert_eq!(describe(&a.recv_data(WAIT).expect("A's IPv6 echo")).payload, "a v6");
        a.send(Command::Data, &tcp_syn4(v4, INTERNET4, 40001, 80));
        let syn_ack = describe(&a.recv_data(WAIT).expect("the SYN-ACK to A"));
        assert_eq!((syn_ack.proto, syn_ack.sport), ("tcp", 80), "{syn_ack:?}");
        a.send(Command::Data, &tcp4(v4, INTERNET4, 40001, 80, 1001, syn_ack.seq.wrapping_add(1), 0x10, b""));

        // Positive control: while A holds the address, a late reply on each flow reaches A.
        asks.send(Some("control")).unwrap();
        assert_eq!(done.recv_timeout(WAIT).expect("the internet host answers"), [true; 3], "sent on A's 3 flows");
        let mut control = Vec::new();
        let deadline = Instant::now() + WAIT;
        while control.len() < 3 && Instant::now() < deadline {
            if let Some(p) = a.recv_data(Duration::from_millis(50)) {
                let s = describe(&p);
                if s.payload == "control" && !control.contains(&(s.proto, s.from)) {
                    control.push((s.proto, s.from));
                }
                if s.proto == "tcp" && s.payload == "control" {
                    // Acknowledged, so that the server sends its next data at once.
                    let ack = s.seq.wrapping_add(s.payload.len() as u32);
                    a.send(Command::Data, &tcp4(v4, INTERNET4, 40001, 80, 1001, ack, 0x10, b""));
                }
            }
        }
        assert_eq!(control.len(), 3, "A receives the internet's packets on all 3 flows: {control:?}");

        // Four more users take the other addresses of the pool.
        let mut others = Vec::new();
        for i in 0..4 {
            let mut c = Client::connect(hop, 0x7c11_0010 + i);
            let l = c.attach(None, WAIT).expect("another user's ATTACH is answered");
            assert_ne!(l.ipv4.0, v4);
            others.push(c);
        }

        // A's circuit ends; its session expires, or stays in its grace period for B to reclaim.
        a.close();
        if expire {
            wait_for("A's session to expire", || {
                metric(&metrics(METRICS_ADDR), "exitd_sessions_ended_total{why=\"expired\"}") >= 1.0
            });
        } else {
            wait_for("A's session to detach", || {
                metric(&metrics(METRICS_ADDR), "exitd_sessions{state=\"detached\"}") == 1.0
            });
        }

        // User B gets A's addresses: the pool has no other. (An ATTACH may go unanswered while
        // the address is made ready; B asks again, as a client rebuilds.)
        let mut b = Client::connect(hop, 0x7c11_0002);
        let lease_b = (0..4).find_map(|_| b.attach(None, Duration::from_secs(2))).expect("B's ATTACH is answered");
        assert_eq!((lease_b.ipv4.0, lease_b.ipv6.0), (v4, v6), "B holds A's old addresses");

        // The late replies on A's three flows, then B's own datagram: its echo is the first
        // thing B may receive (the late packets were in the exit's one TUN queue before it).
        asks.send(Some("late")).unwrap();
        assert_eq!(done.recv_timeout(WAIT).expect("the internet host answers"), [true; 3], "sent on A's 3 flows");
        b.send(Command::Data, &udp4_from(v4, 41000, INTERNET4, 7, b"b own"));
        let mut leaked = Vec::new();
        let mut own_echo = false;
        let deadline = Instant::now() + WAIT;
        while !own_echo && Instant::now() < deadline {
            if let Some(p) = b.recv_data(Duration::from_millis(50)) {
                let s = describe(&p);
                if s.proto == "udp" && s.payload == "b own" {
                    own_echo = true;
                } else {
                    leaked.push(s);
                }
            }
        }
        // Anything after it too (retransmissions of A's TCP data would come later).
        while let Some(p) = b.recv_data(Duration::from_millis(500)) {
            leaked.push(describe(&p));
        }
        drop(others);
        (own_echo, leaked)
    })
    .join()
    .expect("client");
    // `asks` went with the client thread: the internet host stops.
    host.join().expect("internet host");
    let (own_echo, leaked) = outcome;
    Outcome { own_echo, leaked, metrics: lab.metrics() }
}

fn check(outcome: &Outcome) {
    assert!(
        outcome.leaked.is_empty(),
        "B received {} packets of A's flows (late replies to A's old address): {:?}",
        outcome.leaked.len(),
        outcome.leaked
    );
    assert!(outcome.own_echo, "B's own flow works (positive control)");
    // What the exit did: A's address was flushed before B got it, A's three entries deleted.
    let m = &outcome.metrics;
    assert!(metric(m, "exitd_conntrack_flushes_total{result=\"ok\"}") >= 1.0, "{m:?}");
    assert_eq!(metric(m, "exitd_conntrack_flushes_total{result=\"failed\"}"), 0.0, "{m:?}");
    assert!(metric(m, "exitd_conntrack_deleted_total") >= 3.0, "A's UDP/IPv4, UDP/IPv6 and TCP: {m:?}");
    assert_eq!(metric(m, "exitd_addresses_flushing"), 0.0, "{m:?}");
}

#[test]
fn late_replies_to_an_expired_session_never_reach_the_next_holder_of_its_address() {
    let outcome = late_replies_after_reuse("ctx", 1);
    check(&outcome);
}

#[test]
fn late_replies_to_a_reclaimed_session_never_reach_the_next_holder_of_its_address() {
    let outcome = late_replies_after_reuse("ctr", 600);
    check(&outcome);
}

/// `Conntrack` alone in a namespace of its own: entries from several sources (UDP and TCP,
/// both families, one in a conntrack zone), and a flush deletes exactly those of the sources
/// it is given, by kernel-filtered dumps and by one whole dump when many addresses are asked.
#[test]
fn a_flush_deletes_exactly_the_entries_of_the_given_sources() {
    use exitd::conntrack::Conntrack;
    use ipnet::IpNet;
    let ns = netns::NetNs::new("conntrack").unwrap();
    ns.addr("lo", &["fd00::2/128", "fd00::3/128"]).unwrap();
    ns.run(|| {
        // Conntrack tracks this namespace once a rule uses it; 127.0.0.4's flows go to zone 7.
        let rules = "table inet ct_test {\n\
                     chain raw { type filter hook output priority raw; ip saddr 127.0.0.4 ct zone set 7; }\n\
                     chain out { type filter hook output priority filter; ct state new counter; }\n}\n";
        let mut nft =
            std::process::Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
        nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft");
        let listener = TcpListener::bind("127.0.0.1:80").unwrap();
        let mut keep = Vec::new();
        for src in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "fd00::2", "fd00::3"] {
            let src: IpAddr = src.parse().unwrap();
            let s = UdpSocket::bind((src, 0)).unwrap();
            let to: IpAddr = if src.is_ipv4() { "127.0.0.1".parse().unwrap() } else { "::1".parse().unwrap() };
            s.send_to(b"x", (to, 9)).unwrap();
            keep.push(s);
        }
        // An established TCP connection from 127.0.0.2.
        let tcp = socket2_connect("127.0.0.2", "127.0.0.1:80");
        let (_accepted, _) = listener.accept().unwrap();
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let mut ct = Conntrack::open().unwrap();
        let count = |ct: &mut Conntrack, s: &str| ct.count_prefixes(&[net(s)]).unwrap();
        for (src, n) in
            [("127.0.0.2/32", 2), ("127.0.0.3/32", 1), ("127.0.0.4/32", 1), ("fd00::2/128", 1), ("fd00::3/128", 1)]
        {
            assert_eq!(count(&mut ct, src), n, "entries from {src} before");
        }
        let deleted = ct
            .flush_sources(&["127.0.0.2".parse().unwrap(), "127.0.0.4".parse().unwrap(), "fd00::2".parse().unwrap()])
            .unwrap();
        assert_eq!(deleted, 4);
        for (src, n) in
            [("127.0.0.2/32", 0), ("127.0.0.3/32", 1), ("127.0.0.4/32", 0), ("fd00::2/128", 0), ("fd00::3/128", 1)]
        {
            assert_eq!(count(&mut ct, src), n, "entries from {src} after");
        }
        // Many addresses at once: one whole dump per family, matched here.
        let many: Vec<IpAddr> =
            (3..12).map(|n| IpAddr::from([127, 0, 0, n])).chain(["fd00::3".parse().unwrap()]).collect();
        assert_eq!(ct.flush_sources(&many).unwrap(), 2);
        assert_eq!(count(&mut ct, "127.0.0.0/8") + count(&mut ct, "fd00::/64"), 0);
        assert_eq!(ct.flush_sources(&many).unwrap(), 0, "nothing left, nothing deleted, no error");
        drop(tcp);
    })
    .unwrap();
}

/// A TCP connection from `src` (any port) to `to`.
fn socket2_connect(src: &str, to: &str) -> TcpStream {
    // std cannot bind before connect; a UDP-free way: connect from a bound raw fd via nix.
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    let src: std::net::SocketAddrV4 = format!("{src}:0").parse().unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(src)).unwrap();
    let to: std::net::SocketAddrV4 = to.parse().unwrap();
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to)).unwrap();
    TcpStream::from(fd)
}
