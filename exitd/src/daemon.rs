//! `exitd run` as a library function, so tests and `perf` can run an exit in-process.

use crate::config::ExitConfig;
use crate::conntrack::{Conntrack, ConntrackError};
use crate::exit::{ExitShared, ExitTerminal};
use crate::policy::ExitPolicy;
use crate::pool::{AddressPool, AttachError, Outcome, PoolLimits};
use anyhow::{Context, Result, bail};
use daemonkit::log::LogControl;
use daemonkit::notify::{Notify, notify};
use relayd::relay::RelayHandle;
use relayd::reload::Reloader;
use relayd::terminal::Terminal;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The MTU of the exit's TUN device: the largest IP packet one cell carries through a
/// full-length circuit (`cellproto::cell::TUN_MTU`). tundev knows nothing of cells, so the exit
/// passes it.
pub const TUN_MTU: u32 = cellproto::cell::TUN_MTU as u32;

/// Released addresses flushed per tick of the session thread at most.
const FLUSH_BATCH: usize = 256;
/// A failing flush is logged at most this often.
const FLUSH_LOG_EVERY: Duration = Duration::from_secs(10);

/// Turns forwarding on (logged), or refuses with what to do.
fn forwarding(enable: bool) -> Result<()> {
    for path in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
        let on = std::fs::read_to_string(path).map(|v| v.trim() == "1").unwrap_or(false);
        if on {
            continue;
        }
        if !enable {
            bail!("{path} is 0: enable forwarding (sysctl) or set exit.enable_forwarding = true");
        }
        std::fs::write(path, "1").with_context(|| format!("cannot enable forwarding in {path} (needs root)"))?;
        info!("enabled forwarding: {path} = 1");
    }
    Ok(())
}

/// Runs the exit configured by `path` until `stop` is set: forwarding, TUN, nftables, the relay
/// engine with an exit terminal per worker; on stop, DESTROY for live circuits and the table removed.
pub fn run(path: &Path, stop: Arc<AtomicBool>) -> Result<()> {
    run_with(path, stop, None)
}

/// What `exitd run` adds for a service manager: SIGHUP sets `hup` to re-read the
/// configuration; `log` applies a new `log_level`.
pub struct ReloadOn {
    /// Set by the SIGHUP handler.
    pub hup: Arc<AtomicBool>,
    /// The log filter.
    pub log: LogControl,
}

