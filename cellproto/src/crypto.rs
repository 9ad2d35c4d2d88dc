//! The only module of the protocol core that touches cryptographic implementations.
//!
//! As in Arti's `tor-llcrypto`, every primitive the protocol uses is wrapped here with the exact
//! shape the protocol needs, so the rest of the crate never sees a nonce format or a key type of
//! the underlying library. All primitives come from `aws-lc-rs`:
//!
//! * AEAD layers: AES-256-GCM or ChaCha20-Poly1305 ([`Suite`]), nonce = 8 zero bytes ‖ counter.
//! * Link tags ([`LinkMac`]): the same AEAD with an empty plaintext (GMAC or Poly1305) over the
//!   whole cell, so a hop authenticates what its neighbour sent before it changes any state.
//! * Header protection and padding: AES-256 blocks, whatever the layer suite, because both are
//!   a handful of blocks per cell and aws-lc's AES is constant-time (vpaes/bitsliced) even
//!   without AES instructions.
//! * X25519 and HKDF-SHA256 for the handshake. `x25519-dalek` (on the design card) is measured
//!   against aws-lc-rs in `benches/handshake.rs`; aws-lc-rs was faster on the relay's path, so it
//!   is the one used here (the figures are in the README).

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::cipher::{AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::{hkdf, hmac};
use thiserror::Error;

/// Length of every symmetric key the protocol derives.
pub const KEY_LEN: usize = 32;
/// Length of an AEAD tag (both suites).
pub const TAG_LEN: usize = 16;
/// Length of an X25519 public key.
pub const X25519_LEN: usize = 32;

/// A cryptographic operation failed. Deliberately carries no detail: a failed tag check must not
/// tell an attacker which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("cryptographic check failed")]
pub struct CryptoError;

/// The AEAD used for a hop's onion layer, negotiated in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    /// ChaCha20-Poly1305 (RFC 8439): the choice when either end lacks AES hardware.
    ChaCha20Poly1305,
    /// AES-256-GCM: chosen when both ends have AES and carry-less multiply instructions.
    Aes256Gcm,
}

impl Suite {
    /// Wire code of the suite (SPEC.md, "Cipher suites").
    pub const fn code(self) -> u8 {
        match self {
            Suite::ChaCha20Poly1305 => 1,
            Suite::Aes256Gcm => 2,
        }
    }

    /// Parses a wire code.
    pub const fn from_code(code: u8) -> Option<Suite> {
        match code {
            1 => Some(Suite::ChaCha20Poly1305),
            2 => Some(Suite::Aes256Gcm),
            _ => None,
        }
    }

    /// Short name for logs and status output.
    pub const fn name(self) -> &'static str {
        match self {
            Suite::ChaCha20Poly1305 => "chacha20-poly1305",
            Suite::Aes256Gcm => "aes-256-gcm",
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
        }
    }
}

/// Whether this CPU has the instructions that make AES-GCM fast and constant-time.
pub fn local_aes_hw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn counter_nonce(counter: u32) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[8..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// One direction of one hop's onion layer: an AEAD key whose nonce is the cell counter.
///
/// Callers never choose a nonce directly: the counter comes from the replay window or the
/// sender's own counter (see `onion`), which is what makes nonce reuse impossible.
pub struct LayerKey {
    key: LessSafeKey,
    suite: Suite,
}

impl LayerKey {
    /// Builds the key from 32 bytes of derived key material.
    pub fn new(suite: Suite, key: &[u8; KEY_LEN]) -> Self {
        // A 32-byte key is valid for both suites, so this cannot fail.
        let unbound = UnboundKey::new(suite.algorithm(), key).unwrap_or_else(|_| unreachable!());
        Self { key: LessSafeKey::new(unbound), suite }
    }

    /// The suite this key uses.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Encrypts `in_out` in place and returns the tag.
    pub fn seal(&self, counter: u32, aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .key
            .seal_in_place_separate_tag(counter_nonce(counter), Aad::from(aad), in_out)
            .unwrap_or_else(|_| unreachable!("AEAD seal fails only on oversized input"));
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Authenticates and decrypts `in_out` in place.
    pub fn open(&self, counter: u32, aad: &[u8], in_out: &mut [u8], tag: &[u8]) -> Result<(), CryptoError> {
        self.key
            .open_in_place_separate_tag(counter_nonce(counter), Aad::from(aad), tag, in_out)
            .map(|_| ())
            .map_err(|_| CryptoError)
    }
}

impl std::fmt::Debug for LayerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerKey").field("suite", &self.suite).finish_non_exhaustive()
    }
}

