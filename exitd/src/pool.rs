//! Inner addresses and sessions, sans-IO (time and randomness are arguments).
//!
//! Each circuit that ATTACHes gets one session: an IPv4 address from a pool (e.g. 10.8.0.0/16),
//! the IPv6 address at the same offset in a /64, and a token. A client whose path broke
//! reconnects through new relays with that token and gets the same addresses back, so its TCP
//! connections survive; a session's addresses return to the pool only after a grace period.
//! The first host address of each pool is the exit's own (gateway and DNS resolver).
//!
//! The pool is the only writer of the [`AddressTable`] that routes packets to circuits, and it
//! keeps it exact: an address points at the circuit holding its session and at nothing else
//! (never at a circuit that re-ATTACHed, ended or handed its session over). Against churn and
//! exhaustion: a circuit holds at most one session (a second ATTACH gets the same one back, or
//! moves the circuit to the session it resumes); ATTACH is rate-limited per circuit and per
//! source ([`crate::limits`]); one source holds at most `sessions_per_source` sessions; and when
//! every address is taken, the session detached longest ago gives its address up first.
//!
//! An address whose session ends (its grace period is over, or it is reclaimed) is not free
//! yet: the kernel's conntrack still maps late replies on the old user's flows to it. It waits,
//! out of the pool, until the daemon has deleted those entries ([`AddressPool::take_flushes`],
//! then [`AddressPool::flushed`]); a failed flush keeps it out and is tried again after
//! [`FLUSH_RETRY`]. So an ATTACH that needs a reclaimed address is refused
//! ([`AttachError::Flushing`]) and the client's next one gets it.

use crate::limits::{AttachLimiter, Refusal, SourceKey};
use crate::table::AddressTable;
use ipnet::{Ipv4Net, Ipv6Net};
use rand_core::CryptoRngCore;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A session token: 32 random bytes, the only credential for resuming a session.
pub type Token = [u8; 32];

/// Why an ATTACH was not served (each is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AttachError {
    /// Every address is held by an attached session.
    #[error("the address pool is exhausted")]
    Exhausted,
    /// The source already holds its share of sessions.
    #[error("the source holds its maximum of sessions")]
    SourceCap,
    /// The circuit sent too many ATTACHes.
    #[error("too many ATTACHes on this circuit")]
    CircuitRate,
    /// The source sent too many ATTACHes.
    #[error("too many ATTACHes from this source")]
    SourceRate,
    /// No address is free until a released one's conntrack entries are deleted (a later
    /// ATTACH gets it).
    #[error("no address is free while released ones are flushed")]
    Flushing,
}

impl AttachError {
    /// Stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            AttachError::Exhausted => "exhausted",
            AttachError::SourceCap => "source_cap",
            AttachError::CircuitRate => "circuit_rate",
            AttachError::SourceRate => "source_rate",
            AttachError::Flushing => "flushing",
        }
    }
}

/// What a served ATTACH did (each is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new session.
    New,
    /// The session of the token, now on this circuit.
    Resumed,
    /// The circuit's own session again (a repeated ATTACH): nothing changed.
    Same,
}

impl Outcome {
    /// Stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Outcome::New => "new",
            Outcome::Resumed => "resumed",
            Outcome::Same => "same",
        }
    }
}

/// One session's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The session token.
    pub token: Token,
    /// Inner IPv4 address.
    pub v4: Ipv4Addr,
    /// Inner IPv6 address.
    pub v6: Ipv6Addr,
}

/// The pool's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolLimits {
    /// How long a detached session keeps its addresses.
    pub grace: Duration,
    /// Sessions (attached or in their grace period) one source may hold.
    pub sessions_per_source: usize,
    /// ATTACHes per second per source, after a burst of `attach_burst`.
    pub attach_rate: f64,
    /// The per-source burst of ATTACHes.
    pub attach_burst: f64,
}

/// ATTACH outcomes and refusals since start, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Served, by [`Outcome`] (new, resumed, same).
    pub served: [u64; 3],
    /// Refused, by [`AttachError`] (exhausted, source_cap, circuit_rate, source_rate, flushing).
    pub refused: [u64; 5],
    /// Detached sessions whose addresses were taken before their grace ended (pool full).
    pub reclaimed: u64,
    /// Sessions whose grace period ended.
    pub expired: u64,
    /// Released addresses whose conntrack entries were deleted (back in the pool).
    pub flushed: u64,
    /// Failed attempts to delete a released address's conntrack entries (it stays out).
    pub flush_failed: u64,
}

/// How long an address whose flush failed waits before it is tried again.
pub const FLUSH_RETRY: Duration = Duration::from_secs(5);

/// A released address whose conntrack entries must be deleted before it is leased again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flush {
    /// The slot, to report the outcome with [`AddressPool::flushed`].
    pub slot: usize,
    /// Its IPv4 address.
    pub v4: Ipv4Addr,
    /// Its IPv6 address.
    pub v6: Ipv6Addr,
}

