//! The load generator: `circuits` 2-hop circuits whose first hop is the relay under test and
//! whose second hop is a sink in this process, then DATA cells blasted through them.
//!
//! - Cells are sealed ahead of time, in rounds of at most `--pool` cells (all circuits in
//!   parallel), so that the client's two AEAD seals per cell do not compete for CPU with the
//!   relay during the blast: what is measured is the relay.
//! - The sender (this thread) sends them round-robin over the circuits in bursts of 64 with one
//!   `sendmmsg` (or, with `--gso`, runs of 45 cells of one circuit per `sendmsg` with UDP GSO:
//!   see [`blast::send_order`]), keeping at most a window of
//!   cells in flight (sent and not yet counted by the sink). The window halves when it has been
//!   full with nothing arriving for 100 ms (cells were lost: they are written off) and grows back
//!   by a burst after each window's worth of cells without such a stall, up to `--window`: big
//!   enough to keep the relay busy, small enough that the queue in front of it (and so the
//!   latency) stays bounded.
//!   The window and the sender are [`crate::blast`]'s, shared with `perf exit`.
//! - The sink ([`sink`]: its own thread and UDP socket, with UDP GRO) answers the relay's CREATE with
//!   cellproto's `ControlPlane`, owns the `HopCircuit`s, and counts every cell that arrives on
//!   one of its circuits. For latency it samples: with the relay's cryptography on, every 16th
//!   cell is opened (`HopCircuit::handle_forward`, it is the last hop) and its sequence number
//!   read; with the null forwarder the relay did not remove its layer, so the sink cannot open
//!   the cell and instead matches its first 16 body bytes against those of every 16th cell
//!   sealed. Latency is arrival time minus the time the sender handed the cell's burst to the
//!   kernel, on one clock.
//! - With `--sync` (how `perf relay` runs it) it speaks a line protocol on stdin/stdout so the
//!   orchestrator can read the relay's CPU time exactly around each blast: `ready PORT`, then per
//!   round `start N` (answered `go`) and `end N RECEIVED SECS SENT` (the round's cells received,
//!   its seconds and cells sent; answered `ok`), and at last one JSON line.
//!
//! Everything is bounded: circuit building 20 s, sending 60 s in all, waiting for the last cells
//! 2 s after the last arrival.

mod sink;

use crate::blast::{self, Progress, Round, Sender, Window};
use crate::sys;
use anyhow::{Context, Result, anyhow, bail};
use cellproto::cell::{CELL_LEN, is_valid_lcid, lcid};
use cellproto::client::{Circuit, CircuitConfig, Event, PathHop};
use cellproto::handshake::{OnionSecret, RelayKeys};
use cellproto::onion::payload_mut;
use nix::sys::socket::{self as sock, sockopt};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of IP packet carried per DATA cell (the cell is 1452 bytes whatever this is).
pub const PAYLOAD: usize = 1200;
/// One cell in this many is opened (or matched) by the sink for a latency sample.
const SAMPLE_EVERY: u64 = 16;
/// Sending stops after this long in all, sent or not.
const SEND_LIMIT: Duration = Duration::from_secs(60);
/// A round ends (for the CPU reading) once nothing arrived for this long.
const QUIET_ROUND: Duration = Duration::from_millis(100);
/// The last cells are waited for until nothing arrived for this long.
const QUIET_FINAL: Duration = Duration::from_secs(2);
/// Circuit building gives up after this long.
const BUILD_LIMIT: Duration = Duration::from_secs(20);
/// The sink's made-up identity (only the onion key matters to the handshake).
const SINK_IDENTITY: [u8; 32] = [0x5A; 32];
/// Socket buffers of the client and sink sockets.
const SOCKET_BUFFER: usize = 32 << 20;

