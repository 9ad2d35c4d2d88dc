//! exitd end to end, as root, in three network namespaces this test creates and deletes (see
//! `common`): the client drives a 1-hop circuit into the real `exitd` binary: ATTACH, then
//! crafted packets — UDP over IPv4 and IPv6, DNS to the resolver address inside the tunnel, ICMP
//! echo, a TCP handshake (MSS clamped) — that reach the internet namespace from the exit's WAN
//! address and come back; denied destinations, port 25, a spoofed source and malformed packets
//! are counted at the exit and never reach the internet (and nothing answers them: a good
//! packet sent after them is the first thing to come back); a circuit over its rate limit is
//! held to it (loosely: the exact logic is `bucket::RateLimits`, tested with an injected
//! clock); the nftables table is there while exitd runs (READY=1 to systemd only once it is);
//! SIGHUP reloads and the exit still forwards, a broken file is refused; SIGTERM removes the
//! table and the pools' conntrack entries (STOPPING=1). Counters are polled until every packet sent is counted, never read after
//! a fixed sleep. Addresses exist only in these namespaces; every wait is bounded. A crash and
//! restart are `tests/restart.rs`.

mod common;

use cellproto::cell::Command;
use cellproto::command::Attached;
use common::*;
use pnet_packet::Packet;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;
use pnet_packet::udp::UdpPacket;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the internet's echo server received: (source, payload).
type Seen = Vec<(SocketAddr, Vec<u8>)>;

/// Packets the exit writes to its TUN besides the 400 of the rate-limit check: 2 UDP, DNS,
/// 2 ICMP, 2 SYN, the packet after the refusals, the packet after resume (its own circuit, its
/// own bucket).
const TO_TUN_BESIDES_THE_400: f64 = 9.0;