/// What a slot of the pool is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Free to lease.
    Free,
    /// Held by the session with this token.
    Held(Token),
    /// Released; its conntrack entries are not deleted yet (see [`Dirty`]).
    Dirty,
}

/// A released slot waiting for its flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dirty {
    /// Handed to the daemon and not reported yet.
    taken: bool,
    /// Not before then (after a failure).
    due: Option<Instant>,
}

#[derive(Debug)]
struct Session {
    lease: Lease,
    slot: usize,
    source: SourceKey,
    circuit: Option<u32>,
    detached_at: Option<Instant>,
}

/// The pools and the sessions using them.
#[derive(Debug)]
pub struct AddressPool {
    table: Arc<AddressTable>,
    limits: PoolLimits,
    /// Slots addresses are leased from: 2 ..= last (not the network, not the gateway, not
    /// the IPv4 broadcast address).
    first: usize,
    last: usize,
    next: usize,
    /// What each slot is doing: free, held by a session, or waiting for its flush.
    holder: Vec<Slot>,
    /// The slots waiting for their flush.
    dirty: BTreeMap<usize, Dirty>,
    sessions: HashMap<Token, Session>,
    by_circuit: HashMap<u32, Token>,
    per_source: HashMap<SourceKey, usize>,
    /// Detached sessions, oldest first: expiry and reclaiming take from the front.
    detached: BTreeSet<(Instant, Token)>,
    limiter: AttachLimiter,
    stats: PoolStats,
}

impl AddressPool {
    /// Pools `v4` and `v6` (the IPv6 address of a session is at its IPv4 address's offset).
    pub fn new(v4: Ipv4Net, v6: Ipv6Net, limits: PoolLimits) -> Self {
        let table = Arc::new(AddressTable::new(v4, v6));
        let last = table.len().saturating_sub(2).max(2);
        Self {
            limiter: AttachLimiter::new(limits.attach_rate, limits.attach_burst),
            holder: vec![Slot::Free; table.len()],
            dirty: BTreeMap::new(),
            table,
            limits,
            first: 2,
            last,
            next: 2,
            sessions: HashMap::new(),
            by_circuit: HashMap::new(),
            per_source: HashMap::new(),
            detached: BTreeSet::new(),
            stats: PoolStats::default(),
        }
    }

    /// The address → circuit table this pool keeps, for the workers to read.
    pub fn table(&self) -> Arc<AddressTable> {
        self.table.clone()
    }

    /// The exit's own addresses in the pools (gateway and resolver): the first hosts.
    pub fn gateway(&self) -> (Ipv4Addr, Ipv6Addr) {
        self.table.addresses(1)
    }

    /// ATTACH on `circuit`, from the previous hop `source`: resumes the session of `resume` if
    /// it is known, answers the circuit's own session if it has one, else starts one.
    pub fn attach(
        &mut self,
        circuit: u32,
        source: IpAddr,
        resume: Option<Token>,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Lease, Outcome), AttachError> {
        let result = self.serve(circuit, SourceKey::new(source), resume, now, rng);
        match result {
            Ok((_, outcome)) => self.stats.served[outcome as usize] += 1,
            Err(e) => self.stats.refused[e as usize] += 1,
        }
        result
    }

    fn serve(
        &mut self,
        circuit: u32,
        source: SourceKey,
        resume: Option<Token>,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Lease, Outcome), AttachError> {
        self.limiter.allow(circuit, source, now).map_err(|r| match r {
            Refusal::Circuit => AttachError::CircuitRate,
            Refusal::Source => AttachError::SourceRate,
        })?;
        let current = self.by_circuit.get(&circuit).copied();
        if let Some(token) = resume.filter(|t| self.sessions.contains_key(t))
            && current != Some(token)
        {
            if current.is_some() {
                self.unlink(circuit, now);
            }
            if let Some(lease) = self.take_over(token, circuit, source) {
                return Ok((lease, Outcome::Resumed));
            }
        }
        if let Some(session) = current.and_then(|t| self.sessions.get(&t)) {
            return Ok((session.lease, Outcome::Same));
        }
        if self.per_source.get(&source).copied().unwrap_or(0) >= self.limits.sessions_per_source {
            return Err(AttachError::SourceCap);
        }
        let slot = self.free_slot()?;
        let (v4, v6) = self.table.addresses(slot);
        let mut token = [0u8; 32];
        rng.fill_bytes(&mut token);
        let lease = Lease { token, v4, v6 };
        self.holder[slot] = Slot::Held(token);
        *self.per_source.entry(source).or_insert(0) += 1;
        self.sessions.insert(token, Session { lease, slot, source, circuit: Some(circuit), detached_at: None });
        self.by_circuit.insert(circuit, token);
        self.table.set(slot, Some(circuit));
        Ok((lease, Outcome::New))
    }

