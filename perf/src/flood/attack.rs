//! The attacks of `perf flood`, each a thread paced to a rate and bounded in time.
//!
//! - [`CreateFlood`]: replayed CREATEs (one handshake message, many reply LCIDs) from many
//!   spoofed loopback sources 127.1.0.1, 127.1.0.2, …: with a raw socket (`IPPROTO_RAW`, root or
//!   CAP_NET_RAW) each datagram is written with its own IPv4 source address, so the relay sees
//!   `--sources` distinct sources that never read an answer; without one, UDP sockets bound to
//!   256 of those addresses (Linux lets a socket bind to any of 127.0.0.0/8) send and never
//!   read, which the relay cannot tell from spoofing either.
//! - [`ExtendFlood`]: EXTENDs on one circuit (built first, from 127.0.0.4) to a target that
//!   never answers, each with a different body: the first stays pending, every later one is a
//!   different EXTEND while one is pending.

use anyhow::{Context, Result, anyhow, bail};
use cellproto::cell::{CELL_LEN, Command, is_valid_lcid, lcid};
use cellproto::client::{Circuit, CircuitConfig, Event, PathHop};
use cellproto::command::Extend;
use cellproto::handshake::{CREATE_LEN, ClientHandshake, ClientRequest};
use cellproto::link::encode_create;
use cellproto::onion::payload_mut;
use nix::sys::socket::{self as sock, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn};
use pnet_packet::MutablePacket;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::MutableIpv4Packet;
use pnet_packet::udp::MutableUdpPacket;
use rand_core::{OsRng, RngCore};
use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Datagrams per send call (and per pacing step).
const BATCH: usize = 32;
/// A flood stops by itself after this long.
const FLOOD_LIMIT: Duration = Duration::from_secs(300);
/// Distinct CREATE cells cycled through (reply LCIDs).
const CREATE_POOL: usize = 256;
/// Source sockets of the fallback without a raw socket.
const BOUND_SOURCES: u32 = 256;
/// IPv4 + UDP headers.
const HEADERS: usize = 28;

/// How the flood's sources were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spoof {
    /// A raw socket writing each datagram's source address.
    Raw,
    /// UDP sockets bound to loopback addresses, never read.
    Bound,
}

impl Spoof {
    /// For the report.
    pub fn label(self) -> &'static str {
        match self {
            Spoof::Raw => "raw socket",
            Spoof::Bound => "bound sockets",
        }
    }
}

/// What a flood sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    /// Datagrams handed to the kernel.
    pub datagrams: u64,
    /// Seconds it ran.
    pub secs: f64,
}

/// Paces batches to `rate` datagrams per second while the flood is active; false once stopped
/// or past the limit.
struct Pace<'a> {
    begin: Instant,
    start: Instant,
    rate: f64,
    sent: u64,
    control: &'a Control,
}

impl<'a> Pace<'a> {
    fn new(rate: f64, control: &'a Control) -> Self {
        Self { begin: Instant::now(), start: Instant::now(), rate: rate.max(1.0), sent: 0, control }
    }

    fn wait(&mut self) -> bool {
        loop {
            if self.control.stop.load(Ordering::Relaxed) || self.begin.elapsed() > FLOOD_LIMIT {
                return false;
            }
            if !self.control.active.load(Ordering::Relaxed) {
                // Paused: the pace starts over when resumed.
                self.start = Instant::now();
                self.sent = 0;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let due = self.start + Duration::from_secs_f64(self.sent as f64 / self.rate);
            let now = Instant::now();
            if now >= due {
                return true;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(5)));
        }
    }

    fn sent(&mut self, n: u64) {
        self.sent += n;
        self.control.sent.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the orchestrator and a flood thread share.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    active: AtomicBool,
    sent: AtomicU64,
}

/// A flood thread, paused until [`Flood::resume`].
pub struct Flood {
    control: Arc<Control>,
    thread: JoinHandle<Result<()>>,
    resumed: Option<(Instant, u64)>,
}

impl Flood {
    fn spawn(name: &str, f: impl FnOnce(&Control) -> Result<()> + Send + 'static) -> Result<Self> {
        let control = Arc::new(Control::default());
        let shared = control.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || f(&shared))?;
        Ok(Self { control, thread, resumed: None })
    }

    /// Starts (or resumes) flooding.
    pub fn resume(&mut self) {
        self.resumed = Some((Instant::now(), self.control.sent.load(Ordering::Relaxed)));
        self.control.active.store(true, Ordering::Relaxed);
    }

    /// Pauses; returns what was sent since [`Flood::resume`].
    pub fn pause(&mut self) -> Sent {
        self.control.active.store(false, Ordering::Relaxed);
        let (at, sent0) = self.resumed.take().unwrap_or((Instant::now(), 0));
        Sent { datagrams: self.control.sent.load(Ordering::Relaxed) - sent0, secs: at.elapsed().as_secs_f64() }
    }

