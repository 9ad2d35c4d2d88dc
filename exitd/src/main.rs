//! `exitd`: the meshvpn exit server.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use exitd::config::ExitConfig;
use exitd::policy::ExitPolicy;
use relayd::keycli::{self, DescriptorSource, KeyCmd};
use std::path::PathBuf;

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
    #[command(flatten)]
    Keys(KeyCmd),
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
        Cmd::Keys(cmd) => keycli::run(cmd, "exitd", |path| {
            let config = ExitConfig::load(path)?;
            Ok(DescriptorSource { exit_policy: Some(ExitPolicy::new(&config.policy).summary()), relay: config.relay })
        })?,
        Cmd::GenerateDocs { dir } => daemonkit::docs::write_docs(Cli::command(), &dir)?,
        Cmd::Run { config } => {
            let stop = daemonkit::signals::stop_flag().context("cannot install signal handler")?;
            let hup = daemonkit::signals::hup_flag().context("cannot install signal handler")?;
            exitd::daemon::run_with(&config, stop, Some(exitd::daemon::ReloadOn { hup, log }))?;
        }
    }
    Ok(())
}
