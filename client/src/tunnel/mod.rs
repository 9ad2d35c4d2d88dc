//! The tunnel, sans-IO: one circuit at a time, its session at the exit, keepalive, and the
//! rebuild policy. The daemon feeds it received cells, packets from the TUN device and the
//! time; it returns cells to send, packets for the TUN device and events.
//!
//! **Rebuild.** A circuit that closes, fails to build, or is silent for `dead_after` is
//! replaced by a new path to the **same exit**, which gets ATTACH with the session token and
//! hands back the same inner addresses, so open TCP connections survive a relay's death. A
//! relay whose handshake timed out is avoided for [`AVOID_FOR`]. After silence on an open
//! circuit nobody knows which hop died, so its middles are only suspected: the next path
//! avoids them if it can (the guard and exit are kept: if they are the dead ones, that build
//! times out at their hop and says so). Only when the exit itself does not answer is another
//! exit chosen, with a fresh session and a log line, since the inner addresses then change;
//! with no other exit, the client keeps trying the same one and `status` says why.

use crate::config::Timers;
use crate::relays::{PathError, PathRequest, Relay, Relays};
use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::{Circuit, CircuitConfig, CloseReason, Event};
use cellproto::command::{Attach, Attached, decode_ping};
use cellproto::identity::IdentityKey;
use cellproto::onion::{payload, payload_mut};
use rand_core::{CryptoRngCore, RngCore};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a relay that failed is left out of new paths.
pub const AVOID_FOR: Duration = Duration::from_secs(10);
/// Pause before retrying when no path can be built at all.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEvent {
    /// The first hop is (now) this relay: let cells to it through the kill switch, route it
    /// outside the tunnel. Comes before any cell to it.
    Guard(SocketAddr),
    /// The exit attached the circuit: configure the TUN device with these addresses (they
    /// are the previous ones when the session was resumed).
    Up(Attached),
    /// Traffic stopped: the reason is in [`Tunnel::status`].
    Down,
}

/// Where the tunnel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Building the first circuit.
    Connecting,
    /// Packets flow.
    Up,
    /// Building a replacement circuit; packets are dropped meanwhile (the kill switch holds).
    Rebuilding,
}

/// Counters for `meshvpn status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// IP packets sealed towards the exit.
    pub packets_sent: u64,
    /// Their bytes.
    pub bytes_sent: u64,
    /// IP packets received from the exit.
    pub packets_received: u64,
    /// Their bytes.
    pub bytes_received: u64,
    /// Packets from the TUN device dropped while no circuit was up.
    pub dropped_no_circuit: u64,
    /// Received datagrams that were not valid cells of the current circuit.
    pub dropped_bad_cells: u64,
    /// Circuits built after the first.
    pub rebuilds: u64,
    /// Times the exit changed.
    pub exit_changes: u64,
}

struct Avoid {
    id: IdentityKey,
    until: Instant,
}

/// The tunnel state machine.
pub struct Tunnel {
    relays: Relays,
    request: PathRequest,
    timers: Timers,
    circuit_config: CircuitConfig,
    circuit: Option<Circuit>,
    path: Vec<Relay>,
    pending_path: Option<Vec<Relay>>,
    guard: Option<SocketAddr>,
    session: Option<Attached>,
    session_exit: Option<IdentityKey>,
    state: State,
    reason: Option<String>,
    attach_sent: Option<Instant>,
    attached: bool,
    avoid: Vec<Avoid>,
    suspects: Vec<IdentityKey>,
    retry_at: Option<Instant>,
    last_rx: Instant,
    /// Last run of [`Tunnel::handle_timeout`]: it runs at least every keepalive interval, also
    /// while traffic flows, to catch a circuit's usage and age limits.
    checked: Instant,
    ping: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    up_since: Option<Instant>,
    queued: VecDeque<(SocketAddr, Box<[u8; CELL_LEN]>)>,
    events: VecDeque<TunnelEvent>,
    counters: Counters,
}

