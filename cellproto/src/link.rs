//! Link-level cells: CREATE and CREATED (the handshake before a circuit exists on a link), the
//! COOKIE a relay under load answers a CREATE with, and authenticated link-control cells
//! (DESTROY between neighbours).
//!
//! These are rare, so they favour simplicity: random filler makes them look like any other cell.

use crate::cell::{
    BODY_LEN, CELL_LEN, HANDSHAKE_LCID, HEADER_LEN, LINK_CONTROL_COUNTER, is_valid_lcid, lcid, set_lcid,
};
use crate::crypto::{
    KEY_LEN, TAG_LEN, X25519_LEN, hkdf, mac16, open_once, open_random_nonce, seal_once, seal_random_nonce, verify_mac16,
};
use crate::handshake::{CREATE_LEN, CREATED_LEN};
use crate::onion::{Direction, LinkKeys, PROTOID, protect_header, unprotect_counter};
use rand_core::CryptoRngCore;
use thiserror::Error;
use zeroize::Zeroize;

/// Why a link-level cell was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LinkError {
    /// Not a handshake cell (wrong LCID).
    #[error("not a CREATE cell")]
    NotCreate,
    /// An LCID field holds a value no endpoint may choose.
    #[error("invalid link circuit id {0:#010x}")]
    BadLcid(u32),
    /// A link-control or cookie cell failed authentication.
    #[error("link-level cell failed authentication")]
    BadTag,
    /// A link-control message this version does not know.
    #[error("unknown link-control message {0:#04x}")]
    UnknownMessage(u8),
    /// A link-control cell that is not newer than the last one accepted on this link.
    #[error("replayed link-control cell")]
    Replay,
}

/// Where the fields of CREATE and CREATED lie (SPEC.md §7).
const CREATE_MSG: usize = HEADER_LEN;
const CREATE_SHARE: usize = CREATE_MSG + CREATE_LEN;
const CREATE_COOKIE: usize = CREATE_SHARE + X25519_LEN;
/// Bytes of a CREATE covered by its cookie MAC.
const CREATE_COVERED: usize = CREATE_COOKIE;
const CREATED_MSG: usize = HEADER_LEN;
const CREATED_SHARE: usize = CREATED_MSG + CREATED_LEN;
/// Length of a cookie and of the MAC a CREATE carries with it.
pub const COOKIE_LEN: usize = 16;

/// A CREATE as read from the wire.
#[derive(Debug, Clone, Copy)]
pub struct Create<'a> {
    /// The id the creator wants on cells sent back to it.
    pub reply_lcid: u32,
    /// The client's handshake message.
    pub message: &'a [u8; CREATE_LEN],
    /// The creator's link share (random bytes when the creator is a client).
    pub share: &'a [u8; X25519_LEN],
}

/// Writes a CREATE cell: `reply_lcid` is the id the sender wants on cells sent back to it,
/// `share` the extending hop's link share (a client passes `None`: random bytes go there), and
/// `cookie` the cookie a relay under load gave this sender, if any.
pub fn encode_create(
    cell: &mut [u8; CELL_LEN],
    reply_lcid: u32,
    handshake: &[u8; CREATE_LEN],
    share: Option<&[u8; X25519_LEN]>,
    cookie: Option<&[u8; COOKIE_LEN]>,
    rng: &mut impl CryptoRngCore,
) {
    rng.fill_bytes(&mut cell[8..]);
    set_lcid(cell, HANDSHAKE_LCID);
    cell[4..8].copy_from_slice(&reply_lcid.to_be_bytes());
    cell[CREATE_MSG..CREATE_SHARE].copy_from_slice(handshake);
    if let Some(share) = share {
        cell[CREATE_SHARE..CREATE_COOKIE].copy_from_slice(share);
    }
    if let Some(cookie) = cookie {
        let mac = mac16(cookie, &cell[..CREATE_COVERED]);
        cell[CREATE_COOKIE..CREATE_COOKIE + COOKIE_LEN].copy_from_slice(&mac);
    }
}

/// Reads a CREATE cell.
pub fn decode_create(cell: &[u8; CELL_LEN]) -> Result<Create<'_>, LinkError> {
    if lcid(cell) != HANDSHAKE_LCID {
        return Err(LinkError::NotCreate);
    }
    let reply_lcid = u32::from_be_bytes([cell[4], cell[5], cell[6], cell[7]]);
    if !is_valid_lcid(reply_lcid) {
        return Err(LinkError::BadLcid(reply_lcid));
    }
    let message = cell[CREATE_MSG..CREATE_SHARE].try_into().map_err(|_| LinkError::NotCreate)?;
    let share = cell[CREATE_SHARE..CREATE_COOKIE].try_into().map_err(|_| LinkError::NotCreate)?;
    Ok(Create { reply_lcid, message, share })
}