/// As [`run`], telling systemd READY=1 once the exit is set up (forwarding, TUN, nftables,
/// sockets) and STOPPING=1 at stop, and with `reload`, re-reading the configuration on SIGHUP:
/// the relay engine's live keys are applied as relayd does (`relayd::reload`); `[exit]` and
/// `[policy]` are built into the TUN, the nftables table and the workers, so a change to
/// either is logged as needing a restart.
pub fn run_with(path: &Path, stop: Arc<AtomicBool>, reload: Option<ReloadOn>) -> Result<()> {
    let config = ExitConfig::load(path)?;
    if let Some(r) = &reload {
        r.log.set(&config.relay.log_level)?;
    }
    let keys = relayd::keys::load(&config.relay.key_dir).with_context(|| {
        format!(
            "cannot load keys from {} (key_dir); create them with `exitd keygen --dir`",
            config.relay.key_dir.display()
        )
    })?;
    let exit = &config.exit;
    forwarding(exit.enable_forwarding)?;
    // Whatever an earlier exitd left of its users' flows (a crash, a restart) must not reach
    // whoever gets their addresses now; and an exit that cannot delete conntrack entries
    // cannot free an address safely, so it does not start.
    let pools = [ipnet::IpNet::V4(exit.pool_v4), ipnet::IpNet::V6(exit.pool_v6)];
    let mut conntrack = Conntrack::open().context("cannot open the kernel's conntrack (netlink)")?;
    let left = conntrack
        .flush_prefixes(&pools)
        .context("cannot delete the conntrack entries of the pools (needs nf_conntrack_netlink: modprobe it)")?;
    if left > 0 {
        info!(entries = left, "deleted conntrack entries of the pools left by an earlier run");
    }
    let workers = config.relay.worker_count();
    let limits = PoolLimits {
        grace: Duration::from_secs(exit.session_grace_secs),
        sessions_per_source: exit.sessions_per_source,
        attach_rate: exit.attach_rate,
        attach_burst: f64::from(exit.attach_burst),
    };
    let pool = AddressPool::new(exit.pool_v4, exit.pool_v6, limits);
    let (gw4, gw6) = pool.gateway();
    let table = pool.table();
    let tun = tundev::Tun::create_with(&exit.tun, workers, true)
        .with_context(|| format!("cannot create TUN {} (exit.tun)", exit.tun))?;
    // TCP from the internet then reaches the workers as super-packets, segmented in userspace.
    tun.enable_offloads().context("cannot enable the TUN device's offloads")?;
    let gw4_net = ipnet::Ipv4Net::new(gw4, exit.pool_v4.prefix_len())?;
    let gw6_net = ipnet::Ipv6Net::new(gw6, exit.pool_v6.prefix_len())?;
    tundev::configure(tun.name(), TUN_MTU, gw4_net, gw6_net).context("cannot configure the TUN device")?;
    let policy = ExitPolicy::new(&config.policy).with_exit_host(host_addresses()?);
    let nat = nat_config(&config, tun.name(), &policy);
    crate::nft::install(&nat).context("cannot install the nftables table")?;
    info!(table = %nat.table, wan = %exit.wan, tun = %tun.name(), "NAT installed");

    let mut handoff = Vec::with_capacity(workers);
    let mut handoff_ready = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = crossbeam_channel::bounded(4096);
        handoff.push(tx);
        inboxes.push(Some(rx));
        let flags = nix::sys::eventfd::EfdFlags::EFD_NONBLOCK | nix::sys::eventfd::EfdFlags::EFD_CLOEXEC;
        handoff_ready
            .push(nix::sys::eventfd::EventFd::from_value_and_flags(0, flags).context("cannot create an eventfd")?);
    }
    let shared = Arc::new(ExitShared {
        pool: Mutex::new(pool),
        table,
        policy: policy.clone(),
        pools: (exit.pool_v4, exit.pool_v6),
        circuit_limit: (exit.circuit_rate, exit.circuit_burst),
        exit_limit: (exit.exit_rate, exit.exit_burst),
        handoff,
        handoff_ready,
        dns: (gw4, gw6),
        stats: (0..workers).map(|_| Mutex::new(Default::default())).collect(),
        conntrack_deleted: AtomicU64::new(left),
    });
    let mut queues: Vec<_> = tun.into_queues().into_iter().map(Some).collect();
    let now = Instant::now();
    let mut reloader = reload.map(|r| (r.hup, Reloader::new(config.relay.clone(), &keys, r.log)));
    let relay = relayd::relay::start_with(&config.relay, keys, |i| {
        let queue = queues.get_mut(i)?.take()?;
        let inbox = inboxes.get_mut(i)?.take()?;
        Some(Box::new(ExitTerminal::new(i, shared.clone(), queue, inbox, now)) as Box<dyn Terminal>)
    })?;
    let metrics_shared = shared.clone();
    let _ = relay.registry.extra.set(Box::new(move || render(&metrics_shared)));
    if let Some(m) = relay.metrics_addr {
        info!("metrics on http://{m}/metrics");
    }
    // Sessions expire and released addresses are flushed on a thread of their own: a flush
    // lists the kernel's table (about a second per 300 000 entries), which must delay neither
    // a reload nor the stop.
    let sessions = {
        let (shared, stop) = (shared.clone(), stop.clone());
        let mut flusher = Flusher { conntrack: Some(conntrack), failures: 0, last_log: None };
        std::thread::Builder::new()
            .name("exitd-sessions".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    flusher.tick(&shared, Instant::now());
                }
            })
            .context("cannot start the session thread")?
    };
    let status = format!("exit on {}, out of {}", relay.local_addr, exit.wan);
    notify(Notify::Ready, &status);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if let Some((hup, reloader)) = &mut reloader
            && hup.swap(false, Ordering::Relaxed)
        {
            reload_config(path, &config, reloader, &relay, &status);
        }
    }
    notify(Notify::Stopping, "sending DESTROY for live circuits, removing the nftables table");
    info!("shutting down: sending DESTROY for live circuits");
    relay.shutdown();
    let _ = sessions.join();
    crate::nft::remove(&nat.table).context("cannot remove the nftables table")?;
    // No flow state of the users is left behind (the next start would delete it anyway).
    match Conntrack::open().and_then(|mut c| c.flush_prefixes(&pools)) {
        Ok(n) => info!(entries = n, "stopped; nftables table removed, conntrack entries of the pools deleted"),
        Err(e) => warn!("stopped; nftables table removed, but the pools' conntrack entries stay: {e}"),
    }
    Ok(())
}

/// Deletes the conntrack entries of the addresses the pool released, every 100 ms on the
/// session thread, outside the pool's mutex (a flush lists the kernel's table). The pool keeps
/// each address out of use until its flush is reported done.
struct Flusher {
    /// The netlink socket; reopened after an I/O or parse error.
    conntrack: Option<Conntrack>,
    /// Failed flushes since the last log line.
    failures: u64,
    last_log: Option<Instant>,
}

