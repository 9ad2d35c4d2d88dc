//! A data-plane worker: one thread, pinned, the driver of one [`Node`] (its share of circuits).
//! It moves bytes and time and keeps the books; the node decides. Per poll: read the clock,
//! take the control thread's messages, let the exit's terminal originate (TUN), then per batch
//! classify (cell, STUN, junk) → [`Node::handle`] in place → mark each datagram sent or
//! dropped; the node's own cells (PONG, EXTENDED, DESTROY) land in this worker's [`Outbox`].
//! Every reaction to a cell (PING, DESTROY, EXTEND, ATTACH, DATA, expiry) is the node's.
//! Nothing here locks or does an atomic read-modify-write per cell; counters are plain and
//! published periodically. CREATEs are checked for a cookie under load here
//! ([`crate::cookies`]: one relaxed load of the shared flag per CREATE), and STUN answers are
//! rate-limited per source and in all.

use crate::control::{ToControl, ToWorker};
use crate::cookies::{CreateCheck, CreateGuard};
use crate::metrics::{
    DROP_COOKIE_LIMIT, DROP_LABELS, DROP_OVERLOAD, DROP_STUN_LIMIT, Registry, WorkerCounters, drop_index,
};
use crate::ratelimit::{ReplyLimiter, ReplyLimits};
use crate::terminal::Terminal;
use cellio::{Action, Datagram, Datapath, DatapathStats, Outbox, Outgoing};
use cellproto::cell::{CELL_LEN, Command};
use cellproto::node::{CircuitId, Host, Node, Routed, Transmit, Upcall};
use cellproto::relay::{DropReason, HopCircuit, Incoming};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use rand_core::OsRng;
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long one poll waits for datagrams when idle. The control thread wakes the worker when
/// it sends a message, and an exit's TUN queue wakes it when readable ([`Terminal::wake_fd`]),
/// so this only paces the timers (publishing; the node's expiry is sooner if due).
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often counters are published to the metrics registry.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often the limiters forget idle sources.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Drops of one reason are logged at most this often (with the count since the last line).
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);
/// CREATEs held from one poll to the end of it (beyond: dropped as overload). CREATEs are
/// handled after the poll has sent the batch's cells, so their cryptography under load (the
/// cookie MAC, a COOKIE answer: several µs each) never delays established circuits' cells.
const CREATE_BACKLOG: usize = 1024;

/// Logs drops at a bounded rate: counting is always exact, logging is not per cell.
#[derive(Debug)]
struct DropLog {
    last: [Option<Instant>; DROP_LABELS.len()],
    logged: [u64; DROP_LABELS.len()],
}

impl DropLog {
    fn new() -> Self {
        Self { last: [None; DROP_LABELS.len()], logged: [0; DROP_LABELS.len()] }
    }

    fn maybe_log(&mut self, worker: usize, counters: &WorkerCounters, now: Instant) {
        for (((label, &total), logged), last) in
            DROP_LABELS.iter().zip(&counters.drops).zip(&mut self.logged).zip(&mut self.last)
        {
            if total == *logged || last.is_some_and(|t| now.duration_since(t) < DROP_LOG_EVERY) {
                continue;
            }
            info!(worker, reason = label, dropped = total - *logged, total, "dropped datagrams");
            *logged = total;
            *last = Some(now);
        }
    }
}

/// One worker's state.
pub struct Worker {
    index: usize,
    /// Its circuits and every decision about their cells.
    node: Node,
    to_control: Sender<ToControl>,
    inbox: Receiver<ToWorker>,
    counters: WorkerCounters,
    /// Cells relayed (marked `Send` in place); the node's own cells are counted by the outbox.
    forwarded: u64,
    registry: Arc<Registry>,
    local: SocketAddr,
    /// What this worker originates, sent at the end of the next poll.
    out: Outbox,
    /// The vector being sent while `out` fills (swapped each poll: neither reallocates).
    sending: Vec<Outgoing>,
    log: DropLog,
    /// The RFC 5780 alternate address and where change-port answers are handed over.
    stun_alternate: Option<(SocketAddr, crate::stun::Handover)>,
    /// The exit's hook, if this relay is an exit.
    terminal: Option<Box<dyn Terminal>>,
    /// Cookies under load and the COOKIE answer limits.
    guard: CreateGuard,
    /// STUN answer limits.
    stun_limits: ReplyLimiter,
    /// CREATEs received in this poll, handled once it has sent its cells.
    creates: Vec<(SocketAddr, [u8; CELL_LEN])>,
}

