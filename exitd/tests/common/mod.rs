//! What exitd's namespace tests share: a three-namespace lab, the real `exitd` binary in it, a
//! 1-hop client circuit into it, polling with a deadline, metrics, and packets crafted with pnet.
//!
//! ```text
//!  client ns ──cl0 203.0.113.2 ══ 203.0.113.1 ex0── exit ns ──wan0 198.51.100.1 ══ 198.51.100.2 i0── internet ns
//!                                                 (exitd, TUN, nftables)   2001:db8:1::1 ══ 2001:db8:1::2
//! ```
//!
//! The namespaces are the `netns` crate's (`mv-<tag>-{c,x,i}-<pid>-<n>`: the test binary's pid
//! and a per-process counter), so tests in one binary (threads) and different binaries
//! (processes) never share one. Every wait is bounded.
#![allow(dead_code)] // each test binary uses its own part of the harness

use cellproto::cell::{CELL_LEN, Command, lcid};
use cellproto::client::{Circuit, CircuitConfig, Event, PathHop};
use cellproto::command::{Attach, Attached};
use cellproto::handshake::RelayKeys;
use cellproto::onion::{payload, payload_mut};
use netns::NetNs;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{self, MutableIpv4Packet};
use pnet_packet::ipv6::MutableIpv6Packet;
use pnet_packet::udp::{self, MutableUdpPacket, UdpPacket};
use rand_core::OsRng;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest any single condition is waited for.
pub const WAIT: Duration = Duration::from_secs(10);