impl Tunnel {
    /// A tunnel over `relays`, asking paths of `request` (its `guard`: the kept one, if any).
    pub fn new(relays: Relays, request: PathRequest, timers: Timers, now: Instant) -> Self {
        let circuit_config = CircuitConfig {
            handshake_timeout: Duration::from_millis(timers.handshake_timeout_ms),
            handshake_attempts: timers.handshake_attempts,
            ..CircuitConfig::default()
        };
        Self {
            relays,
            request,
            timers,
            circuit_config,
            circuit: None,
            path: Vec::new(),
            pending_path: None,
            guard: None,
            session: None,
            session_exit: None,
            state: State::Connecting,
            reason: None,
            attach_sent: None,
            attached: false,
            avoid: Vec::new(),
            suspects: Vec::new(),
            retry_at: Some(now),
            last_rx: now,
            checked: now,
            ping: None,
            rtt: None,
            up_since: None,
            queued: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// New timings (SIGHUP), from the next timer on.
    pub fn set_timers(&mut self, timers: Timers) {
        self.timers = timers;
        self.circuit_config.handshake_timeout = Duration::from_millis(timers.handshake_timeout_ms);
        self.circuit_config.handshake_attempts = timers.handshake_attempts;
    }

    /// A fresh directory (SIGHUP): new paths are chosen from it; the current circuit stays.
    pub fn set_relays(&mut self, relays: Relays) {
        self.relays = relays;
    }

    /// Where packets flow.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why the tunnel is not up (or what last went wrong).
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The current (or last) path.
    pub fn path(&self) -> &[Relay] {
        &self.path
    }

    /// The current circuit, if any.
    pub fn circuit(&self) -> Option<&Circuit> {
        self.circuit.as_ref()
    }

    /// The exit's answer for the current session.
    pub fn session(&self) -> Option<&Attached> {
        self.session.as_ref()
    }

    /// The first hop's address.
    pub fn guard(&self) -> Option<SocketAddr> {
        self.guard
    }

    /// The last measured round trip to the exit (PING/PONG).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// When the tunnel last came up.
    pub fn up_since(&self) -> Option<Instant> {
        self.up_since
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }

    /// The next cell to send: handshakes, ATTACH, PING, DESTROY.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        cell: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Option<SocketAddr> {
        if let Some((to, queued)) = self.queued.pop_front() {
            cell.copy_from_slice(&queued[..]);
            return Some(to);
        }
        self.circuit.as_mut()?.poll_transmit(now, cell, rng)
    }

    /// When [`Tunnel::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Instant {
        // Every deadline here moves past `now` once `handle_timeout` has acted on it, so the
        // driver never spins.
        let mut at = self.checked + self.timers.keepalive();
        let mut earliest = |t: Instant| at = at.min(t);
        if let Some(t) = self.retry_at {
            earliest(t);
        }
        if let Some(t) = self.circuit.as_ref().and_then(Circuit::poll_timeout) {
            earliest(t);
        }
        if let Some(t) = self.attach_sent {
            earliest(t + self.timers.dead_after());
        }
        if self.state == State::Up {
            earliest(self.last_rx + self.timers.dead_after());
            earliest(match self.ping {
                Some((_, sent)) => sent + self.timers.keepalive(),
                None => self.last_rx + self.timers.keepalive(),
            });
        }
        at
    }