/// The node's host in a worker: the outbox, and the control thread behind a bounded channel.
struct WorkerHost<'a> {
    index: usize,
    out: &'a mut Outbox,
    to_control: &'a Sender<ToControl>,
    counters: &'a mut WorkerCounters,
    creates: &'a mut Vec<(SocketAddr, [u8; CELL_LEN])>,
}

impl Transmit for WorkerHost<'_> {
    #[inline]
    fn slot(&mut self) -> &mut [u8; CELL_LEN] {
        self.out.slot()
    }

    #[inline]
    fn commit(&mut self, to: SocketAddr) {
        self.out.commit(to);
    }
}

impl Host for WorkerHost<'_> {
    fn upcall(&mut self, _now: Instant, up: Upcall<'_>) {
        let msg = match up {
            Upcall::Create { from, cell } => {
                self.counters.creates += 1;
                if self.creates.len() < CREATE_BACKLOG {
                    self.creates.push((from, *cell));
                } else {
                    self.counters.drops[DROP_OVERLOAD] += 1;
                }
                return;
            }
            Upcall::Created { from, cell } => ToControl::Created { from, cell: Box::new(*cell) },
            Upcall::Extend { circuit, body } => ToControl::Extend { worker: self.index, circuit, body: body.to_vec() },
            Upcall::Closed { circuit, next } => {
                ToControl::Closed { lcids: [Some(circuit), next].into_iter().flatten().collect() }
            }
        };
        tell(self.to_control, self.counters, msg);
    }
}

/// Hands a message to the control thread, or counts it as shed.
fn tell(to_control: &Sender<ToControl>, counters: &mut WorkerCounters, msg: ToControl) {
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = to_control.try_send(msg) {
        // The control thread is saturated (e.g. a CREATE flood): shed load here rather than
        // stall the data plane.
        counters.drops[DROP_OVERLOAD] += 1;
    }
}

/// The exit's terminal as the node sees it (none: a relay, where DATA is a protocol error).
struct Exit<'a>(Option<&'a mut dyn Terminal>);

impl cellproto::node::Terminal for Exit<'_> {
    #[inline]
    fn deliver(
        &mut self,
        now: Instant,
        id: CircuitId,
        circ: &mut HopCircuit,
        cmd: Command,
        payload: &[u8],
        tx: &mut dyn Transmit,
    ) -> bool {
        match self.0.as_mut() {
            Some(t) => t.deliver(now, id, circ, cmd, payload, tx),
            None => false,
        }
    }

    fn closed(&mut self, id: CircuitId) {
        if let Some(t) = self.0.as_mut() {
            t.closed(id);
        }
    }
}

/// Splits a worker into the node and what the node is given (disjoint borrows).
macro_rules! parts {
    ($w:expr) => {
        (
            &mut $w.node,
            WorkerHost {
                index: $w.index,
                out: &mut $w.out,
                to_control: &$w.to_control,
                counters: &mut $w.counters,
                creates: &mut $w.creates,
            },
            Exit($w.terminal.as_deref_mut().map(|t| t as &mut dyn Terminal)),
        )
    };
}

impl Worker {
    /// A worker with index `index`.
    pub fn new(
        index: usize,
        to_control: Sender<ToControl>,
        inbox: Receiver<ToWorker>,
        registry: Arc<Registry>,
        idle: Duration,
        local: SocketAddr,
    ) -> Self {
        Self {
            index,
            node: Node::new(Instant::now(), idle),
            to_control,
            inbox,
            counters: WorkerCounters::default(),
            forwarded: 0,
            registry,
            local,
            out: Outbox::new(),
            sending: Vec::new(),
            log: DropLog::new(),
            stun_alternate: None,
            terminal: None,
            // The control thread sends the configured limits and the cookie secret before this
            // worker runs (`ToWorker::Limits`, `ToWorker::Cookies`); until then, the defaults.
            guard: CreateGuard::new(Instant::now(), crate::config::Limits::default().cookie_limits(), Vec::new()),
            stun_limits: ReplyLimiter::new(crate::config::StunOptions::default().replies(), Instant::now()),
            creates: Vec::new(),
        }
    }