    /// Moves session `token` to `circuit` (the token is the client's proof).
    fn take_over(&mut self, token: Token, circuit: u32, source: SourceKey) -> Option<Lease> {
        let session = self.sessions.get_mut(&token)?;
        if let Some(old) = session.circuit.replace(circuit) {
            self.by_circuit.remove(&old);
        }
        if let Some(at) = session.detached_at.take() {
            self.detached.remove(&(at, token));
        }
        if session.source != source {
            // Counted against the source it now comes from; a resume is never refused for it
            // (it takes no new address).
            let old = std::mem::replace(&mut session.source, source);
            decrement(&mut self.per_source, old);
            *self.per_source.entry(source).or_insert(0) += 1;
        }
        self.by_circuit.insert(circuit, token);
        self.table.set(session.slot, Some(circuit));
        Some(session.lease)
    }

    /// The circuit ended at `now`: its session's grace period starts and no packet is routed
    /// to the circuit any more.
    pub fn detach(&mut self, circuit: u32, now: Instant) {
        self.unlink(circuit, now);
        self.limiter.forget_circuit(circuit);
    }

    fn unlink(&mut self, circuit: u32, now: Instant) {
        let Some(token) = self.by_circuit.remove(&circuit) else { return };
        if let Some(session) = self.sessions.get_mut(&token)
            && session.circuit == Some(circuit)
        {
            session.circuit = None;
            session.detached_at = Some(now);
            self.detached.insert((now, token));
            self.table.set(session.slot, None);
        }
    }

    /// Returns the addresses of sessions detached for the grace period or longer to the pool.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(at, token)) = self.detached.first() {
            if now.saturating_duration_since(at) < self.limits.grace {
                break;
            }
            self.release(at, token);
            self.stats.expired += 1;
        }
    }

    /// Ends a session: its slot waits for its flush (never free before).
    fn release(&mut self, at: Instant, token: Token) {
        self.detached.remove(&(at, token));
        if let Some(s) = self.sessions.remove(&token) {
            self.holder[s.slot] = Slot::Dirty;
            self.dirty.insert(s.slot, Dirty { taken: false, due: None });
            self.table.set(s.slot, None);
            decrement(&mut self.per_source, s.source);
        }
    }

    /// A free slot, round robin (an address is reused as late as possible). When there is
    /// none, the session detached longest ago gives its address up, to be flushed first: this
    /// ATTACH is refused, a later one gets the address.
    fn free_slot(&mut self) -> Result<usize, AttachError> {
        for _ in self.first..=self.last {
            let slot = self.next;
            self.next = if slot >= self.last { self.first } else { slot + 1 };
            if self.holder.get(slot) == Some(&Slot::Free) {
                return Ok(slot);
            }
        }
        if let Some(&(at, token)) = self.detached.first() {
            self.release(at, token);
            self.stats.reclaimed += 1;
        }
        Err(if self.dirty.is_empty() { AttachError::Exhausted } else { AttachError::Flushing })
    }

    /// Up to `max` released addresses to flush now (none is handed out twice before its
    /// outcome is reported). Each must be reported with [`AddressPool::flushed`].
    pub fn take_flushes(&mut self, now: Instant, max: usize) -> Vec<Flush> {
        let mut out = Vec::new();
        for (&slot, dirty) in self.dirty.iter_mut() {
            if out.len() >= max {
                break;
            }
            if dirty.taken || dirty.due.is_some_and(|due| now < due) {
                continue;
            }
            dirty.taken = true;
            let (v4, v6) = self.table.addresses(slot);
            out.push(Flush { slot, v4, v6 });
        }
        out
    }

    /// The outcome of a flush from [`AddressPool::take_flushes`]: deleted, the address is free
    /// again; failed, it stays out of the pool and is tried again after [`FLUSH_RETRY`].
    pub fn flushed(&mut self, slot: usize, ok: bool, now: Instant) {
        let Some(dirty) = self.dirty.get_mut(&slot) else { return };
        if ok {
            self.dirty.remove(&slot);
            self.holder[slot] = Slot::Free;
            self.stats.flushed += 1;
        } else {
            *dirty = Dirty { taken: false, due: Some(now + FLUSH_RETRY) };
            self.stats.flush_failed += 1;
        }
    }

    /// Released addresses not yet flushed (kept out of the pool).
    pub fn flushing(&self) -> usize {
        self.dirty.len()
    }

    /// Sessions holding addresses (attached or within their grace period).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Sessions within their grace period.
    pub fn detached_sessions(&self) -> usize {
        self.detached.len()
    }

    /// Sessions held by `source` (after aggregation: see [`SourceKey`]).
    pub fn sessions_of(&self, source: IpAddr) -> usize {
        self.per_source.get(&SourceKey::new(source)).copied().unwrap_or(0)
    }

    /// ATTACH outcomes so far.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// The circuit a packet to inner address `addr` belongs to (as the workers see it).
    pub fn circuit_of(&self, addr: IpAddr) -> Option<u32> {
        self.table.circuit_of(addr)
    }

    /// The lease of `circuit`.
    pub fn lease_of(&self, circuit: u32) -> Option<Lease> {
        Some(self.sessions.get(self.by_circuit.get(&circuit)?)?.lease)
    }
}

fn decrement(counts: &mut HashMap<SourceKey, usize>, key: SourceKey) {
    if let Some(n) = counts.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
