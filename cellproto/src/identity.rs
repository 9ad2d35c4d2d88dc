//! Relay identity keys (Ed25519) and the onion-key certificates they sign.
//!
//! A relay is named by its long-term Ed25519 identity key. The X25519 onion key that clients
//! handshake with is short-lived and rotates, so the identity signs an [`OnionKeyCert`] binding
//! the onion key to a validity window; anyone holding the identity key can then check a new
//! onion key without trusting whoever handed it over. Every signature here covers
//! `context || body` with a distinct context string, so a signature made for one kind of object
//! can never be replayed as another.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rand_core::CryptoRngCore;
use thiserror::Error;

use crate::codec::{CodecError, Reader};

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Signature context of an onion-key certificate.
pub const ONION_KEY_CONTEXT: &[u8] = b"meshvpn onion-key v1\0";

/// First byte of an encoded onion-key certificate (`'K'`).
pub const ONION_CERT_MAGIC: u8 = 0x4B;

/// The only onion-key certificate version this code reads and writes.
pub const ONION_CERT_VERSION: u8 = 1;

/// Length of the signed part of an onion-key certificate.
pub const ONION_CERT_BODY_LEN: usize = 2 + 32 + 32 + 8 + 8;

/// Length of an encoded, signed onion-key certificate (body then signature).
pub const SIGNED_ONION_CERT_LEN: usize = ONION_CERT_BODY_LEN + SIGNATURE_LEN;

/// Why an identity key or a signature by one was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IdentityError {
    /// The signature does not verify under this key for this context and body.
    #[error("bad Ed25519 signature by identity {0}")]
    BadSignature(IdentityKey),
    /// A textual identity key was not 64 hex digits.
    #[error("an identity key is written as 64 hex digits")]
    BadHex,
}

/// Why an onion-key certificate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CertError {
    /// The bytes are too short, too long or otherwise unreadable.
    #[error("malformed onion-key certificate: {0}")]
    Codec(#[from] CodecError),
    /// The magic byte or version is not one this code knows.
    #[error("unknown onion-key certificate magic {magic:#04x} version {version}")]
    UnknownVersion {
        /// The magic byte found.
        magic: u8,
        /// The version byte found.
        version: u8,
    },
    /// The signature does not verify under the identity named in the certificate.
    #[error("onion-key certificate has a bad signature by identity {identity}")]
    BadSignature {
        /// The identity the certificate claims to be signed by.
        identity: IdentityKey,
    },
    /// `expires` is not after `valid_after`, so the certificate is never valid.
    #[error("onion-key certificate validity is empty (valid_after {valid_after}, expires {expires})")]
    EmptyWindow {
        /// Start of the window.
        valid_after: u64,
        /// End of the window.
        expires: u64,
    },
    /// The onion key is all zeros, which no honest X25519 key generation produces.
    #[error("onion key is all zeros")]
    ZeroOnionKey,
    /// `now` is before the start of the certificate's window.
    #[error("onion-key certificate not valid until {valid_after} (now {now})")]
    NotYetValid {
        /// Start of the window.
        valid_after: u64,
        /// The time checked.
        now: u64,
    },
    /// `now` is at or after the end of the certificate's window.
    #[error("onion-key certificate expired at {expires} (now {now})")]
    Expired {
        /// End of the window.
        expires: u64,
        /// The time checked.
        now: u64,
    },
}

/// A relay's (or directory authority's) Ed25519 identity key pair. Secret.
///
/// `Debug` shows only the public key, so the secret cannot leak through logs.
pub struct RelayIdentity {
    seed: [u8; 32],
    keypair: Ed25519KeyPair,
    public: IdentityKey,
}

impl RelayIdentity {
    /// Makes a fresh identity from 32 random bytes of `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let identity = Self::from_seed(&seed);
        wipe(&mut seed);
        identity
    }

    /// Rebuilds an identity from the 32-byte seed kept in its key file.
    ///
    /// # Panics
    /// Every 32-byte string is a valid Ed25519 seed, so this fails only if aws-lc cannot
    /// allocate; that is treated like any other allocation failure.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let keypair = Ed25519KeyPair::from_seed_unchecked(seed)
            .expect("every 32-byte string is an Ed25519 seed; only allocation can fail");
        let public = <[u8; 32]>::try_from(keypair.public_key().as_ref()).expect("an Ed25519 public key is 32 bytes");
        Self { seed: *seed, keypair, public: IdentityKey(public) }
    }

    /// The secret seed, for writing the key file (the caller must make it mode 0600).
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The public identity key.
    pub fn public(&self) -> IdentityKey {
        self.public
    }

    /// Signs `context || body`; `context` keeps signatures for different objects apart.
    pub fn sign(&self, context: &[u8], body: &[u8]) -> [u8; SIGNATURE_LEN] {
        let sig = self.keypair.sign(&signed_message(context, body));
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(sig.as_ref());
        out
    }
}