/// `perf loadgen` options.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// The relay under test (first hop), a loopback address.
    #[arg(long)]
    pub relay: SocketAddr,
    /// The relay's Ed25519 identity, hex.
    #[arg(long)]
    pub identity: String,
    /// The relay's X25519 onion key, hex.
    #[arg(long)]
    pub onion_key: String,
    /// DATA cells to send.
    #[arg(long, default_value_t = 2_000_000)]
    pub cells: u64,
    /// Circuits to build and spread the cells over.
    #[arg(long, default_value_t = 64)]
    pub circuits: usize,
    /// The relay is a null forwarder (it does not remove its layer): match cells by their bytes.
    #[arg(long)]
    pub null: bool,
    /// Window: cells in flight at most (halved after a stall, down to 128, and grown back).
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Cells sealed ahead per round (1,452 bytes each).
    #[arg(long, default_value_t = 1 << 20)]
    pub pool: usize,
    /// Send with UDP GSO, 45 cells of one circuit per send, instead of sendmmsg of 64 cells of
    /// 64 circuits: bulk flows from an upstream that batches, as relayd does.
    #[arg(long)]
    pub gso: bool,
    /// Speak the line protocol of `perf relay` on stdin/stdout.
    #[arg(long)]
    pub sync: bool,
}

/// What one load generator run measured (its last line of output, JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadgenResult {
    /// Cells handed to the kernel.
    pub sent: u64,
    /// Cells that reached the sink, in the end.
    pub received: u64,
    /// Cells that reached the sink within the measured intervals.
    pub received_measured: u64,
    /// Sum over rounds of first send to last arrival.
    pub blast_secs: f64,
    /// `received_measured / blast_secs`.
    pub cells_per_s: f64,
    /// Latency percentiles over the samples, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Latency samples.
    pub samples: u64,
    /// Sampled cells the sink could not open (or match): corrupted or misrouted.
    pub bad: u64,
    /// Times the window stalled and its cells were written off.
    pub stalls: u64,
    /// Window at the end.
    pub window: usize,
    /// Rounds of sealing and sending.
    pub rounds: u32,
    /// Seconds to build all circuits.
    pub build_secs: f64,
    /// Seconds spent sealing (outside the measured intervals).
    pub seal_secs: f64,
    /// CPU seconds of this process during the measured intervals (sender and sink).
    pub cpu_secs: f64,
    /// The sink's UDP port.
    pub sink_port: u16,
    /// Datagrams the kernel dropped at the sink's socket (receive buffer full).
    pub sink_socket_drops: u64,
}

/// State shared by the sender and the sink.
struct Shared {
    progress: Progress,
    null: bool,
    /// Null mode: first 16 body bytes → sequence number, for every `SAMPLE_EVERY`th cell.
    fingerprints: Mutex<HashMap<[u8; 16], u64>>,
}

fn key32(hex_text: &str, what: &str) -> Result<[u8; 32]> {
    hex::decode(hex_text)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| anyhow!("--{what} must be 32 bytes in hex"))
}

/// The line protocol with `perf relay` (a no-op without `--sync`).
struct Sync {
    lines: Option<std::io::Lines<std::io::StdinLock<'static>>>,
}

impl Sync {
    fn new(on: bool) -> Self {
        Self { lines: on.then(|| std::io::stdin().lock().lines()) }
    }

    fn say(&self, line: &str) -> Result<()> {
        if self.lines.is_some() {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        Ok(())
    }

    /// Says `line` and waits for `answer`.
    fn ask(&mut self, line: &str, answer: &str) -> Result<()> {
        self.say(line)?;
        let Some(lines) = &mut self.lines else { return Ok(()) };
        match lines.next() {
            Some(Ok(got)) if got.trim() == answer => Ok(()),
            Some(Ok(got)) => bail!("expected {answer:?} from the orchestrator, got {got:?}"),
            _ => bail!("the orchestrator closed stdin"),
        }
    }
}

/// Runs the load generator; prints its result as one JSON line on stdout.
pub fn run(args: LoadgenArgs) -> Result<()> {
    if !args.relay.ip().is_loopback() {
        bail!("--relay must be a loopback address (this is a benchmark, not a traffic generator)");
    }
    if args.circuits == 0 || args.cells == 0 {
        bail!("--cells and --circuits must be at least 1");
    }
    let result = generate(&args)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&result)?)?;
    out.flush()?;
    Ok(())
}

