//! exitd end to end, as root, in three network namespaces this test creates and deletes:
//!
//! ```text
//!  client ns ──cl0 203.0.113.2 ══ 203.0.113.1 ex0── exit ns ──wan0 198.18.0.1 ══ 198.18.0.2 i0── internet ns
//!                                                 (exitd, TUN, nftables)        2001:db8:1::1/2 (UDP echo)
//! ```
//!
//! The client drives a 1-hop circuit into the real `exitd` binary: ATTACH, then crafted packets
//! — UDP over IPv4 and IPv6, DNS to the resolver address inside the tunnel, ICMP echo, a TCP
//! handshake (MSS clamped) — that reach the internet namespace from the exit's WAN address and
//! come back; denied destinations, port 25, a spoofed source and malformed packets are counted
//! at the exit and never reach the internet; a circuit over its rate limit is held to it; the
//! nftables table is there while exitd runs (READY=1 to systemd only once it is; SIGHUP reloads,
//! a broken file is refused), gone after SIGTERM (STOPPING=1), and exactly once after kill -9
//! and a restart. Addresses exist only in these namespaces; every wait is bounded.

use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::{Circuit, CircuitConfig, Event, PathHop};
use cellproto::command::{Attach, Attached};
use cellproto::handshake::RelayKeys;
use cellproto::onion::{payload, payload_mut};
use nix::sched::{CloneFlags, setns};
use pnet_packet::Packet;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{self, Ipv4Packet, MutableIpv4Packet};
use pnet_packet::ipv6::{Ipv6Packet, MutableIpv6Packet};
use pnet_packet::udp::{self, MutableUdpPacket, UdpPacket};
use rand_core::OsRng;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command as Proc};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(5);

/// What the internet's echo server received: (source, payload).
type Seen = Vec<(SocketAddr, Vec<u8>)>;