impl fmt::Debug for RelayIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayIdentity").field("public", &self.public).finish_non_exhaustive()
    }
}

impl Drop for RelayIdentity {
    fn drop(&mut self) {
        // Best effort without `unsafe`: aws-lc cleanses its own copy when the key is freed.
        wipe(&mut self.seed);
    }
}

/// Overwrites a secret; `black_box` keeps the optimiser from dropping the dead store.
fn wipe(secret: &mut [u8; 32]) {
    secret.fill(0);
    std::hint::black_box(secret);
}

/// The exact bytes an Ed25519 signature covers.
fn signed_message(context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(context.len().saturating_add(body.len()));
    msg.extend_from_slice(context);
    msg.extend_from_slice(body);
    msg
}

/// Whether a decoder checks the signatures it meets. Production code has only [`Self::Check`];
/// the `fuzzing` feature adds [`Self::Ignore`] so a fuzzer can reach the parsers behind the
/// signatures (a random input never carries a valid one). Every check goes through
/// [`Self::verify`], so the two modes differ in nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signatures {
    /// Verify every signature (the only mode outside fuzzing).
    Check,
    /// Treat every signature as valid. Only for fuzzing the parsers behind the checks.
    #[cfg(feature = "fuzzing")]
    Ignore,
}

impl Signatures {
    /// [`IdentityKey::verify`], or nothing in [`Self::Ignore`] mode.
    pub(crate) fn verify(
        self,
        key: &IdentityKey,
        context: &[u8],
        body: &[u8],
        sig: &[u8; SIGNATURE_LEN],
    ) -> Result<(), IdentityError> {
        match self {
            Signatures::Check => key.verify(context, body, sig),
            #[cfg(feature = "fuzzing")]
            Signatures::Ignore => Ok(()),
        }
    }
}

/// Splits a signed encoding into its body and the trailing 64-byte signature.
pub(crate) fn split_signature<'a>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<(&'a [u8], [u8; SIGNATURE_LEN]), CodecError> {
    let body_len = bytes.len().checked_sub(SIGNATURE_LEN).ok_or(CodecError::Truncated(what))?;
    let (body, sig) = bytes.split_at_checked(body_len).ok_or(CodecError::Truncated(what))?;
    let sig = <[u8; SIGNATURE_LEN]>::try_from(sig).map_err(|_| CodecError::Truncated(what))?;
    Ok((body, sig))
}

/// A public Ed25519 identity key: the name of a relay or of a directory authority.
///
/// `Display` is the full key in lowercase hex; `Debug` shows only a prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey(pub [u8; 32]);

impl IdentityKey {
    /// Checks `sig` over `context || body`.
    pub fn verify(&self, context: &[u8], body: &[u8], sig: &[u8; SIGNATURE_LEN]) -> Result<(), IdentityError> {
        UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(&signed_message(context, body), sig)
            .map_err(|_| IdentityError::BadSignature(*self))
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight bytes tell keys apart in logs without flooding them.
        f.write_str("IdentityKey(")?;
        self.0.iter().take(8).try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str("…)")
    }
}

impl FromStr for IdentityKey {
    type Err = IdentityError;

    /// Parses the 64-hex-digit form that `Display` writes (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(IdentityError::BadHex);
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let text = std::str::from_utf8(pair).map_err(|_| IdentityError::BadHex)?;
            *byte = u8::from_str_radix(text, 16).map_err(|_| IdentityError::BadHex)?;
        }
        Ok(Self(out))
    }
}

/// An identity's statement that `onion_key` is its X25519 onion key from `valid_after`
/// (inclusive) until `expires` (exclusive), both in unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OnionKeyCert {
    /// The identity that signs (and owns) the onion key.
    pub identity: IdentityKey,
    /// The X25519 public onion key.
    pub onion_key: [u8; 32],
    /// First second the key may be used.
    pub valid_after: u64,
    /// First second the key may no longer be used.
    pub expires: u64,
}

impl OnionKeyCert {
    /// Signs the certificate. The signature only verifies if `id` is `self.identity`;
    /// descriptor signing checks that, a lone certificate is the caller's business.
    pub fn sign(&self, id: &RelayIdentity) -> SignedOnionKeyCert {
        SignedOnionKeyCert { cert: *self, signature: id.sign(ONION_KEY_CONTEXT, &self.encode_body()) }
    }

