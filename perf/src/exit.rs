//! `perf exit`: exitd's round trip, against plain kernel routing of the same packets, in one run.
//!
//! The lab is three network namespaces made for the run (as exitd's end-to-end test does) and
//! always deleted afterwards, also on error:
//!
//! ```text
//!  client ns ──cl0 203.0.113.2 ══ 203.0.113.1 ex0── exit ns ──wan0 198.18.0.1 ══ 198.18.0.2 i0── internet ns
//!  (load generator: threads                       (exitd: `perf exit-child`,     (UDP echo server on port 7:
//!   of this process)                               TUN, nftables NAT)             a thread of this process)
//! ```
//!
//! 1. **plain routing**: the load generator sends the UDP packets straight to the echo server;
//!    the exit namespace is a plain router (`ip_forward` on, no nftables, no exitd). What the
//!    kernel alone does for the same packets over the same veths: the baseline.
//! 2. **exitd**: exitd's engine runs in the exit namespace (`perf exit-child`, i.e.
//!    `exitd::daemon::run`, or `--exitd PATH run`). The load generator builds `--circuits`
//!    1-hop circuits to it, ATTACHes each (an inner address each: its own flow), and sends the
//!    same packets as crafted IPv4/UDP packets (valid checksums) in DATA cells from the inner
//!    addresses: exitd opens each cell, checks it (anti-spoofing, policy, rate limits), writes
//!    the packet to its TUN; the kernel forwards it with NAT out of `wan0` to the echo server;
//!    the echo comes back through conntrack to the TUN, and exitd seals it as DATA back down
//!    the circuit.
//!
//! relayd's `[bench] null_forwarder` is no baseline here: it skips the cryptography only for
//! cells it relays to a next hop; on a 1-hop circuit every cell is for the exit itself, which
//! has to open it to get the packet (`null_forward` hands those to the normal path).
//!
//! Both runs share the load generator: packets prepared (and, for exitd, sealed) ahead in rounds
//! of `--pool`, sent with `sendmmsg` in bursts of 64 round-robin over the circuits within an
//! in-flight window (perf relay's: halved after a 100 ms stall, grown back), and counted as they
//! come back by a receiver thread, which takes one packet in 16 for latency (it opens that
//! cell; its UDP payload starts with the packet's sequence number; latency is arrival minus the
//! time its burst was handed to the kernel). exitd's CPU time is read from `/proc/PID/stat`
//! around each round's blast; its metrics, its TUN's drop counters and the sockets' drop
//! counters (`/proc/.../net/udp`) say where lost packets went. Every wait is bounded.

use crate::loadgen::{BURST, Sender, Window, build_circuits};
use crate::sys::{self, ChildGuard};
use anyhow::{Context, Result, anyhow, bail};
use cellproto::cell::{CELL_LEN, Command, TUN_MTU, lcid};
use cellproto::client::{Circuit, Event, PathHop};
use cellproto::command::{Attach, Attached};
use cellproto::handshake::RelayKeys;
use cellproto::onion::{payload, payload_mut};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{self as sock, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, sockopt};
use pnet_packet::Packet;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{self, Ipv4Packet, MutableIpv4Packet};
use pnet_packet::udp::{self, MutableUdpPacket, UdpPacket};
use rand_core::OsRng;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{IoSlice, IoSliceMut, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The client's address (client namespace).
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The exit's address on the client side: exitd listens here (exit namespace).
const EXIT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The exit's WAN address (exit namespace): exitd's NAT source, the plain route's next hop.
const EXIT_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The echo server (internet namespace).
const ECHO: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ECHO_PORT: u16 = 7;
const EXIT_PORT: u16 = 9001;
const METRICS_PORT: u16 = 9101;
/// exitd's TUN device (in the exit namespace, so no clash with anything on the host).
const TUN: &str = "mvexit0";
/// UDP source port of circuit `c`'s packets: `SPORT + c`.
const SPORT: u16 = 40000;
/// IPv4 + UDP headers.
const HEADERS: usize = 28;
/// The sequence number of readiness probes (never a packet of the blast).
const PROBE: u64 = u64::MAX;
/// Single round trips measured before the blast, and their sequence numbers (`PING + i`).
const PINGS: u64 = 500;
const PING: u64 = u64::MAX - 1_000_000;
/// A ping not back within this long is lost (left out).
const PING_WAIT: Duration = Duration::from_millis(200);
/// One packet in this many is taken for a latency sample.
const SAMPLE_EVERY: u64 = 16;
/// Sending stops after this long in all.
const SEND_LIMIT: Duration = Duration::from_secs(60);
/// A round ends (for the CPU reading) once nothing arrived for this long.
const QUIET_ROUND: Duration = Duration::from_millis(100);
/// The last packets are waited for until nothing arrived for this long.
const QUIET_FINAL: Duration = Duration::from_secs(2);
/// exitd must answer STUN, build the circuits, ATTACH them and echo a probe within this long.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// Socket buffers of the client and echo sockets.
const SOCKET_BUFFER: usize = 32 << 20;
/// Datagrams per `recvmmsg` of the echo server.
const ECHO_BATCH: usize = 64;

/// `perf exit` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ExitArgs {
    /// Packets per run, each a round trip (sent, echoed, received).
    #[arg(long, default_value_t = 200_000)]
    pub packets: u64,
    /// Bytes per IP packet (IPv4 + UDP headers + payload): 36 up to the TUN MTU, 1304.
    #[arg(long, default_value_t = 1200)]
    pub size: usize,
    /// exitd worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Circuits (1 hop each), each ATTACHed: its own inner address, so its own flow.
    #[arg(long, default_value_t = 4)]
    pub circuits: usize,
    /// In-flight window: packets sent and not yet back (halved after a stall, down to 128).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Packets prepared (sealed) ahead per round.
    #[arg(long, default_value_t = 1 << 17)]
    pub pool: usize,
    /// Do not pin exitd's workers to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Run this exitd binary (`exitd run --config`) instead of exitd's engine in a
    /// `perf exit-child` process.
    #[arg(long)]
    pub exitd: Option<PathBuf>,
    /// End with one line of JSON.
    #[arg(long)]
    pub json: bool,
}

