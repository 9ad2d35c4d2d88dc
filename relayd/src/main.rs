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
    /// Directory authority: make its key, sign a directory of relay descriptors.
    #[command(subcommand)]
    Authority(AuthorityCmd),
    /// Run the relay until SIGTERM or SIGINT.
    Run {
        /// Configuration file (see relayd.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AuthorityCmd {
    /// Create the authority's identity key (authority.key, mode 0600; never overwrites) and
    /// print its public key, which clients pin as `authority` in their configuration.
    Keygen {
        /// Directory for authority.key (created 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a directory from descriptor files (each as `relayd descriptor` prints it: base64).
    Sign {
        /// Directory holding authority.key.
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the signed directory (binary).
        #[arg(long)]
        out: PathBuf,
        /// How long the directory is valid, in seconds; every descriptor must outlast it.
        #[arg(long, default_value_t = 43_200)]
        lifetime_secs: u64,
        /// Descriptor files.
        #[arg(required = true)]
        descriptors: Vec<PathBuf>,
    },
}

fn authority(cmd: AuthorityCmd) -> Result<()> {
    match cmd {
        AuthorityCmd::Keygen { dir } => {
            let id = relayd::keys::authority_keygen(&dir)?;
            println!("authority {}", id.public());
        }
        AuthorityCmd::Sign { dir, out, lifetime_secs, descriptors } => {
            let id = relayd::keys::load_authority(&dir)?;
            let mut signed = Vec::with_capacity(descriptors.len());
            for path in &descriptors {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .with_context(|| format!("{} is not base64 (as `relayd descriptor` prints)", path.display()))?;
                signed.push(bytes);
            }
            let now = relayd::cli::unix_now();
            let directory = cellproto::directory::Directory::sign(&signed, now, now + lifetime_secs, &id)
                .context("cannot sign the directory (descriptor numbers count from 0 in the order given)")?;
            std::fs::write(&out, &directory).with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("signed {} relays into {} ({} bytes)", descriptors.len(), out.display(), directory.len());
        }
    }
    Ok(())
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
        Cmd::Authority(cmd) => authority(cmd)?,
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