    /// Ends the flood thread.
    pub fn stop(self) -> Result<()> {
        self.control.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow!("a flood thread panicked"))?
    }
}

/// The i-th spoofed source: 127.1.0.1 onwards.
fn source(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + i)
}

/// Replayed CREATEs from spoofed sources.
pub struct CreateFlood;

impl CreateFlood {
    /// The flood thread, paused: `rate` CREATEs per second from `sources` sources to `relay`
    /// once resumed; `raw`: whether to try a raw socket first. Returns the flood and how its
    /// sources are made.
    pub fn start(relay: SocketAddr, keys: &PathHop, rate: f64, sources: u32, raw: bool) -> Result<(Flood, Spoof)> {
        let SocketAddr::V4(relay) = relay else { bail!("the relay must listen on IPv4 loopback") };
        let req = ClientRequest { hop: 1, offer_aes: true, link_secret: None };
        let hs = ClientHandshake::start(&keys.keys, &req, &mut OsRng)?;
        let cells: Vec<[u8; CELL_LEN]> = (0..CREATE_POOL as u32)
            .map(|i| {
                let mut cell = [0u8; CELL_LEN];
                encode_create(&mut cell, 0x4000_0000 + i, hs.message(), None, None, &mut OsRng);
                cell
            })
            .collect();
        let sources = sources.clamp(1, 1 << 20);
        if raw && let Ok(fd) = sock::socket(AddressFamily::Inet, SockType::Raw, SockFlag::empty(), SockProtocol::Raw) {
            let flood = Flood::spawn("flood-create", move |c| raw_flood(&fd, relay, &cells, rate, sources, c))?;
            return Ok((flood, Spoof::Raw));
        }
        let sockets = (0..sources.min(BOUND_SOURCES))
            .map(|i| UdpSocket::bind((source(i), 0)).with_context(|| format!("cannot bind {}", source(i))))
            .collect::<Result<Vec<_>>>()?;
        let flood = Flood::spawn("flood-create", move |c| bound_flood(&sockets, relay, &cells, rate, c))?;
        Ok((flood, Spoof::Bound))
    }
}

