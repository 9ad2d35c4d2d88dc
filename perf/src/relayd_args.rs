//! The relayd under test in `perf relay` and `perf flood`: which binary runs it and how it is
//! configured, as options both commands take, and the command that starts it.

use crate::sys::TempDir;
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

/// What a run against relayd starts from.
pub struct RelaydSetup {
    /// CPU cores of this machine.
    pub cores: usize,
    /// relayd's worker threads: `--workers`, else one per core.
    pub workers: usize,
    /// The run's directory, removed at the end.
    pub dir: TempDir,
    /// `dir/keys`, with the relay's keys.
    pub key_dir: PathBuf,
    /// The relay's keys, freshly made.
    pub keys: relayd::keys::RelayKeys,
}

impl RelaydArgs {
    /// Checks these options, then makes the run's directory (`$TMPDIR/<name>-<pid>`) and the
    /// relay's keys in it; `workers` is the command's `--workers`.
    pub fn setup(&self, workers: Option<usize>, name: &str) -> Result<RelaydSetup> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = workers.unwrap_or(cores).max(1);
        self.check()?;
        let dir = TempDir::new(name)?;
        let key_dir = dir.0.join("keys");
        let keys = relayd::keys::keygen(&key_dir)?;
        Ok(RelaydSetup { cores, workers, dir, key_dir, keys })
    }

    /// Refuses a `--relayd` that is not a file, before anything is started.
    fn check(&self) -> Result<()> {
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