impl Flusher {
    /// Expires sessions, then flushes the released addresses that are due.
    fn tick(&mut self, shared: &ExitShared, now: Instant) {
        let batch = match shared.pool.lock() {
            Ok(mut pool) => {
                pool.expire(now);
                pool.take_flushes(now, FLUSH_BATCH)
            }
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        let sources: Vec<IpAddr> = batch.iter().flat_map(|f| [IpAddr::V4(f.v4), IpAddr::V6(f.v6)]).collect();
        let result = self.flush(&sources);
        match &result {
            Ok(deleted) => {
                shared.conntrack_deleted.fetch_add(*deleted, Ordering::Relaxed);
            }
            Err(e) => self.failed(batch.len(), e, now),
        }
        // A poisoned pool keeps the batch taken: its addresses are never leased again.
        if let Ok(mut pool) = shared.pool.lock() {
            for f in &batch {
                pool.flushed(f.slot, result.is_ok(), now);
            }
        }
    }

    fn flush(&mut self, sources: &[IpAddr]) -> Result<u64, ConntrackError> {
        let conntrack = match &mut self.conntrack {
            Some(c) => c,
            None => self.conntrack.insert(Conntrack::open()?),
        };
        let result = conntrack.flush_sources(sources);
        if matches!(result, Err(ConntrackError::Io(_) | ConntrackError::Decode(_))) {
            // Whatever the socket still holds is of no use: a fresh one for the retry.
            self.conntrack = None;
        }
        result
    }

    /// Counted by the pool per address; logged at most every [`FLUSH_LOG_EVERY`], without
    /// addresses (no client's address goes to the log).
    fn failed(&mut self, addresses: usize, e: &ConntrackError, now: Instant) {
        self.failures += 1;
        if self.last_log.is_some_and(|t| now.saturating_duration_since(t) < FLUSH_LOG_EVERY) {
            return;
        }
        warn!(
            addresses,
            failures = self.failures,
            "cannot delete released addresses' conntrack entries; they stay out of the pool and are tried again: {e}"
        );
        self.failures = 0;
        self.last_log = Some(now);
    }
}

/// The nftables table `exitd run` installs for `config`, its TUN device `tun` and `policy`.
pub fn nat_config(config: &ExitConfig, tun: &str, policy: &ExitPolicy) -> crate::nft::NatConfig {
    let exit = &config.exit;
    // The first hosts of the pools: the exit's own addresses inside the tunnel (AddressPool::gateway).
    let gw4 = std::net::Ipv4Addr::from(u32::from(exit.pool_v4.network()).wrapping_add(1));
    let gw6 = std::net::Ipv6Addr::from(u128::from(exit.pool_v6.network()).wrapping_add(1));
    let mut nat = crate::nft::NatConfig::new(exit.wan.clone(), tun.to_string(), exit.pool_v4, exit.pool_v6);
    nat.table = exit.nft_table.clone();
    // The exit host's addresses are the input chain's (whichever they are when a packet comes).
    nat.deny = policy
        .denied_prefixes()
        .into_iter()
        .filter(|d| d.rule != "exit_host")
        .map(|d| crate::nft::Deny { net: d.net, except: d.except })
        .collect();
    nat.deny_ports = policy.deny_ports().to_vec();
    nat.allow_ports = policy.allow_ports().to_vec();
    nat.protocols_v4 = crate::policy::PROTOCOLS_V4.to_vec();
    nat.protocols_v6 = crate::policy::PROTOCOLS_V6.to_vec();
    nat.dns = vec![
        crate::nft::DnsRedirect { gateway: gw4.into(), upstream: exit.dns_upstream_v4.into() },
        crate::nft::DnsRedirect { gateway: gw6.into(), upstream: exit.dns_upstream_v6.into() },
    ];
    nat
}

/// The exit host's own addresses (every interface, the TUN's included; loopback is a class of
/// its own): circuits may not reach them. Read once at start; nftables' input chain covers
/// addresses added later.
fn host_addresses() -> Result<Vec<std::net::IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("cannot list the host's addresses")?;
    let mut out: Vec<std::net::IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| std::net::IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| s.ip().into()))
        })
        .filter(|a: &std::net::IpAddr| !a.is_loopback())
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// SIGHUP: a new configuration that does not load is logged and the running one kept.
fn reload_config(path: &Path, running: &ExitConfig, reloader: &mut Reloader, relay: &RelayHandle, status: &str) {
    notify(Notify::Reloading, "reloading the configuration");
    info!("SIGHUP: reloading {}", path.display());
    let result = ExitConfig::load(path).map_err(anyhow::Error::from).and_then(|new| {
        for (section, changed) in [("[exit]", new.exit != running.exit), ("[policy]", new.policy != running.policy)] {
            if changed {
                tracing::warn!(key = section, "reload: changed but needs a restart; still running with the old value");
            }
        }
        reloader.apply(&new.relay, relay)
    });
    match result {
        Ok(_) => {
            relay.registry.reloads_ok.fetch_add(1, Ordering::Relaxed);
            notify(Notify::Ready, &format!("{status}; configuration reloaded"));
        }
        Err(e) => {
            relay.registry.reloads_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("configuration reload failed, keeping the running configuration: {e:#}");
            notify(Notify::Ready, &format!("{status}; last reload FAILED (see log)"));
        }
    }
}

