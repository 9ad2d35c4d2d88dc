//! The control thread: handshakes (CREATE), EXTEND and CREATED, per-source limits, the global
//! circuit cap, the under-load state and the cookie secrets, LCID allocation. It owns
//! cellproto's sans-IO [`ControlPlane`] and talks to the workers over crossbeam channels; a
//! flood of CREATEs queues here, never in front of established circuits, and under load only
//! CREATEs with a valid cookie get here at all (the workers check it, see [`crate::cookies`]).

use crate::config::Config;
use crate::extend::ExtendTargets;
use crate::metrics::{ControlStats, REFUSED_CIRCUIT_CAP, Registry, refusal_index};
use crate::ratelimit::{LOAD_TICK, LoadMonitor, ReplyLimits, SourceKey, SourceLimits};
use cellio::{Outgoing, Waker};
use cellproto::cell::{CELL_LEN, is_valid_lcid, lcid};
use cellproto::command::{Extend, Extended, reason};
use cellproto::relay::control::{Answer, ControlError, ControlPlane, Created, Expired};
use cellproto::relay::cookie::CookieJar;
use cellproto::relay::{HopCircuit, Link};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ipnet::IpNet;
use rand_core::{OsRng, RngCore};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// A cell buffer.
pub type Cell = Box<[u8; CELL_LEN]>;

/// Worker → control.
#[derive(Debug)]
pub enum ToControl {
    /// A CREATE arrived.
    Create {
        /// From this source.
        from: SocketAddr,
        /// The cell.
        cell: Cell,
    },
    /// A cell on a pending EXTEND's reply LCID (a CREATED).
    Created {
        /// From this source.
        from: SocketAddr,
        /// The cell.
        cell: Cell,
    },
    /// A circuit owned by `worker` asked to be extended.
    Extend {
        /// The worker that owns the circuit.
        worker: usize,
        /// The circuit's previous-link LCID.
        circuit: u32,
        /// The EXTEND body.
        body: Vec<u8>,
    },
    /// Circuits ended; their LCIDs are free again.
    Closed {
        /// Previous- and next-link LCIDs of the ended circuits.
        lcids: Vec<u32>,
    },
}

/// Control → worker.
#[derive(Debug)]
pub enum ToWorker {
    /// Own this new circuit, then send the CREATED.
    Install {
        /// The circuit.
        circuit: Box<HopCircuit>,
        /// The CREATED to send.
        reply: Outgoing,
    },
    /// Send this datagram.
    Send(Outgoing),
    /// Cells on this LCID are CREATEDs for the control plane until told otherwise.
    ExpectCreated(u32),
    /// An EXTEND completed: set the next link and send EXTENDED to the client.
    Extended {
        /// The circuit's previous-link LCID.
        circuit: u32,
        /// The next link.
        link: Box<Link>,
        /// The EXTENDED body.
        extended: Extended,
        /// The reply LCID that was pending.
        reply_lcid: u32,
    },
    /// An EXTEND failed or was refused: tell the client with DESTROY.
    ExtendFailed {
        /// The circuit's previous-link LCID.
        circuit: u32,
        /// DESTROY reason.
        reason: u8,
        /// The reply LCID that was pending, if one was allocated.
        reply_lcid: Option<u32>,
    },
    /// Cells on this LCID are no longer CREATEDs (the EXTEND's circuit closed).
    ForgetCreated(u32),
    /// A copy of the relay's cookie jar: at start, then after each rotation.
    Cookies(Box<CookieJar>),
    /// Limits on the answers the worker sends unasked-for (at start and on SIGHUP).
    Limits {
        /// STUN answers.
        stun: ReplyLimits,
        /// CREATEs examined and COOKIE answers under load.
        cookie: crate::cookies::CookieLimits,
        /// Sources without a per-source COOKIE limit (`limits.exempt`).
        exempt: Vec<IpNet>,
    },
}

/// Main thread → control: settings changed by SIGHUP (see [`crate::reload`]).
#[derive(Debug)]
pub struct ControlUpdate {
    /// The new `[limits]`.
    pub limits: crate::config::Limits,
    /// The new STUN answer limits (`stun.rate`, `stun.burst`, `stun.global_rate`).
    pub stun: ReplyLimits,
    /// The new EXTEND target policy (`[extend]`).
    pub targets: ExtendTargets,
    /// New onion keys (current first), if they changed on disk (rotation), and when the
    /// previous one stops being accepted.
    pub onion: Option<(Vec<cellproto::handshake::OnionSecret>, Option<Instant>)>,
}

