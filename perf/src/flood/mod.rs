//! `perf flood`: established circuits carry traffic through relayd alone, then the same while
//! the relay is flooded, in rounds that alternate (baseline, flood, baseline, flood, …) against
//! one relay process, on loopback, so that a drift of the machine's load hits both alike.
//!
//! 1. relayd's engine starts (`perf relay-child`, or `--relayd PATH run`) with its default
//!    limits (nothing exempt; `extend.allow_private` so the load generator's sink on loopback
//!    can be the second hop, and the EXTEND flood's target is allowed).
//! 2. `perf loadgen --sync` builds `--circuits` 2-hop circuits (before any flood) and blasts
//!    `--cells` DATA cells through them per round; its `end` lines give each round's cells and
//!    seconds.
//! 3. In every round honest 1-hop circuits are built at `--honest-rate` from 20 loopback
//!    sources ([`honest`]); in flood rounds also a CREATE flood from `--sources` spoofed
//!    sources at `--flood-rate` and an EXTEND flood on one circuit at `--extend-rate`
//!    ([`attack`]). A flood round's blast starts once the relay says it is under load (or
//!    after 5 s); the floods pause after the honest builds in flight have finished.
//!
//! Reported ([`report`]): cells/s per round and per kind, and their ratio (goal ≥ 0.8); the
//! share of honest builds that succeeded within 5 s during the floods (goal ≥ 95 %); the
//! relay's RSS (start, before the first flood, after the last, peak); CPU by process; and what
//! the relay's metrics say (handshakes, COOKIEs, drops). Bounded: the flood threads and the
//! builders stop by themselves after 300 s, the load generator after its 60 s sending limit,
//! every wait for it after 180 s.

mod attack;
mod honest;
mod report;

use crate::orchestrate::log_tail;
use crate::relayd_args::{RelaydArgs, RelaydSetup};
use crate::sys::{self, ChildGuard, LineReader};
use anyhow::{Context, Result, anyhow, bail};
use attack::{CreateFlood, ExtendFlood};
use cellproto::client::PathHop;
use cellproto::handshake::RelayKeys;
use honest::Honest;
use report::{Cpu, Memory, Phase, Report, Setup};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
/// Longest wait for a line of the load generator.
const LINE_WAIT: Duration = Duration::from_secs(180);
/// Longest wait for the relay to go under load before the flood phase's blast.
const LOAD_WAIT: Duration = Duration::from_secs(5);
/// Sources of the honest builds: 127.0.3.1 ..= 127.0.3.20.
const HONEST_SOURCES: u8 = 20;

/// `perf flood` options.
#[derive(clap::Args, Debug, Clone)]
pub struct FloodArgs {
    /// DATA cells per round.
    #[arg(long, default_value_t = 500_000)]
    pub cells: u64,
    /// Pairs of rounds (a baseline, then a flood).
    #[arg(long, default_value_t = 3)]
    pub pairs: u32,
    /// Established circuits carrying them (2 hops: the relay, then the load generator's sink).
    #[arg(long, default_value_t = 32)]
    pub circuits: usize,
    /// relayd worker threads (default: the number of CPU cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Spoofed CREATEs per second during the flood.
    #[arg(long, default_value_t = 10_000.0)]
    pub flood_rate: f64,
    /// Distinct spoofed sources (127.1.0.1 onwards; 256 without a raw socket).
    #[arg(long, default_value_t = 65_536)]
    pub sources: u32,
    /// EXTENDs per second on one circuit during the flood.
    #[arg(long, default_value_t = 10_000.0)]
    pub extend_rate: f64,
    /// Honest circuit builds per second, in every round.
    #[arg(long, default_value_t = 20.0)]
    pub honest_rate: f64,
    /// Spoof with UDP sockets bound to loopback sources even when a raw socket is available.
    #[arg(long)]
    pub no_raw: bool,
    /// End with one line of JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub relay: RelaydArgs,
    /// The load generator's in-flight window (cells).
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
}