#[test]
fn exit_end_to_end() {
    let lab = Lab::new("e2e");
    let hop = lab.hop();
    let config = lab.write_config(2, "circuit_rate = 200000\ncircuit_burst = 20000\n");

    // The internet: a UDP echo server on both families that records who it saw.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let echoes = Arc::new(AtomicUsize::new(0));
    let mut servers = Vec::new();
    for bind in ["198.51.100.2:7", "[2001:db8:1::2]:7", "198.51.100.2:53", "[2001:db8:1::2]:53"] {
        let (stop, seen, echoes) = (stop.clone(), seen.clone(), echoes.clone());
        servers.push(Lab::run_in(&lab.internet, move || {
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    seen.lock().unwrap().push((from, buf[..n].to_vec()));
                    let _ = s.send_to(&buf[..n], from);
                    echoes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    for bind in ["198.51.100.2:80", "[2001:db8:1::2]:80"] {
        let tcp_stop = stop.clone();
        servers.push(Lab::run_in(&lab.internet, move || {
            let l = std::net::TcpListener::bind(bind).unwrap();
            l.set_nonblocking(true).unwrap();
            while !tcp_stop.load(Ordering::Relaxed) {
                let _ = l.accept();
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }

    // systemd's notification socket: READY=1 only once the exit is set up.
    let notify = lab.notify_socket();
    let mut child = lab.exitd(&config);
    let ready = notify.next();
    assert!(ready.contains("READY=1") && ready.contains("out of wan0"), "{ready}");
    assert!(lab.nft(&["list", "tables"]).contains("meshvpn_exit"), "READY=1 before the nftables table");

    let client = Lab::run_in(&lab.client, move || {
        let mut c = Client::connect(hop, 0x5111_0001);
        let attached = c.attach(None, WAIT).expect("no ATTACHED");
        let (v4, v6) = (attached.ipv4.0, attached.ipv6.0);
        assert_eq!(attached.dns.0, Ipv4Addr::new(10, 8, 0, 1));

        // UDP over IPv4 and IPv6 to the internet and back.
        let (internet4, internet6) = (INTERNET4, INTERNET6);
        c.send(Command::Data, &udp4(v4, internet4, 7, b"hello v4"));
        let (cmd, reply) = c.recv(WAIT).expect("no IPv4 reply");
        assert_eq!(cmd, Command::Data);
        let ip = Ipv4Packet::new(&reply).unwrap();
        assert_eq!((ip.get_source(), ip.get_destination()), (internet4, v4));
        assert_eq!(UdpPacket::new(ip.payload()).unwrap().payload(), b"hello v4");
        c.send(Command::Data, &udp6(v6, internet6, 7, b"hello v6"));
        let (_, reply) = c.recv(WAIT).expect("no IPv6 reply");
        let ip = Ipv6Packet::new(&reply).unwrap();
        assert_eq!((ip.get_source(), ip.get_destination()), (internet6, v6));
        assert_eq!(UdpPacket::new(ip.payload()).unwrap().payload(), b"hello v6");

        // DNS to the resolver address inside the tunnel reaches the configured upstream (the
        // internet's echo on port 53 here) and the answer comes from the tunnel address.
        let resolver = attached.dns.0;
        c.send(Command::Data, &udp4(v4, resolver, 53, b"dns query"));
        let (_, reply) = c.recv(WAIT).expect("no DNS answer");
        let ip = Ipv4Packet::new(&reply).unwrap();
        assert_eq!((ip.get_source(), ip.get_destination()), (resolver, v4));
        assert_eq!(UdpPacket::new(ip.payload()).unwrap().payload(), b"dns query");

        // ICMP echo through the exit.
        c.send(Command::Data, &icmp_echo4(v4, internet4, 0x4d56, 1));
        let (_, reply) = c.recv(WAIT).expect("no ICMP echo reply");
        let ip = Ipv4Packet::new(&reply).unwrap();
        assert_eq!((ip.get_source(), ip.get_next_level_protocol()), (internet4, IpNextHeaderProtocols::Icmp));
        assert_eq!(ip.payload()[0], 0, "ICMP type echo reply");

        // A TCP handshake: SYN out, SYN-ACK back with the MSS clamped for the tunnel.
        c.send(Command::Data, &tcp_syn4(v4, internet4, 40001, 80));
        let (_, reply) = c.recv(WAIT).expect("no SYN-ACK");
        let ip = Ipv4Packet::new(&reply).unwrap();
        let tcp = pnet_packet::tcp::TcpPacket::new(ip.payload()).unwrap();
        assert_eq!((ip.get_source(), tcp.get_source(), tcp.get_destination()), (internet4, 80, 40001));
        assert_eq!(tcp.get_flags() & 0x12, 0x12, "SYN-ACK");
        let mss = tcp
            .get_options_iter()
            .find(|o| o.get_number().0 == 2)
            .map(|o| u16::from_be_bytes([o.payload()[0], o.payload()[1]]));
        assert!(mss.is_some_and(|m| m <= 1264), "MSS not clamped: {mss:?}");

        // The same over IPv6: ICMPv6 echo and a TCP handshake (MSS clamped for IPv6).
        c.send(Command::Data, &icmp_echo6(v6, internet6, 0x4d57, 1));
        let (_, reply) = c.recv(WAIT).expect("no ICMPv6 echo reply");
        let ip = Ipv6Packet::new(&reply).unwrap();
        assert_eq!((ip.get_source(), ip.get_next_header()), (internet6, IpNextHeaderProtocols::Icmpv6));
        assert_eq!(ip.payload()[0], 129, "ICMPv6 echo reply");
        c.send(Command::Data, &tcp_syn6(v6, internet6, 40002, 80));
        let (_, reply) = c.recv(WAIT).expect("no IPv6 SYN-ACK");
        let ip = Ipv6Packet::new(&reply).unwrap();
        let tcp = pnet_packet::tcp::TcpPacket::new(ip.payload()).unwrap();
        assert_eq!((ip.get_source(), tcp.get_flags() & 0x12), (internet6, 0x12));
        let mss = tcp
            .get_options_iter()
            .find(|o| o.get_number().0 == 2)
            .map(|o| u16::from_be_bytes([o.payload()[0], o.payload()[1]]));
        assert!(mss.is_some_and(|m| m <= 1244), "IPv6 MSS not clamped: {mss:?}");

        // Refused at the exit: denied classes, port 25, a spoofed source, malformed packets.
        for dst in [[10, 1, 2, 3], [169, 254, 169, 254], [127, 0, 0, 1], [100, 64, 0, 1], [224, 0, 0, 1]] {
            c.send(Command::Data, &udp4(v4, dst.into(), 7, b"nope"));
        }
        for dst in ["fd00:ec2::254", "fe80::1", "fd12::1", "ff02::1", "::1"] {
            c.send(Command::Data, &udp6(v6, dst.parse().unwrap(), 7, b"nope"));
        }
        c.send(Command::Data, &udp4(v4, [169, 254, 1, 1].into(), 7, b"nope"));
        // Translated and reserved destinations; the IPv4-mapped form of the internet host.
        c.send(Command::Data, &udp4(v4, [198, 18, 0, 5].into(), 7, b"nope"));
        c.send(Command::Data, &udp6(v6, "64:ff9b::c633:6402".parse().unwrap(), 7, b"nope"));
        c.send(Command::Data, &udp6(v6, "::ffff:198.51.100.2".parse().unwrap(), 7, b"nope"));
        // The exit host itself: its metrics port on the client side, its WAN addresses.
        c.send(Command::Data, &tcp_syn4(v4, Ipv4Addr::new(203, 0, 113, 1), 40003, 9101));
        c.send(Command::Data, &tcp_syn4(v4, WAN4, 40004, 9101));
        c.send(Command::Data, &tcp_syn6(v6, WAN6, 40005, 9101));
        c.send(Command::Data, &udp4(v4, internet4, 25, b"smtp"));
        c.send(Command::Data, &udp4(Ipv4Addr::new(10, 8, 9, 9), internet4, 7, b"spoof"));
        let good = udp4(v4, internet4, 7, b"x");
        c.send(Command::Data, &good[..10]);
        let mut v5 = good.clone();
        v5[0] = 0x55;
        c.send(Command::Data, &v5);
        let mut long = good.clone();
        long[3] = long[3].wrapping_add(9);
        c.send(Command::Data, &long);
        // Then a good packet on the same circuit: its echo comes back, and nothing else may
        // come before it (the refusals are proven by their counters below).
        c.send(Command::Data, &udp4(v4, internet4, 7, b"after the refusals"));
        let reply = c.recv_data(WAIT).expect("the echo after the refusals (positive control)");
        let ip = Ipv4Packet::new(&reply).unwrap();
        assert_eq!(
            UdpPacket::new(ip.payload()).unwrap().payload(),
            b"after the refusals",
            "a refused packet got an answer: {reply:02x?}"
        );

        // Over its limit (200 kB/s, burst 20 kB), the circuit is held to it: 400 packets of
        // 1000 bytes offered over about a second (the pause only paces the offered load); what
        // passes can never exceed the bucket over the time measured, with half a second of
        // slack for queueing. The exact logic is bucket::RateLimits' tests (injected clock).
        let start = Instant::now();
        for i in 0..400u32 {
            c.send(Command::Data, &udp4(v4, internet4, 9, &vec![i as u8; 972]));
            std::thread::sleep(Duration::from_micros(2500));
        }
        let elapsed = start.elapsed().as_secs_f64();

        // The path breaks; the client comes back on a new circuit with its session token and
        // gets the same inner addresses.
        let mut again = Client::connect(hop, 0x5111_0002);
        let resumed: Attached = again.attach(Some(attached.token), WAIT).expect("no ATTACHED on resume");
        assert_eq!((resumed.token, resumed.ipv4.0, resumed.ipv6.0), (attached.token, v4, v6));
        again.send(Command::Data, &udp4(v4, internet4, 7, b"after resume"));
        let (_, reply) = again.recv(WAIT).expect("no reply after resume");
        assert_eq!(UdpPacket::new(Ipv4Packet::new(&reply).unwrap().payload()).unwrap().payload(), b"after resume");
        (v4, v6, elapsed)
    })
    .join()
    .expect("client");
    let (_, _, elapsed) = client;

    // The workers publish their counters every 100 ms: poll until every packet sent is
    // counted (or the deadline passes, and the assertions below say what is missing).
    let expected = [
        ("private", 2.0),
        ("cloud_metadata", 2.0),
        ("loopback", 2.0),
        ("link_local", 2.0),
        ("cgnat", 1.0),
        ("multicast", 2.0),
        ("benchmarking", 1.0),
        ("nat64", 1.0),
        ("ipv4_in_ipv6", 1.0),
        ("exit_host", 3.0),
        ("denied_port", 1.0),
        ("spoofed_source", 1.0),
        ("truncated", 1.0),
        ("bad_version", 1.0),
        ("bad_length", 1.0),
        ("dns", 1.0),
    ];
    let all_counted = |m: &std::collections::HashMap<String, f64>| {
        expected.iter().all(|&(what, n)| exit_count(m, what) == n)
            && exit_count(m, "to_tun") - TO_TUN_BESIDES_THE_400 + exit_count(m, "rate_limited") == 400.0
    };
    let m = lab.metrics_when(all_counted);
    for (what, n) in expected {
        assert_eq!(exit_count(&m, what), n, "exitd_packets_total{{what={what}}}: {m:?}");
    }
    // to_tun: what the rate limit let through of the 400, and the rest (TO_TUN_BESIDES_THE_400).
    let passed = exit_count(&m, "to_tun") - TO_TUN_BESIDES_THE_400;
    let limited = exit_count(&m, "rate_limited");
    assert_eq!(passed + limited, 400.0, "{m:?}");
    let allowed_bytes = 20_000.0 + 200_000.0 * (elapsed + 0.5);
    assert!(passed * 1000.0 <= allowed_bytes, "{passed} packets of 1000 B passed in {elapsed:.2} s: over the limit");
    assert!(limited > 0.0, "nothing was limited");
    assert_eq!(exit_count(&m, "rate_limited_bytes"), limited * 1000.0);
    // The internet saw the two good packets, the DNS query, the one after the refusals and the
    // one after resume, from the exit's WAN address: each was echoed back to the client, so
    // the server had recorded it. (The rate-limit packets go to port 9, where nothing listens.)
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let sources: Vec<IpAddr> = seen.iter().map(|(a, _)| a.ip()).collect();
    assert!(sources.contains(&IpAddr::V4(WAN4)), "{sources:?}");
    assert!(sources.contains(&"2001:db8:1::1".parse().unwrap()), "{sources:?}");

    // SIGHUP with new limits and a new policy: reloaded (the policy is logged as needing a
    // restart), and the exit still forwards (a new circuit's packet comes back).
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}[limits]\ncreate_burst = 7\n[policy]\ndeny_ports = [25, 26]\n")).unwrap();
    child.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(notify.next().contains("RELOADING=1"));
    assert!(notify.next().contains("READY=1"));
    let m = lab.metrics();
    assert_eq!(m["relayd_config_reloads_total{result=\"ok\"}"], 1.0, "{m:?}");
    Lab::run_in(&lab.client, move || {
        let mut c = Client::connect(hop, 0x5111_0003);
        let v4 = c.attach(None, WAIT).expect("ATTACHED after the reload").ipv4.0;
        c.send(Command::Data, &udp4(v4, INTERNET4, 7, b"after reload"));
        let reply = c.recv_data(WAIT).expect("an echo through the reloaded exit");
        assert_eq!(UdpPacket::new(Ipv4Packet::new(&reply).unwrap().payload()).unwrap().payload(), b"after reload");
    })
    .join()
    .expect("client after reload");
    std::fs::write(&config, "nonsense").unwrap();
    child.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(notify.next().contains("RELOADING=1"));
    assert!(notify.next().contains("last reload FAILED"));
    let m = lab.metrics();
    assert_eq!(m["relayd_config_reloads_total{result=\"failed\"}"], 1.0, "{m:?}");
    std::fs::write(&config, text).unwrap();

    // SIGTERM: STOPPING=1, and the table goes away with exitd.
    child.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(notify.next().contains("STOPPING=1"));
    let status = child.wait_exit();
    assert!(status.success(), "exitd exited with {status}");
    assert!(!lab.nft(&["list", "tables"]).contains("meshvpn_exit"), "table left after stop");
    let left = Lab::run_in(&lab.exit, || {
        let pools = ["10.8.0.0/16".parse().unwrap(), "fd6d:6573:6800::/64".parse().unwrap()];
        exitd::conntrack::Conntrack::open().unwrap().count_prefixes(&pools).unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(left, 0, "the users' conntrack entries (flows, NAT state) left after stop");

    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    let _ = echoes;
}