/// The exit's address on the client side and its relay port.
pub const EXIT_ADDR: &str = "203.0.113.1:9001";
/// The exit's metrics endpoint (reachable from the client namespace).
pub const METRICS_ADDR: &str = "203.0.113.1:9101";
/// The internet host.
pub const INTERNET4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The internet host's IPv6 address.
pub const INTERNET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The exit's WAN addresses (the source the internet sees after masquerading).
pub const WAN4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The exit's WAN IPv6 address.
pub const WAN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// Runs a command (in the calling thread's namespace), which must succeed.
pub fn cmd(program: &str, args: &[&str]) -> Output {
    let out = std::process::Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

/// A namespace's whole ruleset as `nft -j list ruleset` prints it.
pub fn ruleset(ns: &NetNs) -> serde_json::Value {
    let out = ns.run(|| cmd("nft", &["-j", "list", "ruleset"])).unwrap();
    serde_json::from_slice(&out.stdout).expect("nft -j prints JSON")
}

/// Static IPv6 neighbour entries both ways between `a`'s `a_dev` (addresses `a_addrs`) and
/// `b`'s `b_dev` (addresses `b_addrs`): exitd's input chain drops everything from its TUN
/// device, neighbour discovery included (a real TUN device has none), so a test whose "TUN" is
/// a veth resolves neighbours statically.
pub fn static_neighbours(a: &NetNs, a_dev: &str, a_addrs: &[&str], b: &NetNs, b_dev: &str, b_addrs: &[&str]) {
    let (a_mac, b_mac) = (a.mac(a_dev).unwrap(), b.mac(b_dev).unwrap());
    for addr in b_addrs {
        a.ip(&["neigh", "replace", addr, "lladdr", &b_mac, "dev", a_dev, "nud", "permanent"]).unwrap();
    }
    for addr in a_addrs {
        b.ip(&["neigh", "replace", addr, "lladdr", &a_mac, "dev", b_dev, "nud", "permanent"]).unwrap();
    }
}

/// Polls `ok` every 20 ms until it holds; fails the test naming `what` after [`WAIT`].
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The nftables tests' network: client ─c0══tun0─ router ─wan0══i0─ internet, three
/// namespaces joined by veths (still down, without addresses); the client's "TUN" is a veth.
pub struct RouterLab {
    /// The client namespace.
    pub client: NetNs,
    /// The router (exitd's table is installed here).
    pub router: NetNs,
    /// The internet namespace.
    pub internet: NetNs,
}

impl RouterLab {
    /// Namespaces `mv-<tag>-<pid>-<n>` and the two veth pairs.
    pub fn new(tag: &str) -> RouterLab {
        let lab = RouterLab {
            client: NetNs::new(tag).unwrap(),
            router: NetNs::new(tag).unwrap(),
            internet: NetNs::new(tag).unwrap(),
        };
        lab.router.veth("tun0", &lab.client, "c0").unwrap();
        lab.router.veth("wan0", &lab.internet, "i0").unwrap();
        lab
    }
}

/// Three namespaces joined by veths, deleted on drop (with exitd, should it still run).
pub struct Lab {
    /// The client namespace.
    pub client: NetNs,
    /// The exit namespace (exitd runs here).
    pub exit: NetNs,
    /// The internet namespace.
    pub internet: NetNs,
    /// A directory for this lab's files (keys, config, notify socket), removed on drop.
    pub dir: PathBuf,
}

impl Lab {
    /// A fresh lab (root only): namespaces, veths, addresses, and exit keys in `dir/keys`.
    pub fn new(tag: &str) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the exitd namespace tests need root (netns, TUN, nftables), as CI has"
        );
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(format!("exitd-{tag}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Lab {
            client: NetNs::new(&format!("{tag}-c")).unwrap(),
            exit: NetNs::new(&format!("{tag}-x")).unwrap(),
            internet: NetNs::new(&format!("{tag}-i")).unwrap(),
            dir,
        };
        lab.exit.veth("ex0", &lab.client, "cl0").unwrap();
        lab.exit.veth("wan0", &lab.internet, "i0").unwrap();
        for (ns, dev, v4, v6) in [
            (&lab.client, "cl0", "203.0.113.2/24", "2001:db8:2::2/64"),
            (&lab.exit, "ex0", "203.0.113.1/24", "2001:db8:2::1/64"),
            (&lab.exit, "wan0", "198.51.100.1/24", "2001:db8:1::1/64"),
            (&lab.internet, "i0", "198.51.100.2/24", "2001:db8:1::2/64"),
        ] {
            ns.addr(dev, &[v4, v6]).unwrap();
        }
        relayd::keys::keygen(&lab.dir.join("keys")).unwrap();
        lab
    }

    /// The exit as a 1-hop path.
    pub fn hop(&self) -> PathHop {
        let keys = relayd::keys::load(&self.dir.join("keys")).unwrap();
        PathHop {
            keys: RelayKeys { identity: keys.identity.public().0, onion_key: *keys.onion[0].public() },
            addr: EXIT_ADDR.parse().unwrap(),
        }
    }

    /// Writes `exitd.toml`: listen and metrics on the client side, WAN `wan0`, DNS upstreams on
    /// the internet host, then `extra` (more `[exit]` keys, then other tables).
    pub fn write_config(&self, workers: usize, extra: &str) -> PathBuf {
        let config = self.dir.join("exitd.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{EXIT_ADDR}\"\nkey_dir = \"keys\"\nnickname = \"nstest\"\nworkers = {workers}\n\
                 pin_workers = false\n[metrics]\nlisten = \"{METRICS_ADDR}\"\n[exit]\nwan = \"wan0\"\n\
                 tun = \"mvexit0\"\ndns_upstream_v4 = \"{INTERNET4}\"\ndns_upstream_v6 = \"{INTERNET6}\"\n{extra}"
            ),
        )
        .unwrap();
        config
    }

    /// Runs `f` on a thread inside namespace `ns` (its sockets live there).
    pub fn run_in<T: Send + 'static>(ns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        ns.thread("lab", f).unwrap()
    }

    /// Starts `exitd run --config CONFIG` in the exit namespace, with `NOTIFY_SOCKET` next to it.
    pub fn exitd(&self, config: &Path) -> Exitd {
        let child = self
            .exit
            .spawn(
                self.exit
                    .command(env!("CARGO_BIN_EXE_exitd"))
                    .args(["run", "--config"])
                    .arg(config)
                    .env("NOTIFY_SOCKET", self.notify_path()),
            )
            .expect("start exitd");
        Exitd(child)
    }

    /// Where exitd sends its sd_notify messages.
    pub fn notify_path(&self) -> PathBuf {
        self.dir.join("notify.sock")
    }

    /// A bound systemd notification socket for the next `exitd` (bind before starting it).
    pub fn notify_socket(&self) -> Notify {
        let _ = std::fs::remove_file(self.notify_path());
        let socket = std::os::unix::net::UnixDatagram::bind(self.notify_path()).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        Notify(socket)
    }

    /// `nft ARGS` in the exit namespace; its standard output.
    pub fn nft(&self, args: &[&str]) -> String {
        let out = self.exit.command("nft").args(args).output().expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The exit's metrics, read from the client namespace.
    pub fn metrics(&self) -> HashMap<String, f64> {
        Lab::run_in(&self.client, || metrics(METRICS_ADDR)).join().unwrap()
    }

    /// The exit's metrics once `ready` holds for them, polled every 50 ms, or the last ones
    /// read when [`WAIT`] has passed (the caller's assertions then say what is missing).
    pub fn metrics_when(&self, ready: impl Fn(&HashMap<String, f64>) -> bool) -> HashMap<String, f64> {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.metrics();
            if ready(&m) || Instant::now() >= deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The namespaces (fields) are deleted after this.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The exitd process, killed if the test ends (or fails) while it still runs.
pub struct Exitd(pub Child);

impl Exitd {
    /// Waits (bounded) for exitd to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "exitd did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to exitd.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }
}

impl Drop for Exitd {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// systemd's notification socket as a test sees it.
pub struct Notify(std::os::unix::net::UnixDatagram);

impl Notify {
    /// The next message (bounded wait).
    pub fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.0.recv(&mut buf).expect("sd_notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Waits for READY=1 and returns its message.
    pub fn ready(&self) -> String {
        loop {
            let m = self.next();
            if m.contains("READY=1") {
                return m;
            }
        }
    }
}

/// The client side: a 1-hop circuit into exitd over UDP, run inside the client namespace.
pub struct Client {
    socket: UdpSocket,
    /// The circuit.
    pub circuit: Circuit,
    /// The exit's LCID for this circuit (on cells we send); `lcid % workers` is its worker.
    pub exit_lcid: Option<u32>,
}

impl Client {
    /// Builds a 1-hop circuit whose cells to us carry `lcid`.
    pub fn connect(hop: PathHop, lcid: u32) -> Client {
        let socket = UdpSocket::bind("203.0.113.2:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let config = CircuitConfig { handshake_timeout: Duration::from_millis(300), ..CircuitConfig::default() };
        let circuit = Circuit::new(vec![hop], lcid, config, Instant::now(), &mut OsRng).unwrap();
        let mut c = Client { socket, circuit, exit_lcid: None };
        let deadline = Instant::now() + WAIT;
        while !c.circuit.is_open() {
            assert!(Instant::now() < deadline, "circuit to exitd not built");
            c.recv(Duration::from_millis(20));
        }
        c
    }

    /// Seals `body` as `cmd` to the exit and sends it.
    pub fn send(&mut self, cmd: Command, body: &[u8]) {
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..body.len()].copy_from_slice(body);
        let to = self.circuit.seal(1, cmd, body.len(), &mut cell).unwrap();
        self.exit_lcid = Some(lcid(&cell));
        self.socket.send_to(&cell, to).unwrap();
    }

    /// Sends ATTACH (resuming `resume` if given).
    pub fn send_attach(&mut self, resume: Option<[u8; 32]>) {
        let mut b = [0u8; 64];
        let n = Attach { resume }.encode(&mut b).unwrap();
        self.send(Command::Attach, &b[..n]);
    }

    /// Sends ATTACH and waits up to `wait` for ATTACHED.
    pub fn attach(&mut self, resume: Option<[u8; 32]>, wait: Duration) -> Option<Attached> {
        self.send_attach(resume);
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some((Command::Attached, body)) => return Some(Attached::decode(&body).expect("ATTACHED decodes")),
                Some(_) => continue,
                None => return None,
            }
        }
        None
    }

    /// Closes the circuit: a DESTROY to the exit, which ends the circuit (its session detaches).
    pub fn close(&mut self) {
        let mut cell = [0u8; CELL_LEN];
        if let Some(to) = self.circuit.close(&mut cell, &mut OsRng) {
            self.socket.send_to(&cell, to).unwrap();
        }
    }

    /// The next command delivered to us within `wait`, with its body.
    pub fn recv(&mut self, wait: Duration) -> Option<(Command, Vec<u8>)> {
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

    /// The next DATA packet within `wait`.
    pub fn recv_data(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some((Command::Data, p)) => return Some(p),
                Some(_) => continue,
                None => return None,
            }
        }
        None
    }
}

/// Reads `/metrics` at `addr` (from the calling thread's namespace).
pub fn metrics(addr: &str) -> HashMap<String, f64> {
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

/// `exitd_packets_total{what=WHAT}` summed over workers.
pub fn exit_count(m: &HashMap<String, f64>, what: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with("exitd_packets_total") && k.contains(&format!("what=\"{what}\"")))
        .map(|(_, v)| v)
        .sum()
}

/// `exitd_packets_total{worker=W,what=WHAT}`.
pub fn worker_count(m: &HashMap<String, f64>, worker: usize, what: &str) -> f64 {
    m.get(&format!("exitd_packets_total{{worker=\"{worker}\",what=\"{what}\"}}")).copied().unwrap_or(0.0)
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

/// UDP/IPv4 from port 40000.
pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    udp4_from(src, 40000, dst, dport, data)
}

/// UDP/IPv4 from `sport`.
pub fn udp4_from(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let body = udp(sport, dport, data, |u| udp::ipv4_checksum(u, &src, &dst));
    ip4(src, dst, IpNextHeaderProtocols::Udp, &body)
}

/// UDP/IPv6 from port 40000.
pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let body = udp(40000, dport, data, |u| udp::ipv6_checksum(u, &src, &dst));
    ip6(src, dst, IpNextHeaderProtocols::Udp, &body)
}

