//! The circuit handshake: one-way authenticated, forward-secret, ntor-v3 style.
//!
//! The client knows the relay's identity `ID` (Ed25519 public key) and onion key `B` (X25519)
//! from its signed descriptor; the relay learns nothing about the client. Client extensions are
//! encrypted under a key from `x·B` alone (like ntor-v3's first phase: secret from passive
//! observers, authenticated to the relay, but not forward-secret against a later theft of `b`);
//! every circuit key also depends on the ephemeral–ephemeral `x·Y`, so recorded traffic stays
//! secret when `b` is stolen later. The relay's encrypted reply authenticates it: only the holder
//! of `b` can derive the reply key. Byte layouts and the key schedule are in SPEC.md.

use crate::crypto::{CryptoError, KEY_LEN, Suite, TAG_LEN, X25519_LEN, X25519Secret, hkdf, open_once, seal_once};
use crate::onion::{HopKeyMaterial, PROTOID};
use rand_core::CryptoRngCore;
use thiserror::Error;
use zeroize::Zeroize;

/// Handshake version this library speaks (descriptors list the versions a relay accepts).
pub const HANDSHAKE_VERSION: u8 = 2;
/// Plaintext length of the client's encrypted extensions.
pub const CLIENT_EXT_LEN: usize = 96;
/// Plaintext length of the relay's encrypted extensions.
pub const SERVER_EXT_LEN: usize = 32;
/// Client handshake message: X ‖ encrypted extensions ‖ tag.
pub const CREATE_LEN: usize = X25519_LEN + CLIENT_EXT_LEN + TAG_LEN;
/// Relay handshake reply: Y ‖ encrypted extensions ‖ tag.
pub const CREATED_LEN: usize = X25519_LEN + SERVER_EXT_LEN + TAG_LEN;

const SUITE_BIT_CHACHA: u8 = 1 << 0;
const SUITE_BIT_AES: u8 = 1 << 1;
const FLAG_LINK_SECRET: u8 = 1 << 0;
/// Extension types with this bit set must be understood by the receiver.
const EXT_CRITICAL: u8 = 0x80;

/// Why a handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// No onion key of this relay opens the client's extensions: wrong or rotated-out key, a
    /// corrupted message, or random bytes.
    #[error("no onion key of this relay matches the CREATE message")]
    NoMatchingOnionKey,
    /// The relay's reply did not authenticate: not the relay we meant, or a modified reply.
    #[error("the relay's reply failed authentication")]
    BadReply,
    /// A peer sent a low-order X25519 point.
    #[error("degenerate X25519 public key")]
    BadPublicKey,
    /// The extensions are not valid for this version.
    #[error("invalid handshake extensions: {0}")]
    BadExtensions(&'static str),
    /// The peer speaks a handshake version we do not.
    #[error("unsupported handshake version {0}")]
    UnsupportedVersion(u8),
}

/// What the client knows of a relay for the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayKeys {
    /// Ed25519 identity public key.
    pub identity: [u8; 32],
    /// Current X25519 onion public key.
    pub onion_key: [u8; X25519_LEN],
}

/// What the client asks of this hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRequest {
    /// Position of the hop in the circuit, 1-based.
    pub hop: u8,
    /// Offer AES-256-GCM (the client has AES hardware).
    pub offer_aes: bool,
    /// For hops after the first: the client's seed for the link from the previous hop, which
    /// the client also hands to the previous hop in its EXTEND. The two hops mix it with a
    /// Diffie–Hellman of their own ([`hop_link_secret`]), so the link's keys are forward-secret
    /// and known to those two hops only.
    pub link_secret: Option<[u8; KEY_LEN]>,
}

/// What both ends hold after a successful handshake.
pub struct HandshakeOutput {
    /// The negotiated suite for this hop's layer.
    pub suite: Suite,
    /// The layer keys.
    pub keys: HopKeyMaterial,
    /// Hop 1: the secret of the client's link, derived here. Later hops (relay side): the
    /// client's seed for the link from the previous hop, for [`hop_link_secret`]; the client
    /// itself needs no secret of a link between two relays.
    pub link_secret: [u8; KEY_LEN],
    /// The hop index the client asked for.
    pub hop: u8,
}

impl Drop for HandshakeOutput {
    fn drop(&mut self) {
        self.link_secret.zeroize();
    }
}

fn random_public_bit(public: &[u8; X25519_LEN], rng: &mut impl CryptoRngCore) -> [u8; X25519_LEN] {
    // X25519 ignores the top bit of a u-coordinate (RFC 7748 §5); setting it at random removes
    // the one fixed bit that would tell handshake cells from random bytes.
    let mut wire = *public;
    let mut b = [0u8; 1];
    rng.fill_bytes(&mut b);
    wire[31] = (wire[31] & 0x7F) | (b[0] & 0x80);
    wire
}