    /// Benchmark only: forward cells by LCID without cryptography (see `config::Bench`).
    pub fn with_null_forwarder(mut self, on: bool) -> Self {
        self.node.set_null_forwarder(on);
        self
    }

    /// Answers STUN with OTHER-ADDRESS `addr` and hands change-port answers to `handover`.
    pub fn with_stun_alternate(mut self, alternate: Option<(SocketAddr, crate::stun::Handover)>) -> Self {
        self.stun_alternate = alternate;
        self
    }

    /// Makes this worker an exit's: `terminal` gets DATA and ATTACH and may originate cells.
    pub fn with_terminal(mut self, terminal: Option<Box<dyn Terminal>>) -> Self {
        self.terminal = terminal;
        self
    }

    /// Runs until `stop` is set, then sends DESTROY for every circuit both ways.
    pub fn run(mut self, mut dp: Box<dyn Datapath>, stop: Arc<AtomicBool>) {
        let mut last_publish = Instant::now();
        let mut last_prune = Instant::now();
        for fd in self.terminal.as_ref().map(|t| t.wake_fds()).unwrap_or_default() {
            dp.watch(fd);
        }
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.drain_inbox(now);
            let busy = match self.terminal.as_mut() {
                Some(terminal) => terminal.poll(now, &mut self.node, &mut self.out),
                None => false,
            };
            let timeout = if self.out.is_empty() && !busy {
                POLL_TIMEOUT.min(self.node.poll_timeout().saturating_duration_since(now))
            } else {
                Duration::ZERO
            };
            // What the node originates while this is being sent (PONG, STUN answers, DESTROY)
            // collects in `self.out` and goes out on the next round, at once.
            let mut sending = std::mem::take(&mut self.sending);
            std::mem::swap(&mut sending, self.out.datagrams());
            let polled = dp.poll(timeout, &mut |batch| self.handle_batch(now, batch), &mut sending);
            sending.clear();
            self.sending = sending;
            // The batch's cells are sent: now the CREATEs (their answers go out next round).
            self.handle_creates();
            if let Err(e) = polled {
                warn!(worker = self.index, "data path error: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            let now = Instant::now();
            let (node, mut host, mut exit) = parts!(self);
            node.handle_timeout(now, &mut host, &mut exit, &mut OsRng);
            if now.duration_since(last_prune) >= PRUNE_EVERY {
                last_prune = now;
                self.guard.prune(now);
                self.stun_limits.prune(now);
            }
            if now.duration_since(last_publish) >= PUBLISH_EVERY {
                last_publish = now;
                self.publish(now, dp.stats());
            }
        }
        let (node, mut host, mut exit) = parts!(self);
        node.shutdown(Instant::now(), &mut host, &mut exit, &mut OsRng);
        let _ = dp.poll(Duration::ZERO, &mut |_| {}, self.out.datagrams());
        self.publish(Instant::now(), dp.stats());
    }

    fn publish(&mut self, now: Instant, datapath: DatapathStats) {
        self.counters.circuits = self.node.len() as u64;
        self.counters.cells_out = self.forwarded + self.out.sealed();
        self.counters.datapath = datapath;
        self.registry.workers[self.index].publish(&self.counters);
        self.log.maybe_log(self.index, &self.counters, now);
    }

    fn drop(&mut self, index: usize) {
        self.counters.drops[index] += 1;
    }

    fn drain_inbox(&mut self, now: Instant) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                ToWorker::Install { circuit, reply } => {
                    self.node.install(*circuit);
                    self.out.push(reply);
                }
                ToWorker::Send(o) => self.out.push(o),
                ToWorker::ExpectCreated(reply_lcid) => self.node.expect_created(reply_lcid),
                ToWorker::Extended { circuit, link, extended, reply_lcid } => {
                    self.node.extended(now, circuit, *link, &extended, reply_lcid, &mut self.out);
                }
                ToWorker::ForgetCreated(reply_lcid) => self.node.forget_created(reply_lcid),
                ToWorker::Cookies(jar) => self.guard.set_jar(*jar),
                ToWorker::Limits { stun, cookie, exempt } => self.set_limits(stun, cookie, exempt),
                ToWorker::ExtendFailed { circuit, reason, reply_lcid } => {
                    self.node.extend_failed(now, circuit, reason, reply_lcid, &mut self.out);
                }
            }
        }
    }

    /// The per-batch pipeline: classify, let the node handle the cells in place, mark them.
    fn handle_batch(&mut self, now: Instant, batch: &mut [Datagram<'_>]) {
        for chunk in batch.chunks_mut(64) {
            self.handle_chunk(now, chunk);
        }
        if let Some(terminal) = self.terminal.as_mut() {
            terminal.flush();
        }
    }

    fn handle_chunk(&mut self, now: Instant, batch: &mut [Datagram<'_>]) {
        let mut routed = [Routed::Drop(DropReason::Malformed); 64];
        let mut which = [0usize; 64];
        let mut n = 0;
        {
            let mut cells: SmallVec<[Incoming<'_>; 64]> = SmallVec::new();
            for (i, d) in batch.iter_mut().enumerate() {
                if d.data.len() != CELL_LEN {
                    if cellproto::stun::is_stun(d.data) {
                        self.answer_stun(now, d.from, d.data);
                    } else {
                        self.drop(drop_index(DropReason::Malformed));
                    }
                    continue;
                }
                let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(&mut *d.data) else { continue };
                self.counters.cells_in += 1;
                cells.push(Incoming { from: d.from, cell });
                which[n] = i;
                n += 1;
            }
            let (node, mut host, mut exit) = parts!(self);
            node.handle(now, &mut cells, &mut routed[..n], &mut host, &mut exit, &mut OsRng);
        }
        for (k, r) in routed[..n].iter().enumerate() {
            match *r {
                Routed::Send { to, .. } => {
                    self.forwarded += 1;
                    batch[which[k]].action = Action::Send(to);
                }
                Routed::Drop(why) => self.drop(drop_index(why)),
                Routed::Local { .. } => {}
            }
        }
    }

    /// The CREATEs of the last poll.
    fn handle_creates(&mut self) {
        if self.creates.is_empty() {
            return;
        }
        // The poll may have waited: the limits' clocks want the time now.
        let now = Instant::now();
        let mut creates = std::mem::take(&mut self.creates);
        for (from, cell) in &creates {
            self.create(now, *from, cell);
        }
        creates.clear();
        self.creates = creates;
    }

    /// A CREATE: under load, only one with a valid cookie goes on to the control thread.
    fn create(&mut self, now: Instant, from: SocketAddr, cell: &[u8; CELL_LEN]) {
        let msg = || ToControl::Create { from, cell: Box::new(*cell) };
        match self.guard.check(&self.registry.load, now, from, cell, &mut self.out) {
            CreateCheck::Forward => tell(&self.to_control, &mut self.counters, msg()),
            CreateCheck::ForwardWithCookie => {
                self.counters.cookies_valid += 1;
                tell(&self.to_control, &mut self.counters, msg());
            }
            CreateCheck::CookieSent => self.counters.cookies_sent += 1,
            CreateCheck::Limited => self.drop(DROP_COOKIE_LIMIT),
            CreateCheck::Malformed => self.drop(drop_index(DropReason::Malformed)),
            CreateCheck::NoSecret | CreateCheck::Shed => self.drop(DROP_OVERLOAD),
        }
    }

    fn set_limits(&mut self, stun: ReplyLimits, cookie: crate::cookies::CookieLimits, exempt: Vec<ipnet::IpNet>) {
        self.stun_limits.reconfigure(stun);
        self.guard.reconfigure(cookie, exempt);
    }

    fn answer_stun(&mut self, now: Instant, from: SocketAddr, request: &[u8]) {
        // Before any work: a 20-byte request gets up to 124 bytes (amplification).
        if self.stun_limits.allow(from.ip(), now).is_err() {
            return self.drop(DROP_STUN_LIMIT);
        }
        let other = self.stun_alternate.as_ref().map(|(addr, _)| *addr);
        let Some(answer) = crate::stun::reply(from, self.local, other, request) else { return };
        let out = Outgoing::new(from, &answer.data);
        match &self.stun_alternate {
            Some((_, handover)) if answer.from_other => {
                // An answer lost on a full handover is a drop, not an answer.
                if handover.try_send(out).is_err() {
                    return self.drop(DROP_OVERLOAD);
                }
            }
            _ => self.out.push(out),
        }
        self.counters.stun += 1;
    }
}