/// Runs the benchmark and prints the report (and JSON with `--json`).
pub fn run(args: FloodArgs) -> Result<()> {
    if args.cells == 0 || args.circuits == 0 || args.pairs == 0 {
        bail!("--cells, --circuits and --pairs must be at least 1");
    }
    if !(args.flood_rate > 0.0 && args.extend_rate > 0.0 && args.honest_rate > 0.0) {
        bail!("--flood-rate, --extend-rate and --honest-rate must be positive");
    }
    let RelaydSetup { cores, workers, dir, key_dir, keys } = args.relay.setup(args.workers, "meshvpn-perf-flood")?;
    let relay_keys = RelayKeys { identity: keys.identity.public().0, onion_key: *keys.onion[0].public() };
    let exe = std::env::current_exe().context("cannot find the perf executable")?;
    eprintln!(
        "perf flood: {} pairs of rounds of {} cells over {} circuits; relayd with {workers} worker(s); {cores} CPU core(s)",
        args.pairs, args.cells, args.circuits
    );
    let log = dir.0.join("relayd.log");
    let (mut relay, addr, metrics) = start_relay(&args, &dir.0, &key_dir, workers, &exe, &log)?;
    sys::wait_for_stun(addr, &mut relay, Duration::from_secs(15)).map_err(|e| anyhow!("{e}\n{}", log_tail(&log)))?;
    let hop = PathHop { keys: relay_keys, addr };
    let result = measure(&args, &exe, &mut relay, hop, metrics);
    relay.stop();
    let report = result.map_err(|e| anyhow!("{e:#}\n{}", log_tail(&log)))?;
    let setup = Setup {
        cells: args.cells,
        circuits: args.circuits,
        workers,
        cores,
        sources: args.sources,
        rates: (args.flood_rate, args.extend_rate, args.honest_rate),
        honest_sources: HONEST_SOURCES,
        json: args.json,
    };
    report::print(&setup, &report)
}

fn start_relay(
    args: &FloodArgs,
    dir: &std::path::Path,
    key_dir: &std::path::Path,
    workers: usize,
    exe: &std::path::Path,
    log: &std::path::Path,
) -> Result<(ChildGuard, SocketAddr, SocketAddr)> {
    let port = sys::free_udp_port()?;
    let metrics_port = sys::free_tcp_port()?;
    let text = format!(
        "# written by perf flood: relayd's default limits\n\
         listen = \"127.0.0.1:{port}\"\nkey_dir = \"{}\"\nnickname = \"flood\"\nworkers = {workers}\n\
         pin_workers = {}\ndatapath = \"{}\"\n[extend]\nallow_private = true\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        key_dir.display(),
        !args.relay.no_pin,
        args.relay.datapath,
    );
    let config = dir.join("relayd.toml");
    relayd::config::Config::parse(&text, &config)?;
    std::fs::write(&config, text)?;
    let mut cmd = args.relay.command(exe, &config);
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(log)?);
    let child = ChildGuard::spawn("relayd", &mut cmd)?;
    Ok((child, SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from(([127, 0, 0, 1], metrics_port))))
}

/// The floods, paused between flood rounds.
struct Attack {
    creates: attack::Flood,
    extends: attack::Flood,
}

fn measure(
    args: &FloodArgs,
    exe: &std::path::Path,
    relay: &mut ChildGuard,
    hop: PathHop,
    metrics: SocketAddr,
) -> Result<Report> {
    // EXTENDs go to a socket nobody reads: each stays pending.
    let blackhole = UdpSocket::bind("127.0.0.1:0")?;
    let extend_flood = ExtendFlood::prepare(hop, Ipv4Addr::new(127, 0, 0, 4), blackhole.local_addr()?)?;
    let (creates, spoof) = CreateFlood::start(hop.addr, &hop, args.flood_rate, args.sources, !args.no_raw)?;
    let mut attack = Attack { creates, extends: extend_flood.start(args.extend_rate)? };
    let result = rounds(args, exe, relay, hop, metrics, &mut attack);
    attack.creates.stop()?;
    attack.extends.stop()?;
    drop(blackhole);
    let (rounds, memory) = result?;
    Ok(Report { rounds, memory, spoof })
}