/// A TCP segment over IPv4 (no options): `flags` as in the header (0x10 ACK, 0x02 SYN, ...).
#[allow(clippy::too_many_arguments)]
pub fn tcp4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    data: &[u8],
) -> Vec<u8> {
    use pnet_packet::tcp::MutableTcpPacket;
    let mut tcp = vec![0u8; 20 + data.len()];
    let mut t = MutableTcpPacket::new(&mut tcp).unwrap();
    t.set_source(sport);
    t.set_destination(dport);
    t.set_sequence(seq);
    t.set_acknowledgement(ack);
    t.set_data_offset(5);
    t.set_flags(flags);
    t.set_window(65535);
    t.set_payload(data);
    let c = pnet_packet::tcp::ipv4_checksum(&t.to_immutable(), &src, &dst);
    t.set_checksum(c);
    ip4(src, dst, IpNextHeaderProtocols::Tcp, &tcp)
}

/// An ICMP echo request.
pub fn icmp_echo4(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
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

/// An ICMPv6 echo request.
pub fn icmp_echo6(src: Ipv6Addr, dst: Ipv6Addr, id: u16, seq: u16) -> Vec<u8> {
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

/// A TCP SYN over IPv6.
pub fn tcp_syn6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let body = tcp_syn(sport, dport, |t| pnet_packet::tcp::ipv6_checksum(t, &src, &dst));
    ip6(src, dst, IpNextHeaderProtocols::Tcp, &body)
}

/// A TCP SYN over IPv4.
pub fn tcp_syn4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let body = tcp_syn(sport, dport, |t| pnet_packet::tcp::ipv4_checksum(t, &src, &dst));
    ip4(src, dst, IpNextHeaderProtocols::Tcp, &body)
}

/// An IPv6 header before `body`.
pub fn ip6(src: Ipv6Addr, dst: Ipv6Addr, next: pnet_packet::ip::IpNextHeaderProtocol, body: &[u8]) -> Vec<u8> {
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

/// An IPv4 header (with checksum) before `body`.
pub fn ip4(src: Ipv4Addr, dst: Ipv4Addr, proto: pnet_packet::ip::IpNextHeaderProtocol, body: &[u8]) -> Vec<u8> {
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

/// UDP/IPv6 from port 40000 behind `headers` destination-options headers (8 bytes each, PadN).
pub fn udp6_behind_options(src: Ipv6Addr, dst: Ipv6Addr, headers: usize, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for i in 0..headers {
        let next = if i + 1 == headers { 17 } else { 60 };
        body.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    body.extend_from_slice(&udp(40000, dport, data, |u| udp::ipv6_checksum(u, &src, &dst)));
    let next = if headers == 0 { 17 } else { 60 };
    ip6(src, dst, pnet_packet::ip::IpNextHeaderProtocol(next), &body)
}
