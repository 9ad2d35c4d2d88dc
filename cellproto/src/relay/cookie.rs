//! Cookies under load, after WireGuard's cookie reply: a relay that is busy answers a CREATE
//! with a COOKIE bound to the source address instead of doing the handshake, and only a CREATE
//! that carries a valid MAC under that cookie costs it the three X25519 operations. A flooder
//! with spoofed sources never receives the cookies, so its CREATEs cost one HMAC each.
//!
//! Stateless: the cookie is a MAC of the source address under a secret that rotates every
//! [`COOKIE_ROTATION`]; the previous secret stays valid for one more period, so a cookie works
//! for at least one rotation period after it was issued.

use super::canonical_addr;
use crate::cell::CELL_LEN;
use crate::crypto::mac16;
use crate::link::{COOKIE_LEN, LinkError, create_has_cookie, decode_create, encode_cookie_reply};
use rand_core::CryptoRngCore;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use zeroize::Zeroize;

/// How long one cookie secret is current (WireGuard uses two minutes too).
pub const COOKIE_ROTATION: Duration = Duration::from_secs(120);

/// The relay's cookie secrets. A relay with several workers rotates one jar and gives each
/// worker a copy, so that a cookie any of them issued is valid at all.
#[derive(Clone)]
pub struct CookieJar {
    current: [u8; 32],
    previous: [u8; 32],
    rotated: Instant,
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieJar").field("rotated", &self.rotated).finish_non_exhaustive()
    }
}

impl CookieJar {
    /// Fresh secrets.
    pub fn new(now: Instant, rng: &mut impl CryptoRngCore) -> Self {
        let mut current = [0u8; 32];
        let mut previous = [0u8; 32];
        rng.fill_bytes(&mut current);
        rng.fill_bytes(&mut previous);
        Self { current, previous, rotated: now }
    }

    /// Rotates the secret if it is older than [`COOKIE_ROTATION`]; whether it did.
    pub fn rotate_if_due(&mut self, now: Instant, rng: &mut impl CryptoRngCore) -> bool {
        if now.saturating_duration_since(self.rotated) < COOKIE_ROTATION {
            return false;
        }
        self.previous = self.current;
        rng.fill_bytes(&mut self.current);
        self.rotated = now;
        true
    }

    fn cookie(secret: &[u8; 32], from: SocketAddr) -> [u8; COOKIE_LEN] {
        let from = canonical_addr(from);
        let mut input = [0u8; 19];
        match from.ip() {
            IpAddr::V4(v4) => {
                input[0] = 4;
                input[1..5].copy_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                input[0] = 6;
                input[1..17].copy_from_slice(&v6.octets());
            }
        }
        input[17..].copy_from_slice(&from.port().to_be_bytes());
        mac16(secret, &input)
    }

    /// Whether `create` (from `from`) carries a MAC under the cookie this relay gives `from`.
    pub fn check(&self, from: SocketAddr, create: &[u8; CELL_LEN]) -> bool {
        create_has_cookie(create, &Self::cookie(&self.current, from))
            || create_has_cookie(create, &Self::cookie(&self.previous, from))
    }

    /// Writes the COOKIE answer for `create` from `from` into `out`.
    pub fn reply(
        &self,
        from: SocketAddr,
        create: &[u8; CELL_LEN],
        out: &mut [u8; CELL_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Result<(), LinkError> {
        let parsed = decode_create(create)?;
        let cookie = Self::cookie(&self.current, from);
        encode_cookie_reply(out, parsed.reply_lcid, parsed.message, &cookie, rng);
        Ok(())
    }
}

impl Drop for CookieJar {
    fn drop(&mut self) {
        self.current.zeroize();
        self.previous.zeroize();
    }
}