fn generate(args: &LoadgenArgs) -> Result<LoadgenResult> {
    let mut sync = Sync::new(args.sync);
    let relay_keys =
        RelayKeys { identity: key32(&args.identity, "identity")?, onion_key: key32(&args.onion_key, "onion-key")? };

    // The sink: hop 2.
    let sink_socket = UdpSocket::bind("127.0.0.1:0")?;
    sys::deep_buffers(&sink_socket, SOCKET_BUFFER);
    let _ = sock::setsockopt(&sink_socket, sockopt::UdpGroSegment, &true);
    sink_socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let sink_addr = sink_socket.local_addr()?;
    let sink_onion = OnionSecret::generate(&mut OsRng);
    let sink_hop =
        PathHop { keys: RelayKeys { identity: SINK_IDENTITY, onion_key: *sink_onion.public() }, addr: sink_addr };
    let shared = Arc::new(Shared {
        progress: Progress::new(args.cells),
        null: args.null,
        fingerprints: Mutex::new(HashMap::new()),
    });
    let sink = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || sink::sink_loop(sink_socket, sink_onion, &shared))?
    };
    let outcome = drive(args, &mut sync, relay_keys, sink_hop, &shared);
    shared.progress.stop.store(true, Ordering::Relaxed);
    let sink_out = sink.join().map_err(|_| anyhow!("sink thread panicked"))?;
    let mut result = outcome?;
    let mut lat = sink_out.latencies_ns;
    lat.sort_unstable();
    result.p50_us = blast::percentile(&lat, 0.50);
    result.p99_us = blast::percentile(&lat, 0.99);
    result.max_us = lat.last().map_or(0.0, |&v| v as f64 / 1000.0);
    result.samples = lat.len() as u64;
    result.bad = sink_out.bad;
    result.sink_port = sink_addr.port();
    result.sink_socket_drops = sink_out.socket_drops;
    Ok(result)
}

/// Builds the circuits, then seals and sends round after round.
fn drive(
    args: &LoadgenArgs,
    sync: &mut Sync,
    relay_keys: RelayKeys,
    sink_hop: PathHop,
    shared: &Shared,
) -> Result<LoadgenResult> {
    let client = UdpSocket::bind("127.0.0.1:0")?;
    sys::deep_buffers(&client, SOCKET_BUFFER);
    client.connect(args.relay)?;
    client.set_read_timeout(Some(Duration::from_millis(5)))?;
    let path = vec![PathHop { keys: relay_keys, addr: args.relay }, sink_hop];
    let started = Instant::now();
    let mut circuits = build_circuits(&client, path, args.circuits, args.null)?;
    let mut result = LoadgenResult { build_secs: started.elapsed().as_secs_f64(), ..Default::default() };
    eprintln!("loadgen: {} circuits built in {:.2} s", circuits.len(), result.build_secs);
    sync.say(&format!("ready {}", sink_hop.addr.port()))?;

    let n = circuits.len();
    let pool_cells = args.pool.max(n).min(args.cells as usize);
    let rows = pool_cells.div_ceil(n);
    let mut pools: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; rows * CELL_LEN]).collect();
    let mut window = Window::new(args.window);
    let sender = Sender { fd: client.as_raw_fd(), gso: args.gso };
    let send_deadline = Instant::now() + SEND_LIMIT;
    let me = std::process::id();
    let mut base = 0u64;
    while base < args.cells && Instant::now() < send_deadline {
        let count = (args.cells - base).min((rows * n) as u64) as usize;
        let sealing = Instant::now();
        seal_round(&mut circuits, &mut pools, base, count)?;
        if shared.null {
            let mut fp = shared.fingerprints.lock().map_err(|_| anyhow!("poisoned"))?;
            fp.clear();
            for k in (0..count).filter(|k| (base + *k as u64) % SAMPLE_EVERY == 0) {
                fp.insert(sink::fingerprint(blast::datagram_at(&pools, n, CELL_LEN, k)), base + k as u64);
            }
        }
        result.seal_secs += sealing.elapsed().as_secs_f64();
        result.rounds += 1;
        sync.ask(&format!("start {}", result.rounds), "go")?;
        let cpu0 = sys::process_cpu(me)?;
        let progress = &shared.progress;
        let received0 = progress.received.load(Ordering::Relaxed);
        let first_ns = progress.now_ns();
        let round = Round { pools: &pools, n, dlen: CELL_LEN, base, count };
        let sent = sender
            .blast(&round, progress, &mut window, &mut result.sent, send_deadline, None)
            .context("sending cells to the relay")?;
        crate::sys::wait_quiet(&progress.received, result.sent, QUIET_ROUND);
        let last_ns = progress.last_arrival_ns.load(Ordering::Relaxed).max(first_ns);
        result.cpu_secs += sys::process_cpu(me)? - cpu0;
        // The round's own figures for orchestrators that compare rounds (`perf flood`):
        // cells received so far in this round, its seconds, cells sent.
        let round_received = progress.received.load(Ordering::Relaxed) - received0;
        let round_secs = (last_ns - first_ns) as f64 / 1e9;
        sync.ask(&format!("end {} {round_received} {round_secs:.6} {sent}", result.rounds), "ok")?;
        result.blast_secs += (last_ns - first_ns) as f64 / 1e9;
        result.received_measured += progress.received.load(Ordering::Relaxed) - received0;
        base += sent as u64;
        if sent < count {
            eprintln!("loadgen: sending stopped after {SEND_LIMIT:?}");
            break;
        }
    }
    crate::sys::wait_quiet(&shared.progress.received, result.sent, QUIET_FINAL);
    result.received = shared.progress.received.load(Ordering::Relaxed);
    result.cells_per_s =
        if result.blast_secs > 0.0 { result.received_measured as f64 / result.blast_secs } else { 0.0 };
    result.stalls = window.stalls;
    result.window = window.size;
    Ok(result)
}

