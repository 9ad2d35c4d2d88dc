//! The TUN device against a real kernel. Every test makes its own network namespace
//! (`netns::NetNs`: `mv-tun-<pid>-<n>`, deleted by a drop guard even when the test fails)
//! and runs its body on a thread that joined it with `setns(CLONE_NEWNET)`: the TUN device, the
//! `ip` children that configure it and the test's sockets all live there, so nothing touches the
//! host's interfaces and the tests can run in parallel with the same device name.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2, as in CI; without root each test
//! fails with a message saying so (CI runs as root). Every wait is bounded.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use netns::NetNs;
use pnet_packet::Packet;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{self, Ipv4Flags, Ipv4Packet, MutableIpv4Packet};
use pnet_packet::ipv6::{Ipv6Packet, MutableIpv6Packet};
use pnet_packet::udp::{self, MutableUdpPacket, UdpPacket};
use rand_core::{OsRng, RngCore};
use tundev::{self as tun, PACKET_BUF_LEN, Tun, TunQueue};

/// The MTU exitd gives its device (`exitd::daemon::TUN_MTU`, from `cellproto::cell::TUN_MTU`).
const DEFAULT_MTU: u32 = 1304;

const DEV: &str = "mvexit0";
const WAIT: Duration = Duration::from_secs(5);
const EXIT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const EXIT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);

// ---------------------------------------------------------------------------------------------
// Namespaces

/// A network namespace of the test's own (root only), deleted on drop.
fn namespace() -> NetNs {
    NetNs::new("tun").expect("the TUN tests need a network namespace of their own")
}

/// `ip ARGS` in the calling thread's namespace (inside [`NetNs::run`], the test's).
fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip (is iproute2 installed?)")
}

fn check(output: Output, what: &str) -> Output {
    assert!(output.status.success(), "{what} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn ip_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let output = check(ip(&all), &all.join(" "));
    serde_json::from_slice(&output.stdout).expect("ip -j prints JSON")
}

/// The network namespace of the calling thread, as `net:[inode]`.
fn thread_netns() -> String {
    std::fs::read_link("/proc/thread-self/ns/net").expect("readlink ns/net").to_string_lossy().into_owned()
}

/// A TUN device with two queues, configured with 10.77.0.1/24 and fd77::1/64 at MTU `mtu`.
fn device(mtu: u32) -> (Tun, Vec<TunQueue>) {
    let mut tun = Tun::create(DEV, 2).expect("create the TUN device");
    tun::configure(DEV, mtu, "10.77.0.1/24".parse().unwrap(), "fd77::1/64".parse().unwrap())
        .expect("configure the TUN device");
    let queues = tun.queues();
    (tun, queues)
}

// ---------------------------------------------------------------------------------------------
// Packets

fn udp4(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut buf = vec![0u8; 20 + udp_len];
    {
        let mut udp = MutableUdpPacket::new(&mut buf[20..]).unwrap();
        udp.set_source(from.1);
        udp.set_destination(to.1);
        udp.set_length(udp_len as u16);
        udp.set_payload(payload);
        let checksum = udp::ipv4_checksum(&udp.to_immutable(), &from.0, &to.0);
        udp.set_checksum(checksum);
    }
    let mut ip = MutableIpv4Packet::new(&mut buf).unwrap();
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length((20 + udp_len) as u16);
    ip.set_flags(Ipv4Flags::DontFragment);
    ip.set_ttl(64);
    ip.set_next_level_protocol(IpNextHeaderProtocols::Udp);
    ip.set_source(from.0);
    ip.set_destination(to.0);
    let checksum = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(checksum);
    buf
}

fn udp6(from: (Ipv6Addr, u16), to: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut buf = vec![0u8; 40 + udp_len];
    {
        let mut udp = MutableUdpPacket::new(&mut buf[40..]).unwrap();
        udp.set_source(from.1);
        udp.set_destination(to.1);
        udp.set_length(udp_len as u16);
        udp.set_payload(payload);
        let checksum = udp::ipv6_checksum(&udp.to_immutable(), &from.0, &to.0);
        udp.set_checksum(checksum);
    }
    let mut ip = MutableIpv6Packet::new(&mut buf).unwrap();
    ip.set_version(6);
    ip.set_payload_length(udp_len as u16);
    ip.set_next_header(IpNextHeaderProtocols::Udp);
    ip.set_hop_limit(64);
    ip.set_source(from.0);
    ip.set_destination(to.0);
    buf
}

/// The UDP datagram in an IPv4 or IPv6 packet: (source, destination, payload).
fn parse_udp(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new(packet)?;
            if ip.get_next_level_protocol() != IpNextHeaderProtocols::Udp {
                return None;
            }
            let udp = UdpPacket::new(ip.payload())?;
            let (src, dst) = (ip.get_source(), ip.get_destination());
            assert_eq!(udp.get_checksum(), udp::ipv4_checksum(&udp, &src, &dst), "UDP checksum {packet:02x?}");
            Some((
                SocketAddr::new(src.into(), udp.get_source()),
                SocketAddr::new(dst.into(), udp.get_destination()),
                udp.payload().to_vec(),
            ))
        }
        6 => {
            let ip = Ipv6Packet::new(packet)?;
            if ip.get_next_header() != IpNextHeaderProtocols::Udp {
                return None;
            }
            let udp = UdpPacket::new(ip.payload())?;
            let (src, dst) = (ip.get_source(), ip.get_destination());
            assert_eq!(udp.get_checksum(), udp::ipv6_checksum(&udp, &src, &dst), "UDP checksum");
            Some((
                SocketAddr::new(src.into(), udp.get_source()),
                SocketAddr::new(dst.into(), udp.get_destination()),
                udp.payload().to_vec(),
            ))
        }
        _ => None,
    }
}