/// One run's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExitReport {
    /// Which run.
    pub name: String,
    /// Round trips per second (packets back / time from first send to last arrival).
    pub packets_per_s: f64,
    /// `packets_per_s` × packet size × 8 / 1e9: IP packet bytes, each way.
    pub gbps: f64,
    /// Round-trip latency, sampled, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest sample, µs.
    pub max_us: f64,
    /// Latency samples.
    pub samples: u64,
    /// Round-trip latency of single packets, one in flight at a time (before the blast), µs.
    pub idle_p50_us: f64,
    /// 99th percentile of those, µs.
    pub idle_p99_us: f64,
    /// Single round trips measured (of `PINGS`; a lost one is left out).
    pub pings: u64,
    /// Packets sent.
    pub sent: u64,
    /// Packets that came back.
    pub received: u64,
    /// sent − received.
    pub losses: u64,
    /// losses / sent.
    pub loss_ratio: f64,
    /// Measured seconds (sum over rounds).
    pub blast_secs: f64,
    /// Rounds of preparing and sending.
    pub rounds: u32,
    /// exitd process CPU µs per round trip (exitd run only).
    pub exitd_cpu_us_per_packet: Option<f64>,
    /// Of that, in user space (opening and sealing cells, exitd's own logic).
    pub exitd_user_us_per_packet: Option<f64>,
    /// Of that, in the kernel on exitd's behalf: its UDP and TUN system calls, and what the
    /// kernel does within them (a TUN write carries the packet on through NAT and the veth to
    /// the echo server's socket; a UDP send, through the veth to the client's socket).
    pub exitd_sys_us_per_packet: Option<f64>,
    /// Cores exitd used on average during the blasts.
    pub exitd_cores: Option<f64>,
    /// exitd's cores by thread name.
    pub exitd_threads: BTreeMap<String, f64>,
    /// Cores this process used (load generator and echo server).
    pub harness_cores: f64,
    /// Cores in soft interrupts (the network stack, accounted to no process).
    pub softirq_cores: f64,
    /// Cores busy with anything else.
    pub other_cores: f64,
    /// Datagrams the kernel dropped at the client's socket.
    pub client_socket_drops: u64,
    /// Datagrams the kernel dropped at the echo server's socket.
    pub echo_socket_drops: u64,
    /// Datagrams the kernel dropped at exitd's socket(s).
    pub exitd_socket_drops: Option<u64>,
    /// `exitd_packets_total` by outcome (to_tun, from_tun, handed_off, drops by reason).
    pub exitd_packets: Option<BTreeMap<String, u64>>,
    /// `relayd_drops_total` by reason.
    pub relay_drops: Option<BTreeMap<String, u64>>,
    /// Packets the kernel dropped queueing them for exitd on its TUN (TUN tx dropped).
    pub tun_to_exitd_drops: Option<u64>,
    /// Packets exitd wrote to its TUN that the kernel dropped (TUN rx dropped).
    pub tun_from_exitd_drops: Option<u64>,
    /// Times the window stalled (packets written off).
    pub stalls: u64,
    /// Sampled packets that came back wrong (cell not opened, wrong addresses or payload).
    pub bad: u64,
    /// Seconds to get ready: STUN, circuits, ATTACH (exitd run).
    pub build_secs: f64,
    /// Seconds spent preparing and sealing packets (outside the measured intervals).
    pub seal_secs: f64,
    /// exitd's data path ("io_uring", "recvmmsg").
    pub datapath: String,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `ip` with `args`; fails with its error output.
fn ip(args: &[&str]) -> Result<()> {
    let out = Proc::new("ip").args(args).output().context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `f` on a new thread inside network namespace `ns` (sockets it opens live there).
fn in_ns<T: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let path = format!("/run/netns/{ns}");
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let fd = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
            setns(fd, CloneFlags::CLONE_NEWNET).with_context(|| format!("cannot enter {path}"))?;
            f()
        })
        .context("cannot start a thread")
}

/// [`in_ns`] and wait for the result.
fn in_ns_wait<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    in_ns(ns, "perf-ns", f)?.join().map_err(|_| anyhow!("thread panicked"))?
}

/// The three namespaces and their veths; deleted when dropped.
struct Lab {
    client: String,
    exit: String,
    internet: String,
}

impl Lab {
    fn new() -> Result<Lab> {
        remove_stale_labs();
        let id = std::process::id();
        let lab = Lab {
            client: format!("mvperf-c-{id}"),
            exit: format!("mvperf-x-{id}"),
            internet: format!("mvperf-i-{id}"),
        };
        for ns in [&lab.client, &lab.exit, &lab.internet] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &lab.exit, "link", "add", "ex0", "type", "veth", "peer", "name", "cl0", "netns", &lab.client])?;
        ip(&["-n", &lab.exit, "link", "add", "wan0", "type", "veth", "peer", "name", "i0", "netns", &lab.internet])?;
        for (ns, dev, addr) in [
            (&lab.client, "cl0", "203.0.113.2/24"),
            (&lab.exit, "ex0", "203.0.113.1/24"),
            (&lab.exit, "wan0", "198.18.0.1/24"),
            (&lab.internet, "i0", "198.18.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        // The plain route: client → exit namespace → internet and back, no NAT.
        ip(&["-n", &lab.client, "route", "add", "198.18.0.0/24", "via", &EXIT.to_string()])?;
        ip(&["-n", &lab.internet, "route", "add", "203.0.113.0/24", "via", &EXIT_WAN.to_string()])?;
        // /proc/sys/net is the opening thread's namespace's.
        in_ns_wait(&lab.exit, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("cannot enable forwarding in the exit ns")
        })?;
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.exit, &self.internet] {
            let _ = Proc::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Deletes namespaces an earlier `perf exit` left behind when it was killed (its pid is gone).
fn remove_stale_labs() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = ["mvperf-c-", "mvperf-x-", "mvperf-i-"].iter().find_map(|p| name.strip_prefix(p)) else {
            continue;
        };
        // Gone, or a zombie not reaped yet (state Z, the field after the command name).
        let alive = pid.parse::<u32>().is_ok()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|t| t.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')));
        if !alive {
            let _ = Proc::new("ip").args(["netns", "del", &name]).output();
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("meshvpn-perf-exit-{pid}")));
        }
    }
}

/// The UDP echo server: a thread in the internet namespace, stopped and joined when dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Echo {
    fn start(ns: &str) -> Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let handle = in_ns(ns, "echo", move || {
            let socket = match UdpSocket::bind((ECHO, ECHO_PORT)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    bail!("cannot bind the echo server: {e}");
                }
            };
            sys::deep_buffers(&socket, SOCKET_BUFFER);
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            let _ = tx.send(Ok(()));
            echo_loop(&socket, &flag)
        })?;
        let echo = Echo { stop, handle: Some(handle) };
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(echo),
            Ok(Err(e)) => bail!("echo server: {e}"),
            Err(_) => bail!("the echo server did not start"),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends every datagram back to where it came from, up to 64 per `recvmmsg`/`sendmmsg`.