fn phase1_key(xb: &[u8; 32], relay: &RelayKeys, x_wire: &[u8; 32]) -> [u8; KEY_LEN] {
    let mut info = [0u8; 6 + 96];
    info[..6].copy_from_slice(b"create");
    info[6..38].copy_from_slice(&relay.identity);
    info[38..70].copy_from_slice(&relay.onion_key);
    info[70..].copy_from_slice(x_wire);
    let mut key = [0u8; KEY_LEN];
    hkdf(PROTOID, xb, &info, &mut key);
    key
}

fn transcript_aad<const N: usize>(parts: [&[u8; 32]; N]) -> [u8; 128] {
    let mut aad = [0u8; 128];
    for (i, p) in parts.iter().enumerate() {
        aad[i * 32..(i + 1) * 32].copy_from_slice(*p);
    }
    aad
}

/// reply_key, then the hop's key material (forward, backward, forward padding) and the
/// client-link secret, from both DH results.
fn final_keys(
    xy: &[u8; 32],
    xb: &[u8; 32],
    relay: &RelayKeys,
    x_wire: &[u8; 32],
    y_wire: &[u8; 32],
    client_ext: &[u8],
) -> ([u8; KEY_LEN], HopKeyMaterial, [u8; KEY_LEN]) {
    let mut ikm = [0u8; 6 * 32 + CLIENT_EXT_LEN + TAG_LEN];
    for (i, p) in [xy, xb, &relay.identity, &relay.onion_key, x_wire, y_wire].iter().enumerate() {
        ikm[i * 32..(i + 1) * 32].copy_from_slice(*p);
    }
    ikm[192..].copy_from_slice(client_ext);
    let mut okm = [0u8; 5 * KEY_LEN];
    hkdf(PROTOID, &ikm, b"circuit keys", &mut okm);
    ikm.zeroize();
    let take = |i: usize| -> [u8; KEY_LEN] { okm[i * 32..(i + 1) * 32].try_into().unwrap_or([0; 32]) };
    let out = (take(0), HopKeyMaterial { fwd: take(1), bwd: take(2), pad: take(3) }, take(4));
    okm.zeroize();
    out
}

/// Skips extension TLVs, refusing unknown critical ones (none are defined in version 1).
fn check_extensions(mut ext: &[u8]) -> Result<(), HandshakeError> {
    while let [typ, rest @ ..] = ext {
        if *typ == 0 {
            return Ok(());
        }
        if typ & EXT_CRITICAL != 0 {
            return Err(HandshakeError::BadExtensions("unknown critical extension"));
        }
        let [len, rest @ ..] = rest else { return Err(HandshakeError::BadExtensions("truncated extension")) };
        ext = rest.get(usize::from(*len)..).ok_or(HandshakeError::BadExtensions("truncated extension"))?;
    }
    Ok(())
}

/// The client's half of a handshake in progress.
pub struct ClientHandshake {
    x: X25519Secret,
    x_wire: [u8; 32],
    relay: RelayKeys,
    message: [u8; CREATE_LEN],
    offer_aes: bool,
    hop: u8,
    link_secret: Option<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandshake").field("hop", &self.hop).finish_non_exhaustive()
    }
}

impl ClientHandshake {
    /// Starts a handshake with `relay`; [`message`](Self::message) is what to send.
    pub fn start(relay: &RelayKeys, req: &ClientRequest, rng: &mut impl CryptoRngCore) -> Result<Self, HandshakeError> {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let x = X25519Secret::from_bytes(&secret);
        secret.zeroize();
        let x_wire = random_public_bit(x.public(), rng);
        let xb = x.diffie_hellman(&relay.onion_key).map_err(|_| HandshakeError::BadPublicKey)?;

        let mut message = [0u8; CREATE_LEN];
        message[..32].copy_from_slice(&x_wire);
        let ext = &mut message[32..32 + CLIENT_EXT_LEN];
        ext[0] = HANDSHAKE_VERSION;
        ext[1] = req.hop;
        ext[2] = SUITE_BIT_CHACHA | if req.offer_aes { SUITE_BIT_AES } else { 0 };
        if let Some(link) = &req.link_secret {
            ext[3] = FLAG_LINK_SECRET;
            ext[4..36].copy_from_slice(link);
        }
        let mut k1 = phase1_key(&xb, relay, &x_wire);
        let aad = transcript_aad([&relay.identity, &relay.onion_key, &x_wire]);
        let tag = seal_once(&k1, &aad[..96], &mut message[32..32 + CLIENT_EXT_LEN]);
        k1.zeroize();
        message[32 + CLIENT_EXT_LEN..].copy_from_slice(&tag);
        Ok(Self {
            x,
            x_wire,
            relay: *relay,
            message,
            offer_aes: req.offer_aes,
            hop: req.hop,
            link_secret: req.link_secret,
        })
    }

