//! The tunnel, sans-IO: one circuit at a time, its session at the exit, keepalive, and the
//! rebuild policy. The daemon feeds it received cells, packets from the TUN device and the
//! time; it returns cells to send, packets for the TUN device and events.
//!
//! **Who may say what.** Only the exit (the last hop) configures the client, and only by
//! answering an ATTACH the client sent: an ATTACHED from another hop, or one nobody asked for,
//! is refused and counted, as is a PONG that answers no PING of ours or comes from another hop
//! than the exit, and DATA from anyone but the exit. The exit's answer itself must hold usable
//! addresses ([`crate::session::validate`]); a resumed session must keep its addresses, and a
//! new token is a new session, logged as such. See `receive.rs`.
//!
//! **Rebuild.** A circuit that closes, fails to build, or is silent for `dead_after` is
//! replaced by a new path to the **same exit**, which gets ATTACH with the session token and
//! hands back the same inner addresses, so open TCP connections survive a relay's death. Who
//! is blamed for a failure is decided in `failure.rs`, so that no hop can steer the client: the
//! guard is kept by [`crate::guards`] (a failing guard is retried, never swapped on one
//! failure), a hop's DESTROY says nothing about the hops after it, and the exit is given up
//! only on evidence a single middle cannot forge. With no usable exit the client keeps trying
//! and `status` says why; the kill switch holds meanwhile.
//!
//! **Directory.** A circuit is built only through an unexpired directory: once it expires the
//! current circuit keeps carrying traffic, but nothing new is built until a fresh one is
//! loaded, and [`Tunnel::directory_expired`] says so.

mod failure;
mod receive;

use crate::config::Timers;
use crate::guards::Guards;
use crate::relays::{PathError, PathRequest, Relay, Relays};
use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::{Circuit, CircuitConfig};
use cellproto::command::{Attach, Attached};
use cellproto::identity::IdentityKey;
use cellproto::onion::payload_mut;
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
    /// are the previous ones when the session was resumed). Already validated.
    Up(Attached),
    /// Traffic stopped: the reason is in [`Tunnel::reason`].
    Down,
    /// The guard set changed: save [`Tunnel::guards`].
    SaveGuards,
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
    /// Authentic cells refused: a control answer from a hop that may not send it, or that
    /// answers nothing the client asked, or an exit's unusable ATTACHED.
    pub control_refused: u64,
    /// Circuits built after the first.
    pub rebuilds: u64,
    /// Times the exit changed.
    pub exit_changes: u64,
    /// Times the exit answered a resume with a new session (new inner addresses).
    pub session_changes: u64,
    /// Circuits closed because their cells showed tampering on the path.
    pub tampered: u64,
}

/// What the tunnel is configured with besides the directory and the path request.
#[derive(Debug, Clone)]
pub struct Options {
    /// Keepalive, silence and handshake timing.
    pub timers: Timers,
    /// Offer AES-256-GCM besides ChaCha20-Poly1305 in handshakes.
    pub offer_aes: bool,
    /// The guard set as saved (empty at first).
    pub guards: Guards,
    /// The wall clock (unix seconds) at the `now` given to [`Tunnel::new`].
    pub unix_now: u64,
}

struct Avoid {
    id: IdentityKey,
    until: Instant,
}

/// An ATTACH sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct PendingAttach {
    sent: Instant,
    resume: Option<[u8; 32]>,
}

/// Where the circuit is: one value, so that no combination the tunnel cannot be in (a PING
/// without a circuit, an ATTACH outstanding on a circuit that is up, a retry due while a
/// circuit builds) can be written down.
enum Phase {
    /// No circuit; the next build is at `at`. `path` is one already chosen, held back while the
    /// driver lets its new guard through the kill switch ([`TunnelEvent::Guard`]).
    Waiting { at: Instant, path: Option<Vec<Relay>> },
    /// Handshakes under way (CREATE, then EXTEND per hop).
    Building { circuit: Circuit },
    /// Built; ATTACH sent and not yet answered.
    Attaching { circuit: Circuit, attach: PendingAttach },
    /// Attached: packets flow since `since`; `ping` is the keepalive PING outstanding (its id
    /// and when it left).
    Up { circuit: Circuit, since: Instant, ping: Option<(u64, Instant)> },
    /// Closed for good ([`Tunnel::close`]).
    Stopped,
}