/// Whether a CREATE carries a valid MAC under `cookie` (constant-time comparison).
pub fn create_has_cookie(cell: &[u8; CELL_LEN], cookie: &[u8; COOKIE_LEN]) -> bool {
    verify_mac16(cookie, &cell[..CREATE_COVERED], &cell[CREATE_COOKIE..CREATE_COOKIE + COOKIE_LEN])
}

/// Writes a CREATED cell to the creator (`reply_lcid`), telling it `responder_lcid`, the id the
/// responder wants on cells sent to it, and (on a link between relays) the responder's share.
pub fn encode_created(
    cell: &mut [u8; CELL_LEN],
    reply_lcid: u32,
    responder_lcid: u32,
    handshake: &[u8; CREATED_LEN],
    share: Option<&[u8; X25519_LEN]>,
    rng: &mut impl CryptoRngCore,
) {
    rng.fill_bytes(&mut cell[4..]);
    set_lcid(cell, reply_lcid);
    cell[4..8].copy_from_slice(&responder_lcid.to_be_bytes());
    cell[CREATED_MSG..CREATED_SHARE].copy_from_slice(handshake);
    if let Some(share) = share {
        cell[CREATED_SHARE..CREATED_SHARE + X25519_LEN].copy_from_slice(share);
    }
}

/// A CREATED as read from the wire.
#[derive(Debug, Clone, Copy)]
pub struct CreatedCell<'a> {
    /// The id the responder wants on cells sent to it.
    pub responder_lcid: u32,
    /// The handshake reply.
    pub message: &'a [u8; CREATED_LEN],
    /// The responder's link share (random bytes on a client's link).
    pub share: &'a [u8; X25519_LEN],
}

/// Reads a CREATED cell. The caller has already matched the cell's LCID to a pending handshake.
pub fn decode_created(cell: &[u8; CELL_LEN]) -> Result<CreatedCell<'_>, LinkError> {
    let responder_lcid = u32::from_be_bytes([cell[4], cell[5], cell[6], cell[7]]);
    if !is_valid_lcid(responder_lcid) {
        return Err(LinkError::BadLcid(responder_lcid));
    }
    let message = cell[CREATED_MSG..CREATED_SHARE].try_into().map_err(|_| LinkError::NotCreate)?;
    let share = cell[CREATED_SHARE..CREATED_SHARE + X25519_LEN].try_into().map_err(|_| LinkError::NotCreate)?;
    Ok(CreatedCell { responder_lcid, message, share })
}

/// The key that hides a cookie in its reply: derived from the handshake message of the CREATE
/// it answers (the same in every retransmission), so only who sent (or saw) that CREATE can read
/// it. The cookie proves return routability, not identity.
fn cookie_reply_key(message: &[u8; CREATE_LEN]) -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    hkdf(PROTOID, message, b"cookie reply", &mut key);
    key
}

const COOKIE_BOX: usize = HEADER_LEN;

/// Writes the COOKIE answer (sent by a relay under load instead of a handshake) to a CREATE
/// with reply id `reply_lcid` and handshake message `message`.
pub fn encode_cookie_reply(
    cell: &mut [u8; CELL_LEN],
    reply_lcid: u32,
    message: &[u8; CREATE_LEN],
    cookie: &[u8; COOKIE_LEN],
    rng: &mut impl CryptoRngCore,
) {
    rng.fill_bytes(&mut cell[4..]);
    set_lcid(cell, reply_lcid);
    let mut key = cookie_reply_key(message);
    let sealed = &mut cell[COOKIE_BOX..COOKIE_BOX + COOKIE_LEN];
    sealed.copy_from_slice(cookie);
    let tag = seal_once(&key, b"cookie", sealed);
    key.zeroize();
    cell[COOKIE_BOX + COOKIE_LEN..COOKIE_BOX + COOKIE_LEN + TAG_LEN].copy_from_slice(&tag);
}

