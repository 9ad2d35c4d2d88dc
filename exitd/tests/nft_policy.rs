//! The kernel half of the exit policy: the nftables table `exitd run` installs
//! (`daemon::nat_config`), tested with real packets through a router namespace while nothing
//! in user space filters them, so each rule must hold on its own (defence in depth).
//!
//! ```text
//! client ─c0 10.8.0.2══tun0 10.8.0.1─ router ─wan0 198.51.100.1══i0─ internet
//!             fd00:8::2     fd00:8::1          2001:db8:1::1        198.51.100.2, 2001:db8:1::2,
//!                                                                   and addresses in denied ranges
//! ```
//!
//! Every refusal is checked after a positive control on the same path (sent after it, so on a
//! FIFO path it would have arrived first): "nothing arrived" then means "dropped", and the
//! rule's counter says which rule dropped it. Root, namespaces of the test's own (see
//! the `netns` crate); every wait is bounded.

mod common;

use common::{RouterLab as Lab, static_neighbours};
use exitd::config::ExitConfig;
use exitd::nft::{self, NatConfig};
use exitd::policy::ExitPolicy;
use netns::NetNs;
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket};
use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(5);
const TABLE: &str = nft::DEFAULT_TABLE;
const CLIENT4: &str = "10.8.0.2";
const CLIENT6: &str = "fd00:8::2";
const WAN4: &str = "198.51.100.1";
const INTERNET4: &str = "198.51.100.2";
const INTERNET6: &str = "2001:db8:1::2";
/// Addresses in denied ranges, on the internet host, routed by the router: (address, the
/// nftables rule that must drop packets to it).
const DENIED: [(&str, &str); 6] = [
    ("198.18.0.2", "deny 198.18.0.0/15"),
    ("10.200.0.2", "deny 10.0.0.0/8"),
    ("192.0.0.2", "deny 192.0.0.0/24"),
    ("198.51.100.3", "deny 198.51.100.3/32"), // configured `deny`
    ("fd99::2", "deny fc00::/7"),
    ("64:ff9b::c633:6402", "deny 64:ff9b::/96"),
];

