//! `relayd`: the meshvpn relay server.

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{CommandFactory, Parser, Subcommand};
use daemonkit::log::LogControl;
use daemonkit::notify::{Notify, notify};
use relayd::config::Config;
use relayd::keycli::{self, DescriptorSource, KeyCmd};
use relayd::relay::RelayHandle;
use relayd::reload::Reloader;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
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
    #[command(flatten)]
    Keys(KeyCmd),
    /// Directory authority: make its key, sign a directory of relay descriptors.
    #[command(subcommand)]
    Authority(AuthorityCmd),
    /// Run the relay until SIGTERM or SIGINT; SIGHUP re-reads the configuration (applies
    /// `[limits]`, the STUN rates, `extend`, `log_level` and rotated onion keys; logs keys that
    /// need a restart).
    Run {
        /// Configuration file (see relayd.example.toml).
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
    /// A descriptor declaring more than 12500000000 bytes/s (100 Gbit/s) is refused.
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

/// The most bandwidth, in bytes per second, a descriptor may declare: 100 Gbit/s, the fastest
/// NIC a single relay process is commonly given. A relay's bandwidth is self-declared, and
/// clients weight path selection by it, so an absurd claim (u64::MAX) would attract almost
/// every circuit; clients cap the weight of unmeasured claims far lower still (see the
/// client's README).
const MAX_DECLARED_BANDWIDTH: u64 = 12_500_000_000;

/// Refuses a descriptor whose declared bandwidth exceeds [`MAX_DECLARED_BANDWIDTH`]. Other
/// problems are left to `Directory::sign`, which reports them with the descriptor's position.
fn check_bandwidth(signed: &[u8], now: u64) -> Result<()> {
    let Ok(desc) = cellproto::descriptor::RelayDescriptor::decode_and_verify(signed, now) else { return Ok(()) };
    if desc.bandwidth > MAX_DECLARED_BANDWIDTH {
        bail!(
            "relay {} ({}) declares a bandwidth of {} bytes/s, more than the {MAX_DECLARED_BANDWIDTH} bytes/s \
             (100 Gbit/s) one relay can carry; ask its operator to set `bandwidth` to what the link really does",
            desc.nickname,
            desc.identity,
            desc.bandwidth
        );
    }
    Ok(())
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
            let now = daemonkit::unix_now();
            for path in &descriptors {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .with_context(|| format!("{} is not base64 (as `relayd descriptor` prints)", path.display()))?;
                check_bandwidth(&bytes, now).with_context(|| format!("refusing {}", path.display()))?;
                signed.push(bytes);
            }
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
    let log = daemonkit::log::init_logging_with("info");
    match cli.command {
        Cmd::Keys(cmd) => {
            keycli::run(cmd, "relayd", |path| Ok(DescriptorSource { relay: Config::load(path)?, exit_policy: None }))?
        }
        Cmd::Authority(cmd) => authority(cmd)?,
        Cmd::Run { config } => run(&config, log)?,
        Cmd::GenerateDocs { dir } => daemonkit::docs::write_docs(Cli::command(), &dir)?,
    }
    Ok(())
}

fn run(path: &std::path::Path, log: LogControl) -> Result<()> {
    let config = Config::load(path)?;
    log.set(&config.log_level)?;
    let keys = relayd::keys::load(&config.key_dir).with_context(|| {
        format!("cannot load keys from {} (key_dir); create them with `relayd keygen --dir`", config.key_dir.display())
    })?;
    tracing::info!(identity = %keys.identity.public(), nickname = %config.nickname, "starting relayd {}", env!("CARGO_PKG_VERSION"));
    let term = daemonkit::signals::stop_flag().context("cannot install signal handler")?;
    let hup = daemonkit::signals::hup_flag().context("cannot install signal handler")?;
    let mut reloader = Reloader::new(config.clone(), &keys, log);
    let relay = relayd::relay::start(&config, keys)?;
    if let Some(m) = relay.metrics_addr {
        tracing::info!("metrics on http://{m}/metrics");
    }
    notify(Notify::Ready, &format!("relaying on {}", relay.local_addr));
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if hup.swap(false, Ordering::Relaxed) {
            reload(path, &mut reloader, &relay);
        }
    }
    notify(Notify::Stopping, "sending DESTROY for live circuits");
    tracing::info!("shutting down: sending DESTROY for live circuits");
    relay.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: a new configuration that does not load is logged and the running one kept.
fn reload(path: &std::path::Path, reloader: &mut Reloader, relay: &RelayHandle) {
    notify(Notify::Reloading, "reloading the configuration");
    tracing::info!("SIGHUP: reloading {}", path.display());
    let result = Config::load(path).map_err(anyhow::Error::from).and_then(|new| reloader.apply(&new, relay));
    match result {
        Ok(_) => {
            relay.registry.reloads_ok.fetch_add(1, Ordering::Relaxed);
            notify(Notify::Ready, &format!("relaying on {}; configuration reloaded", relay.local_addr));
        }
        Err(e) => {
            relay.registry.reloads_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("configuration reload failed, keeping the running configuration: {e:#}");
            notify(Notify::Ready, &format!("relaying on {}; last reload FAILED (see log)", relay.local_addr));
        }
    }
}