/// exitd's own series: packets by what happened to them, and sessions.
fn render(shared: &ExitShared) -> String {
    let mut out = String::from(
        "# HELP exitd_packets_total Exit packets by outcome (policy rule, spoof, rate limit, ...).\n# TYPE exitd_packets_total counter\n",
    );
    for (i, slot) in shared.stats.iter().enumerate() {
        if let Ok(counts) = slot.lock() {
            for (what, n) in counts.iter() {
                let _ = writeln!(out, "exitd_packets_total{{worker=\"{i}\",what=\"{what}\"}} {n}");
            }
        }
    }
    if let Ok(pool) = shared.pool.lock() {
        let _ = writeln!(out, "# HELP exitd_sessions Sessions holding inner addresses.\n# TYPE exitd_sessions gauge");
        let detached = pool.detached_sessions();
        let _ = writeln!(out, "exitd_sessions{{state=\"attached\"}} {}", pool.sessions() - detached);
        let _ = writeln!(out, "exitd_sessions{{state=\"detached\"}} {detached}");
        let stats = pool.stats();
        let _ = writeln!(
            out,
            "# HELP exitd_attach_total ATTACH requests: served (new, resumed, same) or refused (why).\n# TYPE exitd_attach_total counter"
        );
        for (outcome, n) in [Outcome::New, Outcome::Resumed, Outcome::Same].iter().zip(stats.served) {
            let _ = writeln!(out, "exitd_attach_total{{result=\"{}\"}} {n}", outcome.label());
        }
        let refusals = [
            AttachError::Exhausted,
            AttachError::SourceCap,
            AttachError::CircuitRate,
            AttachError::SourceRate,
            AttachError::Flushing,
        ];
        for (e, n) in refusals.iter().zip(stats.refused) {
            let _ = writeln!(out, "exitd_attach_total{{result=\"{}\"}} {n}", e.label());
        }
        let _ = writeln!(
            out,
            "# HELP exitd_sessions_ended_total Sessions whose addresses returned to the pool: grace over, or reclaimed early for a new session (pool full).\n# TYPE exitd_sessions_ended_total counter"
        );
        let _ = writeln!(out, "exitd_sessions_ended_total{{why=\"expired\"}} {}", stats.expired);
        let _ = writeln!(out, "exitd_sessions_ended_total{{why=\"reclaimed\"}} {}", stats.reclaimed);
        let _ = writeln!(
            out,
            "# HELP exitd_conntrack_flushes_total Released inner addresses whose conntrack entries were deleted (ok), or attempts that failed (the address stays out of the pool and is tried again).\n# TYPE exitd_conntrack_flushes_total counter"
        );
        let _ = writeln!(out, "exitd_conntrack_flushes_total{{result=\"ok\"}} {}", stats.flushed);
        let _ = writeln!(out, "exitd_conntrack_flushes_total{{result=\"failed\"}} {}", stats.flush_failed);
        let _ = writeln!(
            out,
            "# HELP exitd_addresses_flushing Released inner addresses whose conntrack entries are not deleted yet (out of the pool until they are).\n# TYPE exitd_addresses_flushing gauge"
        );
        let _ = writeln!(out, "exitd_addresses_flushing {}", pool.flushing());
    }
    let _ = writeln!(
        out,
        "# HELP exitd_conntrack_deleted_total Conntrack entries deleted: of released inner addresses, and of the whole pools at start.\n# TYPE exitd_conntrack_deleted_total counter"
    );
    let _ = writeln!(out, "exitd_conntrack_deleted_total {}", shared.conntrack_deleted.load(Ordering::Relaxed));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_mtu_is_the_cell_payload() {
        assert_eq!(TUN_MTU, 1304);
    }
}
