//! `perf`: meshvpn's benchmark harness.
//!
//! `perf relay` measures relayd's forwarding on loopback against two baselines in one run: the
//! same engine with the cryptography switched off (`[bench] null_forwarder`, the I/O ceiling)
//! and a plain tokio `recv_from`/`send_to` relay with the same cryptography. The relay under
//! test and the load generator are separate processes (`perf relay-child`, `perf tokio-relay`,
//! `perf loadgen`: this binary re-executing itself), so the relay's CPU time can be read from
//! `/proc` on its own.
//!
//! `perf flood` measures what a flood does to relayd: established circuits' throughput alone and
//! while a CREATE flood from many spoofed sources and an EXTEND flood from one circuit hit the
//! relay, honest circuit builds during the flood, and the relay's memory.
//!
//! `perf exit` measures exitd's round trip (IP packets in DATA cells through 1-hop circuits into
//! its TUN, out with NAT to an echo server and back) against plain kernel routing of the same
//! packets, in network namespaces it creates (root only); exitd runs as `perf exit-child`.

#![forbid(unsafe_code)]

mod blast;
mod exit;
mod flood;
mod loadgen;
mod orchestrate;
mod relayd_args;
mod report;
mod sys;
mod tokio_relay;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// meshvpn benchmark harness.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Benchmark relayd against its null forwarder and a plain tokio relay (loopback only).
    Relay(orchestrate::RelayArgs),
    /// Established circuits' throughput through relayd alone and under a CREATE flood from
    /// spoofed sources and an EXTEND flood; honest builds during the flood; relay memory
    /// (loopback; spoofs with a raw socket when run as root).
    Flood(flood::FloodArgs),
    /// The load generator: builds 2-hop circuits through a relay to a sink in this process and
    /// blasts DATA cells through them (started by `perf relay`).
    Loadgen(loadgen::LoadgenArgs),
    /// The baseline: a straightforward tokio relay with the same cryptography.
    TokioRelay(tokio_relay::TokioRelayArgs),
    /// Benchmark exitd's round trip (cells into TUN and back) against plain kernel routing, in
    /// network namespaces this command creates and deletes (root only).
    Exit(exit::ExitArgs),
    /// Prints a relay's identity and onion key in hex (for running `perf loadgen` by hand).
    Keys {
        /// Directory with identity.key and onion.key.
        #[arg(long)]
        key_dir: PathBuf,
    },
    /// relayd's engine in this process (`relayd::relay::start`), until stdin closes or SIGTERM.
    #[command(hide = true)]
    RelayChild {
        /// relayd configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// exitd's engine in this process (`exitd::daemon::run`), until stdin closes or SIGTERM.
    #[command(hide = true)]
    ExitChild {
        /// exitd configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Relay(args) => orchestrate::run(args),
        Cmd::Flood(args) => flood::run(args),
        Cmd::Exit(args) => exit::run(args),
        Cmd::ExitChild { config } => {
            sys::die_with_parent();
            exit_child(&config)
        }
        Cmd::Loadgen(args) => {
            sys::die_with_parent();
            loadgen::run(args)
        }
        Cmd::TokioRelay(args) => {
            sys::die_with_parent();
            tokio_relay::run(args)
        }
        Cmd::RelayChild { config } => {
            sys::die_with_parent();
            relay_child(&config)
        }
        Cmd::Keys { key_dir } => {
            let keys = relayd::keys::load(&key_dir)?;
            println!(
                "--identity {} --onion-key {}",
                hex::encode(keys.identity.public().0),
                hex::encode(keys.onion[0].public())
            );
            Ok(())
        }
    }
}

/// Runs relayd's engine as `relayd run` does, and stops when stdin reaches end of file (the
/// orchestrator exited or closed it) or on SIGTERM/SIGINT.
fn relay_child(path: &std::path::Path) -> Result<()> {
    use std::sync::atomic::Ordering;
    daemonkit::log::init_logging();
    let config = relayd::config::Config::load(path)?;
    let keys = relayd::keys::load(&config.key_dir)
        .with_context(|| format!("cannot load keys from {}", config.key_dir.display()))?;
    let relay = relayd::relay::start(&config, keys)?;
    let stop = daemonkit::signals::stop_flag().context("cannot install signal handler")?;
    sys::stop_on_stdin_eof(stop.clone());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    relay.shutdown();
    Ok(())
}

/// Runs exitd as `exitd run` does (`exitd::daemon::run`: forwarding, TUN, nftables, the relay
/// engine), and stops when stdin reaches end of file or on SIGTERM/SIGINT; the nftables table
/// is removed on the way out.
fn exit_child(path: &std::path::Path) -> Result<()> {
    daemonkit::log::init_logging();
    let stop = daemonkit::signals::stop_flag().context("cannot install signal handler")?;
    sys::stop_on_stdin_eof(stop.clone());
    exitd::daemon::run(path, stop)
}