/// The three namespaces, and exitd's table for `policy` (TOML after `[policy]`-less `[exit]`
/// keys) installed in the router.
fn lab(extra: &str) -> Lab {
    let lab = Lab::new("nft");
    for (ns, dev, addrs) in [
        (&lab.client, "c0", vec!["10.8.0.2/16", "fd00:8::2/64"]),
        (&lab.router, "tun0", vec!["10.8.0.1/16", "fd00:8::1/64"]),
        (&lab.router, "wan0", vec!["198.51.100.1/24", "2001:db8:1::1/64"]),
        (&lab.internet, "i0", vec!["198.51.100.2/24", "2001:db8:1::2/64"]),
    ] {
        for a in addrs {
            ns.ip(&["addr", "add", a, "dev", dev, "nodad"]).unwrap();
        }
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    for (addr, _) in DENIED {
        let len = if addr.contains(':') { "128" } else { "32" };
        lab.internet.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", "i0", "nodad"]).unwrap();
        lab.router.ip(&["route", "replace", &format!("{addr}/{len}"), "dev", "wan0"]).unwrap();
    }
    lab.client.ip(&["route", "add", "default", "via", "10.8.0.1"]).unwrap();
    lab.client.ip(&["-6", "route", "add", "default", "via", "fd00:8::1"]).unwrap();
    static_neighbours(&lab.client, "c0", &[CLIENT6], &lab.router, "tun0", &["fd00:8::1"]);
    // The internet can route to the pool (an attacker on the exit's LAN could); replies to
    // masqueraded traffic go to the WAN address, on link.
    lab.internet.ip(&["route", "add", "10.8.0.0/16", "via", WAN4]).unwrap();
    lab.router.sysctl("net.ipv4.ip_forward=1").unwrap();
    lab.router.sysctl("net.ipv6.conf.all.forwarding=1").unwrap();

    let text = format!(
        "listen = \"127.0.0.1:9001\"\nkey_dir = \"k\"\nnickname = \"t\"\n[exit]\nwan = \"wan0\"\n\
         pool_v4 = \"10.8.0.0/16\"\npool_v6 = \"fd00:8::/64\"\n{extra}"
    );
    let config = ExitConfig::parse(&text, std::path::Path::new("t.toml")).expect("config");
    let router_addrs: Vec<IpAddr> = ["10.8.0.1", "fd00:8::1", WAN4, "2001:db8:1::1"].map(|a| a.parse().unwrap()).into();
    let policy = ExitPolicy::new(&config.policy).with_exit_host(router_addrs);
    let nat: NatConfig = exitd::daemon::nat_config(&config, "tun0", &policy);
    lab.router.run(|| nft::install(&nat).expect("install")).unwrap();
    lab
}

fn bind(ns: &NetNs, addr: &str, port: u16) -> UdpSocket {
    let addr: IpAddr = addr.parse().unwrap();
    let s = ns.run(|| UdpSocket::bind(SocketAddr::new(addr, port)).expect("bind")).unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

/// Receives `want` on `socket` within `WAIT`, calling `resend` every 200 ms; its sender.
fn receive(socket: &UdpSocket, want: &[u8], resend: impl Fn()) -> SocketAddr {
    let deadline = Instant::now() + WAIT;
    let mut last = Instant::now();
    let mut buf = [0u8; 128];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if &buf[..n] == want => return from,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "{want:?} did not arrive (positive control)");
                if last.elapsed() > Duration::from_millis(200) {
                    resend();
                    last = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Whatever is already queued on `socket` (nothing must be).
fn queued(socket: &UdpSocket) -> Option<(usize, SocketAddr)> {
    let mut buf = [0u8; 128];
    socket.recv_from(&mut buf).ok()
}

fn counters(ns: &NetNs, table: &str) -> HashMap<String, u64> {
    ns.run(|| nft::counters(table).expect("counters")).unwrap().into_iter().collect()
}

#[test]
fn denied_ranges_and_allow_ports_are_dropped_by_the_kernel() {
    let lab = lab("[policy]\nallow_ports = [9999, 53]\ndeny = [\"198.51.100.3/32\"]\n");
    let tx4 = bind(&lab.client, CLIENT4, 0);
    let tx6 = bind(&lab.client, CLIENT6, 0);
    let denied: Vec<UdpSocket> = DENIED.iter().map(|(addr, _)| bind(&lab.internet, addr, 9999)).collect();
    let wrong_port = bind(&lab.internet, INTERNET4, 9998);
    for (addr, _) in DENIED {
        let tx = if addr.contains(':') { &tx6 } else { &tx4 };
        tx.send_to(b"denied", (addr.parse::<IpAddr>().unwrap(), 9999)).unwrap();
    }
    tx4.send_to(b"wrong port", (INTERNET4.parse::<IpAddr>().unwrap(), 9998)).unwrap();
    for (tx, to) in [(&tx4, INTERNET4), (&tx6, INTERNET6)] {
        let rx = bind(&lab.internet, to, 9999);
        let to: IpAddr = to.parse().unwrap();
        let from = receive(&rx, b"allowed", || drop(tx.send_to(b"allowed", (to, 9999))));
        assert!(!from.ip().to_string().starts_with("10.8.") && !from.ip().to_string().starts_with("fd00:8:"));
    }
    for (socket, (addr, _)) in denied.iter().zip(DENIED) {
        assert_eq!(queued(socket), None, "a packet to {addr} went through");
    }
    assert_eq!(queued(&wrong_port), None, "a packet to a port outside allow_ports went through");
    let c = counters(&lab.router, TABLE);
    for (addr, rule) in DENIED {
        assert_eq!(c.get(rule), Some(&1), "{addr}: {c:?}");
    }
    assert_eq!(c.get("deny ports outside allow_ports"), Some(&1), "{c:?}");
}

#[test]
fn circuits_cannot_reach_the_exit_host_but_dns_to_a_local_resolver_works() {
    let lab = lab("dns_upstream_v4 = \"198.51.100.1\"\n");
    let services: Vec<UdpSocket> =
        ["10.8.0.1", WAN4, "fd00:8::1", "2001:db8:1::1"].iter().map(|a| bind(&lab.router, a, 7777)).collect();
    let resolver = bind(&lab.router, WAN4, 53);
    let tx4 = bind(&lab.client, CLIENT4, 0);
    let tx6 = bind(&lab.client, CLIENT6, 0);
    for to in ["10.8.0.1", WAN4] {
        tx4.send_to(b"service", (to.parse::<IpAddr>().unwrap(), 7777)).unwrap();
    }
    for to in ["fd00:8::1", "2001:db8:1::1"] {
        tx6.send_to(b"service", (to.parse::<IpAddr>().unwrap(), 7777)).unwrap();
    }
    // DNS to the resolver address in the tunnel reaches the upstream on the exit host itself.
    receive(&resolver, b"query", || drop(tx4.send_to(b"query", ("10.8.0.1".parse::<IpAddr>().unwrap(), 53))));
    for s in &services {
        assert_eq!(queued(s), None, "a circuit reached a service on the exit host");
    }
    assert_eq!(counters(&lab.router, TABLE).get("deny exit host"), Some(&4));
}

/// A raw IPv4 socket in `ns` (IP_HDRINCL: the packet is sent as given, the kernel fills in the
/// checksum and length).
fn send_raw(ns: &NetNs, packet: &[u8], to: Ipv4Addr) {
    ns.run(|| {
        let fd = socket(AddressFamily::Inet, SockType::Raw, SockFlag::empty(), SockProtocol::Raw).expect("raw socket");
        sendto(fd.as_raw_fd(), packet, &SockaddrIn::from(SocketAddrV4::new(to, 0)), MsgFlags::empty())
            .expect("send raw");
    })
    .unwrap();
}

fn ipv4(protocol: u8, src: Ipv4Addr, dst: Ipv4Addr, body: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(body);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

#[test]
fn nothing_unsolicited_comes_in_and_nothing_leaves_un_natted() {
    let lab = lab("");
    // The internet counts what arrives from the pool's addresses (un-NATed) and from the WAN.
    let watch = "table inet watch {
        chain pre {
            type filter hook prerouting priority -300; policy accept;
            ip saddr 10.8.0.0/16 counter comment \"from the pool\"
            ip saddr 198.51.100.1 counter comment \"from the wan\"
            meta l4proto { 4, 51 } counter comment \"ipip or ah\"
        }
    }";
    lab.internet
        .run(|| {
            let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
            child.stdin.take().unwrap().write_all(watch.as_bytes()).unwrap();
            assert!(child.wait().unwrap().success());
        })
        .unwrap();
    let (client, internet): (Ipv4Addr, Ipv4Addr) = (CLIENT4.parse().unwrap(), INTERNET4.parse().unwrap());
    // From the client: an ICMP error about no connection (conntrack: invalid, so it would
    // leave un-NATed), IP in IP and AH (protocols the exit refuses).
    let inner = ipv4(17, internet, client, &[0x04, 0xd2, 0x16, 0x2e, 0, 8, 0, 0]);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&inner);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    send_raw(&lab.client, &ipv4(1, client, internet, &icmp), internet);
    send_raw(&lab.client, &ipv4(4, client, internet, &ipv4(17, client, internet, &[0; 8])), internet);
    send_raw(&lab.client, &ipv4(51, client, internet, &[17, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]), internet);

    // An established flow both ways (the positive control), and meanwhile an unsolicited
    // packet from the internet to the client's address, sent before the reply.
    let client_flow = bind(&lab.client, CLIENT4, 7000);
    let client_victim = bind(&lab.client, CLIENT4, 7001);
    let server = bind(&lab.internet, INTERNET4, 9999);
    let from = receive(&server, b"hello", || drop(client_flow.send_to(b"hello", (internet, 9999))));
    assert_eq!(from.ip().to_string(), WAN4, "masqueraded");
    let stranger = bind(&lab.internet, INTERNET4, 9000);
    stranger.send_to(b"unsolicited", (client, 7001)).unwrap();
    receive(&client_flow, b"reply", || drop(server.send_to(b"reply", from)));
    assert_eq!(queued(&client_victim), None, "an unsolicited packet from the internet reached a client");

    let seen = counters(&lab.internet, "watch");
    assert_eq!(seen.get("from the pool"), Some(&0), "a packet left un-NATed: {seen:?}");
    assert_eq!(seen.get("ipip or ah"), Some(&0), "{seen:?}");
    assert!(seen.get("from the wan").is_some_and(|&n| n >= 1), "{seen:?}");
    let c = counters(&lab.router, TABLE);
    assert_eq!(c.get("deny invalid"), Some(&1), "{c:?}");
    assert_eq!(c.get("deny protocol ipv4"), Some(&2), "{c:?}");
    assert_eq!(c.get("deny new inbound"), Some(&1), "{c:?}");
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
