//! What `meshvpn up` changes on the machine, and how every change is undone.
//!
//! Each change is recorded in the undo journal (`state_dir/undo.json`) *before* it is made, so
//! that `meshvpn down` can put the machine back as it was: the guard's host route, the
//! nftables kill switch, resolv.conf. **Only `down` undoes them.** A crash, `kill -9`, an
//! error, SIGTERM (`systemctl stop` or `restart`) leave them in place, so the kill switch keeps
//! holding traffic in while no client runs; the next `up` takes the journal over (keeping the
//! kill switch until it replaces it, and resolv.conf as it was before the first `up`), and
//! `down --config` with no client running undoes it. The TUN device and the routes through it
//! need no entry: the device is not persistent, so the kernel deletes it, and its routes, when
//! the process holding it ends (traffic then meets the kill switch).
//!
//! Changes are made with the system's own tools (`ip`, `nft`), as `wg-quick` does: one-time
//! set-up, never on a packet path, and the commands in the log are the ones an operator would
//! type to check.

pub mod dns;
pub mod killswitch;
pub mod routes;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tracing::{info, warn};

/// File name of the undo journal inside the state directory.
pub const JOURNAL_FILE: &str = "undo.json";

/// Everything that must be undone.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Journal {
    /// The process that made the changes.
    pub pid: u32,
    /// Host routes added for guards (`ip route del` on undo).
    pub guard_routes: Vec<String>,
    /// The kill switch's nftables table, if installed.
    pub nft_table: Option<String>,
    /// resolv.conf as it was, if replaced.
    pub resolv_conf: Option<dns::Saved>,
}

/// The journal on disk and the changes it records.
#[derive(Debug)]
pub struct System {
    path: PathBuf,
    journal: Journal,
}

impl System {
    /// Takes charge of `state_dir`: refuses if another meshvpn is running there; takes over
    /// what a stopped or crashed one left (its kill switch stays in force until this run
    /// replaces it), or starts an empty journal.
    pub fn begin(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
        let path = state_dir.join(JOURNAL_FILE);
        if let Some(old) = read_journal(&path)? {
            if old.pid != std::process::id() && process_is_meshvpn(old.pid) {
                bail!(
                    "meshvpn is already running (pid {}) with state in {}; run `meshvpn down` first",
                    old.pid,
                    state_dir.display()
                );
            }
            warn!(
                pid = old.pid,
                "a previous meshvpn stopped without `meshvpn down`: taking over its kill switch, routes and DNS (they stay in force)"
            );
            let mut system = Self { path, journal: Journal { pid: std::process::id(), ..old } };
            system.save()?;
            return Ok(system);
        }
        let mut system = Self { path, journal: Journal { pid: std::process::id(), ..Journal::default() } };
        system.save()?;
        Ok(system)
    }

    /// What the journal records now.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn save(&mut self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.journal)?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .with_context(|| format!("cannot write the undo journal {}", self.path.display()))
    }

    /// Routes `guard` outside the tunnel, via the route the system uses now.
    pub fn route_guard(&mut self, guard: SocketAddr) -> Result<()> {
        let route = routes::host_route(guard.ip())?;
        if !self.journal.guard_routes.contains(&route.prefix) {
            self.journal.guard_routes.push(route.prefix.clone());
            self.save()?;
        }
        routes::add_host_route(&route)
    }

    /// Installs (or replaces, atomically) the kill switch letting only cells to `guard` out.
    pub fn kill_switch(&mut self, table: &str, tun: &str, guard: SocketAddr) -> Result<()> {
        if self.journal.nft_table.is_none() {
            self.journal.nft_table = Some(table.into());
            self.save()?;
        }
        killswitch::install(table, tun, guard)
    }

    /// Points `path` at the tunnel's resolvers.
    pub fn set_dns(&mut self, path: &Path, servers: &[std::net::IpAddr]) -> Result<()> {
        if self.journal.resolv_conf.is_none() {
            self.journal.resolv_conf = Some(dns::Saved::read(path)?);
            self.save()?;
        }
        dns::write(path, servers)
    }

    /// Stops without undoing anything (a signal or an error, not `down`): the kill switch,
    /// the guard's route and DNS stay, recorded in the journal for the next `up` or `down`.
    pub fn leave(self) {
        info!(
            journal = %self.path.display(),
            "leaving the kill switch, the guard's route and DNS in place; `meshvpn down` removes them"
        );
    }

    /// Undoes everything and removes the journal (`meshvpn down`).
    pub fn finish(self) {
        undo(&self.journal);
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Undoes what `journal` records; goes on past failures (logging them): the rest must still be
/// put back.
pub fn undo(journal: &Journal) {
    if let Some(saved) = &journal.resolv_conf
        && let Err(e) = saved.restore()
    {
        warn!("cannot restore {}: {e:#}", saved.path.display());
    }
    if let Some(table) = &journal.nft_table
        && let Err(e) = killswitch::remove(table)
    {
        warn!("cannot remove the kill switch (nftables table {table}): {e:#}");
    }
    for prefix in &journal.guard_routes {
        routes::del_host_route(prefix);
    }
    info!("system settings restored");
}

/// Undoes a journal left in `state_dir` by a meshvpn that is no longer running. Returns
/// whether there was one.
pub fn recover(state_dir: &Path) -> Result<bool> {
    let path = state_dir.join(JOURNAL_FILE);
    let Some(old) = read_journal(&path)? else { return Ok(false) };
    if process_is_meshvpn(old.pid) {
        bail!("meshvpn (pid {}) is still running but does not answer on its control socket", old.pid);
    }
    undo(&old);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(true)
}

fn read_journal(path: &Path) -> Result<Option<Journal>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("undo journal {} is damaged", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Whether `pid` is a live meshvpn. A killed one can linger as a zombie until its parent
/// reaps it: its name is still there, but it holds nothing and changes nothing.
fn process_is_meshvpn(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { return false };
    let state = stat[close + 1..].trim_start().chars().next();
    stat.get(open + 1..close) == Some("meshvpn") && !matches!(state, Some('Z' | 'X'))
}

/// Runs a command, failing with its stderr if it does not exit 0.
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{program}` (is it installed?)"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).with_context(|| format!("writing to `{program}`"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
