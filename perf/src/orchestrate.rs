//! `perf relay`: three runs, each a relay process and a load generator process on loopback.
//!
//! 1. relayd's engine (`perf relay-child`, i.e. `relayd::relay::start`, or `--relayd PATH run`);
//! 2. the same with `[bench] null_forwarder = true` (no cryptography: the I/O ceiling);
//! 3. `perf tokio-relay`, a plain tokio relay with the same cryptography.
//!
//! For each: keys and a config in a temporary directory, free loopback ports, the relay started
//! and probed with STUN, then `perf loadgen --sync`, whose line protocol lets this process read
//! the relay's CPU time (`/proc/PID/stat`) right before and after each blast. Relay metrics and
//! the kernel's per-socket drop counters (`/proc/net/udp`) say where lost cells went. Children
//! are killed and reaped on every path (and by the kernel if this process dies).

use crate::blast::ratio;
use crate::loadgen::LoadgenResult;
use crate::relayd_args::{RelaydArgs, RelaydSetup};
use crate::sys::{self, ChildGuard, LineReader, TempDir};
use anyhow::{Context, Result, anyhow, bail};
use cellproto::cell::CELL_LEN;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Goals from the issue.
const GOAL_VS_NULL: f64 = 0.8;
const GOAL_VS_TOKIO: f64 = 3.0;
const GOAL_PER_CORE: f64 = 1_000_000.0;
/// Longest wait for any line of the load generator (sealing a round, a blast and its tail).
const LINE_WAIT: Duration = Duration::from_secs(180);

/// `perf relay` options.
#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// DATA cells per run.
    #[arg(long, default_value_t = 2_000_000)]
    pub cells: u64,
    /// Circuits per run (2 hops: the relay under test, then the load generator's sink).
    #[arg(long, default_value_t = 64)]
    pub circuits: usize,
    /// relayd worker threads (default: the number of CPU cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// End with one line of JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub relay: RelaydArgs,
    /// The load generator's initial in-flight window (cells).
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// The load generator sends with UDP GSO instead of sendmmsg.
    #[arg(long)]
    pub gso: bool,
    /// Cells the load generator seals ahead per round.
    #[arg(long, default_value_t = 1 << 20)]
    pub pool: usize,
}

/// One relay's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    /// Which relay.
    pub name: String,
    /// Cells forwarded per second (arrived at the sink / time from first send to last arrival).
    pub cells_per_s: f64,
    /// `cells_per_s` × 1452 × 8 / 1e9.
    pub gbps: f64,
    /// Latency from sending to the sink, sampled, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest sample, µs.
    pub max_us: f64,
    /// Cells lost anywhere: sent − received.
    pub drops: u64,
    /// Cells sent.
    pub sent: u64,
    /// Cells received by the sink.
    pub received: u64,
    /// Measured seconds.
    pub blast_secs: f64,
    /// Relay process CPU seconds per million forwarded cells.
    pub cpu_s_per_mcell: f64,
    /// Relay process CPU seconds during the blasts.
    pub relay_cpu_secs: f64,
    /// Cores the relay process used on average during the blasts.
    pub relay_cores: f64,
    /// Cores by relay thread name.
    pub relay_threads: BTreeMap<String, f64>,
    /// Cores the load generator used (sender + sink).
    pub loadgen_cores: f64,
    /// Cores in soft interrupts meanwhile (accounted to no process: the network stack's
    /// receive path, on behalf of all three processes).
    pub softirq_cores: f64,
    /// Cores busy with anything else on the machine meanwhile (other processes).
    pub other_cores: f64,
    /// Cells the relay received and sent (relayd metrics), during the run.
    pub relay_cells_in: Option<u64>,
    /// Cells the relay sent.
    pub relay_cells_out: Option<u64>,
    /// `relayd_drops_total` during the run, by reason (relayd only).
    pub relay_drops: Option<BTreeMap<String, u64>>,
    /// Datagrams the kernel dropped at the relay's socket(s) (receive buffer full).
    pub relay_socket_drops: u64,
    /// Datagrams the kernel dropped at the sink's socket.
    pub sink_socket_drops: u64,
    /// Times the load generator's window stalled (cells written off).
    pub stalls: u64,
    /// Sampled cells the sink could not open.
    pub bad: u64,
    /// Latency samples.
    pub samples: u64,
    /// relayd's data path ("io_uring", "recvmmsg"); "tokio" for the baseline.
    pub datapath: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Relayd,
    Null,
    Tokio,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Relayd => "relayd",
            Kind::Null => "relayd null forwarder",
            Kind::Tokio => "tokio baseline",
        }
    }
}