impl Phase {
    fn circuit(&self) -> Option<&Circuit> {
        match self {
            Phase::Building { circuit } | Phase::Attaching { circuit, .. } | Phase::Up { circuit, .. } => Some(circuit),
            Phase::Waiting { .. } | Phase::Stopped => None,
        }
    }

    fn circuit_mut(&mut self) -> Option<&mut Circuit> {
        match self {
            Phase::Building { circuit } | Phase::Attaching { circuit, .. } | Phase::Up { circuit, .. } => Some(circuit),
            Phase::Waiting { .. } | Phase::Stopped => None,
        }
    }

    fn into_circuit(self) -> Option<Circuit> {
        match self {
            Phase::Building { circuit } | Phase::Attaching { circuit, .. } | Phase::Up { circuit, .. } => Some(circuit),
            Phase::Waiting { .. } | Phase::Stopped => None,
        }
    }

    fn is_up(&self) -> bool {
        matches!(self, Phase::Up { .. })
    }
}

/// The tunnel state machine.
pub struct Tunnel {
    relays: Relays,
    request: PathRequest,
    timers: Timers,
    circuit_config: CircuitConfig,
    guards: Guards,
    /// An instant and the unix time it was, for the guard set and the directory's expiry.
    clock: (Instant, u64),
    phase: Phase,
    /// The path of the current (or last) circuit.
    path: Vec<Relay>,
    guard: Option<SocketAddr>,
    session: Option<Attached>,
    session_exit: Option<IdentityKey>,
    /// Whether a circuit was ever up: [`State::Rebuilding`] rather than
    /// [`State::Connecting`], and the next one counts as a rebuild.
    been_up: bool,
    reason: Option<String>,
    avoid: Vec<Avoid>,
    suspects: Vec<IdentityKey>,
    /// Tampered circuits by guard, for path-bias accounting (see `failure::tampered`).
    tamper_log: Vec<(IdentityKey, Instant)>,
    /// Failures of exits: (exit, the hop before it, or `None` for the exit's own doing).
    exit_strikes: Vec<(IdentityKey, Strike)>,
    last_rx: Instant,
    /// Last run of [`Tunnel::handle_timeout`]: it runs at least every keepalive interval, also
    /// while traffic flows, to catch a circuit's usage and age limits.
    checked: Instant,
    rtt: Option<Duration>,
    directory_warned: bool,
    queued: VecDeque<(SocketAddr, Box<[u8; CELL_LEN]>)>,
    events: VecDeque<TunnelEvent>,
    counters: Counters,
}

/// One failure charged to an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strike {
    /// It did not answer (handshake or ATTACH) with this hop in front of it (`None`: the
    /// client talks to it directly).
    Unreached(Option<IdentityKey>),
    /// It answered, wrongly: a DESTROY of its own, an unusable or changed ATTACHED.
    Refused,
}

