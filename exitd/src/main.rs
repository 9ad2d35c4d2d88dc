//! `exitd`: the meshvpn exit server.

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Parser, Subcommand};
use exitd::config::ExitConfig;
use exitd::exit::{ExitShared, ExitTerminal};
use exitd::policy::ExitPolicy;
use exitd::pool::AddressPool;
use relayd::terminal::Terminal;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::info;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// meshvpn exit: ends circuits and puts their IP packets on the internet under its own address.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the identity and onion keys (files mode 0600; never overwrites).
    Keygen {
        /// Directory for identity.key and onion.key (created 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print this exit's signed descriptor (base64): exit flag and policy summary included.
    Descriptor {
        /// Configuration file (see exitd.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the exit until SIGTERM or SIGINT (needs CAP_NET_ADMIN: TUN, nftables, sysctls).
    Run {
        /// Configuration file (see exitd.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Turns forwarding on (logged), or refuses with what to do.
fn forwarding(enable: bool) -> Result<()> {
    for path in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
        let on = std::fs::read_to_string(path).map(|v| v.trim() == "1").unwrap_or(false);
        if on {
            continue;
        }
        if !enable {
            bail!("{path} is 0: enable forwarding (sysctl) or set exit.enable_forwarding = true");
        }
        std::fs::write(path, "1").with_context(|| format!("cannot enable forwarding in {path} (needs root)"))?;
        info!("enabled forwarding: {path} = 1");
    }
    Ok(())
}

fn run(path: &std::path::Path) -> Result<()> {
    let config = ExitConfig::load(path)?;
    let keys = relayd::keys::load(&config.relay.key_dir).with_context(|| {
        format!(
            "cannot load keys from {} (key_dir); create them with `exitd keygen --dir`",
            config.relay.key_dir.display()
        )
    })?;
    let exit = &config.exit;
    forwarding(exit.enable_forwarding)?;
    let workers = config.relay.worker_count();
    let mut pool = AddressPool::new(exit.pool_v4, exit.pool_v6, Duration::from_secs(exit.session_grace_secs));
    let (gw4, gw6) = pool.gateway();
    pool.expire(Instant::now());
    let tun = exitd::tun::Tun::create(&exit.tun, workers)
        .with_context(|| format!("cannot create TUN {} (exit.tun)", exit.tun))?;
    let gw4_net = ipnet::Ipv4Net::new(gw4, exit.pool_v4.prefix_len())?;
    let gw6_net = ipnet::Ipv6Net::new(gw6, exit.pool_v6.prefix_len())?;
    exitd::tun::configure(tun.name(), exitd::tun::DEFAULT_MTU, gw4_net, gw6_net)
        .context("cannot configure the TUN device")?;
    let policy = ExitPolicy::new(&config.policy);
    let mut nat = exitd::nft::NatConfig::new(exit.wan.clone(), tun.name().to_string(), exit.pool_v4, exit.pool_v6);
    nat.table = exit.nft_table.clone();
    nat.deny_tcp_ports = config.policy.deny_ports.clone();
    nat.deny_udp_ports = config.policy.deny_ports.clone();
    exitd::nft::install(&nat).context("cannot install the nftables table")?;
    info!(table = %nat.table, wan = %exit.wan, tun = %tun.name(), "NAT installed");

    let mut handoff = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = crossbeam_channel::bounded(4096);
        handoff.push(tx);
        inboxes.push(Some(rx));
    }
    let shared = Arc::new(ExitShared {
        pool: Mutex::new(pool),
        policy: policy.clone(),
        pools: (exit.pool_v4, exit.pool_v6),
        circuit_limit: (exit.circuit_rate, exit.circuit_burst),
        exit_limit: (exit.exit_rate, exit.exit_burst),
        handoff,
        stats: (0..workers).map(|_| Mutex::new(Default::default())).collect(),
    });
    let mut queues: Vec<_> = tun.into_queues().into_iter().map(Some).collect();
    let now = Instant::now();
    let relay = relayd::relay::start_with(&config.relay, keys, |i| {
        let queue = queues.get_mut(i)?.take()?;
        let inbox = inboxes.get_mut(i)?.take()?;
        Some(Box::new(ExitTerminal::new(i, shared.clone(), queue, inbox, now)) as Box<dyn Terminal>)
    })?;
    let metrics_shared = shared.clone();
    let _ = relay.registry.extra.set(Box::new(move || render(&metrics_shared)));
    if let Some(m) = relay.metrics_addr {
        info!("metrics on http://{m}/metrics");
    }
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone()).context("cannot install signal handler")?;
    }
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(mut pool) = shared.pool.lock() {
            pool.expire(Instant::now());
        }
    }
    info!("shutting down: sending DESTROY for live circuits");
    relay.shutdown();
    exitd::nft::remove(&nat.table).context("cannot remove the nftables table")?;
    info!("stopped; nftables table removed");
    Ok(())
}

/// exitd's own series: packets by what happened to them, and sessions.
fn render(shared: &ExitShared) -> String {
    let mut out = String::from(
        "# HELP exitd_packets_total Exit packets by outcome (policy rule, spoof, rate limit, ...).\n# TYPE exitd_packets_total counter\n",
    );
    for (i, slot) in shared.stats.iter().enumerate() {
        if let Ok(counts) = slot.lock() {
            for (what, n) in counts.iter() {
                let _ = writeln!(out, "exitd_packets_total{{worker=\"{i}\",what=\"{what}\"}} {n}");
            }
        }
    }
    if let Ok(pool) = shared.pool.lock() {
        let _ = writeln!(out, "# HELP exitd_sessions Sessions holding inner addresses.\n# TYPE exitd_sessions gauge");
        let _ = writeln!(out, "exitd_sessions {}", pool.sessions());
    }
    out
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Cmd::Keygen { dir } => {
            let keys = relayd::keys::keygen(&dir)?;
            println!("identity {}", keys.identity.public());
        }
        Cmd::Descriptor { config } => {
            let config = ExitConfig::load(&config)?;
            let keys = relayd::keys::load(&config.relay.key_dir)
                .with_context(|| format!("cannot load keys from {} (key_dir)", config.relay.key_dir.display()))?;
            let summary = ExitPolicy::new(&config.policy).summary();
            let signed = relayd::descriptor::signed(&config.relay, &keys, unix_now(), Some(summary))?;
            println!("{}", base64::engine::general_purpose::STANDARD.encode(signed));
        }
        Cmd::Run { config } => run(&config)?,
    }
    Ok(())
}