/// What every run shares.
struct Ctx {
    args: RelayArgs,
    workers: usize,
    dir: TempDir,
    key_dir: PathBuf,
    identity: String,
    onion_key: String,
    exe: PathBuf,
}

/// Runs the benchmark and prints the report (and JSON with `--json`).
pub fn run(args: RelayArgs) -> Result<()> {
    if args.cells == 0 || args.circuits == 0 {
        bail!("--cells and --circuits must be at least 1");
    }
    let RelaydSetup { cores, workers, dir, key_dir, keys } = args.relay.setup(args.workers, "meshvpn-perf")?;
    let ctx = Ctx {
        identity: hex::encode(keys.identity.public().0),
        onion_key: hex::encode(keys.onion[0].public()),
        key_dir,
        workers,
        exe: std::env::current_exe().context("cannot find the perf executable")?,
        dir,
        args,
    };
    eprintln!(
        "perf relay: {} cells of {CELL_LEN} bytes over {} circuits per run; relayd with {workers} worker(s); {cores} CPU core(s)",
        ctx.args.cells, ctx.args.circuits
    );
    let mut reports = Vec::new();
    for kind in [Kind::Relayd, Kind::Null, Kind::Tokio] {
        eprintln!("--- {} ---", kind.name());
        let report = run_one(&ctx, kind).with_context(|| format!("{} run failed", kind.name()))?;
        eprintln!(
            "{}: {:.0} cells/s, p50 {:.0} µs, p99 {:.0} µs, {} drops",
            report.name, report.cells_per_s, report.p50_us, report.p99_us, report.drops
        );
        reports.push(report);
    }
    let [relayd, null, tokio] = <[RunReport; 3]>::try_from(reports).map_err(|_| anyhow!("three runs expected"))?;
    print_report(&ctx, cores, &relayd, &null, &tokio)
}

