//! The load generator of `perf exit`, in the client namespace: gets the path ready (exitd's
//! STUN, circuits, ATTACH, a probe through every lane), measures single round trips, then
//! blasts round after round (prepared with [`Wire`], sent with [`crate::blast`]'s sender and
//! window) while a receiver thread counts what comes back and samples latency.

use super::wire::{Arrival, Wire};
use super::{
    CLIENT, ECHO, ECHO_PORT, EXIT, EXIT_PORT, HEADERS, PING, PING_WAIT, PINGS, PROBE, QUIET_FINAL, QUIET_ROUND,
    READY_LIMIT, SAMPLE_EVERY, SEND_LIMIT, SOCKET_BUFFER,
};
use crate::blast::{Progress, Round, Sender, Window};
use crate::loadgen::build_circuits;
use crate::sys;
use anyhow::{Context, Result, anyhow, bail};
use cellproto::cell::{CELL_LEN, Command, lcid};
use cellproto::client::{Circuit, Event, PathHop};
use cellproto::command::{Attach, Attached};
use cellproto::onion::{payload, payload_mut};
use nix::sys::socket::{self as sock, sockopt};
use rand_core::OsRng;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the load generator measured.
#[derive(Debug, Default)]
pub(super) struct DriveResult {
    pub(super) sent: u64,
    pub(super) received: u64,
    pub(super) received_measured: u64,
    pub(super) blast_secs: f64,
    pub(super) rounds: u32,
    pub(super) latencies_ns: Vec<u64>,
    pub(super) pings_ns: Vec<u64>,
    pub(super) bad: u64,
    pub(super) stalls: u64,
    pub(super) build_secs: f64,
    pub(super) seal_secs: f64,
    pub(super) exitd_user: f64,
    pub(super) exitd_sys: f64,
    pub(super) exitd_threads: BTreeMap<String, f64>,
    pub(super) harness_cpu: f64,
    pub(super) busy: f64,
    pub(super) softirq: f64,
    pub(super) client_socket_drops: u64,
}

/// Where the load generator sends.
pub(super) enum Route {
    Plain,
    Exit { hop: PathHop, circuits: usize, pid: u32 },
}

pub(super) struct DriveSpec {
    pub(super) route: Route,
    pub(super) packets: u64,
    pub(super) size: usize,
    pub(super) window: usize,
    pub(super) pool: usize,
    pub(super) abort: Arc<AtomicBool>,
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
            wire.prepare_one(c, PROBE, &mut out)?;
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
        wire.prepare_one(lane, seq, &mut out)?;
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
pub(super) fn drive(spec: DriveSpec) -> Result<DriveResult> {
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
    let progress = Arc::new(Progress::new(spec.packets));
    let receiver = {
        let (socket, wire, progress) = (socket.try_clone()?, wire.clone(), progress.clone());
        std::thread::Builder::new().name("receiver".into()).spawn(move || receive_loop(&socket, &wire, &progress))?
    };
    let outcome = blast_rounds(&spec, &socket, &wire, &progress, exitd_pid, &mut result);
    progress.stop.store(true, Ordering::Relaxed);
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
    progress: &Progress,
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
        let received0 = progress.received.load(Ordering::Relaxed);
        let first_ns = progress.now_ns();
        let round = Round { pools: &pools, n, dlen, base, count };
        let i = sender
            .blast(&round, progress, &mut window, &mut result.sent, deadline, Some(&spec.abort))
            .context("sending packets")?;
        crate::sys::wait_quiet(&progress.received, result.sent, QUIET_ROUND);
        let last_ns = progress.last_arrival_ns.load(Ordering::Relaxed).max(first_ns);

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
        result.received_measured += progress.received.load(Ordering::Relaxed) - received0;
        base += i as u64;
        if i < count {
            check_abort(&spec.abort)?;
            eprintln!("perf exit: sending stopped after {SEND_LIMIT:?}");
            break;
        }
    }
    crate::sys::wait_quiet(&progress.received, result.sent, QUIET_FINAL);
    result.received = progress.received.load(Ordering::Relaxed);
    result.stalls = window.stalls;
    Ok(())
}

/// Counts what comes back (UDP GRO: a datagram may hold several); returns latency samples and
/// the number of bad samples.
fn receive_loop(socket: &UdpSocket, wire: &Wire, progress: &Progress) -> (Vec<u64>, u64) {
    let mut latencies = Vec::new();
    let mut bad = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut cmsg = nix::cmsg_space!(i32);
    let mut count = 0u64;
    let fd = socket.as_raw_fd();
    while !progress.stop.load(Ordering::Relaxed) {
        let Some((len, _, segment)) = sys::recv_gro(fd, &mut buf, &mut cmsg) else { continue };
        let now_ns = progress.now_ns();
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
            if let Some(latency) = seq.and_then(|s| progress.latency(s, now_ns)) {
                latencies.push(latency);
            }
        }
        progress.arrived(arrived, now_ns);
    }
    (latencies, bad)
}