/// Builds `n` circuits through `path` over `socket` (connected to the first hop).
pub(crate) fn build_circuits(socket: &UdpSocket, path: Vec<PathHop>, n: usize, null: bool) -> Result<Vec<Circuit>> {
    let config =
        CircuitConfig { handshake_timeout: Duration::from_millis(500), handshake_attempts: 8, ..Default::default() };
    let start = Instant::now();
    let mut circuits: Vec<Circuit> = Vec::with_capacity(n);
    let mut index: HashMap<u32, usize> = HashMap::new();
    while circuits.len() < n {
        let id = 0x4000_0000 | (OsRng.next_u32() & 0x3FFF_FFFF);
        if !is_valid_lcid(id) || index.contains_key(&id) {
            continue;
        }
        index.insert(id, circuits.len());
        circuits.push(Circuit::new(path.clone(), id, config, start, &mut OsRng)?);
    }
    let mut open = 0;
    let mut cell = [0u8; CELL_LEN];
    let mut buf = [0u8; 2048];
    while open < n {
        if start.elapsed() > BUILD_LIMIT {
            let one_hop = circuits.iter().filter(|c| c.suites().len() == 1).count();
            let hint = if null && one_hop > 0 {
                " (with the null forwarder, EXTEND must still reach the relay's control plane: cells of a \
                 circuit without a next hop have to take the normal path)"
            } else {
                ""
            };
            bail!("only {open} of {n} circuits built in {BUILD_LIMIT:?}; {one_hop} stopped after the first hop{hint}");
        }
        let now = Instant::now();
        for c in circuits.iter_mut() {
            while let Some(_to) = c.poll_transmit(now, &mut cell, &mut OsRng) {
                socket.send(&cell).context("sending a handshake to the relay")?;
            }
            if let Some(Event::Closed(r)) = c.handle_timeout(now) {
                bail!("circuit closed while building: {r:?}");
            }
        }
        let Ok(len) = socket.recv(&mut buf) else { continue };
        let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(&mut buf[..len]) else { continue };
        let Some(&i) = index.get(&lcid(cell)) else { continue };
        match circuits[i].handle_cell(Instant::now(), cell, &mut OsRng) {
            Ok(Some(Event::Established)) => open += 1,
            Ok(Some(Event::Closed(r))) => bail!("circuit closed while building: {r:?}"),
            _ => {}
        }
    }
    Ok(circuits)
}

/// Seals cells `base .. base + count` (sequence numbers) into the pools, circuits in parallel.
fn seal_round(circuits: &mut [Circuit], pools: &mut [Vec<u8>], base: u64, count: usize) -> Result<()> {
    blast::fill_round(circuits, pools, CELL_LEN, base, count, |circ, _, seq, slot| {
        let cell: &mut [u8; CELL_LEN] = slot.try_into().map_err(|_| anyhow!("cell size"))?;
        let body = payload_mut(cell);
        body[..8].copy_from_slice(&seq.to_be_bytes());
        body[8..PAYLOAD].fill(0xA5);
        circ.seal_data(PAYLOAD, cell).map_err(|e| anyhow!("cannot seal: {e}"))?;
        Ok(())
    })
}
