//! The relay's control plane, sans-IO: answering CREATE (idempotently), carrying out EXTEND,
//! and turning the next hop's CREATED into a link and an EXTENDED for the client.
//!
//! Handshakes cost two X25519 operations, about a hundred times a cell, so relayd runs this on
//! its own thread and hands the resulting [`HopCircuit`]s and [`Link`]s to the data-plane
//! workers; nothing here is on the per-cell path.

use super::{HopCircuit, Link};
use crate::cell::{CELL_LEN, HANDSHAKE_LCID, lcid};
use crate::command::{Extend, Extended};
use crate::handshake::{HandshakeError, OnionSecret, respond};
use crate::link::{LinkError, decode_create, decode_created, encode_create, encode_created};
use rand_core::CryptoRngCore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long a CREATED is kept to answer a retransmitted CREATE, and how long an EXTEND waits
/// for its CREATED: longer than a client's whole handshake retry schedule (15 s by default).
pub const HANDSHAKE_STATE_TTL: Duration = Duration::from_secs(30);

/// Why the control plane refused a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ControlError {
    /// A malformed CREATE or CREATED cell.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The handshake failed (wrong onion key, bad extensions…).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A malformed EXTEND body.
    #[error("malformed EXTEND")]
    BadExtend,
    /// A CREATED nobody is waiting for, or from the wrong address.
    #[error("unexpected CREATED")]
    UnexpectedCreated,
}

/// What answering a CREATE produced.
#[derive(Debug)]
pub enum Created {
    /// A new circuit: install it in a worker, then send `reply` to the creator.
    New {
        /// The CREATED cell.
        reply: Box<[u8; CELL_LEN]>,
        /// The circuit, owned by whichever worker owns its LCID.
        circuit: Box<HopCircuit>,
    },
    /// A retransmitted CREATE: send the same CREATED again; nothing else changes.
    Repeat {
        /// The CREATED cell sent the first time.
        reply: Box<[u8; CELL_LEN]>,
    },
}

/// An EXTEND completed: give `link` to the circuit with previous-link LCID `circuit` and send
/// `extended` to the client with [`HopCircuit::seal_backward`].
#[derive(Debug)]
pub struct Extension {
    /// The circuit's previous-link LCID.
    pub circuit: u32,
    /// The new next link.
    pub link: Link,
    /// The body to send back as EXTENDED.
    pub extended: Extended,
}

type Answered = (Box<[u8; CELL_LEN]>, Instant);

#[derive(Debug)]
struct PendingExtend {
    circuit: u32,
    target: SocketAddr,
    link_secret: [u8; 32],
    create: Box<[u8; CELL_LEN]>,
    since: Instant,
}

