//! The relay's control plane, sans-IO: answering CREATE (idempotently), carrying out EXTEND,
//! and turning the next hop's CREATED into a link and an EXTENDED for the client.
//!
//! Handshakes cost X25519 operations, about a hundred times a cell, so relayd runs this on
//! its own thread and hands the resulting [`HopCircuit`]s and [`Link`]s to the data-plane
//! workers; nothing here is on the per-cell path.
//!
//! Every piece of state is bounded and indexed: at most one pending EXTEND per circuit (found by
//! circuit and by reply id), a bounded number of answered CREATEs, and each entry is freed on
//! every path (CREATED, expiry, the circuit closing).

use super::{HopCircuit, Link, RELAY_LINK_SUITE, canonical_addr};
use crate::cell::{CELL_LEN, HANDSHAKE_LCID, lcid};
use crate::command::{Extend, Extended};
use crate::handshake::{CREATE_LEN, HandshakeError, LinkShare, OnionSecret, respond};
use crate::link::{
    COOKIE_LEN, LinkError, decode_cookie_reply, decode_create, decode_created, encode_create, encode_created,
};
use rand_core::CryptoRngCore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;
use zeroize::Zeroize;

/// How long a CREATED is kept to answer a retransmitted CREATE, and how long an EXTEND waits
/// for its CREATED: longer than a client's whole handshake retry schedule (15 s by default).
pub const HANDSHAKE_STATE_TTL: Duration = Duration::from_secs(30);
/// Answered CREATEs remembered for retransmissions (each about 1.5 KB). Beyond this, a
/// retransmitted CREATE is answered by a new handshake, which the creator ignores.
pub const MAX_ANSWERED: usize = 65_536;
/// A repeated EXTEND resends its CREATE at most this often, and at most [`MAX_CREATE_SENDS`]
/// times in all: a client cannot make a relay flood the target it names.
pub const CREATE_RESEND_MIN: Duration = Duration::from_millis(500);
/// Most CREATEs sent for one EXTEND (the first and its resends, cookie retries included).
pub const MAX_CREATE_SENDS: u32 = 6;

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
    /// An EXTEND for a circuit that already has a different one pending.
    #[error("another EXTEND is pending on this circuit")]
    ExtendPending,
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

/// What a cell on a pending EXTEND's reply id turned out to be.
#[derive(Debug)]
pub enum Answer {
    /// The target's CREATED: the circuit is extended.
    Extended(Box<Extension>),
    /// The target is under load and sent a cookie: send this CREATE (with the cookie) again.
    Retry {
        /// Where.
        to: SocketAddr,
        /// The CREATE.
        create: Box<[u8; CELL_LEN]>,
    },
}

/// An EXTEND that expired without an answer: tell the client (DESTROY) and free `reply_lcid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// The circuit's previous-link LCID.
    pub circuit: u32,
    /// The reply id that was waiting.
    pub reply_lcid: u32,
}

type Answered = (Box<[u8; CELL_LEN]>, Instant);

/// A cell to send and where.
pub type Transmit = (SocketAddr, Box<[u8; CELL_LEN]>);

struct PendingExtend {
    circuit: u32,
    extend: Extend,
    share: LinkShare,
    create: Box<[u8; CELL_LEN]>,
    since: Instant,
    last_sent: Instant,
    sends: u32,
}

impl Drop for PendingExtend {
    fn drop(&mut self) {
        self.extend.link_secret.zeroize();
    }
}