/// Reads every queue in batches until a packet satisfies `wanted` (other traffic, such as IPv6
/// multicast listener reports, is skipped); panics after [`WAIT`].
fn read_until(queues: &mut [TunQueue], mut wanted: impl FnMut(&[u8]) -> bool) -> (usize, Vec<u8>) {
    let mut bufs = vec![[0u8; PACKET_BUF_LEN]; 8];
    let mut lens = [0usize; 8];
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        for queue in queues.iter_mut() {
            let n = queue.read_batch(&mut bufs, &mut lens).expect("read_batch");
            for (buf, &len) in bufs.iter().zip(&lens).take(n) {
                assert!(len <= PACKET_BUF_LEN);
                if wanted(&buf[..len]) {
                    return (queue.index(), buf[..len].to_vec());
                }
            }
        }
        thread::sleep(Duration::from_millis(2));
    }
    panic!("no wanted packet on any queue within {WAIT:?}");
}

fn bound(addr: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(addr).expect("bind");
    socket.set_read_timeout(Some(WAIT)).unwrap();
    socket
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn device_is_created_in_the_namespace_configured_and_gone_when_closed() {
    let ns = namespace();
    let host_ns = thread_netns();
    ns.run(|| {
        // The thread is in the test namespace, and so are the children it spawns (how `ip` and
        // `configure` reach the right namespace).
        let here = thread_netns();
        assert_ne!(here, host_ns, "setns did not move the thread");
        let child = check(Command::new("readlink").arg("/proc/self/ns/net").output().unwrap(), "readlink");
        assert_eq!(String::from_utf8_lossy(&child.stdout).trim(), here, "a child runs in its parent thread's netns");

        let mut tun = Tun::create(DEV, 2).expect("create");
        assert_eq!(tun.name(), DEV);
        assert_eq!(tun.queue_count(), 2);
        assert!(!tun.persistent());
        tun::configure(DEV, DEFAULT_MTU, "10.77.0.1/24".parse().unwrap(), "fd77::1/64".parse().unwrap())
            .expect("configure");
        // Idempotent: addresses are replaced, not duplicated.
        tun::configure(DEV, DEFAULT_MTU, "10.77.0.1/24".parse().unwrap(), "fd77::1/64".parse().unwrap())
            .expect("configure again");

        let links = ip_json(&["link", "show", "dev", DEV]);
        let link = &links[0];
        assert_eq!(link["mtu"], 1304, "{link}");
        let state = link["operstate"].as_str().unwrap_or_default();
        assert!(state == "UP" || state == "UNKNOWN", "operstate {state}");
        let flags: Vec<&str> = link["flags"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
        assert!(flags.contains(&"UP"), "flags {flags:?}");

        let addrs = ip_json(&["address", "show", "dev", DEV]);
        let mut found: Vec<String> = addrs[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["scope"] == "global")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        found.sort();
        assert_eq!(found, ["10.77.0.1/24", "fd77::1/64"]);

        let queues = tun.queues();
        assert_eq!(queues.len(), 2);
        assert_eq!(queues.iter().map(TunQueue::index).collect::<Vec<_>>(), [0, 1]);
        assert!(queues.iter().all(|q| q.name() == DEV));
        assert!(tun.queues().is_empty(), "queues are handed out once");

        // Not persistent: it lives while a queue is open and goes when the last one closes.
        drop(tun);
        let mut queues = queues;
        queues.truncate(1);
        assert!(ip(&["link", "show", "dev", DEV]).status.success(), "one open queue keeps the device");
        drop(queues);
        let deadline = Instant::now() + WAIT;
        while ip(&["link", "show", "dev", DEV]).status.success() {
            assert!(Instant::now() < deadline, "the device outlived its last descriptor");
            thread::sleep(Duration::from_millis(10));
        }
    })
    .unwrap();
}

#[test]
fn ipv4_udp_sent_in_the_namespace_is_read_from_a_queue() {
    let ns = namespace();
    ns.run(|| {
        let (_tun, mut queues) = device(DEFAULT_MTU);
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let payload = b"out through the exit v4";
        socket.send_to(payload, (PEER_V4, 9999)).unwrap();
        let port = socket.local_addr().unwrap().port();
        let (_, packet) = read_until(&mut queues, |p| {
            parse_udp(p).is_some_and(|(_, to, _)| to == SocketAddr::new(IpAddr::V4(PEER_V4), 9999))
        });
        let ip = Ipv4Packet::new(&packet).unwrap();
        assert_eq!(ip.get_destination(), PEER_V4);
        assert_eq!(ip.get_source(), EXIT_V4);
        assert_eq!(ip.get_checksum(), ipv4::checksum(&ip));
        let (from, _, data) = parse_udp(&packet).unwrap();
        assert_eq!(from, SocketAddr::new(IpAddr::V4(EXIT_V4), port));
        assert_eq!(data, payload);
        let rx: u64 = queues.iter().map(|q| q.stats().rx_packets).sum();
        assert!(rx >= 1);
    })
    .unwrap();
}

#[test]
fn ipv6_udp_sent_in_the_namespace_is_read_from_a_queue() {
    let ns = namespace();
    ns.run(|| {
        let (_tun, mut queues) = device(DEFAULT_MTU);
        let socket = UdpSocket::bind("[::]:0").unwrap();
        let payload = b"out through the exit v6";
        socket.send_to(payload, (PEER_V6, 9999)).unwrap();
        let port = socket.local_addr().unwrap().port();
        let (_, packet) = read_until(&mut queues, |p| {
            parse_udp(p).is_some_and(|(_, to, _)| to == SocketAddr::new(IpAddr::V6(PEER_V6), 9999))
        });
        let ip = Ipv6Packet::new(&packet).unwrap();
        assert_eq!(ip.get_destination(), PEER_V6);
        assert_eq!(ip.get_source(), EXIT_V6);
        let (from, _, data) = parse_udp(&packet).unwrap();
        assert_eq!(from, SocketAddr::new(IpAddr::V6(EXIT_V6), port));
        assert_eq!(data, payload);
    })
    .unwrap();
}

#[test]
fn crafted_ipv4_udp_written_into_a_queue_reaches_a_socket() {
    let ns = namespace();
    ns.run(|| {
        let (_tun, mut queues) = device(DEFAULT_MTU);
        let socket = bound(SocketAddr::new(IpAddr::V4(EXIT_V4), 0));
        let port = socket.local_addr().unwrap().port();
        let mut buf = [0u8; 2048];

        let packet = udp4((PEER_V4, 5000), (EXIT_V4, port), b"in through the exit v4");
        assert_eq!(queues[0].write(&packet).expect("write"), packet.len());
        let (n, from) = socket.recv_from(&mut buf).expect("the packet reaches the socket");
        assert_eq!(&buf[..n], b"in through the exit v4");
        assert_eq!(from, SocketAddr::new(IpAddr::V4(PEER_V4), 5000));
        assert_eq!(queues[0].stats().tx_packets, 1);

        // A batch through the other queue.
        let batch: Vec<Vec<u8>> = (0..3u8).map(|i| udp4((PEER_V4, 5000), (EXIT_V4, port), &[b'b', b'0' + i])).collect();
        let outcome = queues[1].write_batch(&batch);
        assert_eq!((outcome.written, outcome.failed), (3, 0), "{:?}", outcome.last_error);
        let mut got: Vec<Vec<u8>> = (0..3)
            .map(|_| {
                let n = socket.recv(&mut buf).expect("a batched packet reaches the socket");
                buf[..n].to_vec()
            })
            .collect();
        got.sort();
        assert_eq!(got, [b"b0", b"b1", b"b2"]);
    })
    .unwrap();
}

#[test]
fn crafted_ipv6_udp_written_into_a_queue_reaches_a_socket() {
    let ns = namespace();
    ns.run(|| {
        let (_tun, mut queues) = device(DEFAULT_MTU);
        let socket = bound(SocketAddr::new(IpAddr::V6(EXIT_V6), 0));
        let port = socket.local_addr().unwrap().port();
        let packet = udp6((PEER_V6, 5000), (EXIT_V6, port), b"in through the exit v6");
        assert_eq!(queues[1].write(&packet).expect("write"), packet.len());
        let mut buf = [0u8; 2048];
        let (n, from) = socket.recv_from(&mut buf).expect("the packet reaches the socket");
        assert_eq!(&buf[..n], b"in through the exit v6");
        assert_eq!(from, SocketAddr::new(IpAddr::V6(PEER_V6), 5000));
    })
    .unwrap();
}

#[test]
fn garbage_is_refused_or_dropped_without_panicking() {
    let ns = namespace();
    ns.run(|| {
        let (_tun, mut queues) = device(DEFAULT_MTU);
        let socket = bound(SocketAddr::new(IpAddr::V4(EXIT_V4), 0));
        let port = socket.local_addr().unwrap().port();
        let queue = &mut queues[0];

        let mut refused = 0;
        let mut random = [0u8; 10];
        for _ in 0..100 {
            OsRng.fill_bytes(&mut random);
            // Either outcome is fine: refused (EINVAL for a version nibble other than 4 or 6) or
            // accepted and dropped by the IP stack.
            let result = queue.write(&random);
            refused += u64::from(result.is_err());
            if !matches!(random[0] >> 4, 4 | 6) {
                assert!(result.is_err(), "{random:02x?} was accepted");
            }
        }
        let valid = udp4((PEER_V4, 5000), (EXIT_V4, port), b"x");
        let mut truncated_header = valid.clone();
        truncated_header.truncate(12);
        let mut lying_length = valid.clone();
        lying_length[2..4].copy_from_slice(&4000u16.to_be_bytes());
        let mut bad_checksum = valid.clone();
        bad_checksum[10] ^= 0xff;
        let garbage: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![0x00; 10],
            vec![0xff; 10],
            vec![0x45],
            vec![0x60; 3],
            truncated_header,
            lying_length,
            bad_checksum,
            vec![0x45; 70_000],
        ];
        for packet in &garbage {
            refused += u64::from(queue.write(packet).is_err());
        }
        let outcome = queue.write_batch(&garbage);
        assert_eq!(outcome.written + outcome.failed, garbage.len());
        // At least the empty packet and the version nibbles 0 and 15; the rest the IP stack drops.
        assert!(outcome.failed >= 3, "{outcome:?}");
        assert!(outcome.last_error.is_some());
        refused += outcome.failed as u64;
        assert_eq!(queue.stats().tx_errors, refused);
        assert_eq!(queue.stats().tx_packets + refused, 100 + 2 * garbage.len() as u64);

        // None of it reached the socket, and the device still works.
        assert_eq!(queue.write(&valid).unwrap(), valid.len());
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).expect("a valid packet still gets through");
        assert_eq!(&buf[..n], b"x");

        // Degenerate batches.
        assert_eq!(queue.read_batch(&mut [], &mut []).unwrap(), 0);
        assert_eq!(queue.read_batch(&mut [[0; PACKET_BUF_LEN]; 4], &mut []).unwrap(), 0);
        let none: [&[u8]; 0] = [];
        let outcome = queue.write_batch(none);
        assert_eq!((outcome.written, outcome.failed), (0, 0));
    })
    .unwrap();
}