fn raw_flood(
    fd: &OwnedFd,
    relay: SocketAddrV4,
    cells: &[[u8; CELL_LEN]],
    rate: f64,
    sources: u32,
    control: &Control,
) -> Result<()> {
    let mut packets: Vec<Vec<u8>> = vec![vec![0u8; HEADERS + CELL_LEN]; BATCH];
    let dest = SockaddrIn::from(relay);
    let addrs = vec![Some(dest); BATCH];
    let mut pace = Pace::new(rate, control);
    let mut k = 0u64;
    while pace.wait() {
        for p in packets.iter_mut() {
            let src = source((k % u64::from(sources)) as u32);
            let port = 1024 + (k % 60_000) as u16;
            write_datagram(p, src, port, relay, &cells[k as usize % cells.len()])?;
            k += 1;
        }
        let slices: Vec<[IoSlice<'_>; 1]> = packets.iter().map(|p| [IoSlice::new(p)]).collect();
        let mut headers = sock::MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
        match sock::sendmmsg(fd.as_raw_fd(), &mut headers, &slices, &addrs, [], MsgFlags::empty()) {
            Ok(sent) => pace.sent(sent.count() as u64),
            // A full socket buffer: the kernel could not take the flood at this rate; go on.
            Err(nix::errno::Errno::ENOBUFS | nix::errno::Errno::EAGAIN) => pace.sent(BATCH as u64),
            Err(e) => return Err(anyhow!("raw send: {e}")),
        }
    }
    Ok(())
}

/// Writes an IPv4/UDP datagram from `src:port` to `dst` carrying `cell`. The kernel fills in
/// the IPv4 checksum and identification (raw(7), IP_HDRINCL); a UDP checksum of 0 means none.
fn write_datagram(buf: &mut [u8], src: Ipv4Addr, port: u16, dst: SocketAddrV4, cell: &[u8; CELL_LEN]) -> Result<()> {
    let total = buf.len();
    buf[..HEADERS].fill(0);
    buf[HEADERS..].copy_from_slice(cell);
    let mut ip = MutableIpv4Packet::new(buf).ok_or_else(|| anyhow!("packet too short"))?;
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length(total as u16);
    ip.set_ttl(64);
    ip.set_next_level_protocol(IpNextHeaderProtocols::Udp);
    ip.set_source(src);
    ip.set_destination(*dst.ip());
    let mut udp = MutableUdpPacket::new(ip.payload_mut()).ok_or_else(|| anyhow!("packet too short"))?;
    udp.set_source(port);
    udp.set_destination(dst.port());
    udp.set_length((total - 20) as u16);
    udp.set_checksum(0);
    Ok(())
}

fn bound_flood(
    sockets: &[UdpSocket],
    relay: SocketAddrV4,
    cells: &[[u8; CELL_LEN]],
    rate: f64,
    control: &Control,
) -> Result<()> {
    let mut pace = Pace::new(rate, control);
    let mut k = 0usize;
    while pace.wait() {
        for _ in 0..BATCH {
            // Errors (a full buffer) are the flood's problem, not the benchmark's.
            let _ = sockets[k % sockets.len()].send_to(&cells[k % cells.len()], relay);
            k += 1;
        }
        pace.sent(BATCH as u64);
    }
    Ok(())
}

/// EXTENDs on one established circuit.
pub struct ExtendFlood {
    socket: UdpSocket,
    circuit: Circuit,
    target: SocketAddr,
}

impl ExtendFlood {
    /// Builds the flood's circuit to `relay` from `bind` (bounded wait); its EXTENDs will name
    /// `target` (a socket nobody reads).
    pub fn prepare(relay: PathHop, bind: Ipv4Addr, target: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind((bind, 0)).with_context(|| format!("cannot bind {bind}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let id = loop {
            let id = 0x4000_0000 | (OsRng.next_u32() & 0x3FFF_FFFF);
            if is_valid_lcid(id) {
                break id;
            }
        };
        let config = CircuitConfig { handshake_timeout: Duration::from_millis(500), ..CircuitConfig::default() };
        let mut circuit = Circuit::new(vec![relay], id, config, Instant::now(), &mut OsRng)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut cell = [0u8; CELL_LEN];
        let mut buf = [0u8; 2048];
        while !circuit.is_open() {
            if Instant::now() > deadline {
                bail!("the EXTEND flood's circuit was not built in 20 s");
            }
            while let Some(to) = circuit.poll_transmit(Instant::now(), &mut cell, &mut OsRng) {
                socket.send_to(&cell, to)?;
            }
            if let Some(Event::Closed(r)) = circuit.handle_timeout(Instant::now()) {
                bail!("the EXTEND flood's circuit closed while building: {r:?}");
            }
            let Ok(n) = socket.recv(&mut buf) else { continue };
            let Ok(c) = <&mut [u8; CELL_LEN]>::try_from(&mut buf[..n]) else { continue };
            if lcid(c) == id {
                let _ = circuit.handle_cell(Instant::now(), c, &mut OsRng);
            }
        }
        Ok(Self { socket, circuit, target })
    }

    /// The flood thread, paused: `rate` EXTENDs per second once resumed.
    pub fn start(self, rate: f64) -> Result<Flood> {
        let Self { socket, mut circuit, target } = self;
        Flood::spawn("flood-extend", move |control| {
            let mut pace = Pace::new(rate, control);
            let mut cell = [0u8; CELL_LEN];
            let mut ext = Extend { target, link_secret: [0; 32], handshake: [0; CREATE_LEN] };
            while pace.wait() {
                for _ in 0..BATCH {
                    OsRng.fill_bytes(&mut ext.link_secret);
                    cell.fill(0);
                    let len = ext.encode(payload_mut(&mut cell)).map_err(|e| anyhow!("EXTEND: {e}"))?;
                    // A circuit at its usage limit, or closed by the relay: the flood is over.
                    let Ok(to) = circuit.seal(1, Command::Extend, len, &mut cell) else { return Ok(()) };
                    let _ = socket.send_to(&cell, to);
                    pace.sent(1);
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::Packet;
    use pnet_packet::ipv4::Ipv4Packet;
    use pnet_packet::udp::UdpPacket;

    #[test]
    fn spoofed_datagrams_carry_their_source_and_the_cell_in_reused_buffers() {
        let mut buf = vec![0xEEu8; HEADERS + CELL_LEN];
        let dst: SocketAddrV4 = "127.0.0.1:9001".parse().unwrap();
        for (i, fill) in [(0u32, 1u8), (70_000, 2)] {
            let cell = [fill; CELL_LEN];
            write_datagram(&mut buf, source(i), 4242, dst, &cell).unwrap();
            let ip = Ipv4Packet::new(&buf).unwrap();
            assert_eq!((ip.get_version(), ip.get_header_length(), ip.get_ttl()), (4, 5, 64));
            assert_eq!(usize::from(ip.get_total_length()), buf.len());
            assert_eq!(ip.get_source(), source(i));
            assert_eq!(ip.get_destination(), *dst.ip());
            assert_eq!(ip.get_next_level_protocol(), IpNextHeaderProtocols::Udp);
            let udp = UdpPacket::new(ip.payload()).unwrap();
            assert_eq!((udp.get_source(), udp.get_destination()), (4242, 9001));
            assert_eq!(usize::from(udp.get_length()), 8 + CELL_LEN);
            assert_eq!(udp.payload(), &cell[..]);
        }
        assert_eq!(source(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(source(70_000), Ipv4Addr::new(127, 2, 17, 113));
    }
}
