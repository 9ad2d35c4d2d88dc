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

mod lab;
mod load;
mod report;
mod wire;

use crate::sys::{self, ChildGuard, TempDir};
use anyhow::{Context, Result, anyhow, bail};
use cellproto::cell::TUN_MTU;
use cellproto::client::PathHop;
use cellproto::handshake::RelayKeys;
use lab::{Echo, Lab, in_ns};
use load::{DriveSpec, Route, drive};
use report::{ExitReport, by_label, print_report, report};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    let dir = TempDir::new("meshvpn-perf-exit")?;
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
    lab.internet.run(|| sys::udp_socket_drops_at("/proc/thread-self/net/udp", ECHO_PORT)).unwrap_or(0)
}

fn run_plain(ctx: &Ctx, lab: &Lab) -> Result<ExitReport> {
    let echo0 = echo_drops(lab);
    let spec = spec(ctx, Route::Plain, Arc::new(AtomicBool::new(false)));
    let result = lab.client.thread("client", move || drive(spec))?.join().map_err(|_| anyhow!("client panicked"))??;
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
    let mut cmd = match &ctx.args.exitd {
        Some(bin) => {
            let mut cmd = lab.exit.command(bin);
            cmd.arg("run").arg("--config").arg(&ctx.config).stdin(Stdio::null());
            cmd
        }
        None => {
            let mut cmd = lab.exit.command(&ctx.exe);
            cmd.arg("exit-child").arg("--config").arg(&ctx.config).stdin(Stdio::piped());
            cmd
        }
    };
    cmd.stdout(Stdio::null()).stderr(stderr);
    // `ip netns exec` execs the command itself: the child's pid is exitd's.
    let mut child = ChildGuard::spawn_in("exitd", &lab.exit, &mut cmd)?;
    let pid = child.pid();
    let echo0 = echo_drops(lab);
    let abort = Arc::new(AtomicBool::new(false));
    let hop = PathHop { keys: ctx.keys, addr: SocketAddr::from((EXIT, EXIT_PORT)) };
    let route = Route::Exit { hop, circuits: ctx.args.circuits, pid };
    let spec = spec(ctx, route, abort.clone());
    let handle = lab.client.thread("client", move || drive(spec))?;
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
    match in_ns(&lab.client, move || sys::scrape(metrics)) {
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

/// exitd's TUN drop counters: (kernel → exitd: tx dropped, exitd → kernel: rx dropped).
fn tun_drops(ns: &netns::NetNs) -> Option<(u64, u64)> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", TUN]).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let s = v.get(0)?.get("stats64")?;
    Some((s.get("tx")?.get("dropped")?.as_u64()?, s.get("rx")?.get("dropped")?.as_u64()?))
}
