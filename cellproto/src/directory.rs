//! The directory document: a directory authority's signed list of relay descriptors.
//!
//! Clients pin the authority's [`IdentityKey`] (for the static-file deployment, in their
//! configuration) and accept a directory only if that key signed it. Each relay's own
//! descriptor is carried byte for byte, still under the relay's signature, so the authority
//! vouches for which relays are listed but cannot alter what a relay said about itself.
//! The byte layout is specified in `spec/descriptors.md`.

use std::cmp::Ordering;
use std::fmt;

use thiserror::Error;

use crate::codec::{CodecError, Reader, Writer};
use crate::descriptor::{DescriptorError, RelayDescriptor};
use crate::identity::{IdentityKey, RelayIdentity, SIGNATURE_LEN, Signatures, split_signature};

/// Signature context of a directory document.
pub const DIRECTORY_CONTEXT: &[u8] = b"meshvpn directory v1\0";
/// First byte of an encoded directory (`'D'`).
pub const DIRECTORY_MAGIC: u8 = 0x44;
/// The only directory version this code reads and writes.
pub const DIRECTORY_VERSION: u8 = 1;
/// Largest signed directory accepted, signature included.
pub const MAX_DIRECTORY_LEN: usize = 8 * 1024 * 1024;
/// Most relays in one directory.
pub const MAX_RELAYS: usize = 10_000;

/// Length of the fixed header: magic, version, published, expires, relay count.
const HEADER_LEN: usize = 2 + 8 + 8 + 4;

/// Names a relay in an error as far as it is known: the identity if the descriptor was long
/// enough to hold one, the nickname once the descriptor has been verified and parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayLabel {
    /// The identity field of the descriptor, if present.
    pub identity: Option<IdentityKey>,
    /// The (validated, ASCII alphanumeric) nickname, if the descriptor parsed.
    pub nickname: Option<String>,
}

impl RelayLabel {
    fn of(desc: &RelayDescriptor) -> Box<Self> {
        Box::new(Self { identity: Some(desc.identity), nickname: Some(desc.nickname.clone()) })
    }
}

impl fmt::Display for RelayLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.nickname, &self.identity) {
            (Some(nick), Some(id)) => write!(f, " ({nick}, identity {id})"),
            (None, Some(id)) => write!(f, " (identity {id})"),
            (Some(nick), None) => write!(f, " ({nick})"),
            (None, None) => Ok(()),
        }
    }
}

/// Why a directory was refused, or could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DirectoryError {
    /// The encoding is longer than [`MAX_DIRECTORY_LEN`].
    #[error("directory is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Actual (or would-be) length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are truncated, have trailing data, or hold an unreadable field.
    #[error("malformed directory: {0}")]
    Codec(#[from] CodecError),
    /// The signature does not verify under the pinned authority key.
    #[error("directory signature does not verify under authority key {authority}")]
    BadSignature {
        /// The pinned key that was tried.
        authority: IdentityKey,
    },
    /// The magic byte or version is not one this code knows.
    #[error("unknown directory magic {magic:#04x} version {version}")]
    UnknownVersion {
        /// The magic byte found.
        magic: u8,
        /// The version byte found.
        version: u8,
    },
    /// `expires` is not after `published`.
    #[error("directory validity is empty (published {published}, expires {expires})")]
    EmptyWindow {
        /// Publication time.
        published: u64,
        /// Expiry time.
        expires: u64,
    },
    /// `now` is before the directory's publication time.
    #[error("directory not valid until {published} (now {now})")]
    NotYetValid {
        /// Publication time.
        published: u64,
        /// The time checked.
        now: u64,
    },
    /// `now` is at or after the directory's expiry.
    #[error("directory expired at {expires} (now {now})")]
    Expired {
        /// Expiry time.
        expires: u64,
        /// The time checked.
        now: u64,
    },
    /// More relays than [`MAX_RELAYS`].
    #[error("directory lists {count} relays, more than the limit of {max}")]
    TooManyRelays {
        /// The count given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A descriptor is invalid; one bad descriptor spoils the whole document.
    #[error("descriptor #{index}{label}: {error}")]
    Relay {
        /// Position of the descriptor.
        index: usize,
        /// What is known of the relay (boxed to keep the error small).
        label: Box<RelayLabel>,
        /// What is wrong with it (checked at the directory's publication time).
        error: DescriptorError,
    },
    /// A descriptor expires before the directory, so the directory would go bad partway.
    #[error("descriptor #{index}{label}: expires at {relay_expires}, before the directory ({directory_expires})")]
    RelayExpiresEarly {
        /// Position of the descriptor.
        index: usize,
        /// The relay (boxed to keep the error small).
        label: Box<RelayLabel>,
        /// When the descriptor expires.
        relay_expires: u64,
        /// When the directory expires.
        directory_expires: u64,
    },
    /// Two descriptors share an identity.
    #[error("descriptor #{index}: relay {identity} is listed twice")]
    DuplicateRelay {
        /// Position of the second occurrence.
        index: usize,
        /// The repeated identity.
        identity: IdentityKey,
    },
    /// Descriptors are not in increasing identity order, the one canonical order.
    #[error("descriptor #{index}: relay {identity} is out of identity order")]
    NotSorted {
        /// Position of the misplaced descriptor.
        index: usize,
        /// Its identity.
        identity: IdentityKey,
    },
}

/// A verified directory: its window and its relays in increasing identity order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    /// Unix seconds from which the directory holds.
    pub published: u64,
    /// Unix seconds from which it no longer holds.
    pub expires: u64,
    /// Every listed relay, sorted by identity, no two alike.
    pub relays: Vec<RelayDescriptor>,
}

