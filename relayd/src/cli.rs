//! Pieces the daemons' command lines share (relayd, exitd): logging (reloadable level), systemd
//! readiness notifications, man pages and shell completions.

use anyhow::{Context, Result};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Logs to stderr with `RUST_LOG` filtering (default `info`), colours only on a terminal (journald
/// and files get plain text).
pub fn init_logging() {
    let _ = init_logging_with("info");
}

/// Changes the log filter of a running daemon (SIGHUP with a new `log_level`).
pub struct LogControl {
    handle: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    /// `RUST_LOG` was set: it wins over the configuration, at start and on reload.
    env_override: bool,
}

impl LogControl {
    /// Applies `level` (an `EnvFilter` directive such as `info` or `relayd=debug,warn`).
    /// Returns false when `RUST_LOG` is set, which keeps precedence.
    pub fn set(&self, level: &str) -> Result<bool> {
        if self.env_override {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(level).with_context(|| format!("invalid log_level {level:?}"))?;
        self.handle.reload(filter).context("cannot change the log filter")?;
        Ok(true)
    }
}

/// As [`init_logging`], with `level` (the configuration's `log_level`) as the filter unless
/// `RUST_LOG` is set; the returned control changes it later.
pub fn init_logging_with(level: &str) -> LogControl {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_override = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
    LogControl { handle, env_override }
}

/// Seconds since the Unix epoch (descriptor times).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What the daemon tells systemd (`Type=notify`). Without `NOTIFY_SOCKET` (not started by
/// systemd) nothing is sent; a failed send is logged, never fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// Sockets bound, workers running (exitd: also TUN and nftables in place).
    Ready,
    /// SIGHUP received: re-reading the configuration.
    Reloading,
    /// Shutting down (DESTROY to every circuit, then exit).
    Stopping,
}

/// Sends `state` with a human-readable `status` (shown by `systemctl status`).
pub fn notify(state: Notify, status: &str) {
    use sd_notify::NotifyState;
    let mut states = vec![NotifyState::Status(status)];
    match state {
        Notify::Ready => states.push(NotifyState::Ready),
        Notify::Reloading => {
            states.push(NotifyState::Reloading);
            // systemd ≥ 253 (Type=notify-reload) wants the time the reload began; older ones
            // ignore it.
            if let Ok(t) = NotifyState::monotonic_usec_now() {
                states.push(t);
            }
        }
        Notify::Stopping => states.push(NotifyState::Stopping),
    }
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!("cannot notify systemd ({state:?}): {e}");
    }
}

/// Writes man pages (section 8: `NAME.8` and `NAME-SUBCOMMAND.8` for every visible
/// subcommand) into `dir/man8` and bash, zsh and fish completions into `dir/completions`,
/// all from the clap definition, so they never disagree with `--help`. Used at packaging time
/// (`relayd generate-docs --dir DIR`, hidden).
pub fn write_docs(cmd: clap::Command, dir: &Path) -> Result<()> {
    let man_dir = dir.join("man8");
    let comp_dir = dir.join("completions");
    for d in [&man_dir, &comp_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    write_man(&cmd, &man_dir)?;
    let name = cmd.get_name().to_string();
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &comp_dir)
            .with_context(|| format!("cannot write {shell} completions to {}", comp_dir.display()))?;
    }
    Ok(())
}

fn write_man(cmd: &clap::Command, dir: &Path) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man(sub, dir)?;
    }
    let title = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let path = dir.join(format!("{title}.8"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(&title)
        .section("8")
        .manual("meshvpn")
        .source(format!("meshvpn {}", env!("CARGO_PKG_VERSION")))
        .render(&mut out)
        .with_context(|| format!("cannot render the man page {title}"))?;
    std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_cover_every_subcommand() {
        let cmd = clap::Command::new("demo")
            .version("1")
            .subcommand(clap::Command::new("keygen").about("make keys").arg(clap::arg!(--dir <DIR>)))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = std::env::temp_dir().join(format!("relayd-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_docs(cmd, &dir).unwrap();
        let page = std::fs::read_to_string(dir.join("man8/demo-keygen.8")).unwrap();
        assert!(page.contains("make keys") && page.contains("dir"), "{page}");
        assert!(dir.join("man8/demo.8").exists());
        assert!(!dir.join("man8/demo-secret.8").exists(), "hidden subcommands get no page");
        for f in ["demo.bash", "_demo", "demo.fish"] {
            let text = std::fs::read_to_string(dir.join("completions").join(f)).unwrap();
            assert!(text.contains("keygen"), "{f}: {text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