    /// Checks the rules that do not depend on time or signatures.
    pub fn validate(&self) -> Result<(), CertError> {
        if self.expires <= self.valid_after {
            return Err(CertError::EmptyWindow { valid_after: self.valid_after, expires: self.expires });
        }
        if self.onion_key == [0u8; 32] {
            return Err(CertError::ZeroOnionKey);
        }
        Ok(())
    }

    /// Whether `now` lies in `[valid_after, expires)`.
    pub fn is_valid_at(&self, now: u64) -> bool {
        self.valid_after <= now && now < self.expires
    }

    /// Like [`Self::is_valid_at`], but says which end of the window `now` missed.
    pub fn check_time(&self, now: u64) -> Result<(), CertError> {
        if now < self.valid_after {
            Err(CertError::NotYetValid { valid_after: self.valid_after, now })
        } else if now >= self.expires {
            Err(CertError::Expired { expires: self.expires, now })
        } else {
            Ok(())
        }
    }

    /// Same as [`SignedOnionKeyCert::decode_and_verify`].
    pub fn decode_and_verify(bytes: &[u8], now: u64) -> Result<Self, CertError> {
        SignedOnionKeyCert::decode_and_verify(bytes, now)
    }

    /// The signed bytes: magic, version, identity, onion key, valid_after, expires.
    fn encode_body(&self) -> [u8; ONION_CERT_BODY_LEN] {
        let fields: [&[u8]; 5] = [
            &[ONION_CERT_MAGIC, ONION_CERT_VERSION],
            &self.identity.0,
            &self.onion_key,
            &self.valid_after.to_be_bytes(),
            &self.expires.to_be_bytes(),
        ];
        // The fields add up to exactly the body length, so zipping copies every byte.
        let mut body = [0u8; ONION_CERT_BODY_LEN];
        for (dst, src) in body.iter_mut().zip(fields.into_iter().flatten()) {
            *dst = *src;
        }
        body
    }
}

/// An onion-key certificate together with its identity's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SignedOnionKeyCert {
    /// The certified statement.
    pub cert: OnionKeyCert,
    /// Ed25519 signature by `cert.identity` over `ONION_KEY_CONTEXT || body`.
    pub signature: [u8; SIGNATURE_LEN],
}

impl SignedOnionKeyCert {
    /// The wire form: the 82-byte body followed by the 64-byte signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNED_ONION_CERT_LEN);
        out.extend_from_slice(&self.cert.encode_body());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes a lone certificate, checks its signature by the identity it names, its
    /// structure, and that `now` is inside its window.
    pub fn decode_and_verify(bytes: &[u8], now: u64) -> Result<OnionKeyCert, CertError> {
        Self::decode(bytes, now, Signatures::Check)
    }

    /// [`Self::decode_and_verify`] without the signature check, for fuzzing the parser behind
    /// it. Exists only with the `fuzzing` feature.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn decode_ignoring_signature(bytes: &[u8], now: u64) -> Result<OnionKeyCert, CertError> {
        Self::decode(bytes, now, Signatures::Ignore)
    }

    fn decode(bytes: &[u8], now: u64, sigs: Signatures) -> Result<OnionKeyCert, CertError> {
        let mut r = Reader::new(bytes);
        let cert = Self::read(&mut r, sigs)?;
        r.finish()?;
        cert.check_time(now)?;
        Ok(cert)
    }

    /// Reads one signed certificate from `r`, verifying the signature (as `sigs` says) before
    /// parsing past the identity, then the time-independent rules. Time is left to the caller
    /// because a descriptor may legitimately carry a not-yet-valid next key.
    pub(crate) fn read(r: &mut Reader<'_>, sigs: Signatures) -> Result<OnionKeyCert, CertError> {
        let (body, sig) = split_signature(r.take(SIGNED_ONION_CERT_LEN, "onion cert")?, "onion cert")?;
        let mut b = Reader::new(body);
        let magic = b.u8("onion cert magic")?;
        let version = b.u8("onion cert version")?;
        if magic != ONION_CERT_MAGIC || version != ONION_CERT_VERSION {
            return Err(CertError::UnknownVersion { magic, version });
        }
        let identity = IdentityKey(b.array("onion cert identity")?);
        sigs.verify(&identity, ONION_KEY_CONTEXT, body, &sig).map_err(|_| CertError::BadSignature { identity })?;
        let cert = OnionKeyCert {
            identity,
            onion_key: b.array("onion key")?,
            valid_after: b.u64("onion cert valid_after")?,
            expires: b.u64("onion cert expires")?,
        };
        b.finish()?;
        cert.validate()?;
        Ok(cert)
    }
}