impl Directory {
    /// Builds and signs a directory from signed descriptors (in any order; they are sorted
    /// by identity). Each descriptor must pass every check [`Self::decode_and_verify`] will
    /// make, so a document this returns is accepted at every moment of its window. Errors
    /// about one descriptor give its position in `relays_signed`.
    pub fn sign(
        relays_signed: &[Vec<u8>],
        published: u64,
        expires: u64,
        authority: &RelayIdentity,
    ) -> Result<Vec<u8>, DirectoryError> {
        check_window(published, expires)?;
        if relays_signed.len() > MAX_RELAYS {
            return Err(DirectoryError::TooManyRelays { count: relays_signed.len(), max: MAX_RELAYS });
        }
        let mut entries = Vec::with_capacity(relays_signed.len());
        let mut total = HEADER_LEN + SIGNATURE_LEN;
        for (index, bytes) in relays_signed.iter().enumerate() {
            let desc = check_relay(index, bytes, published, expires, Signatures::Check)?;
            entries.push((desc.identity, index, bytes.as_slice()));
            total = total.saturating_add(2 + bytes.len());
        }
        entries.sort_unstable_by_key(|&(identity, index, _)| (identity, index));
        for pair in entries.windows(2) {
            if let [(a, _, _), (b, index, _)] = pair
                && a == b
            {
                return Err(DirectoryError::DuplicateRelay { index: *index, identity: *b });
            }
        }
        if total > MAX_DIRECTORY_LEN {
            return Err(DirectoryError::TooLarge { len: total, max: MAX_DIRECTORY_LEN });
        }
        let count = u32::try_from(entries.len()).map_err(|_| CodecError::Invalid("relay count"))?;
        let mut body = vec![0u8; total - SIGNATURE_LEN];
        let mut w = Writer::new(&mut body);
        w.u8(DIRECTORY_MAGIC, "directory magic")?;
        w.u8(DIRECTORY_VERSION, "directory version")?;
        w.u64(published, "directory published")?;
        w.u64(expires, "directory expires")?;
        w.u32(count, "relay count")?;
        for (_, _, bytes) in &entries {
            w.bytes_u16(bytes, "relay descriptor")?;
        }
        let sig = authority.sign(DIRECTORY_CONTEXT, &body);
        body.extend_from_slice(&sig);
        Ok(body)
    }

    /// Decodes a signed directory and checks, in this order: size, the signature by
    /// `authority` over the whole document, its window against `now`, then every descriptor
    /// (signature, format, validity at the directory's publication time, and lasting until
    /// the directory expires) and that identities strictly increase.
    pub fn decode_and_verify(bytes: &[u8], authority: &IdentityKey, now: u64) -> Result<Self, DirectoryError> {
        if bytes.len() > MAX_DIRECTORY_LEN {
            return Err(DirectoryError::TooLarge { len: bytes.len(), max: MAX_DIRECTORY_LEN });
        }
        let (body, sig) = split_signature(bytes, "directory signature")?;
        authority
            .verify(DIRECTORY_CONTEXT, body, &sig)
            .map_err(|_| DirectoryError::BadSignature { authority: *authority })?;
        Self::decode_body(body, now, Signatures::Check)
    }