    /// The CREATE handshake message (also carried inside EXTEND).
    pub fn message(&self) -> &[u8; CREATE_LEN] {
        &self.message
    }

    /// Completes the handshake with the relay's reply.
    pub fn finish(&self, reply: &[u8; CREATED_LEN]) -> Result<HandshakeOutput, HandshakeError> {
        let mut y_wire = [0u8; 32];
        y_wire.copy_from_slice(&reply[..32]);
        let xy = self.x.diffie_hellman(&y_wire).map_err(|_| HandshakeError::BadReply)?;
        let xb = self.x.diffie_hellman(&self.relay.onion_key).map_err(|_| HandshakeError::BadPublicKey)?;
        let (mut reply_key, keys, link_secret) =
            final_keys(&xy, &xb, &self.relay, &self.x_wire, &y_wire, &self.message[32..]);
        let mut ext = [0u8; SERVER_EXT_LEN];
        ext.copy_from_slice(&reply[32..32 + SERVER_EXT_LEN]);
        let aad = transcript_aad([&self.relay.identity, &self.relay.onion_key, &self.x_wire, &y_wire]);
        let opened = open_once(&reply_key, &aad, &mut ext, &reply[32 + SERVER_EXT_LEN..]);
        reply_key.zeroize();
        opened.map_err(|_| HandshakeError::BadReply)?;
        if ext[0] != HANDSHAKE_VERSION {
            return Err(HandshakeError::UnsupportedVersion(ext[0]));
        }
        let suite = Suite::from_code(ext[1]).ok_or(HandshakeError::BadExtensions("unknown suite"))?;
        if suite == Suite::Aes256Gcm && !self.offer_aes {
            return Err(HandshakeError::BadExtensions("relay chose a suite we did not offer"));
        }
        check_extensions(&ext[2..])?;
        let link_secret = self.link_secret.unwrap_or(link_secret);
        Ok(HandshakeOutput { suite, keys, link_secret, hop: self.hop })
    }
}

/// A relay's X25519 onion key pair. Relays keep the current and the previous one during rotation.
pub struct OnionSecret(X25519Secret);

impl OnionSecret {
    /// A new random onion key.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let key = Self::from_bytes(&secret);
        secret.zeroize();
        key
    }

    /// From its 32 secret bytes (as stored in the relay's key file).
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        Self(X25519Secret::from_bytes(secret))
    }

    /// The public onion key, as published in the descriptor.
    pub fn public(&self) -> &[u8; 32] {
        self.0.public()
    }
}

impl std::fmt::Debug for OnionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnionSecret").field("public", self.public()).finish_non_exhaustive()
    }
}

/// Relay side: answers a CREATE message. Tries each onion key in `onion_keys` (current first).
/// `aes_hw` says whether this relay has AES hardware; AES-256-GCM is chosen only if both ends do.
pub fn respond(
    identity: &[u8; 32],
    onion_keys: &[&OnionSecret],
    aes_hw: bool,
    message: &[u8; CREATE_LEN],
    rng: &mut impl CryptoRngCore,
) -> Result<([u8; CREATED_LEN], HandshakeOutput), HandshakeError> {
    let mut x_wire = [0u8; 32];
    x_wire.copy_from_slice(&message[..32]);
    let tag = &message[32 + CLIENT_EXT_LEN..];
    let mut ext = [0u8; CLIENT_EXT_LEN];
    let mut found = None;
    for key in onion_keys {
        let relay = RelayKeys { identity: *identity, onion_key: *key.public() };
        let xb = key.0.diffie_hellman(&x_wire).map_err(|_| HandshakeError::BadPublicKey)?;
        let mut k1 = phase1_key(&xb, &relay, &x_wire);
        ext.copy_from_slice(&message[32..32 + CLIENT_EXT_LEN]);
        let aad = transcript_aad([&relay.identity, &relay.onion_key, &x_wire]);
        let opened = open_once(&k1, &aad[..96], &mut ext, tag);
        k1.zeroize();
        if opened.is_ok() {
            found = Some((relay, xb));
            break;
        }
    }
    let (relay, mut xb) = found.ok_or(HandshakeError::NoMatchingOnionKey)?;
    let parsed = parse_client_ext(&ext, aes_hw);
    ext.zeroize();
    let (hop, suite, link_secret) = parsed?;

    let y = OnionSecret::generate(rng);
    let y_wire = random_public_bit(y.public(), rng);
    let xy = y.0.diffie_hellman(&x_wire).map_err(|_| HandshakeError::BadPublicKey)?;
    let (mut reply_key, keys, derived_link) = final_keys(&xy, &xb, &relay, &x_wire, &y_wire, &message[32..]);
    xb.zeroize();

    let mut reply = [0u8; CREATED_LEN];
    reply[..32].copy_from_slice(&y_wire);
    reply[32] = HANDSHAKE_VERSION;
    reply[33] = suite.code();
    let aad = transcript_aad([&relay.identity, &relay.onion_key, &x_wire, &y_wire]);
    let tag = seal_once(&reply_key, &aad, &mut reply[32..32 + SERVER_EXT_LEN]);
    reply_key.zeroize();
    reply[32 + SERVER_EXT_LEN..].copy_from_slice(&tag);
    let link_secret = link_secret.unwrap_or(derived_link);
    Ok((reply, HandshakeOutput { suite, keys, link_secret, hop }))
}

