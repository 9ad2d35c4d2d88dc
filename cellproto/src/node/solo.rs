//! A whole relay in one value: a [`Node`] and the control plane it hands handshakes to, run on
//! the caller's thread. relayd splits the two across threads; the simulator (and tests) use
//! this, so they run the very node relayd runs.

use super::{CircuitId, Host, Node, Routed, Terminal, Transmit, Upcall};
use crate::cell::{CELL_LEN, is_valid_lcid};
use crate::command::reason;
use crate::relay::DropReason;
use crate::relay::control::{Answer, ControlError, ControlPlane, Created};
use crate::relay::cookie::CookieJar;
use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What a hostile relay does to the backward cells it relays (the simulator's attacks).
pub type Meddle = Box<dyn FnMut(&mut [u8; CELL_LEN])>;

/// An upcall kept until the node's call returned (the control plane then runs).
enum Deferred {
    Create(SocketAddr, Box<[u8; CELL_LEN]>),
    Created(SocketAddr, Box<[u8; CELL_LEN]>),
    Extend(CircuitId, Vec<u8>),
    Closed(CircuitId),
}

/// A relay node with its control plane, on one thread.
pub struct SoloRelay<T: Terminal = ()> {
    /// The node: circuits and EXTENDs in progress.
    pub node: Node,
    /// Handshakes and EXTENDs.
    pub control: ControlPlane,
    /// The last hop, if this relay is an exit.
    pub terminal: T,
    /// Under load: CREATEs without a valid cookie get a COOKIE answer instead of a handshake.
    pub cookies: Option<CookieJar>,
    /// A hostile relay's meddling with the backward cells it relays: applied after the cell
    /// passed this relay's checks and before it seals its own layer.
    pub hostile: Option<Meddle>,
    /// Cells the control plane refused (malformed CREATE, CREATED or EXTEND), in order.
    pub refused: Vec<DropReason>,
    rng: ChaCha20Rng,
    deferred: Vec<Deferred>,
}

/// The node's host inside a [`SoloRelay`]: the caller's transmit slots, upcalls kept for later.
struct SoloHost<'a, X: Transmit + ?Sized> {
    tx: &'a mut X,
    deferred: &'a mut Vec<Deferred>,
    hostile: Option<&'a mut Meddle>,
}

impl<X: Transmit + ?Sized> Transmit for SoloHost<'_, X> {
    fn slot(&mut self) -> &mut [u8; CELL_LEN] {
        self.tx.slot()
    }

    fn commit(&mut self, to: SocketAddr) {
        self.tx.commit(to);
    }
}

impl<X: Transmit + ?Sized> Host for SoloHost<'_, X> {
    fn upcall(&mut self, _now: Instant, up: Upcall<'_>) {
        self.deferred.push(match up {
            Upcall::Create { from, cell } => Deferred::Create(from, Box::new(*cell)),
            Upcall::Created { from, cell } => Deferred::Created(from, Box::new(*cell)),
            Upcall::Extend { circuit, body } => Deferred::Extend(circuit, body.to_vec()),
            Upcall::Closed { circuit, .. } => Deferred::Closed(circuit),
        });
    }

    fn inspect_backward(&mut self, cell: &mut [u8; CELL_LEN]) {
        if let Some(meddle) = self.hostile.as_mut() {
            meddle(cell);
        }
    }
}

impl<T: Terminal> SoloRelay<T> {
    /// A relay with this control plane and terminal; circuits expire after `idle`.
    pub fn new(control: ControlPlane, terminal: T, now: Instant, idle: Duration, rng: ChaCha20Rng) -> Self {
        Self {
            node: Node::new(now, idle),
            control,
            terminal,
            cookies: None,
            hostile: None,
            refused: Vec::new(),
            rng,
            deferred: Vec::new(),
        }
    }