/// A relay's identity, onion keys, and the handshake state between cells.
pub struct ControlPlane {
    identity: [u8; 32],
    onion_keys: Vec<OnionSecret>,
    aes_hw: bool,
    /// CREATEs answered, by (creator, reply LCID): the CREATED and when it was sent.
    answered: HashMap<(SocketAddr, u32), Answered>,
    pending: HashMap<u32, PendingExtend>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("answered", &self.answered.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl ControlPlane {
    /// A control plane for the relay with Ed25519 identity `identity`, onion keys (current
    /// first, then the previous one during rotation), and whether it has AES hardware.
    pub fn new(identity: [u8; 32], onion_keys: Vec<OnionSecret>, aes_hw: bool) -> Self {
        Self { identity, onion_keys, aes_hw, answered: HashMap::new(), pending: HashMap::new() }
    }

    /// Answers a CREATE cell from `from`. `alloc_lcid` is called only for a new circuit and
    /// returns the LCID this relay will receive it on.
    pub fn handle_create(
        &mut self,
        now: Instant,
        from: SocketAddr,
        cell: &[u8; CELL_LEN],
        alloc_lcid: impl FnOnce() -> u32,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Created, ControlError> {
        let (reply_lcid, message) = decode_create(cell)?;
        if let Some((reply, _)) = self.answered.get(&(from, reply_lcid)) {
            return Ok(Created::Repeat { reply: reply.clone() });
        }
        let keys: Vec<&OnionSecret> = self.onion_keys.iter().collect();
        let (handshake, out) = respond(&self.identity, &keys, self.aes_hw, message, rng)?;
        let my_lcid = alloc_lcid();
        let circuit = Box::new(HopCircuit::new(&out, from, reply_lcid, my_lcid, now));
        let mut reply = Box::new([0u8; CELL_LEN]);
        encode_created(&mut reply, reply_lcid, my_lcid, &handshake, rng);
        self.answered.insert((from, reply_lcid), (reply.clone(), now));
        Ok(Created::New { reply, circuit })
    }

    /// Carries out an EXTEND that arrived for the circuit with previous-link LCID `circuit`.
    /// Returns the CREATE to send and where. A repeated EXTEND while the first is pending gets
    /// the same CREATE; `alloc_lcid` (the LCID the next hop will write on cells to us) is called
    /// only for a new one.
    pub fn handle_extend(
        &mut self,
        now: Instant,
        circuit: u32,
        body: &[u8],
        alloc_lcid: impl FnOnce() -> u32,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(SocketAddr, Box<[u8; CELL_LEN]>), ControlError> {
        let extend = Extend::decode(body).map_err(|_| ControlError::BadExtend)?;
        if let Some(p) = self.pending.values().find(|p| p.circuit == circuit && p.target == extend.target) {
            return Ok((p.target, p.create.clone()));
        }
        let reply_lcid = alloc_lcid();
        let mut create = Box::new([0u8; CELL_LEN]);
        encode_create(&mut create, reply_lcid, &extend.handshake, rng);
        let pending = PendingExtend {
            circuit,
            target: extend.target,
            link_secret: extend.link_secret,
            create: create.clone(),
            since: now,
        };
        self.pending.insert(reply_lcid, pending);
        Ok((extend.target, create))
    }

    /// Whether `lcid` is the reply LCID of a pending EXTEND (so a cell on it is a CREATED).
    pub fn is_pending(&self, lcid: u32) -> bool {
        self.pending.contains_key(&lcid)
    }

    /// Handles the next hop's CREATED for a pending EXTEND.
    pub fn handle_created(&mut self, from: SocketAddr, cell: &[u8; CELL_LEN]) -> Result<Extension, ControlError> {
        let reply_lcid = lcid(cell);
        let pending = self.pending.get(&reply_lcid).ok_or(ControlError::UnexpectedCreated)?;
        if pending.target != from || reply_lcid == HANDSHAKE_LCID {
            return Err(ControlError::UnexpectedCreated);
        }
        let (responder_lcid, handshake) = decode_created(cell)?;
        let extended = Extended { handshake: *handshake };
        let pending = self.pending.remove(&reply_lcid).ok_or(ControlError::UnexpectedCreated)?;
        let link = Link::new(pending.target, responder_lcid, reply_lcid, &pending.link_secret);
        Ok(Extension { circuit: pending.circuit, link, extended })
    }

    /// Forgets handshake state older than [`HANDSHAKE_STATE_TTL`]; returns the circuits whose
    /// EXTEND never got an answer (the caller tells their clients with DESTROY).
    pub fn expire(&mut self, now: Instant) -> Vec<u32> {
        self.answered.retain(|_, (_, at)| now.saturating_duration_since(*at) < HANDSHAKE_STATE_TTL);
        let mut failed = Vec::new();
        self.pending.retain(|_, p| {
            let keep = now.saturating_duration_since(p.since) < HANDSHAKE_STATE_TTL;
            if !keep {
                failed.push(p.circuit);
            }
            keep
        });
        failed
    }

    /// Replaces the onion keys (rotation): current first, then the previous one.
    pub fn set_onion_keys(&mut self, keys: Vec<OnionSecret>) {
        self.onion_keys = keys;
    }
}