/// Runs the load generator's rounds, flooding every second one.
fn rounds(
    args: &FloodArgs,
    exe: &std::path::Path,
    relay: &mut ChildGuard,
    hop: PathHop,
    metrics: SocketAddr,
    attack: &mut Attack,
) -> Result<(Vec<Phase>, Memory)> {
    let honest_sources: Vec<Ipv4Addr> = (1..=HONEST_SOURCES).map(|i| Ipv4Addr::new(127, 0, 3, i)).collect();
    let total = args.cells * 2 * u64::from(args.pairs);
    let mut cmd = Command::new(exe);
    cmd.arg("loadgen")
        .args(["--relay", &hop.addr.to_string()])
        .args(["--identity", &hex::encode(hop.keys.identity), "--onion-key", &hex::encode(hop.keys.onion_key)])
        .args(["--cells", &total.to_string(), "--pool", &args.cells.to_string()])
        .args(["--circuits", &args.circuits.to_string(), "--window", &args.window.to_string(), "--sync"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut loadgen = ChildGuard::spawn("loadgen", &mut cmd)?;
    let mut to_loadgen = loadgen.child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let lines = LineReader::new(loadgen.child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
    let pid = relay.pid();
    let loadgen_pid = loadgen.pid();
    let mut memory = Memory::default();
    let mut rounds: Vec<Phase> = Vec::new();
    let mut honest: Option<Honest> = None;
    let mut cpu0 = Cpu::read(pid, loadgen_pid);
    let mut counters0 = sys::scrape(metrics)?;
    loop {
        let line = lines.next(LINE_WAIT).map_err(|e| match loadgen.check_alive() {
            Err(dead) => dead,
            Ok(()) => e,
        })?;
        relay.check_alive()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let flood_round = rounds.len() % 2 == 1;
        match words.first().copied() {
            Some("ready") => memory.start_kib = rss_kib(pid, "VmRSS"),
            Some("start") => {
                counters0 = sys::scrape(metrics)?;
                cpu0 = Cpu::read(pid, loadgen_pid);
                if flood_round {
                    if memory.before_flood_kib == 0 {
                        memory.before_flood_kib = rss_kib(pid, "VmRSS");
                    }
                    attack.creates.resume();
                    attack.extends.resume();
                }
                honest = Some(Honest::start(hop, &honest_sources, args.honest_rate)?);
                if flood_round {
                    wait_under_load(metrics);
                }
                writeln!(to_loadgen, "go")?;
            }
            Some("end") => {
                let received: u64 = words.get(2).and_then(|w| w.parse().ok()).unwrap_or(0);
                let secs: f64 = words.get(3).and_then(|w| w.parse().ok()).unwrap_or(0.0);
                let sent: u64 = words.get(4).and_then(|w| w.parse().ok()).unwrap_or(0);
                let cpu1 = Cpu::read(pid, loadgen_pid);
                let kind = if flood_round { "flood" } else { "baseline" };
                let mut round = Phase::new(kind, sent, received, secs, &cpu0, &cpu1);
                // Builds in flight finish under the same conditions (the flood still runs).
                round.honest = honest.take().map(Honest::finish).transpose()?.unwrap_or_default();
                if flood_round {
                    let c = attack.creates.pause();
                    let e = attack.extends.pause();
                    round.creates_sent = c.datagrams;
                    round.extends_sent = e.datagrams;
                    round.flood_secs = c.secs;
                    memory.after_flood_kib = rss_kib(pid, "VmRSS");
                }
                // Workers publish their counters every 100 ms.
                std::thread::sleep(Duration::from_millis(250));
                round.relay = report::counter_deltas(&counters0, &sys::scrape(metrics)?);
                eprintln!("{kind} round: {:.0} cells/s", round.cells_per_s);
                rounds.push(round);
                writeln!(to_loadgen, "ok")?;
            }
            Some(w) if w.starts_with('{') => break,
            _ => eprintln!("loadgen: {line}"),
        }
    }
    drop(to_loadgen);
    loadgen.stop();
    memory.peak_kib = rss_kib(pid, "VmHWM");
    if rounds.len() != 2 * args.pairs as usize {
        bail!("{} rounds instead of {} (the load generator stopped early)", rounds.len(), 2 * args.pairs);
    }
    Ok((rounds, memory))
}

/// Waits (bounded) until relayd says it is under load.
fn wait_under_load(metrics: SocketAddr) {
    let deadline = Instant::now() + LOAD_WAIT;
    while Instant::now() < deadline {
        if sys::scrape(metrics).ok().and_then(|m| m.get("relayd_under_load").copied()) == Some(1.0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("perf flood: the relay did not go under load within {LOAD_WAIT:?}");
}

/// A line of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`); 0 if unreadable.
fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