#[test]
fn packets_larger_than_the_buffer_are_dropped_not_truncated() {
    let ns = namespace();
    ns.run(|| {
        let (_tun, mut queues) = device(4000);
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.send_to(&[7u8; 3000], (PEER_V4, 9999)).unwrap();
        socket.send_to(b"small", (PEER_V4, 9999)).unwrap();
        // The big one is skipped by read_batch (and counted), the small one is read.
        let (_, packet) = read_until(&mut queues, |p| parse_udp(p).is_some_and(|(_, _, data)| data == b"small"));
        assert!(packet.len() < 100);
        let dropped: u64 = queues.iter().map(|q| q.stats().rx_errors).sum();
        assert_eq!(dropped, 1);

        // A single read into a too-small buffer says so.
        socket.send_to(&[7u8; 200], (PEER_V4, 9999)).unwrap();
        let deadline = Instant::now() + WAIT;
        let mut small = [0u8; 100];
        'wait: loop {
            assert!(Instant::now() < deadline, "the packet never came");
            for queue in &mut queues {
                match queue.read(&mut small) {
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => break 'wait,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => {
                        // IPv6 chatter that fits; keep waiting for ours.
                        let _ = other.expect("read");
                    }
                }
            }
            thread::sleep(Duration::from_millis(2));
        }
    })
    .unwrap();
}

#[test]
fn bad_arguments_are_errors() {
    let ns = namespace();
    ns.run(|| {
        assert!(Tun::create("", 1).is_err());
        assert!(Tun::create(DEV, 0).is_err());
        // Configuring a device that does not exist reports ip's complaint.
        let err =
            tun::configure("nosuchdev0", DEFAULT_MTU, "10.9.0.1/24".parse().unwrap(), "fd09::1/64".parse().unwrap())
                .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("ip link set dev nosuchdev0 mtu 1304"), "{message}");
        assert!(message.to_lowercase().contains("nosuchdev0") && message.contains("failed"), "{message}");
        // A template name gets a real one from the kernel.
        let tun = Tun::create("mvx%d", 1).expect("template");
        assert!(tun.name().starts_with("mvx") && !tun.name().contains('%'), "{}", tun.name());
        // Single-queue and multi-queue devices of one name do not mix.
        let _single = Tun::create("mvsingle0", 1).expect("single-queue");
        assert!(Tun::create("mvsingle0", 2).is_err());
    })
    .unwrap();
}