fn print_report(ctx: &Ctx, cores: usize, relayd: &RunReport, null: &RunReport, tokio: &RunReport) -> Result<()> {
    let vs_null = ratio(relayd.cells_per_s, null.cells_per_s);
    let vs_tokio = ratio(relayd.cells_per_s, tokio.cells_per_s);
    let per_core = relayd.cells_per_s / ctx.workers as f64;
    let per_cpu_s = ratio(1e6, relayd.cpu_s_per_mcell);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nperf relay: {} cells × {CELL_LEN} B over {} circuits; relayd {} worker(s), data path {}; {cores} CPU core(s) shared by relay and load generator",
        ctx.args.cells, ctx.args.circuits, ctx.workers, relayd.datapath
    )?;
    writeln!(
        out,
        "{:<22} {:>10} {:>6} {:>8} {:>8} {:>12} {:>12} {:>14} {:>8} {:>12} {:>8}",
        "run",
        "cells/s",
        "Gb/s",
        "p50 µs",
        "p99 µs",
        "CPU s/Mcell",
        "relay cores",
        "loadgen cores",
        "softirq",
        "other cores",
        "drops"
    )?;
    for r in [relayd, null, tokio] {
        writeln!(
            out,
            "{:<22} {:>10.0} {:>6.2} {:>8.0} {:>8.0} {:>12.2} {:>12.2} {:>14.2} {:>8.2} {:>12.2} {:>8}",
            r.name,
            r.cells_per_s,
            r.gbps,
            r.p50_us,
            r.p99_us,
            r.cpu_s_per_mcell,
            r.relay_cores,
            r.loadgen_cores,
            r.softirq_cores,
            r.other_cores,
            r.drops
        )?;
    }
    writeln!(out, "where cells were lost (sent → relay socket → relay → sink socket → sink):")?;
    for r in [relayd, null, tokio] {
        let relay = match &r.relay_drops {
            Some(d) if d.values().any(|&v| v > 0) => {
                d.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            }
            Some(_) => "0".into(),
            None => "n/a".into(),
        };
        writeln!(
            out,
            "  {:<22} relay socket {}, relay {}, sink socket {}; window stalls {}; sampled cells not opened {}",
            r.name, r.relay_socket_drops, relay, r.sink_socket_drops, r.stalls, r.bad
        )?;
    }
    let verdict = |ok: bool| if ok { "goal met" } else { "below goal" };
    writeln!(out, "ratios:")?;
    writeln!(
        out,
        "  relayd / null forwarder  {vs_null:>10.2}   goal ≥ {GOAL_VS_NULL}   {}",
        verdict(vs_null >= GOAL_VS_NULL)
    )?;
    writeln!(
        out,
        "  relayd / tokio baseline  {vs_tokio:>10.2}   goal ≥ {GOAL_VS_TOKIO}     {}",
        verdict(vs_tokio >= GOAL_VS_TOKIO)
    )?;
    writeln!(out, "  cells/s per worker core  {per_core:>10.0}   goal ≥ 1 M   {}", verdict(per_core >= GOAL_PER_CORE))?;
    writeln!(
        out,
        "  (cells per relay CPU-second: {per_cpu_s:.0}, i.e. 1 / relayd's CPU time per cell, whatever share of the cores it got)"
    )?;
    crate::report::end(&mut out, ctx.args.json, || {
        Ok(serde_json::json!({
            "cells_per_s": relayd.cells_per_s,
            "gbps": relayd.gbps,
            "p50_us": relayd.p50_us,
            "p99_us": relayd.p99_us,
            "drops": relayd.drops,
            "vs_null": vs_null,
            "vs_tokio": vs_tokio,
            "per_core_cells_per_s": per_core,
            "cells_per_cpu_s": per_cpu_s,
            "workers": ctx.workers,
            "cores": cores,
            "cpu_s_per_mcell": relayd.cpu_s_per_mcell,
            "cells": ctx.args.cells,
            "circuits": ctx.args.circuits,
            "goals": {
                "vs_null": vs_null >= GOAL_VS_NULL,
                "vs_tokio": vs_tokio >= GOAL_VS_TOKIO,
                "per_core": per_core >= GOAL_PER_CORE,
            },
            "relayd": serde_json::to_value(relayd)?,
            "null": serde_json::to_value(null)?,
            "tokio": serde_json::to_value(tokio)?,
        }))
    })
}

fn config_text(ctx: &Ctx, port: u16, metrics_port: u16, null: bool) -> String {
    format!(
        "# written by perf relay\n\
         listen = \"127.0.0.1:{port}\"\n\
         key_dir = \"{}\"\n\
         nickname = \"perf\"\n\
         workers = {}\n\
         pin_workers = {}\n\
         datapath = \"{}\"\n\
         [limits]\n\
         exempt = [\"127.0.0.0/8\"]\n\
         [extend]\n\
         allow_private = true\n\
         [metrics]\n\
         listen = \"127.0.0.1:{metrics_port}\"\n\
         [bench]\n\
         null_forwarder = {null}\n",
        ctx.key_dir.display(),
        ctx.workers,
        !ctx.args.relay.no_pin,
        ctx.args.relay.datapath,
    )
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("last lines of {}:\n{tail}", path.display())
}