/// A MAC over a whole cell under a link key: the AEAD of the link's suite with an empty
/// plaintext (GMAC for AES-256-GCM, Poly1305 for ChaCha20-Poly1305), the link counter as nonce.
/// Counters are unique per key (one key per link and direction, each counter sent once), so the
/// one-time-key requirement of both constructions holds. Verification is the library's
/// constant-time tag check.
pub struct LinkMac(LayerKey);

impl LinkMac {
    /// Builds the key from 32 bytes of derived key material.
    pub fn new(suite: Suite, key: &[u8; KEY_LEN]) -> Self {
        Self(LayerKey::new(suite, key))
    }

    /// The tag of `data` sent with link counter `counter`.
    pub fn tag(&self, counter: u32, data: &[u8]) -> [u8; TAG_LEN] {
        self.0.seal(counter, data, &mut [])
    }

    /// Checks `tag` against `data` and `counter`.
    pub fn verify(&self, counter: u32, data: &[u8], tag: &[u8]) -> Result<(), CryptoError> {
        self.0.open(counter, data, &mut [], tag)
    }
}

impl std::fmt::Debug for LinkMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkMac(..)")
    }
}

/// Who writes a run of padding: the input blocks differ, so no two writers under one key ever
/// produce the same bytes for the same counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PadRole {
    /// The client filling the link-tag slot of a forward cell (hop 1's associated data).
    Client = 0,
    /// A hop replacing what it opened of a forward cell (the next hop's associated data).
    Forward = 1,
    /// A hop filling a backward cell after its layer (overwritten by the next hop, never read).
    Backward = 2,
}

/// AES-256 in ECB mode for header protection and padding.
///
/// * The counter is hidden as QUIC hides packet numbers (RFC 9001 §5.4):
///   mask = AES(key, sample)[..4], where the sample is the first 16 body bytes (ciphertext).
/// * Padding is AES(key, counter ‖ j ‖ "pad" ‖ role ‖ 0⁴) for block j = 0, 1, …: a PRF of the
///   counter, so the client (which knows every forward padding key) can predict it and the next
///   hop authenticates it as associated data. Sample blocks are ciphertext and never match that
///   fixed structure except with probability 2⁻⁶⁴ per block.
///
/// Mask and padding for an outgoing cell come from one call where one key does both: what
/// costs here is the call (about 25 ns), not the handful of AES blocks (about 4 ns each).
pub struct HeaderKey(EncryptingKey);

/// Most padding one cell carries (the deepest layer's end to the end of the body), in blocks.
const MAX_PAD: usize = 128;

impl HeaderKey {
    /// Builds the key from 32 bytes of derived key material.
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        let unbound = UnboundCipherKey::new(&AES_256, key).unwrap_or_else(|_| unreachable!());
        Self(EncryptingKey::ecb(unbound).unwrap_or_else(|_| unreachable!()))
    }

    fn encrypt_blocks(&self, blocks: &mut [u8]) {
        self.0
            .less_safe_encrypt(blocks, EncryptionContext::None)
            .unwrap_or_else(|_| unreachable!("ECB on whole blocks cannot fail"));
    }

    /// The 4-byte mask for a 16-byte sample of the cell body.
    pub fn mask(&self, sample: &[u8; 16]) -> [u8; 4] {
        let mut block = *sample;
        self.encrypt_blocks(&mut block);
        [block[0], block[1], block[2], block[3]]
    }

    /// The mask for `sample` and the padding for `counter` (`pad.len()` ≤ 128 bytes), in one call.
    pub fn mask_and_pad(&self, sample: &[u8; 16], counter: u32, role: PadRole, pad: &mut [u8]) -> [u8; 4] {
        let pad_blocks = pad.len().div_ceil(16).min(MAX_PAD / 16);
        let mut buf = [0u8; 16 + MAX_PAD];
        buf[..16].copy_from_slice(sample);
        for (j, block) in buf[16..16 + 16 * pad_blocks].chunks_exact_mut(16).enumerate() {
            pad_block(counter, j, role, block);
        }
        self.encrypt_blocks(&mut buf[..16 + 16 * pad_blocks]);
        let n = pad.len().min(MAX_PAD);
        pad[..n].copy_from_slice(&buf[16..16 + n]);
        [buf[0], buf[1], buf[2], buf[3]]
    }

    /// The padding alone (`pad.len()` ≤ 128 bytes).
    pub fn pad(&self, counter: u32, role: PadRole, pad: &mut [u8]) {
        let blocks = pad.len().div_ceil(16).min(MAX_PAD / 16);
        let mut buf = [0u8; MAX_PAD];
        for (j, block) in buf[..16 * blocks].chunks_exact_mut(16).enumerate() {
            pad_block(counter, j, role, block);
        }
        self.encrypt_blocks(&mut buf[..16 * blocks]);
        let n = pad.len().min(MAX_PAD);
        pad[..n].copy_from_slice(&buf[..n]);
    }
}