/// Whether `ip` is in a range a public relay must not extend into.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 CGNAT
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00 // unique local
                || (s[0] & 0xFFC0) == 0xFE80 // link local
                || v6.to_ipv4_mapped().is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// The control thread's state.
pub struct Control {
    plane: ControlPlane,
    limits: SourceLimits,
    targets: ExtendTargets,
    workers: Vec<Sender<ToWorker>>,
    wakers: Vec<Waker>,
    next_worker: usize,
    used: HashSet<u32>,
    /// Circuits made by CREATE (previous-link LCID) and the source they are charged to (none:
    /// exempt). Its length is what `limits.max_circuits` caps.
    sources: HashMap<u32, Option<SourceKey>>,
    max_circuits: usize,
    load: LoadMonitor,
    /// The relay's cookie secrets; the workers get copies (crate::cookies).
    cookies: CookieJar,
    registry: Arc<Registry>,
    updates: Option<Receiver<ControlUpdate>>,
}

impl Control {
    /// The control plane for `config` and EXTEND policy `targets`, with one channel and one
    /// waker per worker.
    pub fn new(
        config: &Config,
        targets: ExtendTargets,
        plane: ControlPlane,
        workers: Vec<Sender<ToWorker>>,
        wakers: Vec<Waker>,
        registry: Arc<Registry>,
    ) -> Self {
        let l = &config.limits;
        let now = Instant::now();
        registry.control.circuit_limit.store(u64::from(l.max_circuits), Ordering::Relaxed);
        let this = Self {
            plane,
            limits: SourceLimits::new(l.create_rate, l.create_burst, l.max_circuits_per_ip, l.exempt.clone()),
            targets,
            workers,
            wakers,
            next_worker: 0,
            used: HashSet::new(),
            sources: HashMap::new(),
            max_circuits: l.max_circuits as usize,
            load: LoadMonitor::new(now),
            cookies: CookieJar::new(now, &mut OsRng),
            registry,
            updates: None,
        };
        // Queued before the workers start: their first round takes the secret and the limits.
        this.send_cookie_jar();
        this.send_limits(l, config.stun.replies());
        this
    }

    /// A copy of the cookie jar for every worker (at start, then after every rotation).
    fn send_cookie_jar(&self) {
        for w in 0..self.workers.len() {
            self.send(w, ToWorker::Cookies(Box::new(self.cookies.clone())));
        }
    }

    fn send_limits(&self, l: &crate::config::Limits, stun: ReplyLimits) {
        for w in 0..self.workers.len() {
            let msg = ToWorker::Limits { stun, cookie: l.cookie_limits(), exempt: l.exempt.clone() };
            self.send(w, msg);
        }
    }

    /// Takes [`ControlUpdate`]s (SIGHUP) from `updates`, applied between messages.
    pub fn with_updates(mut self, updates: Receiver<ControlUpdate>) -> Self {
        self.updates = Some(updates);
        self
    }

    fn apply(&mut self, u: ControlUpdate) {
        let l = u.limits;
        info!(
            create_rate = l.create_rate,
            create_burst = l.create_burst,
            max_circuits_per_ip = l.max_circuits_per_ip,
            exempt = l.exempt.len(),
            max_circuits = l.max_circuits,
            load_create_rate = l.load_create_rate,
            extend_relays = ?u.targets.relay_count(),
            "reload: limits in force"
        );
        self.send_limits(&l, u.stun);
        self.max_circuits = l.max_circuits as usize;
        self.stats().circuit_limit.store(u64::from(l.max_circuits), Ordering::Relaxed);
        self.registry.load.set_threshold(l.load_create_rate);
        self.limits.reconfigure(l.create_rate, l.create_burst, l.max_circuits_per_ip, l.exempt);
        self.targets = u.targets;
        if let Some((keys, previous_until)) = u.onion {
            debug!(keys = keys.len(), "reload: onion keys replaced");
            self.plane.set_onion_keys(keys, previous_until);
        }
    }

    fn stats(&self) -> &ControlStats {
        &self.registry.control
    }