fn sh(args: &[&str]) {
    let out = Proc::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Three namespaces joined by veths, deleted on drop.
struct Lab {
    client: String,
    exit: String,
    internet: String,
}

impl Lab {
    fn new() -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the exitd end-to-end test needs root (netns, TUN, nftables), as CI has"
        );
        let id = std::process::id();
        let lab = Lab {
            client: format!("mv-e2e-c-{id}"),
            exit: format!("mv-e2e-x-{id}"),
            internet: format!("mv-e2e-i-{id}"),
        };
        for ns in [&lab.client, &lab.exit, &lab.internet] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", &lab.exit, "link", "add", "ex0", "type", "veth", "peer", "name", "cl0", "netns", &lab.client]);
        sh(&[
            "ip",
            "-n",
            &lab.exit,
            "link",
            "add",
            "wan0",
            "type",
            "veth",
            "peer",
            "name",
            "i0",
            "netns",
            &lab.internet,
        ]);
        for (ns, dev, v4, v6) in [
            (&lab.client, "cl0", "203.0.113.2/24", "2001:db8:2::2/64"),
            (&lab.exit, "ex0", "203.0.113.1/24", "2001:db8:2::1/64"),
            (&lab.exit, "wan0", "198.18.0.1/24", "2001:db8:1::1/64"),
            (&lab.internet, "i0", "198.18.0.2/24", "2001:db8:1::2/64"),
        ] {
            sh(&["ip", "-n", ns, "addr", "add", v4, "dev", dev]);
            sh(&["ip", "-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        lab
    }

    /// Runs `f` on a thread inside namespace `ns` (its sockets live there).
    fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("open netns");
            setns(fd, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    fn exitd(&self, config: &std::path::Path) -> Exitd {
        let child = Proc::new("ip")
            .args(["netns", "exec", &self.exit, env!("CARGO_BIN_EXE_exitd"), "run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", config.with_file_name("notify.sock"))
            .spawn()
            .expect("start exitd");
        Exitd(child)
    }

    fn nft_tables(&self) -> String {
        let out = Proc::new("ip").args(["netns", "exec", &self.exit, "nft", "list", "tables"]).output().expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The exitd process, killed if the test ends (or fails) while it still runs.
struct Exitd(Child);

impl Drop for Exitd {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.exit, &self.internet] {
            let _ = Proc::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn udp(sport: u16, dport: u16, data: &[u8], checksum: impl Fn(&UdpPacket<'_>) -> u16) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + data.len()];
    let mut u = MutableUdpPacket::new(&mut buf).unwrap();
    u.set_source(sport);
    u.set_destination(dport);
    u.set_length(8 + data.len() as u16);
    u.set_payload(data);
    let c = checksum(&u.to_immutable());
    u.set_checksum(c);
    buf
}

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let body = udp(40000, dport, data, |u| udp::ipv4_checksum(u, &src, &dst));
    ip4(src, dst, IpNextHeaderProtocols::Udp, &body)
}

fn udp6(src: Ipv6Addr, dst: Ipv6Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let body = udp(40000, dport, data, |u| udp::ipv6_checksum(u, &src, &dst));
    ip6(src, dst, IpNextHeaderProtocols::Udp, &body)
}

/// The client side: a 1-hop circuit into exitd over UDP, run inside the client namespace.
struct Client {
    socket: UdpSocket,
    circuit: Circuit,
}

impl Client {
    fn connect(hop: PathHop) -> Client {
        Self::connect_with_lcid(hop, 0x5111_0001)
    }

    fn connect_with_lcid(hop: PathHop, lcid: u32) -> Client {
        let socket = UdpSocket::bind("203.0.113.2:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let config = CircuitConfig { handshake_timeout: Duration::from_millis(300), ..CircuitConfig::default() };
        let circuit = Circuit::new(vec![hop], lcid, config, Instant::now(), &mut OsRng).unwrap();
        let mut c = Client { socket, circuit };
        let deadline = Instant::now() + WAIT;
        while !c.circuit.is_open() {
            assert!(Instant::now() < deadline, "circuit to exitd not built");
            c.recv(Duration::from_millis(50));
        }
        c
    }

    fn send(&mut self, cmd: Command, body: &[u8]) {
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..body.len()].copy_from_slice(body);
        let to = self.circuit.seal(1, cmd, body.len(), &mut cell).unwrap();
        self.socket.send_to(&cell, to).unwrap();
    }

    fn recv(&mut self, wait: Duration) -> Option<(Command, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        loop {
            let mut cell = [0u8; CELL_LEN];
            while let Some(to) = self.circuit.poll_transmit(Instant::now(), &mut cell, &mut OsRng) {
                self.socket.send_to(&cell, to).unwrap();
            }
            if Instant::now() >= deadline {
                return None;
            }
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else { continue };
            let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(&mut buf[..n]) else { continue };
            if let Ok(Some(Event::Delivered { cmd, len, .. })) =
                self.circuit.handle_cell(Instant::now(), cell, &mut OsRng)
            {
                return Some((cmd, payload(cell, len).to_vec()));
            }
        }
    }
}

fn metrics(addr: &str) -> HashMap<String, f64> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0.0))))
        .collect()
}

fn exit_count(m: &HashMap<String, f64>, what: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with("exitd_packets_total") && k.contains(&format!("what=\"{what}\"")))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn exit_end_to_end() {
    let lab = Lab::new();
    let dir = std::env::temp_dir().join(format!("exitd-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let keys = relayd::keys::keygen(&dir.join("keys")).unwrap();
    let hop = PathHop {
        keys: RelayKeys { identity: keys.identity.public().0, onion_key: *keys.onion[0].public() },
        addr: "203.0.113.1:9001".parse().unwrap(),
    };
    let config = dir.join("exitd.toml");
    std::fs::write(
        &config,
        "listen = \"203.0.113.1:9001\"\nkey_dir = \"keys\"\nnickname = \"e2e\"\nworkers = 2\npin_workers = false\n\
         [metrics]\nlisten = \"203.0.113.1:9101\"\n[exit]\nwan = \"wan0\"\ntun = \"mvexit0\"\n\
         dns_upstream_v4 = \"198.18.0.2\"\ndns_upstream_v6 = \"2001:db8:1::2\"\n\
         circuit_rate = 200000\ncircuit_burst = 20000\n",
    )
    .unwrap();

    // The internet: a UDP echo server on both families that records who it saw.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let echoes = Arc::new(AtomicUsize::new(0));
    let mut servers = Vec::new();
    for bind in ["198.18.0.2:7", "[2001:db8:1::2]:7", "198.18.0.2:53", "[2001:db8:1::2]:53"] {
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

    for bind in ["198.18.0.2:80", "[2001:db8:1::2]:80"] {
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
    let notify = std::os::unix::net::UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let next_notify = || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).expect("sd_notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut child = lab.exitd(&config);
    let ready = next_notify();
    assert!(ready.contains("READY=1") && ready.contains("out of wan0"), "{ready}");
    assert!(lab.nft_tables().contains("meshvpn_exit"), "READY=1 before the nftables table");

    let client = Lab::run_in(&lab.client, move || {
        let mut c = Client::connect(hop);
        c.send(Command::Attach, &{
            let mut b = [0u8; 64];
            let n = Attach { resume: None }.encode(&mut b).unwrap();
            b[..n].to_vec()
        });
        let (cmd, body) = c.recv(WAIT).expect("no ATTACHED");
        assert_eq!(cmd, Command::Attached);
        let attached = Attached::decode(&body).unwrap();
        let (v4, v6) = (attached.ipv4.0, attached.ipv6.0);
        assert_eq!(attached.dns.0, Ipv4Addr::new(10, 8, 0, 1));

        // UDP over IPv4 and IPv6 to the internet and back.
        let internet4 = Ipv4Addr::new(198, 18, 0, 2);
        let internet6: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
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
        assert!(mss.is_some_and(|m| m <= 1262), "MSS not clamped: {mss:?}");

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
        assert!(mss.is_some_and(|m| m <= 1242), "IPv6 MSS not clamped: {mss:?}");

        // Refused at the exit: denied classes, port 25, a spoofed source, malformed packets.
        for dst in [[10, 1, 2, 3], [169, 254, 169, 254], [127, 0, 0, 1], [100, 64, 0, 1], [224, 0, 0, 1]] {
            c.send(Command::Data, &udp4(v4, dst.into(), 7, b"nope"));
        }
        for dst in ["fd00:ec2::254", "fe80::1", "fd12::1", "ff02::1", "::1"] {
            c.send(Command::Data, &udp6(v6, dst.parse().unwrap(), 7, b"nope"));
        }
        c.send(Command::Data, &udp4(v4, [169, 254, 1, 1].into(), 7, b"nope"));
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
        assert!(c.recv(Duration::from_millis(500)).is_none(), "a refused packet got an answer");

        // Over its limit (200 kB/s, burst 20 kB), the circuit is held to it: 400 packets of
        // 1000 bytes offered over about a second; what passes can never exceed the bucket.
        let start = Instant::now();
        for i in 0..400u32 {
            c.send(Command::Data, &udp4(v4, internet4, 9, &vec![i as u8; 972]));
            std::thread::sleep(Duration::from_micros(2500));
        }
        let elapsed = start.elapsed().as_secs_f64();

        // The path breaks; the client comes back on a new circuit with its session token and
        // gets the same inner addresses.
        let mut again = Client::connect_with_lcid(hop, 0x5111_0002);
        again.send(Command::Attach, &{
            let mut b = [0u8; 64];
            let n = Attach { resume: Some(attached.token) }.encode(&mut b).unwrap();
            b[..n].to_vec()
        });
        let (cmd, body) = again.recv(WAIT).expect("no ATTACHED on resume");
        assert_eq!(cmd, Command::Attached);
        let resumed = Attached::decode(&body).unwrap();
        assert_eq!((resumed.token, resumed.ipv4.0, resumed.ipv6.0), (attached.token, v4, v6));
        again.send(Command::Data, &udp4(v4, internet4, 7, b"after resume"));
        let (_, reply) = again.recv(WAIT).expect("no reply after resume");
        assert_eq!(UdpPacket::new(Ipv4Packet::new(&reply).unwrap().payload()).unwrap().payload(), b"after resume");
        (v4, v6, elapsed)
    })
    .join()
    .expect("client");
    let (_, _, elapsed) = client;

    std::thread::sleep(Duration::from_millis(300));
    let m = Lab::run_in(&lab.client, || metrics("203.0.113.1:9101")).join().unwrap();
    for (what, n) in [
        ("private", 2.0),
        ("cloud_metadata", 2.0),
        ("loopback", 2.0),
        ("link_local", 2.0),
        ("cgnat", 1.0),
        ("multicast", 2.0),
        ("denied_port", 1.0),
        ("spoofed_source", 1.0),
        ("truncated", 1.0),
        ("bad_version", 1.0),
        ("bad_length", 1.0),
        ("dns", 1.0),
    ] {
        assert_eq!(exit_count(&m, what), n, "exitd_packets_total{{what={what}}}: {m:?}");
    }
    // to_tun: 2 UDP, DNS, 2 ICMP, 2 SYN, the packet after resume (its own circuit, its own
    // bucket), and what the rate limit let through of the 400.
    let passed = exit_count(&m, "to_tun") - 8.0;
    let limited = exit_count(&m, "rate_limited");
    assert_eq!(passed + limited, 400.0, "{m:?}");
    let allowed_bytes = 20_000.0 + 200_000.0 * (elapsed + 0.5);
    assert!(passed * 1000.0 <= allowed_bytes, "{passed} packets of 1000 B passed in {elapsed:.2} s: over the limit");
    assert!(limited > 0.0, "nothing was limited");
    assert_eq!(exit_count(&m, "rate_limited_bytes"), limited * 1000.0);
    // The internet saw the two good packets, the DNS query and the packet after resume, from
    // the exit's WAN address. (The rate-limit packets go to port 9, where nothing listens.)
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    let sources: Vec<IpAddr> = seen.iter().map(|(a, _)| a.ip()).collect();
    assert!(sources.contains(&IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))), "{sources:?}");
    assert!(sources.contains(&"2001:db8:1::1".parse().unwrap()), "{sources:?}");

    // SIGHUP with new limits and a new policy: reloaded (the policy is logged as needing a
    // restart), the exit still serves.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}[limits]\ncreate_burst = 7\n[policy]\ndeny_ports = [25, 26]\n")).unwrap();
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(next_notify().contains("RELOADING=1"));
    assert!(next_notify().contains("READY=1"));
    let m = Lab::run_in(&lab.client, || metrics("203.0.113.1:9101")).join().unwrap();
    assert_eq!(m["relayd_config_reloads_total{result=\"ok\"}"], 1.0, "{m:?}");
    std::fs::write(&config, "nonsense").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(next_notify().contains("RELOADING=1"));
    assert!(next_notify().contains("last reload FAILED"));
    let m = Lab::run_in(&lab.client, || metrics("203.0.113.1:9101")).join().unwrap();
    assert_eq!(m["relayd_config_reloads_total{result=\"failed\"}"], 1.0, "{m:?}");
    std::fs::write(&config, text).unwrap();

    // SIGTERM: STOPPING=1, and the table goes away with exitd.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(next_notify().contains("STOPPING=1"));
    let status = wait_exit(&mut child.0);
    assert!(status.success(), "exitd exited with {status}");
    assert!(!lab.nft_tables().contains("meshvpn_exit"), "table left after stop");

    // kill -9 leaves the table behind; the next start replaces it: exactly one copy.
    let mut child = lab.exitd(&config);
    wait_for("the table", || lab.nft_tables().contains("meshvpn_exit"));
    child.0.kill().unwrap();
    let _ = child.0.wait();
    assert!(lab.nft_tables().contains("meshvpn_exit"), "kill -9 cannot clean up: the table must still be there");
    let child = lab.exitd(&config);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(lab.nft_tables().matches("meshvpn_exit").count(), 1, "{}", lab.nft_tables());
    drop(child);
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    let _ = echoes;
    let _ = std::fs::remove_dir_all(&dir);
}

fn icmp_echo4(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    use pnet_packet::icmp::{IcmpPacket, IcmpTypes, echo_request::MutableEchoRequestPacket};
    let mut icmp = vec![0u8; 8 + 16];
    {
        let mut e = MutableEchoRequestPacket::new(&mut icmp).unwrap();
        e.set_icmp_type(IcmpTypes::EchoRequest);
        e.set_identifier(id);
        e.set_sequence_number(seq);
        e.set_payload(b"meshvpn ping 16b");
    }
    let c = pnet_packet::icmp::checksum(&IcmpPacket::new(&icmp).unwrap());
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ip4(src, dst, IpNextHeaderProtocols::Icmp, &icmp)
}

fn icmp_echo6(src: Ipv6Addr, dst: Ipv6Addr, id: u16, seq: u16) -> Vec<u8> {
    use pnet_packet::icmpv6::{Icmpv6Packet, Icmpv6Types, echo_request::MutableEchoRequestPacket};
    let mut icmp = vec![0u8; 8 + 16];
    {
        let mut e = MutableEchoRequestPacket::new(&mut icmp).unwrap();
        e.set_icmpv6_type(Icmpv6Types::EchoRequest);
        e.set_identifier(id);
        e.set_sequence_number(seq);
        e.set_payload(b"meshvpn ping 16b");
    }
    let c = pnet_packet::icmpv6::checksum(&Icmpv6Packet::new(&icmp).unwrap(), &src, &dst);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ip6(src, dst, IpNextHeaderProtocols::Icmpv6, &icmp)
}

/// A TCP SYN (MSS option 1400) from `sport` to `dport`.
fn tcp_syn(sport: u16, dport: u16, checksum: impl Fn(&pnet_packet::tcp::TcpPacket<'_>) -> u16) -> Vec<u8> {
    use pnet_packet::tcp::{MutableTcpPacket, TcpOption};
    let mut tcp = vec![0u8; 24];
    let mut t = MutableTcpPacket::new(&mut tcp).unwrap();
    t.set_source(sport);
    t.set_destination(dport);
    t.set_sequence(1000);
    t.set_data_offset(6);
    t.set_flags(0x02);
    t.set_window(65535);
    t.set_options(&[TcpOption::mss(1400)]);
    let c = checksum(&t.to_immutable());
    t.set_checksum(c);
    tcp
}

fn tcp_syn6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let body = tcp_syn(sport, dport, |t| pnet_packet::tcp::ipv6_checksum(t, &src, &dst));
    ip6(src, dst, IpNextHeaderProtocols::Tcp, &body)
}

fn tcp_syn4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let body = tcp_syn(sport, dport, |t| pnet_packet::tcp::ipv4_checksum(t, &src, &dst));
    ip4(src, dst, IpNextHeaderProtocols::Tcp, &body)
}

fn ip6(src: Ipv6Addr, dst: Ipv6Addr, next: pnet_packet::ip::IpNextHeaderProtocol, body: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 40 + body.len()];
    buf[40..].copy_from_slice(body);
    let mut ip = MutableIpv6Packet::new(&mut buf).unwrap();
    ip.set_version(6);
    ip.set_payload_length(body.len() as u16);
    ip.set_next_header(next);
    ip.set_hop_limit(64);
    ip.set_source(src);
    ip.set_destination(dst);
    buf
}

fn ip4(src: Ipv4Addr, dst: Ipv4Addr, proto: pnet_packet::ip::IpNextHeaderProtocol, body: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + body.len()];
    buf[20..].copy_from_slice(body);
    let total = buf.len() as u16;
    let mut ip = MutableIpv4Packet::new(&mut buf).unwrap();
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length(total);
    ip.set_ttl(64);
    ip.set_next_level_protocol(proto);
    ip.set_source(src);
    ip.set_destination(dst);
    let c = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(c);
    buf
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "exitd did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
