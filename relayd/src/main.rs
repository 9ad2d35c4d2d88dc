//! `relayd`: the meshvpn relay server.

use anyhow::{Context, Result};
use base64::Engine as _;
use clap::{Parser, Subcommand};
use relayd::config::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// meshvpn relay: forwards onion cells between hops at line rate, answers STUN.
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
    /// Print this relay's signed descriptor (base64), for the directory.
    Descriptor {
        /// Configuration file (see relayd.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the relay until SIGTERM or SIGINT.
    Run {
        /// Configuration file (see relayd.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    relayd::cli::init_logging();
    match cli.command {
        Cmd::Keygen { dir } => {
            let keys = relayd::keys::keygen(&dir)?;
            println!("identity {}", keys.identity.public());
            eprintln!("keys written to {} (mode 0600)", dir.display());
        }
        Cmd::Descriptor { config } => {
            let config = Config::load(&config)?;
            let keys = relayd::keys::load(&config.key_dir)
                .with_context(|| format!("cannot load keys from {} (key_dir)", config.key_dir.display()))?;
            let signed = relayd::descriptor::signed(&config, &keys, relayd::cli::unix_now(), None)?;
            println!("{}", base64::engine::general_purpose::STANDARD.encode(signed));
        }
        Cmd::Run { config: path } => {
            let config = Config::load(&path)?;
            let keys = relayd::keys::load(&config.key_dir).with_context(|| {
                format!(
                    "cannot load keys from {} (key_dir); create them with `relayd keygen --dir`",
                    config.key_dir.display()
                )
            })?;
            tracing::info!(identity = %keys.identity.public(), nickname = %config.nickname, "starting relayd {}", env!("CARGO_PKG_VERSION"));
            let relay = relayd::relay::start(&config, keys)?;
            if let Some(m) = relay.metrics_addr {
                tracing::info!("metrics on http://{m}/metrics");
            }
            let term = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, term.clone()).context("cannot install signal handler")?;
            }
            while !term.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            tracing::info!("shutting down: sending DESTROY for live circuits");
            relay.shutdown();
            tracing::info!("stopped");
        }
    }
    Ok(())
}