    /// Parses a directory body (everything but the trailing signature) WITHOUT checking the
    /// authority's signature (each descriptor's signatures are still checked), only to name
    /// what is wrong with a document that failed verification (a truncated file fails the
    /// signature first). Never trust what it returns.
    pub fn diagnose_unverified(body: &[u8], now: u64) -> Result<Self, DirectoryError> {
        Self::decode_body(body, now, Signatures::Check)
    }

    /// Everything [`Self::decode_and_verify`] checks except every signature: the authority's
    /// (its 64 bytes must still be there), each descriptor's and each onion-key certificate's,
    /// so a fuzzer reaches every parser behind them. Exists only with the `fuzzing` feature.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn decode_ignoring_signatures(bytes: &[u8], now: u64) -> Result<Self, DirectoryError> {
        if bytes.len() > MAX_DIRECTORY_LEN {
            return Err(DirectoryError::TooLarge { len: bytes.len(), max: MAX_DIRECTORY_LEN });
        }
        let (body, _) = split_signature(bytes, "directory signature")?;
        Self::decode_body(body, now, Signatures::Ignore)
    }

    /// The relay with this identity, if listed.
    pub fn relay(&self, identity: &IdentityKey) -> Option<&RelayDescriptor> {
        self.relays.binary_search_by(|d| d.identity.cmp(identity)).ok().and_then(|i| self.relays.get(i))
    }

    /// Parses an authenticated body (descriptors' signatures checked as `sigs` says).
    fn decode_body(body: &[u8], now: u64, sigs: Signatures) -> Result<Self, DirectoryError> {
        let mut r = Reader::new(body);
        let magic = r.u8("directory magic")?;
        let version = r.u8("directory version")?;
        if magic != DIRECTORY_MAGIC || version != DIRECTORY_VERSION {
            return Err(DirectoryError::UnknownVersion { magic, version });
        }
        let published = r.u64("directory published")?;
        let expires = r.u64("directory expires")?;
        check_window(published, expires)?;
        if now < published {
            return Err(DirectoryError::NotYetValid { published, now });
        }
        if now >= expires {
            return Err(DirectoryError::Expired { expires, now });
        }
        let count = usize::try_from(r.u32("relay count")?).unwrap_or(usize::MAX);
        if count > MAX_RELAYS {
            return Err(DirectoryError::TooManyRelays { count, max: MAX_RELAYS });
        }
        // Grow as descriptors actually arrive rather than trusting the count for allocation.
        let mut relays: Vec<RelayDescriptor> = Vec::new();
        for index in 0..count {
            let bytes = r.bytes_u16("relay descriptor")?;
            let desc = check_relay(index, bytes, published, expires, sigs)?;
            if let Some(prev) = relays.last() {
                match prev.identity.cmp(&desc.identity) {
                    Ordering::Less => {}
                    Ordering::Equal => {
                        return Err(DirectoryError::DuplicateRelay { index, identity: desc.identity });
                    }
                    Ordering::Greater => {
                        return Err(DirectoryError::NotSorted { index, identity: desc.identity });
                    }
                }
            }
            relays.push(desc);
        }
        r.finish()?;
        Ok(Self { published, expires, relays })
    }
}

fn check_window(published: u64, expires: u64) -> Result<(), DirectoryError> {
    if expires <= published {
        return Err(DirectoryError::EmptyWindow { published, expires });
    }
    Ok(())
}

/// Verifies one descriptor for a directory valid over `[published, expires)`. It is checked
/// at `published` and must outlast the directory, so the document's meaning does not change
/// with the reader's clock while the directory itself is valid.
fn check_relay(
    index: usize,
    bytes: &[u8],
    published: u64,
    expires: u64,
    sigs: Signatures,
) -> Result<RelayDescriptor, DirectoryError> {
    let relay_error = |label: Box<RelayLabel>, error: DescriptorError| DirectoryError::Relay { index, label, error };
    // The identity sits at bytes 2..34; it is only a label here, never trusted.
    let claimed = Box::new(RelayLabel {
        identity: bytes.get(2..34).and_then(|b| <[u8; 32]>::try_from(b).ok()).map(IdentityKey),
        nickname: None,
    });
    let desc = RelayDescriptor::decode_untimed(bytes, sigs).map_err(|e| relay_error(claimed, e))?;
    desc.check_time(published).map_err(|e| relay_error(RelayLabel::of(&desc), e))?;
    if desc.expires < expires {
        return Err(DirectoryError::RelayExpiresEarly {
            index,
            label: RelayLabel::of(&desc),
            relay_expires: desc.expires,
            directory_expires: expires,
        });
    }
    Ok(desc)
}
