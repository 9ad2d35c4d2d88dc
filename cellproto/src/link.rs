//! Link-level cells: CREATE and CREATED (the handshake before a circuit exists on a link), and
//! authenticated link-control cells (DESTROY between neighbours).
//!
//! These are rare, so they favour simplicity: random filler makes them look like any other cell.

use crate::cell::{
    BODY_LEN, CELL_LEN, HANDSHAKE_LCID, HEADER_LEN, LINK_CONTROL_COUNTER, is_valid_lcid, lcid, set_lcid,
};
use crate::crypto::{TAG_LEN, open_random_nonce, seal_random_nonce};
use crate::handshake::{CREATE_LEN, CREATED_LEN};
use crate::onion::{Direction, LinkKeys, protect_header, unprotect_counter};
use rand_core::CryptoRngCore;
use thiserror::Error;

/// Why a link-level cell was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LinkError {
    /// Not a handshake cell (wrong LCID).
    #[error("not a CREATE cell")]
    NotCreate,
    /// An LCID field holds a value no endpoint may choose.
    #[error("invalid link circuit id {0:#010x}")]
    BadLcid(u32),
    /// A link-control cell failed authentication.
    #[error("link-control cell failed authentication")]
    BadTag,
    /// A link-control message this version does not know.
    #[error("unknown link-control message {0:#04x}")]
    UnknownMessage(u8),
}

/// Writes a CREATE cell: `reply_lcid` is the id the sender wants on cells sent back to it.
pub fn encode_create(
    cell: &mut [u8; CELL_LEN],
    reply_lcid: u32,
    handshake: &[u8; CREATE_LEN],
    rng: &mut impl CryptoRngCore,
) {
    rng.fill_bytes(&mut cell[8..]);
    set_lcid(cell, HANDSHAKE_LCID);
    cell[4..8].copy_from_slice(&reply_lcid.to_be_bytes());
    cell[HEADER_LEN..HEADER_LEN + CREATE_LEN].copy_from_slice(handshake);
}

/// Reads a CREATE cell: the sender's reply LCID and the handshake message.
pub fn decode_create(cell: &[u8; CELL_LEN]) -> Result<(u32, &[u8; CREATE_LEN]), LinkError> {
    if lcid(cell) != HANDSHAKE_LCID {
        return Err(LinkError::NotCreate);
    }
    let reply = u32::from_be_bytes([cell[4], cell[5], cell[6], cell[7]]);
    if !is_valid_lcid(reply) {
        return Err(LinkError::BadLcid(reply));
    }
    let hs = cell[HEADER_LEN..HEADER_LEN + CREATE_LEN].try_into().map_err(|_| LinkError::NotCreate)?;
    Ok((reply, hs))
}

/// Writes a CREATED cell to the creator (`reply_lcid`), telling it `responder_lcid`, the id the
/// responder wants on cells sent to it.
pub fn encode_created(
    cell: &mut [u8; CELL_LEN],
    reply_lcid: u32,
    responder_lcid: u32,
    handshake: &[u8; CREATED_LEN],
    rng: &mut impl CryptoRngCore,
) {
    rng.fill_bytes(&mut cell[8..]);
    set_lcid(cell, reply_lcid);
    cell[4..8].copy_from_slice(&responder_lcid.to_be_bytes());
    cell[HEADER_LEN..HEADER_LEN + CREATED_LEN].copy_from_slice(handshake);
}

/// Reads a CREATED cell: the responder's LCID and its handshake reply. The caller has already
/// matched the cell's LCID to a pending handshake.
pub fn decode_created(cell: &[u8; CELL_LEN]) -> Result<(u32, &[u8; CREATED_LEN]), LinkError> {
    let responder = u32::from_be_bytes([cell[4], cell[5], cell[6], cell[7]]);
    if !is_valid_lcid(responder) {
        return Err(LinkError::BadLcid(responder));
    }
    let hs = cell[HEADER_LEN..HEADER_LEN + CREATED_LEN].try_into().map_err(|_| LinkError::NotCreate)?;
    Ok((responder, hs))
}

/// Messages between the two ends of one link, authenticated with the link's control key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkControl {
    /// The circuit is gone on the sender's side; the receiver tears it down and propagates.
    Destroy {
        /// Reason code (SPEC.md, "DESTROY reasons").
        reason: u8,
    },
}

const MSG_DESTROY: u8 = 1;
const NONCE_LEN: usize = 12;
const CONTROL_PT: usize = BODY_LEN - NONCE_LEN - TAG_LEN;

/// Writes a link-control cell for the peer whose LCID on this link is `lcid`.
pub fn seal_link_control(
    cell: &mut [u8; CELL_LEN],
    keys: &LinkKeys,
    dir: Direction,
    lcid: u32,
    msg: LinkControl,
    rng: &mut impl CryptoRngCore,
) {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let body = &mut cell[HEADER_LEN..];
    body[..NONCE_LEN].copy_from_slice(&nonce);
    let pt = &mut body[NONCE_LEN..NONCE_LEN + CONTROL_PT];
    pt.fill(0);
    match msg {
        LinkControl::Destroy { reason } => {
            pt[0] = MSG_DESTROY;
            pt[1] = reason;
        }
    }
    let tag = seal_random_nonce(keys.control_key(), nonce, &lcid.to_be_bytes(), pt);
    body[NONCE_LEN + CONTROL_PT..].copy_from_slice(&tag);
    protect_header(cell, keys.header(dir), lcid, LINK_CONTROL_COUNTER, BODY_LEN);
}

/// Whether a received cell is a link-control cell (its unprotected counter is the marker).
pub fn is_link_control(cell: &[u8; CELL_LEN], keys: &LinkKeys, dir: Direction) -> bool {
    unprotect_counter(cell, keys.header(dir)) == LINK_CONTROL_COUNTER
}

/// Authenticates and reads a link-control cell.
pub fn open_link_control(cell: &mut [u8; CELL_LEN], keys: &LinkKeys) -> Result<LinkControl, LinkError> {
    let lcid_bytes = lcid(cell).to_be_bytes();
    let body = &mut cell[HEADER_LEN..];
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&body[..NONCE_LEN]);
    let (pt, tag) = body[NONCE_LEN..].split_at_mut(CONTROL_PT);
    open_random_nonce(keys.control_key(), nonce, &lcid_bytes, pt, tag).map_err(|_| LinkError::BadTag)?;
    match pt[0] {
        MSG_DESTROY => Ok(LinkControl::Destroy { reason: pt[1] }),
        other => Err(LinkError::UnknownMessage(other)),
    }
}