impl Tunnel {
    /// A tunnel over `relays`, asking paths of `request` (its `guard` is ignored: the guard
    /// set in `options` decides).
    pub fn new(relays: Relays, request: PathRequest, options: Options, now: Instant) -> Self {
        let timers = options.timers;
        let circuit_config = CircuitConfig {
            handshake_timeout: Duration::from_millis(timers.handshake_timeout_ms),
            handshake_attempts: timers.handshake_attempts,
            offer_aes: options.offer_aes,
        };
        Self {
            relays,
            request,
            timers,
            circuit_config,
            guards: options.guards,
            clock: (now, options.unix_now),
            phase: Phase::Waiting { at: now, path: None },
            path: Vec::new(),
            guard: None,
            session: None,
            session_exit: None,
            been_up: false,
            reason: None,
            avoid: Vec::new(),
            suspects: Vec::new(),
            tamper_log: Vec::new(),
            exit_strikes: Vec::new(),
            last_rx: now,
            checked: now,
            rtt: None,
            directory_warned: false,
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
        self.directory_warned = false;
    }

    /// The directory in use.
    pub fn relays(&self) -> &Relays {
        &self.relays
    }

    /// Resets the wall clock: `now` is `unix` seconds (the driver calls it on each wake-up, so
    /// that a suspended laptop sees the directory's expiry when it resumes).
    pub fn set_unix_time(&mut self, now: Instant, unix: u64) {
        self.clock = (now, unix);
    }

    fn unix(&self, now: Instant) -> u64 {
        self.clock.1 + now.saturating_duration_since(self.clock.0).as_secs()
    }

    /// Whether the directory has expired at `now`: no new circuit is built until a fresh one
    /// is loaded.
    pub fn directory_expired(&self, now: Instant) -> bool {
        self.unix(now) >= self.relays.expires
    }

    /// Where packets flow.
    pub fn state(&self) -> State {
        match (&self.phase, self.been_up) {
            (Phase::Up { .. }, _) => State::Up,
            (_, true) => State::Rebuilding,
            (_, false) => State::Connecting,
        }
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
        self.phase.circuit()
    }

    /// The exit's answer for the current session.
    pub fn session(&self) -> Option<&Attached> {
        self.session.as_ref()
    }

    /// The first hop's address.
    pub fn guard(&self) -> Option<SocketAddr> {
        self.guard
    }

    /// The guard set (save it on [`TunnelEvent::SaveGuards`]).
    pub fn guards(&self) -> &Guards {
        &self.guards
    }

    /// The last measured round trip to the exit (PING/PONG).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Since when the current circuit carries traffic (`None` while the tunnel is not up).
    pub fn up_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Up { since, .. } => Some(since),
            _ => None,
        }
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<TunnelEvent> {
        if self.request.hops > 1 && self.guards.take_dirty() {
            self.events.push_back(TunnelEvent::SaveGuards);
        }
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
        self.phase.circuit_mut()?.poll_transmit(now, cell, rng)
    }