fn echo_loop(socket: &UdpSocket, stop: &AtomicBool) -> Result<()> {
    let fd = socket.as_raw_fd();
    let mut bufs = vec![[0u8; 2048]; ECHO_BATCH];
    // IPv4 senders only, so reusing the headers (and their address lengths) is safe.
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(ECHO_BATCH, None);
    while !stop.load(Ordering::Relaxed) {
        let got: Vec<(usize, SockaddrStorage)> = {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
            match sock::recvmmsg(fd, &mut headers, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(msgs) => msgs.filter_map(|m| Some((m.bytes, m.address?))).collect(),
                Err(_) => continue,
            }
        };
        let slices: Vec<[IoSlice<'_>; 1]> = got.iter().zip(&bufs).map(|((n, _), b)| [IoSlice::new(&b[..*n])]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = got.iter().map(|(_, a)| Some(*a)).collect();
        let mut done = 0;
        let mut retries = 0;
        while done < slices.len() {
            let mut out = MultiHeaders::<SockaddrStorage>::preallocate(slices.len() - done, None);
            match sock::sendmmsg(fd, &mut out, &slices[done..], &addrs[done..], [], MsgFlags::empty()) {
                Ok(sent) => done += sent.count(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) if retries < 100 => {
                    retries += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => break,
            }
        }
    }
    Ok(())
}

/// Writes an IPv4/UDP packet of `buf.len()` bytes from `src:sport` to the echo server, whose
/// payload is `seq` (8 bytes, big endian) and then 0xA5; checksums computed.
fn write_packet(buf: &mut [u8], src: Ipv4Addr, sport: u16, seq: u64) -> Result<()> {
    let total = buf.len();
    // The buffer is reused: no field may keep an old value (TOS, identification, fragment bits).
    buf[..HEADERS].fill(0);
    buf[HEADERS..HEADERS + 8].copy_from_slice(&seq.to_be_bytes());
    buf[HEADERS + 8..].fill(0xA5);
    {
        let mut u = MutableUdpPacket::new(&mut buf[20..]).ok_or_else(|| anyhow!("packet too short"))?;
        u.set_source(sport);
        u.set_destination(ECHO_PORT);
        u.set_length((total - 20) as u16);
        u.set_checksum(0);
        let c = udp::ipv4_checksum(&u.to_immutable(), &src, &ECHO);
        u.set_checksum(c);
    }
    let mut ip = MutableIpv4Packet::new(buf).ok_or_else(|| anyhow!("packet too short"))?;
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length(total as u16);
    ip.set_ttl(64);
    ip.set_flags(ipv4::Ipv4Flags::DontFragment);
    ip.set_next_level_protocol(IpNextHeaderProtocols::Udp);
    ip.set_source(src);
    ip.set_destination(ECHO);
    ip.set_checksum(0);
    let c = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(c);
    Ok(())
}

/// The sequence number of an echoed packet to `dst`, if it is one.
fn echoed_seq(packet: &[u8], dst: Ipv4Addr) -> Option<u64> {
    let ip = Ipv4Packet::new(packet)?;
    if ip.get_source() != ECHO
        || ip.get_destination() != dst
        || ip.get_next_level_protocol() != IpNextHeaderProtocols::Udp
    {
        return None;
    }
    let udp = UdpPacket::new(ip.payload())?;
    if udp.get_source() != ECHO_PORT {
        return None;
    }
    Some(u64::from_be_bytes(udp.payload().get(..8)?.try_into().ok()?))
}

/// How the load generator's packets travel.
enum Wire {
    /// UDP payloads on a socket connected to the echo server (the kernel adds the headers).
    Plain { payload_len: usize },
    /// Whole IP packets in DATA cells on 1-hop circuits to exitd, circuit `k % n` for packet `k`.
    Exit { circuits: Mutex<Vec<Circuit>>, index: HashMap<u32, usize>, inner: Vec<Ipv4Addr>, size: usize },
}

/// What a received datagram was.
enum Arrival {
    /// Not one of ours.
    Foreign,
    /// An echo, not looked into.
    Counted,
    /// An echo of lane (circuit) `.0` with sequence number `.1`.
    Sample(usize, u64),
    /// Taken for a sample and wrong.
    Bad,
}

impl Wire {
    fn lanes(&self) -> usize {
        match self {
            Wire::Plain { .. } => 1,
            Wire::Exit { inner, .. } => inner.len(),
        }
    }

    fn datagram_len(&self) -> usize {
        match self {
            Wire::Plain { payload_len } => *payload_len,
            Wire::Exit { .. } => CELL_LEN,
        }
    }

    /// Writes packet `seq` of lane `lane` into `out`: for exitd, a cell sealed on `circuit`
    /// (lane `lane`'s circuit).
    fn prepare(&self, circuit: Option<&mut Circuit>, lane: usize, seq: u64, out: &mut [u8]) -> Result<()> {
        match (self, circuit) {
            (Wire::Plain { .. }, _) => {
                out[..8].copy_from_slice(&seq.to_be_bytes());
                Ok(())
            }
            (Wire::Exit { inner, size, .. }, Some(circuit)) => {
                let cell: &mut [u8; CELL_LEN] = out.try_into().map_err(|_| anyhow!("cell size"))?;
                write_packet(&mut payload_mut(cell)[..*size], inner[lane], SPORT + lane as u16, seq)?;
                circuit.seal_data(*size, cell).map_err(|e| anyhow!("cannot seal: {e}"))?;
                Ok(())
            }
            (Wire::Exit { .. }, None) => bail!("no circuit for lane {lane}"),
        }
    }

    /// Prepares packets `base .. base + count` of a round: packet `base + k` into row `k / n` of
    /// `pools[k % n]` (`base` is a multiple of n). Circuits are sealed in parallel.
    fn fill(&self, pools: &mut [Vec<u8>], base: u64, count: usize) -> Result<()> {
        let dlen = self.datagram_len();
        let n = self.lanes();
        let Wire::Exit { circuits, .. } = self else {
            for (k, slot) in pools[0].chunks_exact_mut(dlen).take(count).enumerate() {
                self.prepare(None, 0, base + k as u64, slot)?;
            }
            return Ok(());
        };
        let mut circuits = circuits.lock().map_err(|_| anyhow!("poisoned"))?;
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
        let per = n.div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = circuits
                .chunks_mut(per)
                .zip(pools.chunks_mut(per))
                .enumerate()
                .map(|(t, (circs, pools))| {
                    s.spawn(move || -> Result<()> {
                        for (j, pool) in pools.iter_mut().enumerate() {
                            let c = t * per + j;
                            for (r, slot) in pool.chunks_exact_mut(dlen).enumerate() {
                                let k = r * n + c;
                                if k >= count {
                                    break;
                                }
                                // `circs` is this thread's slice: lane c is its j-th circuit.
                                self.prepare(circs.get_mut(j), c, base + k as u64, slot)?;
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow!("sealing thread panicked"))?)
        })
    }

    /// Classifies a received datagram; with `sample`, looks inside (opens the cell).
    fn arrival(&self, data: &mut [u8], sample: bool) -> Arrival {
        match self {
            Wire::Plain { payload_len } => {
                if data.len() != *payload_len {
                    return Arrival::Bad;
                }
                if !sample {
                    return Arrival::Counted;
                }
                Arrival::Sample(0, u64::from_be_bytes(data[..8].try_into().unwrap_or_default()))
            }
            Wire::Exit { circuits, index, inner, .. } => {
                let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(data) else { return Arrival::Foreign };
                let Some(&c) = index.get(&lcid(cell)) else { return Arrival::Foreign };
                if !sample {
                    return Arrival::Counted;
                }
                let Ok(mut circuits) = circuits.lock() else { return Arrival::Bad };
                match circuits[c].handle_cell(Instant::now(), cell, &mut OsRng) {
                    Ok(Some(Event::Delivered { cmd: Command::Data, len, .. })) => {
                        match echoed_seq(payload(cell, len), inner[c]) {
                            Some(seq) => Arrival::Sample(c, seq),
                            None => Arrival::Bad,
                        }
                    }
                    _ => Arrival::Bad,
                }
            }
        }
    }
}

/// The datagram of packet `k` of a round.
fn datagram_at(pools: &[Vec<u8>], n: usize, dlen: usize, k: usize) -> &[u8] {
    let r = k / n;
    &pools[k % n][r * dlen..(r + 1) * dlen]
}

/// State shared by the sender and the receiver.
struct Shared {
    epoch: Instant,
    received: AtomicU64,
    last_arrival_ns: AtomicU64,
    /// Send time (ns since `epoch`) of each packet, by sequence number.
    send_ns: Vec<AtomicU64>,
    stop: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// What the load generator measured.
#[derive(Debug, Default)]
struct DriveResult {
    sent: u64,
    received: u64,
    received_measured: u64,
    blast_secs: f64,
    rounds: u32,
    latencies_ns: Vec<u64>,
    pings_ns: Vec<u64>,
    bad: u64,
    stalls: u64,
    build_secs: f64,
    seal_secs: f64,
    exitd_user: f64,
    exitd_sys: f64,
    exitd_threads: BTreeMap<String, f64>,
    harness_cpu: f64,
    busy: f64,
    softirq: f64,
    client_socket_drops: u64,
}

/// Where the load generator sends.
enum Route {
    Plain,
    Exit { hop: PathHop, circuits: usize, pid: u32 },
}

struct DriveSpec {
    route: Route,
    packets: u64,
    size: usize,
    window: usize,
    pool: usize,
    abort: Arc<AtomicBool>,
}

fn check_abort(abort: &AtomicBool) -> Result<()> {
    if abort.load(Ordering::Relaxed) {
        bail!("aborted");
    }
    Ok(())
}

/// Waits until exitd answers a STUN Binding request (its data path is up).
fn wait_stun(socket: &UdpSocket, abort: &AtomicBool) -> Result<()> {
    let mut req = [0u8; 64];
    let n = cellproto::stun::Message::binding_request(*b"perf-exit-up")
        .encode(&mut req, true)
        .map_err(|e| anyhow!("cannot encode STUN request: {e}"))?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let deadline = Instant::now() + READY_LIMIT;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        check_abort(abort)?;
        // ECONNREFUSED until exitd binds: ignored.
        let _ = socket.send(&req[..n]);
        if let Ok(len) = socket.recv(&mut buf)
            && cellproto::stun::is_stun(&buf[..len])
        {
            return Ok(());
        }
    }
    bail!("exitd did not answer STUN on {EXIT}:{EXIT_PORT} within {READY_LIMIT:?}")
}

/// ATTACHes every circuit; returns their inner IPv4 addresses.
fn attach(socket: &UdpSocket, circuits: &mut [Circuit], abort: &AtomicBool) -> Result<Vec<Ipv4Addr>> {
    let n = circuits.len();
    let index: HashMap<u32, usize> = circuits.iter().enumerate().map(|(i, c)| (c.lcid_in(), i)).collect();
    let mut inner: Vec<Option<Ipv4Addr>> = vec![None; n];
    let mut asked: Vec<Option<Instant>> = vec![None; n];
    let mut repeated = false;
    let mut all_at: Option<Instant> = None;
    let deadline = Instant::now() + READY_LIMIT;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut buf = [0u8; 2048];
    loop {
        check_abort(abort)?;
        if Instant::now() > deadline {
            bail!("only {} of {n} circuits ATTACHED within {READY_LIMIT:?}", inner.iter().flatten().count());
        }
        // A repeated ATTACH may lease another address: the last reply is the one exitd holds,
        // so after a repeat keep listening a little for a late reply.
        if let Some(t) = all_at
            && (!repeated || t.elapsed() > Duration::from_millis(300))
        {
            break;
        }
        for c in 0..n {
            if inner[c].is_some() || asked[c].is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            repeated |= asked[c].is_some();
            let mut cell = [0u8; CELL_LEN];
            let len = Attach { resume: None }
                .encode(payload_mut(&mut cell))
                .map_err(|e| anyhow!("cannot encode ATTACH: {e}"))?;
            circuits[c].seal(1, Command::Attach, len, &mut cell).map_err(|e| anyhow!("cannot seal ATTACH: {e}"))?;
            socket.send(&cell).context("sending ATTACH")?;
            asked[c] = Some(Instant::now());
        }
        let Ok(len) = socket.recv(&mut buf) else { continue };
        let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(&mut buf[..len]) else { continue };
        let Some(&c) = index.get(&lcid(cell)) else { continue };
        if let Ok(Some(Event::Delivered { cmd: Command::Attached, len, .. })) =
            circuits[c].handle_cell(Instant::now(), cell, &mut OsRng)
        {
            let attached = Attached::decode(payload(cell, len)).map_err(|e| anyhow!("bad ATTACHED: {e}"))?;
            inner[c] = Some(attached.ipv4.0);
            if all_at.is_none() && inner.iter().all(Option::is_some) {
                all_at = Some(Instant::now());
            }
        }
    }
    Ok(inner.into_iter().flatten().collect())
}

/// Sends one probe per lane until each came back: the whole path works before the blast.
fn probe(socket: &UdpSocket, wire: &Wire, abort: &AtomicBool) -> Result<()> {
    let n = wire.lanes();
    let mut back = vec![false; n];
    let mut asked: Vec<Option<Instant>> = vec![None; n];
    let deadline = Instant::now() + READY_LIMIT;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0xA5u8; wire.datagram_len()];
    while !back.iter().all(|&b| b) {
        check_abort(abort)?;
        if Instant::now() > deadline {
            bail!("no echo through {} of {n} lane(s) within {READY_LIMIT:?}", back.iter().filter(|b| !**b).count());
        }
        for c in 0..n {
            if back[c] || asked[c].is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
                continue;
            }
            match wire {
                Wire::Exit { circuits, .. } => {
                    let mut circuits = circuits.lock().map_err(|_| anyhow!("poisoned"))?;
                    wire.prepare(circuits.get_mut(c), c, PROBE, &mut out)?;
                }
                Wire::Plain { .. } => wire.prepare(None, c, PROBE, &mut out)?,
            }
            let _ = socket.send(&out);
            asked[c] = Some(Instant::now());
        }
        let Ok(len) = socket.recv(&mut buf) else { continue };
        if let Arrival::Sample(c, PROBE) = wire.arrival(&mut buf[..len], true) {
            back[c] = true;
        }
    }
    Ok(())
}

/// Single round trips, one packet in flight at a time: the path's latency without queueing.
fn ping(socket: &UdpSocket, wire: &Wire, abort: &AtomicBool) -> Result<Vec<u64>> {
    let n = wire.lanes();
    let mut rtts = Vec::with_capacity(PINGS as usize);
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0xA5u8; wire.datagram_len()];
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    for i in 0..PINGS {
        check_abort(abort)?;
        let (lane, seq) = ((i % n as u64) as usize, PING + i);
        match wire {
            Wire::Exit { circuits, .. } => {
                let mut circuits = circuits.lock().map_err(|_| anyhow!("poisoned"))?;
                wire.prepare(circuits.get_mut(lane), lane, seq, &mut out)?;
            }
            Wire::Plain { .. } => wire.prepare(None, lane, seq, &mut out)?,
        }
        let sent = Instant::now();
        socket.send(&out).context("sending a ping")?;
        while sent.elapsed() < PING_WAIT {
            let Ok(len) = socket.recv(&mut buf) else { continue };
            if let Arrival::Sample(_, got) = wire.arrival(&mut buf[..len], true)
                && got == seq
            {
                rtts.push(sent.elapsed().as_nanos() as u64);
                break;
            }
        }
    }
    Ok(rtts)
}

/// The load generator (in the client namespace): gets ready, then blasts round after round.
fn drive(spec: DriveSpec) -> Result<DriveResult> {
    let socket = UdpSocket::bind((CLIENT, 0)).context("cannot bind the client socket")?;
    sys::deep_buffers(&socket, SOCKET_BUFFER);
    let port = socket.local_addr()?.port();
    let mut result = DriveResult::default();
    let started = Instant::now();
    let (wire, exitd_pid) = match spec.route {
        Route::Plain => {
            socket.connect((ECHO, ECHO_PORT))?;
            (Wire::Plain { payload_len: spec.size - HEADERS }, None)
        }
        Route::Exit { hop, circuits, pid } => {
            socket.connect(hop.addr)?;
            wait_stun(&socket, &spec.abort)?;
            socket.set_read_timeout(Some(Duration::from_millis(5)))?;
            let mut circs = build_circuits(&socket, vec![hop], circuits, false)?;
            let inner = attach(&socket, &mut circs, &spec.abort)?;
            let index = circs.iter().enumerate().map(|(i, c)| (c.lcid_in(), i)).collect();
            (Wire::Exit { circuits: Mutex::new(circs), index, inner, size: spec.size }, Some(pid))
        }
    };
    probe(&socket, &wire, &spec.abort)?;
    result.build_secs = started.elapsed().as_secs_f64();
    result.pings_ns = ping(&socket, &wire, &spec.abort)?;
    result.pings_ns.sort_unstable();
    let _ = sock::setsockopt(&socket, sockopt::UdpGroSegment, &true);
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;

    let wire = Arc::new(wire);
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        received: AtomicU64::new(0),
        last_arrival_ns: AtomicU64::new(0),
        send_ns: (0..spec.packets).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
    });
    let receiver = {
        let (socket, wire, shared) = (socket.try_clone()?, wire.clone(), shared.clone());
        std::thread::Builder::new().name("receiver".into()).spawn(move || receive_loop(&socket, &wire, &shared))?
    };
    let outcome = blast_rounds(&spec, &socket, &wire, &shared, exitd_pid, &mut result);
    shared.stop.store(true, Ordering::Relaxed);
    let (mut latencies, bad) = receiver.join().map_err(|_| anyhow!("receiver thread panicked"))?;
    outcome?;
    latencies.sort_unstable();
    result.latencies_ns = latencies;
    result.bad = bad;
    result.client_socket_drops = sys::udp_socket_drops_at("/proc/thread-self/net/udp", port);
    Ok(result)
}

