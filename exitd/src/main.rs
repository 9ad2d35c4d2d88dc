//! `exitd`: the meshvpn exit server.

use anyhow::{Context, Result};
use base64::Engine as _;
use clap::{CommandFactory, Parser, Subcommand};
use exitd::config::ExitConfig;
use exitd::policy::ExitPolicy;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

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
    /// Onion key rotation: onion.key becomes onion.key.prev and a new onion.key is made; a
    /// running exit takes both on SIGHUP (`systemctl reload exitd`). Publish a new descriptor.
    RotateOnion {
        /// The key directory (`key_dir`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print this exit's signed descriptor (base64): exit flag and policy summary included.
    Descriptor {
        /// Configuration file (see exitd.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the exit until SIGTERM or SIGINT (needs CAP_NET_ADMIN: TUN, nftables, sysctls);
    /// SIGHUP re-reads the configuration (relayd's live keys; `[exit]` and `[policy]` need a
    /// restart, which the log says).
    Run {
        /// Configuration file (see exitd.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Write man pages and shell completions (packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory: man8/ and completions/ are made in it.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let log = daemonkit::log::init_logging_with("info");
    match cli.command {
        Cmd::Keygen { dir } => {
            let keys = relayd::keys::keygen(&dir)?;
            println!("identity {}", keys.identity.public());
        }
        Cmd::RotateOnion { dir } => {
            let public = relayd::keys::rotate_onion(&dir)?;
            println!("onion {}", public.iter().map(|b| format!("{b:02x}")).collect::<String>());
            eprintln!("new onion key in {}; reload the exit (SIGHUP), then publish a new descriptor", dir.display());
        }
        Cmd::GenerateDocs { dir } => daemonkit::docs::write_docs(Cli::command(), &dir)?,
        Cmd::Descriptor { config } => {
            let config = ExitConfig::load(&config)?;
            let keys = relayd::keys::load(&config.relay.key_dir)
                .with_context(|| format!("cannot load keys from {} (key_dir)", config.relay.key_dir.display()))?;
            let summary = ExitPolicy::new(&config.policy).summary();
            let signed = relayd::descriptor::signed(&config.relay, &keys, daemonkit::unix_now(), Some(summary))?;
            println!("{}", base64::engine::general_purpose::STANDARD.encode(signed));
        }
        Cmd::Run { config } => {
            let stop = Arc::new(AtomicBool::new(false));
            let hup = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handler")?;
            }
            signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
                .context("cannot install signal handler")?;
            exitd::daemon::run_with(&config, stop, Some(exitd::daemon::ReloadOn { hup, log }))?;
        }
    }
    Ok(())
}