/// A relay's identity, onion keys, and the handshake state between cells.
pub struct ControlPlane {
    identity: [u8; 32],
    onion_keys: Vec<OnionSecret>,
    /// When the previous onion key (the second of `onion_keys`) stops being accepted: the
    /// last certificate that named it has expired by then.
    previous_until: Option<Instant>,
    aes_hw: bool,
    /// CREATEs answered, by (creator, reply LCID): the CREATED and when it was sent.
    answered: HashMap<(SocketAddr, u32), Answered>,
    /// Pending EXTENDs by the reply LCID their CREATE asked for.
    pending: HashMap<u32, PendingExtend>,
    /// The reply LCID of each circuit's pending EXTEND (one at most).
    pending_by_circuit: HashMap<u32, u32>,
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
        Self {
            identity,
            onion_keys,
            previous_until: None,
            aes_hw,
            answered: HashMap::new(),
            pending: HashMap::new(),
            pending_by_circuit: HashMap::new(),
        }
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
        let from = canonical_addr(from);
        let create = decode_create(cell)?;
        if let Some((reply, _)) = self.answered.get(&(from, create.reply_lcid)) {
            return Ok(Created::Repeat { reply: reply.clone() });
        }
        if self.onion_keys.len() > 1 && self.previous_until.is_some_and(|until| now >= until) {
            self.onion_keys.truncate(1);
            self.previous_until = None;
        }
        let keys: Vec<&OnionSecret> = self.onion_keys.iter().collect();
        let (handshake, out) = respond(&self.identity, &keys, self.aes_hw, create.message, rng)?;
        // The client's own link takes its secret from this handshake; a link from another relay
        // mixes the client's seed with a Diffie–Hellman between the two relays.
        let (secret, suite, share) = if out.hop == 1 {
            (out.link_secret, out.suite, None)
        } else {
            let share = LinkShare::generate(rng);
            let secret = share.finish(create.share, &out.link_secret, create.share, share.public())?;
            (secret, RELAY_LINK_SUITE, Some(share))
        };
        let my_lcid = alloc_lcid();
        let link = Link::new(from, create.reply_lcid, my_lcid, &secret, suite);
        let circuit = Box::new(HopCircuit::new(&out, link, now, rng));
        let mut reply = Box::new([0u8; CELL_LEN]);
        encode_created(&mut reply, create.reply_lcid, my_lcid, &handshake, share.as_ref().map(LinkShare::public), rng);
        if self.answered.len() < MAX_ANSWERED {
            self.answered.insert((from, create.reply_lcid), (reply.clone(), now));
        }
        Ok(Created::New { reply, circuit })
    }

    /// Carries out an EXTEND that arrived for the circuit with previous-link LCID `circuit`
    /// (the caller refuses EXTEND on a circuit that is already extended). Returns the CREATE to
    /// send and where, or `None` when nothing is to be sent now: a repeated EXTEND (the client
    /// retransmitting) resends the same CREATE at most every [`CREATE_RESEND_MIN`] and
    /// [`MAX_CREATE_SENDS`] times. A different EXTEND while one is pending is refused.
    /// `alloc_lcid` (the LCID the next hop will write on cells to us) is called only for a new one.
    pub fn handle_extend(
        &mut self,
        now: Instant,
        circuit: u32,
        body: &[u8],
        alloc_lcid: impl FnOnce() -> u32,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Option<Transmit>, ControlError> {
        let extend = Extend::decode(body).map_err(|_| ControlError::BadExtend)?;
        if let Some(p) = self.pending_by_circuit.get(&circuit).and_then(|id| self.pending.get_mut(id)) {
            if p.extend != extend {
                return Err(ControlError::ExtendPending);
            }
            if now.saturating_duration_since(p.last_sent) < CREATE_RESEND_MIN || p.sends >= MAX_CREATE_SENDS {
                return Ok(None);
            }
            p.last_sent = now;
            p.sends += 1;
            return Ok(Some((p.extend.target, p.create.clone())));
        }
        let reply_lcid = alloc_lcid();
        let share = LinkShare::generate(rng);
        let mut create = Box::new([0u8; CELL_LEN]);
        encode_create(&mut create, reply_lcid, &extend.handshake, Some(share.public()), None, rng);
        let target = extend.target;
        let pending =
            PendingExtend { circuit, extend, share, create: create.clone(), since: now, last_sent: now, sends: 1 };
        self.pending.insert(reply_lcid, pending);
        self.pending_by_circuit.insert(circuit, reply_lcid);
        Ok(Some((target, create)))
    }

    /// Whether `lcid` is the reply LCID of a pending EXTEND (so a cell on it is a CREATED).
    pub fn is_pending(&self, lcid: u32) -> bool {
        self.pending.contains_key(&lcid)
    }

    /// Pending EXTENDs (for metrics and tests).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Answered CREATEs remembered (for metrics and tests).
    pub fn answered_len(&self) -> usize {
        self.answered.len()
    }

    fn remove_pending(&mut self, reply_lcid: u32) -> Option<PendingExtend> {
        let p = self.pending.remove(&reply_lcid)?;
        self.pending_by_circuit.remove(&p.circuit);
        Some(p)
    }

    /// Handles the next hop's answer (a CREATED, or a COOKIE under load) for a pending EXTEND.
    pub fn handle_created(
        &mut self,
        now: Instant,
        from: SocketAddr,
        cell: &[u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Answer, ControlError> {
        let reply_lcid = lcid(cell);
        let pending = self.pending.get_mut(&reply_lcid).ok_or(ControlError::UnexpectedCreated)?;
        if pending.extend.target != canonical_addr(from) || reply_lcid == HANDSHAKE_LCID {
            return Err(ControlError::UnexpectedCreated);
        }
        // A cookie is authenticated under a key from our CREATE; a CREATED is not (it is for
        // the client), so the cookie is tried first.
        if let Ok(cookie) = decode_cookie_reply(cell, &pending.extend.handshake) {
            if pending.sends >= MAX_CREATE_SENDS {
                return Err(ControlError::UnexpectedCreated);
            }
            let cookie: [u8; COOKIE_LEN] = cookie;
            let handshake: [u8; CREATE_LEN] = pending.extend.handshake;
            encode_create(
                &mut pending.create,
                reply_lcid,
                &handshake,
                Some(pending.share.public()),
                Some(&cookie),
                rng,
            );
            pending.sends += 1;
            pending.last_sent = now;
            return Ok(Answer::Retry { to: pending.extend.target, create: pending.create.clone() });
        }
        let created = decode_created(cell)?;
        let secret =
            pending.share.finish(created.share, &pending.extend.link_secret, pending.share.public(), created.share)?;
        let extended = Extended { handshake: *created.message };
        let responder_lcid = created.responder_lcid;
        let pending = self.remove_pending(reply_lcid).ok_or(ControlError::UnexpectedCreated)?;
        let link = Link::new(pending.extend.target, responder_lcid, reply_lcid, &secret, RELAY_LINK_SUITE);
        Ok(Answer::Extended(Box::new(Extension { circuit: pending.circuit, link, extended })))
    }

    /// The circuit closed: forgets its pending EXTEND, if any, and returns the reply LCID that
    /// is free again.
    pub fn circuit_closed(&mut self, circuit: u32) -> Option<u32> {
        let reply_lcid = *self.pending_by_circuit.get(&circuit)?;
        self.remove_pending(reply_lcid).map(|_| reply_lcid)
    }

    /// Forgets handshake state older than [`HANDSHAKE_STATE_TTL`]; returns the EXTENDs that
    /// never got an answer (the caller tells their clients with DESTROY and frees the ids).
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        self.answered.retain(|_, (_, at)| now.saturating_duration_since(*at) < HANDSHAKE_STATE_TTL);
        let stale: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= HANDSHAKE_STATE_TTL)
            .map(|(id, _)| *id)
            .collect();
        stale
            .into_iter()
            .filter_map(|reply_lcid| {
                self.remove_pending(reply_lcid).map(|p| Expired { circuit: p.circuit, reply_lcid })
            })
            .collect()
    }

    /// Replaces the onion keys (rotation): current first, then the previous one, which is
    /// accepted until `previous_until` (when every certificate naming it has expired; `None`:
    /// no limit, for tests and relays that never rotated).
    pub fn set_onion_keys(&mut self, keys: Vec<OnionSecret>, previous_until: Option<Instant>) {
        self.onion_keys = keys;
        self.previous_until = previous_until;
    }

    /// Onion keys still accepted (for tests and logs).
    pub fn onion_key_count(&self) -> usize {
        self.onion_keys.len()
    }
}
