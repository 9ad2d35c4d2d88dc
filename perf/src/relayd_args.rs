//! The relayd under test in `perf relay` and `perf flood`: which binary runs it and how it is
//! configured, as options both commands take, and the command that starts it.

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Options for the relayd under test (flattened into `perf relay` and `perf flood`).
#[derive(clap::Args, Debug, Clone)]
pub struct RelaydArgs {
    /// Run this relayd binary (`relayd run --config`) instead of relayd's engine in a
    /// `perf relay-child` process.
    #[arg(long)]
    pub relayd: Option<PathBuf>,
    /// relayd's data path: auto, uring or recvmmsg.
    #[arg(long, default_value = "auto")]
    pub datapath: String,
    /// Do not pin relayd's workers to cores.
    #[arg(long)]
    pub no_pin: bool,
}

impl RelaydArgs {
    /// Refuses a `--relayd` that is not a file, before anything is started.
    pub fn check(&self) -> Result<()> {
        if let Some(path) = &self.relayd
            && !path.is_file()
        {
            bail!("{} not found; build it with `cargo build --release -p relayd -p perf`", path.display());
        }
        Ok(())
    }

    /// The command that runs relayd with `config`: `--relayd PATH run --config`, or this perf
    /// binary (`exe`) as `perf relay-child`, which stops when its stdin (piped) closes.
    pub fn command(&self, exe: &Path, config: &Path) -> Command {
        match &self.relayd {
            Some(bin) => {
                let mut c = Command::new(bin);
                c.arg("run").arg("--config").arg(config).stdin(Stdio::null());
                c
            }
            None => {
                let mut c = Command::new(exe);
                c.arg("relay-child").arg("--config").arg(config).stdin(Stdio::piped());
                c
            }
        }
    }
}