/// Reads a COOKIE answer to the CREATE with handshake message `message` that this node sent.
pub fn decode_cookie_reply(cell: &[u8; CELL_LEN], message: &[u8; CREATE_LEN]) -> Result<[u8; COOKIE_LEN], LinkError> {
    let mut key = cookie_reply_key(message);
    let mut cookie = [0u8; COOKIE_LEN];
    cookie.copy_from_slice(&cell[COOKIE_BOX..COOKIE_BOX + COOKIE_LEN]);
    let opened =
        open_once(&key, b"cookie", &mut cookie, &cell[COOKIE_BOX + COOKIE_LEN..COOKIE_BOX + COOKIE_LEN + TAG_LEN]);
    key.zeroize();
    opened.map_err(|_| LinkError::BadTag)?;
    Ok(cookie)
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

fn control_aad(lcid: u32, dir: Direction) -> [u8; 5] {
    let [a, b, c, d] = lcid.to_be_bytes();
    [a, b, c, d, matches!(dir, Direction::Backward) as u8]
}

/// Writes a link-control cell travelling `dir` for the peer whose LCID on this link is `lcid`.
/// `seq` is the sender's link-control sequence number for this link and direction (from 1,
/// increasing); the receiver accepts only a number above the last one it accepted.
pub fn seal_link_control(
    cell: &mut [u8; CELL_LEN],
    keys: &LinkKeys,
    dir: Direction,
    lcid: u32,
    seq: u64,
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
    pt[2..10].copy_from_slice(&seq.to_be_bytes());
    let tag = seal_random_nonce(keys.control_key(), nonce, &control_aad(lcid, dir), pt);
    body[NONCE_LEN + CONTROL_PT..].copy_from_slice(&tag);
    protect_header(cell, keys.header(dir), lcid, LINK_CONTROL_COUNTER);
}

/// Whether a received cell is a link-control cell (its unprotected counter is the marker).
pub fn is_link_control(cell: &[u8; CELL_LEN], keys: &LinkKeys, dir: Direction) -> bool {
    unprotect_counter(cell, keys.header(dir)) == LINK_CONTROL_COUNTER
}

/// Authenticates and reads a link-control cell that travelled `dir`. `last_seq` is the highest
/// sequence number accepted on this link and direction so far; it is raised on success only.
pub fn open_link_control(
    cell: &mut [u8; CELL_LEN],
    keys: &LinkKeys,
    dir: Direction,
    last_seq: &mut u64,
) -> Result<LinkControl, LinkError> {
    let aad = control_aad(lcid(cell), dir);
    let body = &mut cell[HEADER_LEN..];
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&body[..NONCE_LEN]);
    let (pt, tag) = body[NONCE_LEN..].split_at_mut(CONTROL_PT);
    open_random_nonce(keys.control_key(), nonce, &aad, pt, tag).map_err(|_| LinkError::BadTag)?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&pt[2..10]);
    let seq = u64::from_be_bytes(seq);
    if seq <= *last_seq {
        return Err(LinkError::Replay);
    }
    let msg = match pt[0] {
        MSG_DESTROY => LinkControl::Destroy { reason: pt[1] },
        other => return Err(LinkError::UnknownMessage(other)),
    };
    *last_seq = seq;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Suite;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn link_control_replay_and_reflection_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let keys = LinkKeys::derive(&[5; 32], Suite::Aes256Gcm);
        let mut cell = [0u8; CELL_LEN];
        seal_link_control(
            &mut cell,
            &keys,
            Direction::Forward,
            0x4000_0001,
            1,
            LinkControl::Destroy { reason: 3 },
            &mut rng,
        );
        let mut last = 0;
        assert_eq!(
            open_link_control(&mut cell.clone(), &keys, Direction::Forward, &mut last),
            Ok(LinkControl::Destroy { reason: 3 })
        );
        assert_eq!(last, 1);
        // The same cell again: a replay.
        assert_eq!(open_link_control(&mut cell.clone(), &keys, Direction::Forward, &mut last), Err(LinkError::Replay));
        // Reflected back the other way: the direction is authenticated.
        let mut other = 0;
        assert_eq!(
            open_link_control(&mut cell.clone(), &keys, Direction::Backward, &mut other),
            Err(LinkError::BadTag)
        );
        assert_eq!(other, 0);
    }

    #[test]
    fn cookie_round_trip_and_mac() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut create = [0u8; CELL_LEN];
        encode_create(&mut create, 0x4000_0002, &[7; CREATE_LEN], None, None, &mut rng);
        let cookie = [0xC0; COOKIE_LEN];
        assert!(!create_has_cookie(&create, &cookie));
        let mut reply = [0u8; CELL_LEN];
        let parsed = decode_create(&create).unwrap();
        encode_cookie_reply(&mut reply, parsed.reply_lcid, parsed.message, &cookie, &mut rng);
        assert_eq!(lcid(&reply), 0x4000_0002);
        assert_eq!(decode_cookie_reply(&reply, &[7; CREATE_LEN]), Ok(cookie));
        assert_eq!(decode_cookie_reply(&reply, &[8; CREATE_LEN]), Err(LinkError::BadTag));
        let mut tampered = reply;
        tampered[HEADER_LEN + 3] ^= 1;
        assert_eq!(decode_cookie_reply(&tampered, &[7; CREATE_LEN]), Err(LinkError::BadTag));
        let mut again = [0u8; CELL_LEN];
        encode_create(&mut again, 0x4000_0002, &[7; CREATE_LEN], None, Some(&cookie), &mut rng);
        assert!(create_has_cookie(&again, &cookie));
        assert!(!create_has_cookie(&again, &[0xC1; COOKIE_LEN]));
    }
}