    /// Handles one received datagram in place; what the relay originates goes into `tx`. A
    /// [`Routed::Send`] cell is the caller's to send.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        cell: &mut [u8; CELL_LEN],
        tx: &mut (impl Transmit + ?Sized),
    ) -> Routed {
        let mut host = SoloHost { tx, deferred: &mut self.deferred, hostile: self.hostile.as_mut() };
        let routed = self.node.handle_one(now, from, cell, &mut host, &mut self.terminal, &mut self.rng);
        self.run_control(now, tx);
        routed
    }

    /// When [`SoloRelay::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        self.node.poll_timeout()
    }

    /// The timers: EXTENDs that got no answer (DESTROY, reason CONNECT_FAILED, to the client)
    /// and expired circuits.
    pub fn handle_timeout(&mut self, now: Instant, tx: &mut (impl Transmit + ?Sized)) {
        if now < self.node.poll_timeout() {
            return;
        }
        for expired in self.control.expire(now) {
            self.node.extend_failed(now, expired.circuit, reason::CONNECT_FAILED, Some(expired.reply_lcid), tx);
        }
        let mut host = SoloHost { tx, deferred: &mut self.deferred, hostile: None };
        self.node.handle_timeout(now, &mut host, &mut self.terminal, &mut self.rng);
        self.run_control(now, tx);
    }

    /// Ends every circuit (DESTROY, reason SHUTDOWN, both ways).
    pub fn shutdown(&mut self, now: Instant, tx: &mut (impl Transmit + ?Sized)) {
        let mut host = SoloHost { tx, deferred: &mut self.deferred, hostile: None };
        self.node.shutdown(now, &mut host, &mut self.terminal, &mut self.rng);
        self.run_control(now, tx);
    }

    fn fresh_lcid(rng: &mut ChaCha20Rng, node: &Node, control: &ControlPlane) -> u32 {
        loop {
            let id = rng.next_u32() | 0x4000_0000;
            if is_valid_lcid(id) && !node.uses_lcid(id) && !control.is_pending(id) {
                return id;
            }
        }
    }

    /// The control plane's share of what the node handed up.
    fn run_control(&mut self, now: Instant, tx: &mut (impl Transmit + ?Sized)) {
        if self.deferred.is_empty() {
            return;
        }
        let deferred = std::mem::take(&mut self.deferred);
        for up in deferred {
            match up {
                Deferred::Create(from, cell) => self.create(now, from, &cell, tx),
                Deferred::Created(from, cell) => match self.control.handle_created(now, from, &cell, &mut self.rng) {
                    Ok(Answer::Retry { to, create }) => send(tx, to, &create),
                    Ok(Answer::Extended(ext)) => {
                        let reply_lcid = ext.link.lcid_in;
                        self.node.extended(now, ext.circuit, ext.link, &ext.extended, reply_lcid, tx);
                    }
                    Err(_) => self.refused.push(DropReason::Malformed),
                },
                Deferred::Extend(circuit, body) => {
                    let lcid = Self::fresh_lcid(&mut self.rng, &self.node, &self.control);
                    match self.control.handle_extend(now, circuit, &body, || lcid, &mut self.rng) {
                        Ok(Some((target, create))) => {
                            if self.control.is_pending(lcid) {
                                self.node.expect_created(lcid);
                            }
                            send(tx, target, &create);
                        }
                        Ok(None) => {}
                        // A different EXTEND while one is pending: the first one stands (relayd's
                        // control thread does the same).
                        Err(ControlError::ExtendPending) => self.refused.push(DropReason::Protocol),
                        Err(_) => {
                            self.refused.push(DropReason::Protocol);
                            self.node.extend_failed(now, circuit, reason::PROTOCOL, None, tx);
                        }
                    }
                }
                Deferred::Closed(circuit) => {
                    if let Some(reply) = self.control.circuit_closed(circuit) {
                        self.node.forget_created(reply);
                    }
                }
            }
        }
    }

    fn create(&mut self, now: Instant, from: SocketAddr, cell: &[u8; CELL_LEN], tx: &mut (impl Transmit + ?Sized)) {
        if let Some(jar) = &self.cookies
            && !jar.check(from, cell)
        {
            let slot = tx.slot();
            if jar.reply(from, cell, slot, &mut self.rng).is_ok() {
                tx.commit(from);
            }
            return;
        }
        let lcid = Self::fresh_lcid(&mut self.rng, &self.node, &self.control);
        match self.control.handle_create(now, from, cell, || lcid, &mut self.rng) {
            Ok(Created::New { reply, circuit }) => {
                self.node.install(*circuit);
                send(tx, from, &reply);
            }
            Ok(Created::Repeat { reply }) => send(tx, from, &reply),
            Err(_) => self.refused.push(DropReason::Malformed),
        }
    }
}

/// Copies a whole cell into a slot and sends it.
fn send(tx: &mut (impl Transmit + ?Sized), to: SocketAddr, cell: &[u8; CELL_LEN]) {
    *tx.slot() = *cell;
    tx.commit(to);
}