    /// When [`Tunnel::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Instant {
        // Every deadline here moves past `now` once `handle_timeout` has acted on it, so the
        // driver never spins.
        let mut at = self.checked + self.timers.keepalive();
        let mut earliest = |t: Instant| at = at.min(t);
        if let Some(t) = self.phase.circuit().and_then(Circuit::poll_timeout) {
            earliest(t);
        }
        match self.phase {
            Phase::Waiting { at, .. } => earliest(at),
            Phase::Attaching { attach, .. } => earliest(attach.sent + self.timers.dead_after()),
            Phase::Up { ping, .. } => {
                earliest(self.last_rx + self.timers.dead_after());
                earliest(match ping {
                    Some((_, sent)) => sent + self.timers.keepalive(),
                    None => self.last_rx + self.timers.keepalive(),
                });
            }
            Phase::Building { .. } | Phase::Stopped => {}
        }
        at
    }

    /// Advances timers: retries, handshake timeouts, keepalive, silence.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl CryptoRngCore) {
        self.checked = now;
        if self.directory_expired(now) && !self.directory_warned {
            self.directory_warned = true;
            warn!(
                expires = self.relays.expires,
                "the directory has expired: the current circuit goes on, but no new one is built until a fresh directory is loaded (SIGHUP)"
            );
        }
        if let Phase::Up { circuit, .. } = &self.phase
            && circuit.needs_rebuild(now)
        {
            info!("the circuit is near its key-usage or age limit: replacing it (same exit, same session)");
            self.reason = Some("circuit replaced at its key-usage or age limit".into());
            self.rebuild(now, rng);
            return;
        }
        if let Phase::Waiting { at, path } = &mut self.phase
            && now >= *at
        {
            let path = path.take();
            self.build(now, path, rng);
        }
        if let Some(circ) = self.phase.circuit_mut()
            && let Some(cellproto::client::Event::Closed(why)) = circ.handle_timeout(now)
        {
            self.circuit_failed(now, why, rng);
            return;
        }
        if let Phase::Attaching { attach, .. } = self.phase
            && now >= attach.sent + self.timers.dead_after()
        {
            self.exit_unreached(now, "did not answer ATTACH", rng);
            return;
        }
        if let Phase::Up { ping, .. } = self.phase {
            let silent = now.saturating_duration_since(self.last_rx);
            if silent >= self.timers.dead_after() {
                let why = format!("no cell from the exit for {} ms", silent.as_millis());
                warn!("{why}: rebuilding through a new path to the same exit");
                self.suspects = self.middles();
                self.reason = Some(why);
                self.rebuild(now, rng);
            } else {
                let keepalive = self.timers.keepalive();
                let due = match ping {
                    Some((_, sent)) => now >= sent + keepalive,
                    None => silent >= keepalive,
                };
                match (due, silent >= keepalive) {
                    (true, true) => self.send_ping(now, rng),
                    // Cells arrive, only the PONG was lost: nothing to probe.
                    (true, false) => {
                        if let Phase::Up { ping, .. } = &mut self.phase {
                            *ping = None;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The middles of the current path.
    fn middles(&self) -> Vec<IdentityKey> {
        self.path.iter().skip(1).take(self.path.len().saturating_sub(2)).map(Relay::id).collect()
    }

    fn avoid_relay(&mut self, id: IdentityKey, now: Instant) {
        self.avoid.retain(|a| a.id != id && a.until > now);
        self.avoid.push(Avoid { id, until: now + AVOID_FOR });
    }

    /// Drops the current circuit (telling the guard) and builds another at once.
    fn rebuild(&mut self, now: Instant, rng: &mut impl CryptoRngCore) {
        self.drop_circuit(now, rng);
        self.build(now, None, rng);
    }

    /// Drops the current circuit (telling the guard) and builds another at `at`.
    fn rebuild_at(&mut self, at: Instant, rng: &mut impl CryptoRngCore) {
        self.drop_circuit(at, rng);
    }

    /// Closes the circuit (its DESTROY queued for the guard), leaving the tunnel waiting to
    /// build the next at `at`.
    fn drop_circuit(&mut self, at: Instant, rng: &mut impl CryptoRngCore) {
        let old = std::mem::replace(&mut self.phase, Phase::Waiting { at, path: None });
        if old.is_up() {
            self.events.push_back(TunnelEvent::Down);
        }
        if let Some(mut old) = old.into_circuit() {
            let mut cell = Box::new([0u8; CELL_LEN]);
            if let Some(to) = old.close(&mut cell, rng) {
                self.queued.push_back((to, cell));
            }
        }
    }

    /// Builds a circuit, over `chosen` if a path was already chosen; with none possible the
    /// tunnel waits [`RETRY_PAUSE`].
    fn build(&mut self, now: Instant, chosen: Option<Vec<Relay>>, rng: &mut impl CryptoRngCore) {
        if self.directory_expired(now) {
            let ago = self.unix(now).saturating_sub(self.relays.expires);
            return self.no_path(now, format!(
                "the directory expired {ago} s ago: no new circuit until a fresh one is loaded (fetch it from your authority, then SIGHUP or `systemctl reload meshvpn`)"
            ));
        }
        self.avoid.retain(|a| a.until > now);
        let failed: Vec<IdentityKey> = self.avoid.iter().map(|a| a.id).collect();
        let mut req = self.request.clone();
        req.avoid = failed.clone();
        req.exit = self.request.exit.or(self.session_exit);
        let guards = self.guard_candidates(now, rng);
        let path = match chosen {
            Some(p) => Ok(p),
            None => self.choose_path(&mut req, &guards, &failed, rng),
        };
        let path = match path {
            Ok(p) => p,
            Err(e) => return self.no_path(now, e.to_string()),
        };
        let guard = path[0].hop.addr;
        if self.guard != Some(guard) {
            // The driver must open the kill switch and route to the new guard first; the
            // circuit (and its build clock) starts once it has, at the next timeout.
            self.guard = Some(guard);
            self.events.push_back(TunnelEvent::Guard(guard));
            self.phase = Phase::Waiting { at: now, path: Some(path) };
            return;
        }
        let lcid = 0x4000_0000 | (rng.next_u32() & 0x3FFF_FFFF);
        let hops = path.iter().map(|r| r.hop).collect();
        match Circuit::new(hops, lcid, self.circuit_config, now, rng) {
            Ok(circuit) => self.phase = Phase::Building { circuit },
            Err(e) => return self.no_path(now, PathError::NoExit(e.to_string()).to_string()),
        }
        if self.request.hops > 1 {
            let unix = self.unix(now);
            self.guards.tried(&path[0].id(), unix);
        }
        info!(
            path = %path.iter().map(|r| r.desc.nickname.as_str()).collect::<Vec<_>>().join(" -> "),
            "building circuit"
        );
        self.path = path;
    }

    /// The guards to try, best first (none for one-hop circuits, whose only relay is the exit).
    fn guard_candidates(&mut self, now: Instant, rng: &mut impl RngCore) -> Vec<Option<IdentityKey>> {
        if self.request.hops <= 1 {
            return vec![None];
        }
        let unix = self.unix(now);
        for id in self.guards.refresh(&self.relays, unix, rng) {
            warn!(guard = %id, "guard left the set: no longer listed as a guard, or unreachable for a day while others worked");
        }
        self.guards.candidates(unix).into_iter().map(Some).collect()
    }

    /// A path through the first guard that gives one; the session's exit is given up here if it
    /// was declared dead and another exit fits.
    fn choose_path(
        &mut self,
        req: &mut PathRequest,
        guards: &[Option<IdentityKey>],
        failed: &[IdentityKey],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<Relay>, PathError> {
        if let Some(exit) = self.session_exit
            && self.request.exit.is_none()
            && failed.contains(&exit)
            && self.relays.another_exit_fits(req, guards, rng)
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
        self.relays.select_through(req, guards, failed, &self.suspects, rng)
    }

    fn no_path(&mut self, now: Instant, why: String) {
        if self.reason.as_deref() != Some(why.as_str()) {
            warn!("{why}; retrying every {} s", RETRY_PAUSE.as_secs());
        }
        self.reason = Some(why);
        self.phase = Phase::Waiting { at: now + RETRY_PAUSE, path: None };
    }

    fn send_ping(&mut self, now: Instant, rng: &mut impl RngCore) {
        let Phase::Up { circuit: circ, ping, .. } = &mut self.phase else { return };
        let id = rng.next_u64();
        let mut cell = Box::new([0u8; CELL_LEN]);
        payload_mut(&mut cell)[..8].copy_from_slice(&id.to_be_bytes());
        let exit = circ.path().len();
        // Marked sent even if sealing failed, so the next probe waits a keepalive interval.
        *ping = Some((id, now));
        if let Ok(to) = circ.seal(exit, Command::Ping, 8, &mut cell) {
            self.queued.push_back((to, cell));
        }
    }

    /// The circuit is built: ATTACH goes to the exit, and the tunnel waits for its answer
    /// (at most `dead_after`, also if sealing failed, so that a stuck circuit is replaced).
    fn send_attach(&mut self, now: Instant) {
        let mut circuit = match std::mem::replace(&mut self.phase, Phase::Stopped) {
            Phase::Building { circuit } => circuit,
            other => return self.phase = other,
        };
        let resume = self.session.map(|s| s.token);
        let mut cell = Box::new([0u8; CELL_LEN]);
        if let Ok(len) = (Attach { resume }).encode(payload_mut(&mut cell)) {
            let exit = circuit.path().len();
            if let Ok(to) = circuit.seal(exit, Command::Attach, len, &mut cell) {
                self.queued.push_back((to, cell));
            }
        }
        self.phase = Phase::Attaching { circuit, attach: PendingAttach { sent: now, resume } };
    }

    /// Seals the IP packet of `len` bytes already at `payload_mut(cell)` for the exit.
    /// Returns where to send it, or `None` (dropped and counted) while no circuit is up.
    pub fn seal_packet(&mut self, len: usize, cell: &mut [u8; CELL_LEN]) -> Option<SocketAddr> {
        let circ = match &mut self.phase {
            Phase::Up { circuit, .. } => Some(circuit),
            _ => None,
        };
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
        std::mem::replace(&mut self.phase, Phase::Stopped).into_circuit()?.close(cell, rng)
    }
}