fn blast_rounds(
    spec: &DriveSpec,
    socket: &UdpSocket,
    wire: &Wire,
    shared: &Shared,
    exitd_pid: Option<u32>,
    result: &mut DriveResult,
) -> Result<()> {
    let n = wire.lanes();
    let dlen = wire.datagram_len();
    let pool_packets = spec.pool.max(n).min(spec.packets as usize);
    let rows = pool_packets.div_ceil(n);
    let mut pools: Vec<Vec<u8>> = (0..n).map(|_| vec![0xA5u8; rows * dlen]).collect();
    let mut window = Window::new(spec.window);
    let sender = Sender { fd: socket.as_raw_fd(), gso: false };
    let deadline = Instant::now() + SEND_LIMIT;
    let me = std::process::id();
    let mut base = 0u64;
    while base < spec.packets && Instant::now() < deadline {
        check_abort(&spec.abort)?;
        let count = (spec.packets - base).min((rows * n) as u64) as usize;
        let sealing = Instant::now();
        wire.fill(&mut pools, base, count)?;
        result.seal_secs += sealing.elapsed().as_secs_f64();
        result.rounds += 1;

        let exitd0 = match exitd_pid {
            Some(pid) => Some((sys::process_cpu_split(pid)?, sys::thread_cpu(pid))),
            None => None,
        };
        let me0 = sys::process_cpu(me)?;
        let (busy0, softirq0) = sys::machine_cpu();
        let received0 = shared.received.load(Ordering::Relaxed);
        let first_ns = shared.now_ns();

        let mut i = 0;
        let mut batch: Vec<&[u8]> = Vec::with_capacity(BURST);
        while i < count {
            let room = window.room(result.sent, shared.received.load(Ordering::Relaxed));
            if room == 0 {
                if Instant::now() >= deadline || spec.abort.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            let m = BURST.min(room).min(count - i);
            batch.clear();
            batch.extend((i..i + m).map(|k| datagram_at(&pools, n, dlen, k)));
            let now = shared.now_ns();
            for k in i..i + m {
                if let Some(slot) = shared.send_ns.get(base as usize + k) {
                    slot.store(now, Ordering::Relaxed);
                }
            }
            sender.send_mmsg(&batch).context("sending packets")?;
            i += m;
            result.sent += m as u64;
            window.sent(m);
        }
        crate::sys::wait_quiet(&shared.received, result.sent, QUIET_ROUND);
        let last_ns = shared.last_arrival_ns.load(Ordering::Relaxed).max(first_ns);

        if let (Some(pid), Some(((user0, sys0), threads0))) = (exitd_pid, exitd0) {
            let (user, system) = sys::process_cpu_split(pid)?;
            result.exitd_user += user - user0;
            result.exitd_sys += system - sys0;
            for (name, secs) in sys::thread_cpu(pid) {
                *result.exitd_threads.entry(name.clone()).or_insert(0.0) +=
                    secs - threads0.get(&name).copied().unwrap_or(0.0);
            }
        }
        result.harness_cpu += sys::process_cpu(me)? - me0;
        let (busy, softirq) = sys::machine_cpu();
        result.busy += busy - busy0;
        result.softirq += softirq - softirq0;
        result.blast_secs += (last_ns - first_ns) as f64 / 1e9;
        result.received_measured += shared.received.load(Ordering::Relaxed) - received0;
        base += i as u64;
        if i < count {
            check_abort(&spec.abort)?;
            eprintln!("perf exit: sending stopped after {SEND_LIMIT:?}");
            break;
        }
    }
    crate::sys::wait_quiet(&shared.received, result.sent, QUIET_FINAL);
    result.received = shared.received.load(Ordering::Relaxed);
    result.stalls = window.stalls;
    Ok(())
}

/// Counts what comes back (UDP GRO: a datagram may hold several); returns latency samples and
/// the number of bad samples.
fn receive_loop(socket: &UdpSocket, wire: &Wire, shared: &Shared) -> (Vec<u64>, u64) {
    let mut latencies = Vec::new();
    let mut bad = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut cmsg = nix::cmsg_space!(i32);
    let mut count = 0u64;
    let fd = socket.as_raw_fd();
    while !shared.stop.load(Ordering::Relaxed) {
        let (len, segment) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = sock::recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()) else {
                continue;
            };
            let segment = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|c| match c {
                    ControlMessageOwned::UdpGroSegments(s) => usize::try_from(s).ok(),
                    _ => None,
                })
            });
            (msg.bytes, segment)
        };
        let now_ns = shared.now_ns();
        let segment = segment.filter(|&s| s > 0).unwrap_or(len.max(1));
        let mut arrived = 0;
        for chunk in buf[..len].chunks_mut(segment) {
            let sample = count % SAMPLE_EVERY == SAMPLE_EVERY - 1;
            let seq = match wire.arrival(chunk, sample) {
                Arrival::Foreign => continue,
                Arrival::Bad => {
                    bad += 1;
                    continue;
                }
                Arrival::Counted => None,
                Arrival::Sample(_, seq) => Some(seq),
            };
            if seq.is_some_and(|s| s >= PING) {
                continue; // a late probe or ping
            }
            count += 1;
            arrived += 1;
            if let Some(sent_at) = seq.and_then(|s| shared.send_ns.get(s as usize)).map(|a| a.load(Ordering::Relaxed))
                && sent_at > 0
            {
                latencies.push(now_ns.saturating_sub(sent_at));
            }
        }
        if arrived > 0 {
            shared.received.fetch_add(arrived, Ordering::Relaxed);
            shared.last_arrival_ns.store(now_ns, Ordering::Relaxed);
        }
    }
    (latencies, bad)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// What every run shares.