/// Starts the relay of `kind`; returns it, its address and its metrics address.
fn start_relay(ctx: &Ctx, kind: Kind, log: &Path) -> Result<(ChildGuard, SocketAddr, Option<SocketAddr>)> {
    let port = sys::free_udp_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stderr = std::fs::File::create(log)?;
    if kind == Kind::Tokio {
        let mut cmd = Command::new(&ctx.exe);
        cmd.arg("tokio-relay").arg("--listen").arg(addr.to_string()).arg("--key-dir").arg(&ctx.key_dir);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(stderr);
        return Ok((ChildGuard::spawn("tokio-relay", &mut cmd)?, addr, None));
    }
    let metrics_port = sys::free_tcp_port()?;
    let config = ctx.dir.0.join(if kind == Kind::Null { "relayd-null.toml" } else { "relayd.toml" });
    let text = config_text(ctx, port, metrics_port, kind == Kind::Null);
    relayd::config::Config::parse(&text, &config)?;
    std::fs::write(&config, text)?;
    let mut cmd = ctx.args.relay.command(&ctx.exe, &config);
    cmd.stdout(Stdio::null()).stderr(stderr);
    let child = ChildGuard::spawn("relayd", &mut cmd)?;
    Ok((child, addr, Some(SocketAddr::from(([127, 0, 0, 1], metrics_port)))))
}

/// relayd's counters we look at, from one scrape.
#[derive(Debug, Default, Clone)]
struct RelayCounters {
    cells_in: f64,
    cells_out: f64,
    drops: BTreeMap<String, f64>,
    datapath: String,
}

fn relay_counters(addr: SocketAddr) -> Result<RelayCounters> {
    let m = sys::scrape(addr)?;
    let mut c = RelayCounters {
        cells_in: sys::metric_sum(&m, "relayd_cells_in_total"),
        cells_out: sys::metric_sum(&m, "relayd_cells_out_total"),
        ..Default::default()
    };
    for (k, v) in &m {
        if let Some(labels) = k.strip_prefix("relayd_drops_total{")
            && let Some(reason) = labels.split("reason=\"").nth(1).and_then(|r| r.split('"').next())
        {
            *c.drops.entry(reason.to_string()).or_insert(0.0) += v;
        }
        if let Some(labels) = k.strip_prefix("relayd_info{")
            && let Some(dp) = labels.split("datapath=\"").nth(1).and_then(|r| r.split('"').next())
        {
            c.datapath = dp.to_string();
        }
    }
    Ok(c)
}

fn run_one(ctx: &Ctx, kind: Kind) -> Result<RunReport> {
    let log = ctx.dir.0.join(format!("{}.log", kind.name().replace(' ', "-")));
    let (mut relay, addr, metrics) = start_relay(ctx, kind, &log)?;
    sys::wait_for_stun(addr, &mut relay, Duration::from_secs(15)).map_err(|e| anyhow!("{e}\n{}", log_tail(&log)))?;
    let result = measure(ctx, kind, &mut relay, addr, metrics);
    relay.stop();
    result.map_err(|e| anyhow!("{e:#}\n{}", log_tail(&log)))
}