/// Input block `j` of the padding for `counter`: counter ‖ u32(j) ‖ "pad" ‖ role ‖ 0⁴.
fn pad_block(counter: u32, j: usize, role: PadRole, block: &mut [u8]) {
    block[..4].copy_from_slice(&counter.to_be_bytes());
    block[4..8].copy_from_slice(&(j as u32).to_be_bytes());
    block[8..11].copy_from_slice(b"pad");
    block[11] = role as u8;
    block[12..16].fill(0);
}

impl std::fmt::Debug for HeaderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeaderKey(..)")
    }
}

/// ChaCha20-Poly1305 with a key used for one message only (handshake extensions), so the
/// all-zero nonce is safe.
pub fn seal_once(key: &[u8; KEY_LEN], aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
    LayerKey::new(Suite::ChaCha20Poly1305, key).seal(0, aad, in_out)
}

/// Opens what [`seal_once`] sealed.
pub fn open_once(key: &[u8; KEY_LEN], aad: &[u8], in_out: &mut [u8], tag: &[u8]) -> Result<(), CryptoError> {
    LayerKey::new(Suite::ChaCha20Poly1305, key).open(0, aad, in_out, tag)
}

/// Seals with a caller-provided 12-byte random nonce (rare link-control cells).
pub fn seal_random_nonce(key: &[u8; KEY_LEN], nonce: [u8; 12], aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
    let unbound = UnboundKey::new(&aead::CHACHA20_POLY1305, key).unwrap_or_else(|_| unreachable!());
    let tag = LessSafeKey::new(unbound)
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
        .unwrap_or_else(|_| unreachable!());
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Opens what [`seal_random_nonce`] sealed.
pub fn open_random_nonce(
    key: &[u8; KEY_LEN],
    nonce: [u8; 12],
    aad: &[u8],
    in_out: &mut [u8],
    tag: &[u8],
) -> Result<(), CryptoError> {
    let unbound = UnboundKey::new(&aead::CHACHA20_POLY1305, key).unwrap_or_else(|_| unreachable!());
    LessSafeKey::new(unbound)
        .open_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), tag, in_out)
        .map(|_| ())
        .map_err(|_| CryptoError)
}

/// HMAC-SHA256 of `data` under `key`, truncated to 16 bytes (cookies and the MAC a CREATE
/// carries with one, as WireGuard's cookie and mac2).
pub fn mac16(key: &[u8], data: &[u8]) -> [u8; 16] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = [0u8; 16];
    out.copy_from_slice(&tag.as_ref()[..16]);
    out
}

/// Whether `tag` is [`mac16`] of `data` under `key`, compared in constant time.
pub fn verify_mac16(key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(&mac16(key, data), tag).is_ok()
}

struct OutLen(usize);

impl hkdf::KeyType for OutLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256 (RFC 5869): extract with `salt` over `ikm`, then expand with `info` into `out`.
pub fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    prk.expand(&[info], OutLen(out.len()))
        .and_then(|okm| okm.fill(out))
        .unwrap_or_else(|_| unreachable!("HKDF output length is below 255 * 32"));
}

/// An X25519 secret scalar with its public key (RFC 7748).
pub struct X25519Secret {
    key: PrivateKey,
    public: [u8; X25519_LEN],
}

impl X25519Secret {
    /// Builds the key pair from 32 secret bytes (clamped by X25519 itself).
    pub fn from_bytes(secret: &[u8; X25519_LEN]) -> Self {
        let key = PrivateKey::from_private_key(&X25519, secret).unwrap_or_else(|_| unreachable!());
        let mut public = [0u8; X25519_LEN];
        let computed = key.compute_public_key().unwrap_or_else(|_| unreachable!());
        public.copy_from_slice(computed.as_ref());
        Self { key, public }
    }

    /// The public key.
    pub fn public(&self) -> &[u8; X25519_LEN] {
        &self.public
    }

    /// Diffie–Hellman with a peer's public key. Fails on a low-order point (all-zero output),
    /// which is what a peer sending a malicious key would produce.
    pub fn diffie_hellman(&self, peer: &[u8; X25519_LEN]) -> Result<[u8; X25519_LEN], CryptoError> {
        agreement::agree(&self.key, UnparsedPublicKey::new(&X25519, peer), CryptoError, |shared| {
            let mut out = [0u8; X25519_LEN];
            out.copy_from_slice(shared);
            if aws_lc_rs::constant_time::verify_slices_are_equal(&out, &[0u8; X25519_LEN]).is_ok() {
                return Err(CryptoError);
            }
            Ok(out)
        })
    }
}

impl std::fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X25519Secret").field("public", &self.public).finish_non_exhaustive()
    }
}