struct Ctx {
    args: ExitArgs,
    dir: TempDir,
    exe: PathBuf,
    keys: RelayKeys,
    config: PathBuf,
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("last lines of {}:\n{tail}", path.display())
}

fn config_text(args: &ExitArgs, key_dir: &Path) -> String {
    // Rate limits far above anything this machine can do: they are not what is measured.
    let unlimited = 1u64 << 40;
    format!(
        "# written by perf exit\n\
         listen = \"{EXIT}:{EXIT_PORT}\"\n\
         key_dir = \"{}\"\n\
         nickname = \"perfexit\"\n\
         workers = {}\n\
         pin_workers = {}\n\
         [limits]\n\
         exempt = [\"203.0.113.0/24\"]\n\
         [metrics]\n\
         listen = \"{EXIT}:{METRICS_PORT}\"\n\
         [exit]\n\
         wan = \"wan0\"\n\
         tun = \"{TUN}\"\n\
         circuit_rate = {unlimited}\n\
         circuit_burst = {unlimited}\n\
         exit_rate = {unlimited}\n\
         exit_burst = {unlimited}\n\
         attach_rate = {unlimited}\n\
         attach_burst = 1000000\n\
         sessions_per_source = 1000000\n\
         [policy]\n\
         # The echo host is on the benchmarking range (RFC 2544), which exits deny by default.\n\
         allow = [\"198.18.0.0/24\"]\n",
        key_dir.display(),
        args.workers,
        !args.no_pin,
    )
}