type ClientExt = (u8, Suite, Option<[u8; KEY_LEN]>);

fn parse_client_ext(ext: &[u8; CLIENT_EXT_LEN], aes_hw: bool) -> Result<ClientExt, HandshakeError> {
    if ext[0] != HANDSHAKE_VERSION {
        return Err(HandshakeError::UnsupportedVersion(ext[0]));
    }
    let hop = ext[1];
    if hop == 0 || usize::from(hop) > crate::cell::MAX_HOPS {
        return Err(HandshakeError::BadExtensions("hop index out of range"));
    }
    if ext[2] & SUITE_BIT_CHACHA == 0 || ext[2] & !(SUITE_BIT_CHACHA | SUITE_BIT_AES) != 0 {
        return Err(HandshakeError::BadExtensions("bad suite offer"));
    }
    let suite = if aes_hw && ext[2] & SUITE_BIT_AES != 0 { Suite::Aes256Gcm } else { Suite::ChaCha20Poly1305 };
    let link_secret = match ext[3] {
        0 if hop == 1 => None,
        FLAG_LINK_SECRET if hop > 1 => {
            let mut s = [0u8; KEY_LEN];
            s.copy_from_slice(&ext[4..36]);
            Some(s)
        }
        _ => return Err(HandshakeError::BadExtensions("link secret must be present exactly for hops after the first")),
    };
    check_extensions(&ext[36..])?;
    Ok((hop, suite, link_secret))
}

impl From<CryptoError> for HandshakeError {
    fn from(_: CryptoError) -> Self {
        HandshakeError::BadReply
    }
}

/// An ephemeral X25519 share one hop sends the other on a new link between two relays (in
/// CREATE from the extending hop, in CREATED from the new hop).
pub struct LinkShare {
    secret: X25519Secret,
    wire: [u8; X25519_LEN],
}

impl LinkShare {
    /// A fresh share.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut raw = [0u8; 32];
        rng.fill_bytes(&mut raw);
        let secret = X25519Secret::from_bytes(&raw);
        raw.zeroize();
        let wire = random_public_bit(secret.public(), rng);
        Self { secret, wire }
    }

    /// The public share as sent (its top bit random, like every X25519 key on the wire).
    pub fn public(&self) -> &[u8; X25519_LEN] {
        &self.wire
    }

    /// The link's secret from the peer's share, the client's seed, and who created the link.
    pub fn finish(
        &self,
        peer: &[u8; X25519_LEN],
        seed: &[u8; KEY_LEN],
        creator_share: &[u8; X25519_LEN],
        responder_share: &[u8; X25519_LEN],
    ) -> Result<[u8; KEY_LEN], HandshakeError> {
        let mut dh = self.secret.diffie_hellman(peer).map_err(|_| HandshakeError::BadPublicKey)?;
        let out = hop_link_secret(seed, &dh, creator_share, responder_share);
        dh.zeroize();
        Ok(out)
    }
}

impl std::fmt::Debug for LinkShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkShare").field("public", &self.wire).finish_non_exhaustive()
    }
}

/// The secret of a link between hop `i` and hop `i + 1`: the client's seed (which a thief of
/// hop `i + 1`'s onion key could read from a recorded CREATE) mixed with the two hops' ephemeral
/// Diffie–Hellman (which nobody can recompute once they erased it), bound to both shares.
pub fn hop_link_secret(
    seed: &[u8; KEY_LEN],
    dh: &[u8; X25519_LEN],
    creator_share: &[u8; X25519_LEN],
    responder_share: &[u8; X25519_LEN],
) -> [u8; KEY_LEN] {
    let mut ikm = [0u8; 4 * 32];
    ikm[..32].copy_from_slice(seed);
    ikm[32..64].copy_from_slice(dh);
    ikm[64..96].copy_from_slice(creator_share);
    ikm[96..].copy_from_slice(responder_share);
    let mut out = [0u8; KEY_LEN];
    hkdf(PROTOID, &ikm, b"hop link", &mut out);
    ikm.zeroize();
    out
}
