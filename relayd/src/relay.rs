//! Wiring: sockets and data paths, the control thread, pinned workers, the metrics endpoint.
//! `exitd` starts the same engine.

use crate::config::{Config, DatapathChoice};
use crate::control::{Control, ControlUpdate, ToControl, ToWorker};
use crate::keys::RelayKeys;
use crate::metrics::{self, Registry};
use crate::terminal::Terminal;
use crate::worker::Worker;
use anyhow::{Context, Result};
use cellio::Backend;
use cellproto::crypto::local_aes_hw;
use cellproto::relay::control::ControlPlane;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{info, warn};

/// Queue between workers and the control thread: deep enough for bursts of handshakes, bounded
/// so a CREATE flood is shed at the worker instead of growing memory.
const CONTROL_QUEUE: usize = 8192;

/// A running relay.
pub struct RelayHandle {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The UDP address cells and STUN arrive on.
    pub local_addr: SocketAddr,
    /// Where `GET /metrics` is served, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The counters.
    pub registry: Arc<Registry>,
    updates: crossbeam_channel::Sender<ControlUpdate>,
    /// New STUN limits for the alternate-port thread, if there is one.
    stun_updates: Option<crossbeam_channel::Sender<crate::ratelimit::ReplyLimits>>,
}

impl RelayHandle {
    /// Hands new limits, EXTEND policy and onion keys to the control thread (SIGHUP); it
    /// applies them within its next poll (≤ 100 ms).
    pub fn update(&self, update: ControlUpdate) {
        if let Some(tx) = &self.stun_updates {
            let _ = tx.send(update.stun);
        }
        // The control thread is gone only while shutting down.
        let _ = self.updates.send(update);
    }

    /// Stops every thread (workers send DESTROY for their circuits first) and waits for them.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pin_to_core(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if set.set(core % cores).is_ok() && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_err() {
        warn!(core, "could not pin worker to its core");
    }
}

/// Starts a relay with `config` and `keys`.
pub fn start(config: &Config, keys: RelayKeys) -> Result<RelayHandle> {
    start_with(config, keys, |_| None)
}

/// Starts the engine with a [`Terminal`] per worker (`terminal(worker index)`): an exit.
pub fn start_with(
    config: &Config,
    keys: RelayKeys,
    mut terminal: impl FnMut(usize) -> Option<Box<dyn Terminal>>,
) -> Result<RelayHandle> {
    let workers = config.worker_count();
    let sockets = cellio::bind_group(config.listen, workers)
        .with_context(|| format!("cannot bind UDP {} for {workers} workers", config.listen))?;
    let backend = match config.datapath {
        DatapathChoice::Auto => Backend::Auto,
        DatapathChoice::Uring => Backend::Uring,
        DatapathChoice::Recvmmsg => Backend::Mmsg,
    };
    // A handle on the main port for the alternate-port STUN thread (RFC 5780 change-port).
    let primary = sockets[0].try_clone().context("cannot duplicate the relay socket")?;
    let mut paths = Vec::with_capacity(workers);
    for socket in sockets {
        paths.push(cellio::open(socket, backend).context("cannot open the data path")?);
    }
    let local_addr = paths[0].local_addr();
    let kind = paths[0].kind();
    info!(%local_addr, workers, datapath = kind, "relay listening");
    if config.bench.null_forwarder {
        warn!("bench.null_forwarder is on: cells are forwarded WITHOUT cryptography (benchmark only)");
    }

    let registry = Arc::new(Registry::new(workers, kind, config.limits.load_create_rate));
    let stop = Arc::new(AtomicBool::new(false));
    let (to_control, control_inbox) = crossbeam_channel::bounded::<ToControl>(CONTROL_QUEUE);
    let mut inboxes = Vec::with_capacity(workers);
    let mut worker_senders = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = crossbeam_channel::unbounded::<ToWorker>();
        worker_senders.push(tx);
        inboxes.push(rx);
    }

    let targets = crate::extend::ExtendTargets::from_config(&config.extend)?;
    match targets.relay_count() {
        Some(n) => info!(relays = n, "EXTEND limited to the relays of extend.directory"),
        None => warn!("extend.directory is not set: EXTEND may go to any public address a client names"),
    }
    let previous_until = keys.previous_until(config.descriptor_lifetime_secs, daemonkit::unix_now());
    if keys.onion.len() > 1 {
        info!(
            secs = previous_until.map(|t| t.saturating_duration_since(std::time::Instant::now()).as_secs()),
            "the previous onion key is accepted until its last certificate expires"
        );
    }
    let mut plane = ControlPlane::new(keys.identity.public().0, Vec::new(), local_aes_hw());
    plane.set_onion_keys(keys.onion, previous_until);
    let wakers = paths.iter().map(|dp| dp.waker()).collect();
    let (updates, update_inbox) = crossbeam_channel::unbounded();
    let control =
        Control::new(config, targets, plane, worker_senders, wakers, registry.clone()).with_updates(update_inbox);
    let mut threads = Vec::with_capacity(workers + 1);
    let control_stop = stop.clone();
    threads.push(
        std::thread::Builder::new().name("control".into()).spawn(move || control.run(control_inbox, control_stop))?,
    );

    let mut stun_updates = None;
    let stun_alternate = match config.stun.alternate_port {
        Some(port) => {
            let addr = SocketAddr::new(local_addr.ip(), port);
            let alt = std::net::UdpSocket::bind(addr)
                .with_context(|| format!("cannot bind the STUN alternate port {addr} (stun.alternate_port)"))?;
            let addr = alt.local_addr()?;
            let (tx, rx) = crossbeam_channel::bounded(1024);
            let (limits_tx, limits_rx) = crossbeam_channel::unbounded();
            stun_updates = Some(limits_tx);
            let alternate = crate::stun::Alternate {
                socket: alt,
                primary,
                handover: rx,
                limits: config.stun.replies(),
                updates: limits_rx,
                registry: registry.clone(),
            };
            threads.push(crate::stun::serve_alternate(alternate, stop.clone())?);
            info!(%addr, "RFC 5780 alternate STUN port");
            Some((addr, tx))
        }
        None => None,
    };
    let idle = Duration::from_secs(config.idle_timeout_secs);
    for (index, (dp, inbox)) in paths.into_iter().zip(inboxes).enumerate() {
        let worker = Worker::new(index, to_control.clone(), inbox, registry.clone(), idle, local_addr)
            .with_null_forwarder(config.bench.null_forwarder)
            .with_stun_alternate(stun_alternate.clone())
            .with_terminal(terminal(index));
        let stop = stop.clone();
        let pin = config.pin_workers;
        threads.push(std::thread::Builder::new().name(format!("worker-{index}")).spawn(move || {
            if pin {
                pin_to_core(index);
            }
            worker.run(dp, stop);
        })?);
    }

    let metrics_addr = match config.metrics.listen {
        Some(addr) => Some(
            metrics::serve(addr, registry.clone(), stop.clone())
                .with_context(|| format!("cannot serve metrics on {addr} (metrics.listen)"))?,
        ),
        None => None,
    };
    Ok(RelayHandle { stop, threads, local_addr, metrics_addr, registry, updates, stun_updates })
}
