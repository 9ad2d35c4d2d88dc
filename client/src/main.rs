//! `meshvpn`: the client. Sends all of this machine's traffic through guard → middle → exit.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use meshvpn::config::Config;
use meshvpn::control;
use std::io::Write;
use std::path::PathBuf;

/// meshvpn: an onion-routed VPN. `up` sends all traffic through guard → middle → exit relays.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// The packaged configuration, used by `down` and `status` when neither `--config` nor
/// `--socket` is given and it exists.
const DEFAULT_CONFIG: &str = "/etc/meshvpn/meshvpn.toml";

/// Which running client to talk to.
#[derive(clap::Args, Debug)]
struct Target {
    /// Configuration file (its `control_socket` and `state_dir` are used) [default:
    /// /etc/meshvpn/meshvpn.toml if it exists].
    #[arg(long, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// The control socket [default: /run/meshvpn/meshvpn.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Target {
    /// The configuration file: `--config`, else the packaged one if present (not with
    /// `--socket`).
    fn config(&self) -> Option<PathBuf> {
        match (&self.config, &self.socket) {
            (Some(c), _) => Some(c.clone()),
            (None, None) => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.is_file()),
            (None, Some(_)) => None,
        }
    }

    fn socket(&self) -> Result<PathBuf> {
        Ok(match (&self.socket, self.config()) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => Config::load(&c)?.control_socket,
            (None, None) => PathBuf::from("/run/meshvpn/meshvpn.sock"),
        })
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build a circuit and route all traffic through it (needs root: TUN, routes, nftables, DNS).
    Up {
        /// Configuration file (see meshvpn.example.toml).
        #[arg(long)]
        config: PathBuf,
        /// Stay in the foreground, logging to stderr, instead of returning once the tunnel is up.
        #[arg(long)]
        foreground: bool,
        /// Relays per circuit (overrides `hops` in the configuration).
        #[arg(long)]
        hops: Option<usize>,
    },
    /// Tear the tunnel down and undo every change `up` made: the only way to remove the kill
    /// switch (a crash, an error or SIGTERM leave it; with no client running, `down` undoes
    /// what the last one left in `state_dir`).
    Down {
        #[command(flatten)]
        target: Target,
    },
    /// Show the circuit: path, exit, inner addresses, bytes, RTT, cipher suites, uptime.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of text (with --watch: one JSON object per line,
        /// {"trigger": "start"|"change"|"tick", "status": {...}}).
        #[arg(long)]
        json: bool,
        /// Keep printing: at once, whenever the state or its reason changes, and every second,
        /// until meshvpn stops (or Ctrl-C).
        #[arg(long)]
        watch: bool,
    },
    /// Write man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory (man8/ and completions/ are made in it).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Ask relays (STUN) for this machine's public address and its NAT's behaviour (RFC 5780).
    /// With a client running (its control socket answers), the client asks from its own UDP
    /// socket, so the address is the one its cells use; its kill switch lets only the guard be
    /// asked then.
    Netcheck {
        /// Configuration file (relays come from its directory).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Up { config, foreground, hops } => {
            let mut cfg = Config::load(&config)?;
            if let Some(h) = hops {
                cfg.hops = h;
            }
            if let Err((key, problem)) = cfg.check() {
                bail!("--hops: {key} {problem}");
            }
            if foreground {
                daemonkit::log::init_logging();
                meshvpn::daemon::run(cfg, &config, hops)
            } else {
                meshvpn::daemon::spawn_background(&config, &cfg, hops)
            }
        }
        Cmd::Down { target } => {
            let socket = target.socket()?;
            let state_dir = target.config().as_deref().map(Config::load).transpose()?.map(|c| c.state_dir);
            meshvpn::daemon::down(&socket, state_dir.as_deref())
        }
        Cmd::Status { target, json, watch: true } => {
            let socket = target.socket()?;
            let context = || format!("is meshvpn up? (no answer on {})", socket.display());
            let mut out = std::io::stdout().lock();
            control::watch(&socket, |update| {
                let text = if json {
                    format!("{}\n", serde_json::to_string(&update)?)
                } else {
                    let name = |v: serde_json::Value| v.as_str().unwrap_or("?").to_owned();
                    let (state, trigger) =
                        (name(serde_json::to_value(update.status.state)?), name(serde_json::to_value(update.trigger)?));
                    format!("--- {state} ({trigger}) ---\n{}", update.status)
                };
                // A closed pipe (`| head`) ends the watch quietly.
                Ok(out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_ok())
            })
            .with_context(context)?;
            eprintln!("meshvpn closed the control connection: it stopped");
            Ok(())
        }
        Cmd::Status { target, json, watch: false } => {
            let socket = target.socket()?;
            let status = control::status(&socket)
                .with_context(|| format!("is meshvpn up? (no answer on {})", socket.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(())
        }
        Cmd::GenerateDocs { dir } => Ok(daemonkit::docs::write_docs(<Cli as clap::CommandFactory>::command(), &dir)?),
        Cmd::Netcheck { config, json } => {
            let cfg = Config::load(&config)?;
            let report = match control::request(&cfg.control_socket, control::Request::Netcheck) {
                Ok(control::Answer::Netcheck(report)) => *report,
                Ok(control::Answer::Error { error }) => bail!("the running meshvpn could not run netcheck: {error}"),
                Ok(other) => bail!("the running meshvpn answered netcheck with {other:?}"),
                // No client running: probe from a socket of our own.
                Err(_) => {
                    let relays = meshvpn::directory::load_directory(&cfg)?;
                    meshvpn::netcheck::run_blocking(&relays.stun_servers())?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(())
        }
    }
}