/// Runs the benchmark and prints the report (and JSON with `--json`).
pub fn run(args: ExitArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "perf exit needs root: it creates network namespaces, veths, a TUN device and nftables rules \
             (run it with sudo, or as root in a VM or container with CAP_NET_ADMIN)"
        );
    }
    if args.packets == 0 || args.circuits == 0 || args.workers == 0 {
        bail!("--packets, --circuits and --workers must be at least 1");
    }
    if args.size < HEADERS + 8 || args.size > TUN_MTU {
        bail!("--size must be between {} and {TUN_MTU} (exitd's TUN MTU)", HEADERS + 8);
    }
    if args.circuits > 1000 {
        bail!("--circuits: at most 1000");
    }
    if let Some(path) = &args.exitd
        && !path.is_file()
    {
        bail!("{} not found; build it with `cargo build --release -p exitd -p perf`", path.display());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = std::env::temp_dir().join(format!("meshvpn-perf-exit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = TempDir(dir);
    let key_dir = dir.0.join("keys");
    let keys = relayd::keys::keygen(&key_dir)?;
    let config = dir.0.join("exitd.toml");
    let text = config_text(&args, &key_dir);
    exitd::config::ExitConfig::parse(&text, &config).context("perf exit's exitd configuration")?;
    std::fs::write(&config, text)?;
    let ctx = Ctx {
        keys: RelayKeys { identity: keys.identity.public().0, onion_key: *keys.onion[0].public() },
        exe: std::env::current_exe().context("cannot find the perf executable")?,
        config,
        dir,
        args,
    };
    eprintln!(
        "perf exit: {} packets of {} B per run; exitd with {} worker(s), {} circuit(s); {cores} CPU core(s)",
        ctx.args.packets, ctx.args.size, ctx.args.workers, ctx.args.circuits
    );
    let lab = Lab::new().context("cannot build the network namespaces")?;
    let echo = Echo::start(&lab.internet)?;
    eprintln!("--- plain routing ---");
    let plain = run_plain(&ctx, &lab).context("plain routing run failed")?;
    eprintln!(
        "plain routing: {:.0} packets/s, p50 {:.0} µs, p99 {:.0} µs, {} lost",
        plain.packets_per_s, plain.p50_us, plain.p99_us, plain.losses
    );
    eprintln!("--- exitd ---");
    let exit = run_exitd(&ctx, &lab).context("exitd run failed")?;
    eprintln!(
        "exitd: {:.0} packets/s, p50 {:.0} µs, p99 {:.0} µs, {} lost",
        exit.packets_per_s, exit.p50_us, exit.p99_us, exit.losses
    );
    drop(echo);
    drop(lab);
    print_report(&ctx, cores, &exit, &plain)
}

fn echo_drops(lab: &Lab) -> u64 {
    in_ns_wait(&lab.internet, || Ok(sys::udp_socket_drops_at("/proc/thread-self/net/udp", ECHO_PORT))).unwrap_or(0)
}

fn run_plain(ctx: &Ctx, lab: &Lab) -> Result<ExitReport> {
    let echo0 = echo_drops(lab);
    let spec = spec(ctx, Route::Plain, Arc::new(AtomicBool::new(false)));
    let result =
        in_ns(&lab.client, "client", move || drive(spec))?.join().map_err(|_| anyhow!("client panicked"))??;
    let mut report = report("plain routing (kernel)", ctx, &result);
    report.echo_socket_drops = echo_drops(lab).saturating_sub(echo0);
    Ok(report)
}

fn spec(ctx: &Ctx, route: Route, abort: Arc<AtomicBool>) -> DriveSpec {
    let a = &ctx.args;
    DriveSpec { route, packets: a.packets, size: a.size, window: a.window, pool: a.pool, abort }
}

fn run_exitd(ctx: &Ctx, lab: &Lab) -> Result<ExitReport> {
    let log = ctx.dir.0.join("exitd.log");
    let stderr = std::fs::File::create(&log)?;
    let mut cmd = Proc::new("ip");
    cmd.args(["netns", "exec", &lab.exit]);
    match &ctx.args.exitd {
        Some(bin) => cmd.arg(bin).arg("run").arg("--config").arg(&ctx.config).stdin(Stdio::null()),
        None => cmd.arg(&ctx.exe).arg("exit-child").arg("--config").arg(&ctx.config).stdin(Stdio::piped()),
    };
    cmd.stdout(Stdio::null()).stderr(stderr);
    // `ip netns exec` execs the command itself: the child's pid is exitd's.
    let mut child = ChildGuard::spawn("exitd", &mut cmd)?;
    let pid = child.pid();
    let echo0 = echo_drops(lab);
    let abort = Arc::new(AtomicBool::new(false));
    let hop = PathHop { keys: ctx.keys, addr: SocketAddr::from((EXIT, EXIT_PORT)) };
    let route = Route::Exit { hop, circuits: ctx.args.circuits, pid };
    let spec = spec(ctx, route, abort.clone());
    let handle = in_ns(&lab.client, "client", move || drive(spec))?;
    let outcome = loop {
        if handle.is_finished() {
            break handle.join().map_err(|_| anyhow!("client panicked"))?;
        }
        if let Err(dead) = child.check_alive() {
            abort.store(true, Ordering::Relaxed);
            let _ = handle.join();
            bail!("{dead}\n{}", log_tail(&log));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let result = outcome.map_err(|e| anyhow!("{e:#}\n{}", log_tail(&log)))?;
    // Workers publish their counters every 100 ms.
    std::thread::sleep(Duration::from_millis(250));
    let mut report = report("exitd (1-hop circuits)", ctx, &result);
    report.echo_socket_drops = echo_drops(lab).saturating_sub(echo0);
    report.exitd_socket_drops = Some(sys::udp_socket_drops_at(&format!("/proc/{pid}/net/udp"), EXIT_PORT));
    let metrics = SocketAddr::from((EXIT, METRICS_PORT));
    match in_ns_wait(&lab.client, move || sys::scrape(metrics)) {
        Ok(m) => {
            report.exitd_packets = Some(by_label(&m, "exitd_packets_total", "what"));
            report.relay_drops = Some(by_label(&m, "relayd_drops_total", "reason"));
            report.datapath = m
                .keys()
                .find_map(|k| k.strip_prefix("relayd_info{")?.split("datapath=\"").nth(1)?.split('"').next())
                .unwrap_or_default()
                .to_string();
        }
        Err(e) => eprintln!("perf exit: cannot read exitd's metrics: {e:#}"),
    }
    if let Some((to_exitd, from_exitd)) = tun_drops(&lab.exit) {
        report.tun_to_exitd_drops = Some(to_exitd);
        report.tun_from_exitd_drops = Some(from_exitd);
    }
    child.stop();
    Ok(report)
}

/// Sums of metric `name` by the value of `label`.
fn by_label(m: &BTreeMap<String, f64>, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for (k, v) in m {
        if let Some(labels) = k.strip_prefix(name).and_then(|r| r.strip_prefix('{'))
            && let Some(value) = labels.split(&key).nth(1).and_then(|r| r.split('"').next())
        {
            *out.entry(value.to_string()).or_insert(0) += *v as u64;
        }
    }
    out
}

/// exitd's TUN drop counters: (kernel → exitd: tx dropped, exitd → kernel: rx dropped).
fn tun_drops(ns: &str) -> Option<(u64, u64)> {
    let out = Proc::new("ip").args(["-n", ns, "-s", "-j", "link", "show", "dev", TUN]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let s = v.get(0)?.get("stats64")?;
    Some((s.get("tx")?.get("dropped")?.as_u64()?, s.get("rx")?.get("dropped")?.as_u64()?))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn report(name: &str, ctx: &Ctx, r: &DriveResult) -> ExitReport {
    let secs = r.blast_secs.max(1e-9);
    let packets_per_s = r.received_measured as f64 / secs;
    let exitd = name.starts_with("exitd");
    let losses = r.sent.saturating_sub(r.received);
    let exitd_cpu = r.exitd_user + r.exitd_sys;
    let per_packet = |secs: f64| secs / r.received_measured.max(1) as f64 * 1e6;
    ExitReport {
        name: name.to_string(),
        packets_per_s,
        gbps: packets_per_s * ctx.args.size as f64 * 8.0 / 1e9,
        p50_us: percentile(&r.latencies_ns, 0.50),
        p99_us: percentile(&r.latencies_ns, 0.99),
        max_us: r.latencies_ns.last().map_or(0.0, |&v| v as f64 / 1000.0),
        samples: r.latencies_ns.len() as u64,
        sent: r.sent,
        received: r.received,
        losses,
        loss_ratio: ratio(losses as f64, r.sent as f64),
        blast_secs: r.blast_secs,
        rounds: r.rounds,
        exitd_cpu_us_per_packet: exitd.then(|| per_packet(exitd_cpu)),
        exitd_user_us_per_packet: exitd.then(|| per_packet(r.exitd_user)),
        exitd_sys_us_per_packet: exitd.then(|| per_packet(r.exitd_sys)),
        exitd_cores: exitd.then(|| exitd_cpu / secs),
        exitd_threads: r.exitd_threads.iter().filter(|(_, s)| **s > 0.0).map(|(n, s)| (n.clone(), s / secs)).collect(),
        harness_cores: r.harness_cpu / secs,
        softirq_cores: r.softirq / secs,
        other_cores: ((r.busy - r.softirq - exitd_cpu - r.harness_cpu) / secs).max(0.0),
        idle_p50_us: percentile(&r.pings_ns, 0.50),
        idle_p99_us: percentile(&r.pings_ns, 0.99),
        pings: r.pings_ns.len() as u64,
        client_socket_drops: r.client_socket_drops,
        stalls: r.stalls,
        bad: r.bad,
        build_secs: r.build_secs,
        seal_secs: r.seal_secs,
        ..Default::default()
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "n/a".into(), |v| v.to_string())
}

fn print_report(ctx: &Ctx, cores: usize, exit: &ExitReport, plain: &ExitReport) -> Result<()> {
    let a = &ctx.args;
    let vs_plain = ratio(exit.packets_per_s, plain.packets_per_s);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nperf exit: {} IPv4/UDP packets of {} B per run, each echoed back (round trip); exitd {} worker(s), data path {}, \
         {} circuit(s) of 1 hop; window {}; {cores} CPU core(s) shared by exitd, the load generator, the echo server and the kernel",
        a.packets, a.size, a.workers, exit.datapath, a.circuits, a.window
    )?;
    writeln!(
        out,
        "{:<24} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>19} {:>11} {:>13} {:>8} {:>8}",
        "run",
        "packets/s",
        "Gb/s ×2",
        "p50 µs",
        "p99 µs",
        "1-pkt p50",
        "1-pkt p99",
        "exitd µs/pkt (u+s)",
        "exitd cores",
        "harness cores",
        "softirq",
        "losses"
    )?;
    for r in [exit, plain] {
        let cpu = match (r.exitd_cpu_us_per_packet, r.exitd_user_us_per_packet, r.exitd_sys_us_per_packet) {
            (Some(t), Some(u), Some(s)) => format!("{t:.1} ({u:.1}+{s:.1})"),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<24} {:>10.0} {:>8.2} {:>8.0} {:>8.0} {:>10.0} {:>10.0} {:>19} {:>11} {:>13.2} {:>8.2} {:>8}",
            r.name,
            r.packets_per_s,
            r.gbps,
            r.p50_us,
            r.p99_us,
            r.idle_p50_us,
            r.idle_p99_us,
            cpu,
            r.exitd_cores.map_or_else(|| "-".into(), |v| format!("{v:.2}")),
            r.harness_cores,
            r.softirq_cores,
            r.losses
        )?;
    }
    writeln!(
        out,
        "(packets/s: round trips; Gb/s ×2: IP packet bytes in each direction; p50/p99: under load, within the window; \
         1-pkt: one packet in flight; exitd µs/pkt: exitd's CPU per round trip, user + system; softirq overlaps the \
         process times where it ran in their context)"
    )?;
    writeln!(out, "where packets were lost:")?;
    let nonzero = |m: &Option<BTreeMap<String, u64>>| match m {
        Some(m) if m.values().any(|&v| v > 0) => {
            m.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
        Some(_) => "0".into(),
        None => "n/a".into(),
    };
    writeln!(
        out,
        "  {:<24} client socket {}, exitd socket {}, relay drops {}, TUN queue to exitd {}, TUN from exitd {}, echo socket {}; \
         window stalls {}; sampled cells not opened or wrong {}",
        exit.name,
        exit.client_socket_drops,
        opt(&exit.exitd_socket_drops),
        nonzero(&exit.relay_drops),
        opt(&exit.tun_to_exitd_drops),
        opt(&exit.tun_from_exitd_drops),
        exit.echo_socket_drops,
        exit.stalls,
        exit.bad
    )?;
    writeln!(out, "  {:<24} exitd packets: {}", "", nonzero(&exit.exitd_packets))?;
    writeln!(
        out,
        "  {:<24} client socket {}, echo socket {}; window stalls {}; wrong echoes {}",
        plain.name, plain.client_socket_drops, plain.echo_socket_drops, plain.stalls, plain.bad
    )?;
    writeln!(out, "ratio:")?;
    writeln!(out, "  exitd / plain routing (packets/s)  {vs_plain:.2}")?;
    writeln!(
        out,
        "  exitd per CPU-second of its own  {:.0} round trips",
        ratio(1e6, exit.exitd_cpu_us_per_packet.unwrap_or(0.0))
    )?;
    if a.json {
        let json = serde_json::json!({
            "packets_per_s": exit.packets_per_s,
            "gbps": exit.gbps,
            "p50_us": exit.p50_us,
            "p99_us": exit.p99_us,
            "losses": exit.losses,
            "loss_ratio": exit.loss_ratio,
            "vs_plain": vs_plain,
            "cpu_us_per_packet": exit.exitd_cpu_us_per_packet,
            "idle_p50_us": exit.idle_p50_us,
            "idle_p99_us": exit.idle_p99_us,
            "packets": a.packets,
            "size": a.size,
            "workers": a.workers,
            "circuits": a.circuits,
            "window": a.window,
            "cores": cores,
            "exitd": serde_json::to_value(exit)?,
            "plain": serde_json::to_value(plain)?,
        });
        writeln!(out, "{json}")?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_valid_in_reused_buffers_and_echoes_parse() {
        let src = Ipv4Addr::new(10, 8, 0, 2);
        let mut buf = vec![0xA5u8; 1200];
        write_packet(&mut buf, src, SPORT + 3, 77).unwrap();
        let ip = Ipv4Packet::new(&buf).unwrap();
        assert_eq!(ip.get_checksum(), ipv4::checksum(&ip));
        assert_eq!((ip.get_dscp(), ip.get_ecn(), ip.get_fragment_offset()), (0, 0, 0));
        assert_eq!(ip.get_flags(), ipv4::Ipv4Flags::DontFragment);
        assert_eq!(usize::from(ip.get_total_length()), buf.len());
        let u = UdpPacket::new(ip.payload()).unwrap();
        assert_eq!(u.get_checksum(), udp::ipv4_checksum(&u, &src, &ECHO));
        assert_eq!((u.get_source(), u.get_destination()), (SPORT + 3, ECHO_PORT));
        // What the echo server sends back, as exitd reads it from its TUN.
        let mut reply = buf.clone();
        {
            let mut ip = MutableIpv4Packet::new(&mut reply).unwrap();
            ip.set_source(ECHO);
            ip.set_destination(src);
            let mut u = MutableUdpPacket::new(&mut reply[20..]).unwrap();
            u.set_source(ECHO_PORT);
            u.set_destination(SPORT + 3);
        }
        assert_eq!(echoed_seq(&reply, src), Some(77));
        assert_eq!(echoed_seq(&reply, Ipv4Addr::new(10, 8, 0, 3)), None, "another circuit's address");
        assert_eq!(echoed_seq(&buf, src), None, "not an echo");
        assert_eq!(echoed_seq(&reply[..20], src), None);
    }

    #[test]
    fn metrics_by_label() {
        let mut m = BTreeMap::new();
        m.insert("exitd_packets_total{worker=\"0\",what=\"to_tun\"}".to_string(), 2.0);
        m.insert("exitd_packets_total{worker=\"1\",what=\"to_tun\"}".to_string(), 3.0);
        m.insert("exitd_packets_total{worker=\"1\",what=\"from_tun\"}".to_string(), 4.0);
        m.insert("exitd_sessions".to_string(), 9.0);
        let by = by_label(&m, "exitd_packets_total", "what");
        assert_eq!(by.get("to_tun"), Some(&5));
        assert_eq!(by.get("from_tun"), Some(&4));
        assert_eq!(by.len(), 2);
    }
}