fn measure(
    ctx: &Ctx,
    kind: Kind,
    relay: &mut ChildGuard,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
) -> Result<RunReport> {
    let a = &ctx.args;
    let mut cmd = Command::new(&ctx.exe);
    cmd.arg("loadgen")
        .args(["--relay", &addr.to_string(), "--identity", &ctx.identity, "--onion-key", &ctx.onion_key])
        .args(["--cells", &a.cells.to_string(), "--circuits", &a.circuits.to_string()])
        .args(["--window", &a.window.to_string(), "--pool", &a.pool.to_string(), "--sync"]);
    if kind == Kind::Null {
        cmd.arg("--null");
    }
    if a.gso {
        cmd.arg("--gso");
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut loadgen = ChildGuard::spawn("loadgen", &mut cmd)?;
    let mut to_loadgen = loadgen.child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let lines = LineReader::new(loadgen.child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
    let pid = relay.pid();
    let before = match metrics {
        Some(m) => Some(relay_counters(m)?),
        None => None,
    };
    let relay_drops0 = sys::udp_socket_drops(addr.port());
    let mut cpu = 0.0;
    let mut cpu0 = 0.0;
    let (mut busy, mut softirq) = (0.0, 0.0);
    let (mut busy0, mut softirq0) = (0.0, 0.0);
    let mut threads: BTreeMap<String, f64> = BTreeMap::new();
    let mut threads0 = BTreeMap::new();
    let result: LoadgenResult = loop {
        let line = lines.next(LINE_WAIT).map_err(|e| match loadgen.check_alive() {
            Err(dead) => dead,
            Ok(()) => e,
        })?;
        relay.check_alive()?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("ready") => {}
            Some("start") => {
                threads0 = sys::thread_cpu(pid);
                cpu0 = sys::process_cpu(pid)?;
                (busy0, softirq0) = sys::machine_cpu();
                writeln!(to_loadgen, "go")?;
            }
            Some("end") => {
                cpu += sys::process_cpu(pid)? - cpu0;
                let (b, s) = sys::machine_cpu();
                busy += b - busy0;
                softirq += s - softirq0;
                for (name, secs) in sys::thread_cpu(pid) {
                    *threads.entry(name.clone()).or_insert(0.0) += secs - threads0.get(&name).copied().unwrap_or(0.0);
                }
                writeln!(to_loadgen, "ok")?;
            }
            Some(w) if w.starts_with('{') => {
                break serde_json::from_str(&line).context("cannot parse the load generator's result")?;
            }
            _ => eprintln!("loadgen: {line}"),
        }
    };
    drop(to_loadgen);
    loadgen.stop();
    // Workers publish their counters every 100 ms.
    std::thread::sleep(Duration::from_millis(250));
    let after = match metrics {
        Some(m) => Some(relay_counters(m)?),
        None => None,
    };
    let forwarded = result.received_measured.max(1) as f64;
    let secs = result.blast_secs.max(1e-9);
    let mut report = RunReport {
        name: kind.name().to_string(),
        cells_per_s: result.cells_per_s,
        gbps: result.cells_per_s * CELL_LEN as f64 * 8.0 / 1e9,
        p50_us: result.p50_us,
        p99_us: result.p99_us,
        max_us: result.max_us,
        drops: result.sent.saturating_sub(result.received),
        sent: result.sent,
        received: result.received,
        blast_secs: result.blast_secs,
        cpu_s_per_mcell: cpu / forwarded * 1e6,
        relay_cpu_secs: cpu,
        relay_cores: cpu / secs,
        relay_threads: threads.into_iter().filter(|(_, s)| *s > 0.0).map(|(n, s)| (n, s / secs)).collect(),
        loadgen_cores: result.cpu_secs / secs,
        softirq_cores: softirq / secs,
        other_cores: ((busy - softirq - cpu - result.cpu_secs) / secs).max(0.0),
        relay_socket_drops: sys::udp_socket_drops(addr.port()).saturating_sub(relay_drops0),
        sink_socket_drops: result.sink_socket_drops,
        stalls: result.stalls,
        bad: result.bad,
        samples: result.samples,
        datapath: "tokio".into(),
        ..Default::default()
    };
    if let (Some(b), Some(a)) = (before, after) {
        report.relay_cells_in = Some((a.cells_in - b.cells_in) as u64);
        report.relay_cells_out = Some((a.cells_out - b.cells_out) as u64);
        report.relay_drops = Some(
            a.drops.iter().map(|(k, v)| (k.clone(), (v - b.drops.get(k).copied().unwrap_or(0.0)) as u64)).collect(),
        );
        report.datapath = a.datapath;
    }
    Ok(report)
}