    /// An unused LCID that the reuseport steering delivers to `worker`.
    fn alloc_lcid(used: &mut HashSet<u32>, workers: usize, worker: usize) -> u32 {
        let n = workers as u32;
        loop {
            let r = OsRng.next_u32() | 0x4000_0000;
            let id = r - r % n + worker as u32;
            if is_valid_lcid(id) && id % n == worker as u32 && used.insert(id) {
                return id;
            }
        }
    }

    fn send(&self, worker: usize, msg: ToWorker) {
        // A worker that is gone (shutting down) no longer needs anything.
        let _ = self.workers[worker].send(msg);
        // Workers block in their data path's poll; this makes them read the message now.
        if let Some(waker) = self.wakers.get(worker) {
            waker.wake();
        }
    }

    /// Runs until `stop` is set.
    pub fn run(mut self, inbox: Receiver<ToControl>, stop: Arc<AtomicBool>) {
        let mut last_expire = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            while let Some(u) = self.updates.as_ref().and_then(|rx| rx.try_recv().ok()) {
                self.apply(u);
            }
            match inbox.recv_timeout(LOAD_TICK) {
                Ok(msg) => self.handle(Instant::now(), msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let stats = self.stats();
            stats.pending_extends.store(self.plane.pending_len() as u64, Ordering::Relaxed);
            stats.answered_creates.store(self.plane.answered_len() as u64, Ordering::Relaxed);
            stats.lcids_in_use.store(self.used.len() as u64, Ordering::Relaxed);
            let now = Instant::now();
            self.watch_load(now, inbox.len());
            if now.duration_since(last_expire) >= Duration::from_secs(1) {
                last_expire = now;
                self.limits.prune(now);
                for Expired { circuit, reply_lcid } in self.plane.expire(now) {
                    ControlStats::bump(&self.stats().extends_failed);
                    self.used.remove(&reply_lcid);
                    let worker = circuit as usize % self.workers.len();
                    let reply_lcid = Some(reply_lcid);
                    self.send(worker, ToWorker::ExtendFailed { circuit, reason: reason::CONNECT_FAILED, reply_lcid });
                }
            }
        }
    }

    /// The under-load state (see [`crate::ratelimit::LoadMonitor`]) and cookie rotation.
    fn watch_load(&mut self, now: Instant, queue: usize) {
        let creates = self.registry.workers.iter().map(|w| w.creates()).sum();
        match self.load.observe(&self.registry.load, now, creates, queue) {
            Some(true) => info!(queue, "under load: CREATEs need a cookie"),
            Some(false) => info!("no longer under load"),
            None => {}
        }
        if self.cookies.rotate_if_due(now, &mut OsRng) {
            self.send_cookie_jar();
        }
    }

    fn handle(&mut self, now: Instant, msg: ToControl) {
        match msg {
            ToControl::Create { from, cell } => self.create(now, from, &cell),
            ToControl::Created { from, cell } => match self.plane.handle_created(now, from, &cell, &mut OsRng) {
                Ok(Answer::Extended(ext)) => {
                    let ext = *ext;
                    ControlStats::bump(&self.stats().extends);
                    let worker = ext.circuit as usize % self.workers.len();
                    let reply_lcid = ext.link.lcid_in;
                    self.send(
                        worker,
                        ToWorker::Extended {
                            circuit: ext.circuit,
                            link: Box::new(ext.link),
                            extended: ext.extended,
                            reply_lcid,
                        },
                    );
                }
                Ok(Answer::Retry { to, create }) => {
                    // The next hop is under load and sent a cookie: the same CREATE with it.
                    let worker = lcid(&cell) as usize % self.workers.len();
                    self.send(worker, ToWorker::Send(Outgoing::cell(to, &create)));
                }
                Err(e) => debug!(%from, "CREATED refused: {e}"),
            },
            ToControl::Extend { worker, circuit, body } => self.extend(now, worker, circuit, &body),
            ToControl::Closed { lcids } => {
                for id in lcids {
                    self.used.remove(&id);
                    if let Some(charged) = self.sources.remove(&id) {
                        if let Some(key) = charged {
                            self.limits.closed(key);
                        }
                        self.stats().circuits.store(self.sources.len() as u64, Ordering::Relaxed);
                    }
                    // An EXTEND still pending for a circuit that is gone: free its reply id too.
                    if let Some(reply_lcid) = self.plane.circuit_closed(id) {
                        self.used.remove(&reply_lcid);
                        self.send(reply_lcid as usize % self.workers.len(), ToWorker::ForgetCreated(reply_lcid));
                    }
                }
            }
        }
    }

    fn create(&mut self, now: Instant, from: SocketAddr, cell: &[u8; CELL_LEN]) {
        // The global cap first, for every source: exempt ones count against it too.
        if self.sources.len() >= self.max_circuits {
            ControlStats::bump(&self.stats().refused[REFUSED_CIRCUIT_CAP]);
            return;
        }
        let charged = match self.limits.check_create(from.ip(), now) {
            Ok(charged) => charged,
            Err(why) => {
                ControlStats::bump(&self.stats().rate_limited);
                ControlStats::bump(&self.stats().refused[refusal_index(why)]);
                return;
            }
        };
        let worker = self.next_worker;
        let workers = self.workers.len();
        let used = &mut self.used;
        let mut allocated = None;
        let result = self.plane.handle_create(
            now,
            from,
            cell,
            || {
                let id = Self::alloc_lcid(used, workers, worker);
                allocated = Some(id);
                id
            },
            &mut OsRng,
        );
        match result {
            Ok(Created::New { reply, circuit }) => {
                ControlStats::bump(&self.stats().handshakes_ok);
                self.next_worker = (worker + 1) % workers;
                if let Some(id) = allocated {
                    self.sources.insert(id, charged);
                    if let Some(key) = charged {
                        self.limits.opened(key);
                    }
                    self.stats().circuits.store(self.sources.len() as u64, Ordering::Relaxed);
                }
                let reply = Outgoing::cell(from, &reply);
                self.send(worker, ToWorker::Install { circuit, reply });
            }
            Ok(Created::Repeat { reply }) => {
                self.send(worker, ToWorker::Send(Outgoing::cell(from, &reply)));
            }
            Err(e) => {
                ControlStats::bump(&self.stats().handshakes_failed);
                debug!(%from, "CREATE refused: {e}");
            }
        }
    }

    fn extend(&mut self, now: Instant, worker: usize, circuit: u32, body: &[u8]) {
        let refuse = |this: &mut Self, why: u8| {
            ControlStats::bump(&this.stats().extends_failed);
            this.send(worker, ToWorker::ExtendFailed { circuit, reason: why, reply_lcid: None });
        };
        let Ok(ext) = Extend::decode(body) else { return refuse(self, reason::PROTOCOL) };
        if let Err(why) = self.targets.allows(ext.target) {
            info!(target = %ext.target, "EXTEND refused: {why}");
            return refuse(self, reason::POLICY);
        }
        let workers = self.workers.len();
        let used = &mut self.used;
        let mut allocated = None;
        let result = self.plane.handle_extend(
            now,
            circuit,
            body,
            || {
                let id = Self::alloc_lcid(used, workers, worker);
                allocated = Some(id);
                id
            },
            &mut OsRng,
        );
        match result {
            Ok(Some((target, create))) => {
                if let Some(id) = allocated {
                    self.send(worker, ToWorker::ExpectCreated(id));
                }
                self.send(worker, ToWorker::Send(Outgoing::cell(target, &create)));
            }
            // A retransmitted EXTEND inside the resend interval, or past the resend budget.
            Ok(None) => {}
            // A different EXTEND while one is pending: the first one stands.
            Err(ControlError::ExtendPending) => {
                ControlStats::bump(&self.stats().extends_failed);
                debug!(circuit, "EXTEND refused: another is pending");
            }
            Err(e) => {
                debug!("EXTEND refused: {e}");
                refuse(self, reason::PROTOCOL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for a in [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "192.168.1.1",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_private(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "100.128.0.1", "2001:4860::8888"] {
            assert!(!is_private(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn lcids_land_on_their_worker() {
        let mut used = HashSet::new();
        for w in 0..7 {
            for _ in 0..100 {
                let id = Control::alloc_lcid(&mut used, 7, w);
                assert!(is_valid_lcid(id));
                assert_eq!(id as usize % 7, w);
            }
        }
        assert_eq!(used.len(), 700);
    }
}
