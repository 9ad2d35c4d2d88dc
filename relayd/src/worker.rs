//! A data-plane worker: one thread, pinned, owning its socket's data path and its share of
//! circuits. Per batch: classify (cell, STUN, junk) → `process_batch` in place → route
//! (send, deliver to this hop, hand handshakes to the control thread). Nothing here locks or
//! does an atomic read-modify-write per cell; counters are plain and published periodically.
//! CREATEs are checked for a cookie under load here ([`crate::cookies`]: one relaxed load of
//! the shared flag per CREATE), and STUN answers are rate-limited per source and in all.

use crate::control::{ToControl, ToWorker};
use crate::cookies::{CreateCheck, CreateGuard};
use crate::datapath::{Action, Datagram, Datapath, DatapathStats, Outgoing};
use crate::metrics::{
    DROP_COOKIE_LIMIT, DROP_LABELS, DROP_OVERLOAD, DROP_STUN_LIMIT, Registry, WorkerCounters, drop_index,
};
use crate::ratelimit::{ReplyLimiter, ReplyLimits};
use crate::terminal::Terminal;
use cellproto::cell::{CELL_LEN, Command, HANDSHAKE_LCID, lcid};
use cellproto::command::{decode_ping, reason};
use cellproto::link::LinkControl;
use cellproto::onion::{Direction, payload, payload_mut};
use cellproto::relay::{CircuitMap, DropReason, HopCircuit, Incoming, Verdict, process_batch};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use rand_core::OsRng;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long one poll waits for datagrams when idle. The control thread wakes the worker when
/// it sends a message, and an exit's TUN queue wakes it when readable ([`Terminal::wake_fd`]),
/// so this only paces the timers (publishing, expiry).
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often counters are published to the metrics registry.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often idle circuits are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
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
    circuits: CircuitMap,
    /// Reply LCIDs of EXTENDs in progress: cells on them are CREATEDs for the control thread.
    pending: HashSet<u32>,
    to_control: Sender<ToControl>,
    inbox: Receiver<ToWorker>,
    counters: WorkerCounters,
    registry: Arc<Registry>,
    idle: Duration,
    local: SocketAddr,
    out: Vec<Outgoing>,
    log: DropLog,
    null_forwarder: bool,
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
            circuits: CircuitMap::new(),
            pending: HashSet::new(),
            to_control,
            inbox,
            counters: WorkerCounters::default(),
            registry,
            idle,
            local,
            out: Vec::new(),
            log: DropLog::new(),
            null_forwarder: false,
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
        self.null_forwarder = on;
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
        let mut last_expire = Instant::now();
        for fd in self.terminal.as_ref().map(|t| t.wake_fds()).unwrap_or_default() {
            dp.watch(fd);
        }
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.drain_inbox(now);
            let busy = match self.terminal.as_mut() {
                Some(terminal) => terminal.poll(now, &mut self.circuits, &mut self.out),
                None => false,
            };
            // What the handler originates while `out` is being sent (PONG, STUN answers,
            // DESTROY) collects in `self.out` and goes out on the next round, at once.
            let mut out = std::mem::take(&mut self.out);
            let timeout = if out.is_empty() && !busy { POLL_TIMEOUT } else { Duration::ZERO };
            let polled = dp.poll(timeout, &mut |batch| self.handle_batch(now, batch), &mut out);
            if self.out.is_empty() {
                out.clear();
                self.out = out;
            }
            // The batch's cells are sent: now the CREATEs (their answers go out next round).
            self.handle_creates();
            if let Err(e) = polled {
                warn!(worker = self.index, "data path error: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            if now.duration_since(last_expire) >= EXPIRE_EVERY {
                last_expire = now;
                self.expire(now);
                self.guard.prune(now);
                self.stun_limits.prune(now);
            }
            if now.duration_since(last_publish) >= PUBLISH_EVERY {
                last_publish = now;
                self.publish(now, dp.stats());
            }
        }
        let all = self.circuits.remove_where(|_| true);
        for circ in all {
            self.teardown(circ, reason::SHUTDOWN, None);
        }
        let mut out = std::mem::take(&mut self.out);
        let _ = dp.poll(Duration::ZERO, &mut |_| {}, &mut out);
        self.publish(Instant::now(), dp.stats());
    }

    fn publish(&mut self, now: Instant, datapath: DatapathStats) {
        self.counters.circuits = self.circuits.len() as u64;
        self.counters.datapath = datapath;
        self.registry.workers[self.index].publish(&self.counters);
        self.log.maybe_log(self.index, &self.counters, now);
    }

    fn drop(&mut self, index: usize) {
        self.counters.drops[index] += 1;
    }

    fn tell_control(&mut self, msg: ToControl) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.to_control.try_send(msg) {
            // The control thread is saturated (e.g. a CREATE flood): shed load here rather
            // than stall the data plane.
            self.drop(DROP_OVERLOAD);
        }
    }

    fn drain_inbox(&mut self, now: Instant) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                ToWorker::Install { circuit, reply } => {
                    self.circuits.insert(*circuit);
                    self.out.push(reply);
                }
                ToWorker::Send(o) => self.out.push(o),
                ToWorker::ExpectCreated(reply_lcid) => {
                    self.pending.insert(reply_lcid);
                }
                ToWorker::Extended { circuit, link, extended, reply_lcid } => {
                    self.pending.remove(&reply_lcid);
                    if !self.circuits.set_next(circuit, *link) {
                        continue;
                    }
                    let mut cell = Box::new([0u8; CELL_LEN]);
                    let Ok(len) = extended.encode(payload_mut(&mut cell)) else { continue };
                    self.originate(now, circuit, Command::Extended, len, cell);
                }
                ToWorker::ForgetCreated(reply_lcid) => {
                    self.pending.remove(&reply_lcid);
                }
                ToWorker::Cookies(jar) => self.guard.set_jar(*jar),
                ToWorker::Limits { stun, cookie, exempt } => self.set_limits(stun, cookie, exempt),
                ToWorker::ExtendFailed { circuit, reason, reply_lcid } => {
                    if let Some(id) = reply_lcid {
                        self.pending.remove(&id);
                    }
                    let mut cell = Box::new([0u8; CELL_LEN]);
                    payload_mut(&mut cell)[0] = reason;
                    self.originate(now, circuit, Command::Destroy, 1, cell);
                }
            }
        }
    }

    /// Seals a command from this hop to the client on `circuit` and queues it.
    fn originate(&mut self, now: Instant, circuit: u32, cmd: Command, len: usize, mut cell: Box<[u8; CELL_LEN]>) {
        let Some(circ) = self.circuits.get_mut(circuit) else { return };
        if let Ok(to) = circ.seal_backward(now, cmd, len, &mut cell) {
            self.counters.cells_out += 1;
            self.out.push(Outgoing { to, data: cell.to_vec() });
        }
    }

    /// Removes nothing itself: sends DESTROY to the neighbours of `circ` (except `skip`) and
    /// tells the control thread its LCIDs are free.
    fn teardown(&mut self, mut circ: HopCircuit, why: u8, skip: Option<Direction>) {
        for side in [Direction::Backward, Direction::Forward] {
            if Some(side) == skip {
                continue;
            }
            let mut cell = [0u8; CELL_LEN];
            if let Some(to) = circ.seal_destroy(side, why, &mut cell, &mut OsRng) {
                self.out.push(Outgoing { to, data: cell.to_vec() });
            }
        }
        if let Some(terminal) = self.terminal.as_mut() {
            terminal.closed(circ.prev().lcid_in);
        }
        let mut lcids = vec![circ.prev().lcid_in];
        if let Some(next) = circ.next() {
            lcids.push(next.lcid_in);
        }
        self.tell_control(ToControl::Closed { lcids });
    }

    fn expire(&mut self, now: Instant) {
        let idle = self.idle;
        for circ in self.circuits.remove_where(|c| c.expired(now, idle)) {
            self.teardown(circ, reason::TIMEOUT, None);
        }
    }

    /// The per-batch pipeline: classify, process cells in place, route.
    fn handle_batch(&mut self, now: Instant, batch: &mut [Datagram<'_>]) {
        for chunk in batch.chunks_mut(64) {
            self.handle_chunk(now, chunk);
        }
        if let Some(terminal) = self.terminal.as_mut() {
            terminal.flush();
        }
    }

    fn handle_chunk(&mut self, now: Instant, batch: &mut [Datagram<'_>]) {
        let mut verdicts = [Verdict::Drop(DropReason::Malformed); 64];
        let mut which = [0usize; 64];
        let mut n = 0;
        {
            let mut cells: Vec<Incoming<'_>> = Vec::with_capacity(batch.len());
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
                let id = lcid(cell);
                if id == HANDSHAKE_LCID {
                    self.counters.creates += 1;
                    if self.creates.len() < CREATE_BACKLOG {
                        self.creates.push((d.from, *cell));
                    } else {
                        self.drop(DROP_OVERLOAD);
                    }
                } else if self.pending.contains(&id) {
                    self.tell_control(ToControl::Created { from: d.from, cell: Box::new(*cell) });
                } else {
                    cells.push(Incoming { from: d.from, cell });
                    which[n] = i;
                    n += 1;
                }
            }
            if self.null_forwarder {
                null_forward(&mut self.circuits, now, &mut cells, &mut verdicts[..n]);
            } else {
                process_batch(&mut self.circuits, now, &mut cells, &mut verdicts[..n]);
            }
        }
        for (k, verdict) in verdicts[..n].iter().enumerate() {
            let d = &mut batch[which[k]];
            match *verdict {
                Verdict::Send(to) => {
                    self.counters.cells_out += 1;
                    d.action = Action::Send(to);
                }
                Verdict::Drop(r) => self.drop(drop_index(r)),
                Verdict::Control { from, msg: LinkControl::Destroy { reason } } => {
                    let id = lcid_of(d.data);
                    if let Some(circ) = self.circuits.remove_any(id) {
                        self.teardown(circ, reason, Some(from_side(from)));
                    }
                }
                Verdict::Deliver { cmd: cmd @ (Command::Data | Command::Attach), len } => {
                    // For the exit, in place: DATA is the exit's per-packet path.
                    let id = lcid_of(d.data);
                    match (self.terminal.as_mut(), self.circuits.get_mut(id)) {
                        (Some(terminal), Some(circ)) => {
                            let payload = <&[u8; CELL_LEN]>::try_from(&*d.data).map(|c| payload(c, len)).unwrap_or(&[]);
                            terminal.deliver(now, id, circ, cmd, payload, &mut self.out);
                        }
                        _ => self.drop(drop_index(DropReason::Protocol)),
                    }
                }
                Verdict::Deliver { cmd, len } => {
                    let id = lcid_of(d.data);
                    self.deliver(now, id, cmd, payload_of(d.data, len));
                }
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
        match self.guard.check(&self.registry.load, now, from, cell, &mut self.out) {
            CreateCheck::Forward => self.tell_control(ToControl::Create { from, cell: Box::new(*cell) }),
            CreateCheck::ForwardWithCookie => {
                self.counters.cookies_valid += 1;
                self.tell_control(ToControl::Create { from, cell: Box::new(*cell) });
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
        self.counters.stun += 1;
        let out = Outgoing { to: from, data: answer.data };
        match &self.stun_alternate {
            Some((_, handover)) if answer.from_other => {
                if handover.try_send(out).is_err() {
                    self.drop(DROP_OVERLOAD);
                }
            }
            _ => self.out.push(out),
        }
    }

    /// A command addressed to this hop (it arrived forward, so `circuit` is the previous-link LCID).
    fn deliver(&mut self, now: Instant, circuit: u32, cmd: Command, body: Vec<u8>) {
        match cmd {
            Command::Extend => {
                // One EXTEND per circuit: refused once the circuit is extended (the control
                // plane also keeps at most one pending, and resends its CREATE sparingly).
                if self.circuits.get_mut(circuit).is_none_or(|c| c.next().is_some()) {
                    return self.drop(drop_index(DropReason::Protocol));
                }
                let msg = ToControl::Extend { worker: self.index, circuit, body };
                self.tell_control(msg);
            }
            Command::Ping => {
                let Ok(id) = decode_ping(&body) else { return self.drop(drop_index(DropReason::Malformed)) };
                let mut cell = Box::new([0u8; CELL_LEN]);
                payload_mut(&mut cell)[..8].copy_from_slice(&id.to_be_bytes());
                self.originate(now, circuit, Command::Pong, 8, cell);
            }
            Command::Padding => {}
            Command::Destroy => {
                if let Some(circ) = self.circuits.remove(circuit) {
                    self.teardown(circ, reason::REQUESTED, Some(Direction::Backward));
                }
            }
            // DATA and ATTACH went to the exit's terminal; anything else is not for a relay.
            _ => self.drop(drop_index(DropReason::Protocol)),
        }
    }
}

/// The null forwarder: the same lookup and routing as `process_batch`, with the cryptography
/// left out (only the LCID is rewritten), to measure the engine's I/O ceiling.
fn null_forward(circuits: &mut CircuitMap, now: Instant, cells: &mut [Incoming<'_>], verdicts: &mut [Verdict]) {
    use cellproto::relay::CircuitTable;
    for (incoming, verdict) in cells.iter_mut().zip(verdicts.iter_mut()) {
        let link = match circuits.lookup(lcid(incoming.cell)) {
            // Not extended yet: the cell is for this hop (EXTEND, PING), so the normal path.
            Some((circ, Direction::Forward)) if circ.next().is_none() => {
                *verdict = circ.handle_forward(now, incoming.from, incoming.cell);
                continue;
            }
            Some((circ, Direction::Forward)) => circ.next(),
            Some((circ, Direction::Backward)) => Some(circ.prev()),
            None => None,
        };
        *verdict = match link {
            Some(link) => {
                cellproto::cell::set_lcid(incoming.cell, link.lcid_out);
                Verdict::Send(link.peer)
            }
            None => Verdict::Drop(DropReason::UnknownCircuit),
        };
    }
}

fn lcid_of(data: &[u8]) -> u32 {
    <&[u8; CELL_LEN]>::try_from(data).map(lcid).unwrap_or(0)
}

fn payload_of(data: &[u8], len: usize) -> Vec<u8> {
    <&[u8; CELL_LEN]>::try_from(data).map(|c| payload(c, len).to_vec()).unwrap_or_default()
}

/// The side a link-control message came from is the side not to send DESTROY back to.
fn from_side(from: Direction) -> Direction {
    match from {
        Direction::Forward => Direction::Backward,
        Direction::Backward => Direction::Forward,
    }
}