    /// Advances timers: retries, handshake timeouts, keepalive, silence.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl CryptoRngCore) {
        self.checked = now;
        if self.state == State::Up && self.circuit.as_ref().is_some_and(|c| c.needs_rebuild(now)) {
            info!("the circuit is near its key-usage or age limit: replacing it (same exit, same session)");
            self.reason = Some("circuit replaced at its key-usage or age limit".into());
            self.rebuild(now, rng);
            return;
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.build(now, rng);
        }
        if let Some(circ) = self.circuit.as_mut()
            && let Some(Event::Closed(why)) = circ.handle_timeout(now)
        {
            self.circuit_failed(now, why, rng);
            return;
        }
        if self.attach_sent.is_some_and(|t| now >= t + self.timers.dead_after()) {
            self.hop_failed(now, self.path.len(), "did not answer ATTACH", rng);
            return;
        }
        if self.state == State::Up {
            let silent = now.saturating_duration_since(self.last_rx);
            if silent >= self.timers.dead_after() {
                let middles: Vec<IdentityKey> =
                    self.path.iter().skip(1).take(self.path.len().saturating_sub(2)).map(Relay::id).collect();
                let why = format!("no cell from the circuit for {} ms", silent.as_millis());
                warn!("{why}: rebuilding through a new path to the same exit");
                self.suspects = middles;
                self.reason = Some(why);
                self.rebuild(now, rng);
            } else {
                let keepalive = self.timers.keepalive();
                let due = match self.ping {
                    Some((_, sent)) => now >= sent + keepalive,
                    None => silent >= keepalive,
                };
                match (due, silent >= keepalive) {
                    (true, true) => self.send_ping(now, rng),
                    // Cells arrive, only the PONG was lost: nothing to probe.
                    (true, false) => self.ping = None,
                    _ => {}
                }
            }
        }
    }

    fn avoid_relay(&mut self, id: IdentityKey, now: Instant) {
        self.avoid.retain(|a| a.id != id && a.until > now);
        self.avoid.push(Avoid { id, until: now + AVOID_FOR });
    }

    /// A hop (1-based) of the current path failed: avoid it and rebuild.
    fn hop_failed(&mut self, now: Instant, hop: usize, what: &str, rng: &mut impl CryptoRngCore) {
        let Some(relay) = self.path.get(hop.saturating_sub(1)) else { return self.rebuild(now, rng) };
        let (id, name) = (relay.id(), relay.desc.nickname.clone());
        let role = if hop == self.path.len() {
            "exit"
        } else if hop == 1 {
            "guard"
        } else {
            "middle"
        };
        let why = format!("{role} {name} ({id}) {what}");
        warn!("{why}");
        self.avoid_relay(id, now);
        self.reason = Some(why);
        self.rebuild(now, rng);
    }

    fn circuit_failed(&mut self, now: Instant, why: CloseReason, rng: &mut impl CryptoRngCore) {
        match why {
            CloseReason::HandshakeTimeout { hop } => self.hop_failed(now, hop, "did not answer the handshake", rng),
            // The hop after `hop` could not be reached (or hop `hop` gave up on the circuit).
            CloseReason::Destroyed { hop, reason } => {
                let failed = if reason == cellproto::command::reason::CONNECT_FAILED { hop + 1 } else { hop };
                self.hop_failed(now, failed, &format!("closed the circuit (reason {reason})"), rng)
            }
            CloseReason::LinkDestroyed { reason } => {
                self.hop_failed(now, 1, &format!("closed the circuit (reason {reason})"), rng)
            }
            CloseReason::Local => self.rebuild(now, rng),
        }
    }

    /// Drops the current circuit (telling the guard) and builds another.
    fn rebuild(&mut self, now: Instant, rng: &mut impl CryptoRngCore) {
        if let Some(mut old) = self.circuit.take() {
            let mut cell = Box::new([0u8; CELL_LEN]);
            if let Some(to) = old.close(&mut cell, rng) {
                self.queued.push_back((to, cell));
            }
        }
        if self.state == State::Up {
            self.events.push_back(TunnelEvent::Down);
        }
        if self.state != State::Connecting {
            self.state = State::Rebuilding;
        }
        self.attach_sent = None;
        self.attached = false;
        self.ping = None;
        self.build(now, rng);
    }

    fn build(&mut self, now: Instant, rng: &mut impl CryptoRngCore) {
        self.avoid.retain(|a| a.until > now);
        let failed: Vec<IdentityKey> = self.avoid.iter().map(|a| a.id).collect();
        let mut req = self.request.clone();
        req.guard = self.path.first().map(Relay::id).or(req.guard);
        req.avoid = failed.clone();
        req.exit = self.request.exit.or(self.session_exit);
        if let Some(exit) = self.session_exit
            && self.request.exit.is_none()
            && failed.contains(&exit)
            && self.relays.select(&PathRequest { exit: None, ..req.clone() }, rng).is_ok()
        {
            let name = self.path.last().map(|r| r.desc.nickname.clone()).unwrap_or_default();
            warn!(
                "exit {name} ({exit}) does not answer: switching to another exit; inner addresses change and open connections break"
            );
            self.session_exit = None;
            self.session = None;
            self.counters.exit_changes += 1;
            req.exit = None;
        }
        let path = match self.pending_path.take() {
            Some(p) => Ok(p),
            None => {
                // Suspects are avoided if the network allows; failed relays always are.
                let wary = PathRequest { avoid: [failed, self.suspects.clone()].concat(), ..req.clone() };
                self.relays.select(&wary, rng).or_else(|_| self.relays.select(&req, rng))
            }
        };
        let path = match path {
            Ok(p) => p,
            Err(e) => return self.no_path(now, e),
        };
        let guard = path[0].hop.addr;
        if self.guard != Some(guard) {
            // The driver must open the kill switch and route to the new guard first; the
            // circuit (and its build clock) starts once it has, at the next timeout.
            self.guard = Some(guard);
            self.events.push_back(TunnelEvent::Guard(guard));
            self.pending_path = Some(path);
            self.retry_at = Some(now);
            return;
        }
        let lcid = 0x4000_0000 | (rng.next_u32() & 0x3FFF_FFFF);
        let hops = path.iter().map(|r| r.hop).collect();
        match Circuit::new(hops, lcid, self.circuit_config, now, rng) {
            Ok(c) => self.circuit = Some(c),
            Err(e) => return self.no_path(now, PathError::NoExit(e.to_string())),
        }
        info!(
            path = %path.iter().map(|r| r.desc.nickname.as_str()).collect::<Vec<_>>().join(" -> "),
            "building circuit"
        );
        self.path = path;
    }

    fn no_path(&mut self, now: Instant, e: PathError) {
        let why = e.to_string();
        if self.reason.as_deref() != Some(why.as_str()) {
            warn!("{why}; retrying every {} s", RETRY_PAUSE.as_secs());
        }
        self.reason = Some(why);
        self.retry_at = Some(now + RETRY_PAUSE);
    }

    fn send_ping(&mut self, now: Instant, rng: &mut impl RngCore) {
        let Some(circ) = self.circuit.as_mut() else { return };
        let id = rng.next_u64();
        let mut cell = Box::new([0u8; CELL_LEN]);
        payload_mut(&mut cell)[..8].copy_from_slice(&id.to_be_bytes());
        let exit = circ.path().len();
        // Marked sent even if sealing failed, so the next probe waits a keepalive interval.
        self.ping = Some((id, now));
        if let Ok(to) = circ.seal(exit, Command::Ping, 8, &mut cell) {
            self.queued.push_back((to, cell));
        }
    }

    fn send_attach(&mut self, now: Instant) {
        let Some(circ) = self.circuit.as_mut() else { return };
        let attach = Attach { resume: self.session.map(|s| s.token) };
        let mut cell = Box::new([0u8; CELL_LEN]);
        let Ok(len) = attach.encode(payload_mut(&mut cell)) else { return };
        let exit = circ.path().len();
        if let Ok(to) = circ.seal(exit, Command::Attach, len, &mut cell) {
            self.queued.push_back((to, cell));
            self.attach_sent = Some(now);
        }
    }

    /// A datagram from `from`. Returns the length of an IP packet for the TUN device, which is
    /// then at `payload(cell, len)`.
    pub fn handle_cell(
        &mut self,
        now: Instant,
        from: SocketAddr,
        cell: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Option<usize> {
        let Some(circ) = self.circuit.as_mut().filter(|_| Some(from) == self.guard) else {
            self.counters.dropped_bad_cells += 1;
            return None;
        };
        if cellproto::cell::lcid(cell) != circ.lcid_in() {
            self.counters.dropped_bad_cells += 1;
            return None;
        }
        let event = match circ.handle_cell(now, cell, rng) {
            Ok(e) => e,
            Err(_) => {
                self.counters.dropped_bad_cells += 1;
                return None;
            }
        };
        self.last_rx = now;
        match event? {
            Event::Established => {
                if let Some(t) = circ.build_time() {
                    info!(ms = t.as_secs_f64() * 1e3, "circuit built");
                }
                self.send_attach(now);
                None
            }
            Event::Delivered { cmd: Command::Data, len, hop } if hop == self.path.len() && self.attached => {
                self.counters.packets_received += 1;
                self.counters.bytes_received += len as u64;
                Some(len)
            }
            Event::Delivered { cmd: Command::Attached, len, .. } => {
                self.on_attached(now, payload(cell, len));
                None
            }
            Event::Delivered { cmd: Command::Pong, len, .. } => {
                if let (Ok(id), Some((sent, at))) = (decode_ping(payload(cell, len)), self.ping)
                    && id == sent
                {
                    self.rtt = Some(now.saturating_duration_since(at));
                    self.ping = None;
                }
                None
            }
            Event::Delivered { .. } => None,
            Event::Closed(why) => {
                self.circuit_failed(now, why, rng);
                None
            }
        }
    }

    fn on_attached(&mut self, now: Instant, body: &[u8]) {
        let Ok(attached) = Attached::decode(body) else {
            self.counters.dropped_bad_cells += 1;
            return;
        };
        if let Some(old) = self.session
            && (old.ipv4 != attached.ipv4 || old.ipv6 != attached.ipv6)
        {
            warn!("the exit gave new inner addresses: open connections break");
        }
        if self.up_since.is_some() {
            self.counters.rebuilds += 1;
        }
        self.session = Some(attached);
        self.session_exit = self.path.last().map(Relay::id);
        self.suspects.clear();
        self.attach_sent = None;
        self.attached = true;
        self.state = State::Up;
        self.reason = None;
        self.up_since = Some(now);
        self.events.push_back(TunnelEvent::Up(attached));
    }

    /// Seals the IP packet of `len` bytes already at `payload_mut(cell)` for the exit.
    /// Returns where to send it, or `None` (dropped and counted) while no circuit is up.
    pub fn seal_packet(&mut self, len: usize, cell: &mut [u8; CELL_LEN]) -> Option<SocketAddr> {
        let circ = self.circuit.as_mut().filter(|_| self.attached);
        match circ.map(|c| c.seal_data(len, cell)) {
            Some(Ok(to)) => {
                self.counters.packets_sent += 1;
                self.counters.bytes_sent += len as u64;
                Some(to)
            }
            _ => {
                self.counters.dropped_no_circuit += 1;
                None
            }
        }
    }

    /// Closes the circuit; returns the DESTROY cell for the guard, if one was built.
    pub fn close(&mut self, cell: &mut [u8; CELL_LEN], rng: &mut impl CryptoRngCore) -> Option<SocketAddr> {
        self.circuit.take()?.close(cell, rng)
    }
}
