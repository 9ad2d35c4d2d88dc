//! Signed relay descriptors: what a relay tells clients about itself.
//!
//! A descriptor names the relay's identity, its onion keys (each in a certificate signed by
//! that identity), where to reach it, what it is willing to do, and how long the statement
//! holds. The whole encoding is signed by the identity it names, and decoding checks that
//! signature before anything else in the body is believed. The byte layout is specified in
//! `spec/descriptors.md`.

use std::net::SocketAddr;

use thiserror::Error;

use crate::codec::{CodecError, Reader, Writer};
use crate::identity::{
    CertError, IdentityKey, OnionKeyCert, RelayIdentity, SIGNATURE_LEN, Signatures, SignedOnionKeyCert, split_signature,
};

/// Signature context of a relay descriptor.
pub const DESCRIPTOR_CONTEXT: &[u8] = b"meshvpn descriptor v1\0";
/// First byte of an encoded descriptor (`'R'`).
pub const DESCRIPTOR_MAGIC: u8 = 0x52;
/// The only descriptor version this code reads and writes.
pub const DESCRIPTOR_VERSION: u8 = 1;
/// Largest signed descriptor accepted, signature included.
pub const MAX_DESCRIPTOR_LEN: usize = 2048;
/// Most onion-key certificates in one descriptor (current plus next or previous).
pub const MAX_ONION_KEYS: usize = 2;
/// Most addresses in one descriptor.
pub const MAX_ADDRESSES: usize = 4;
/// Longest nickname, in ASCII letters and digits.
pub const MAX_NICKNAME_LEN: usize = 19;
/// Longest operator string, in bytes of UTF-8.
pub const MAX_OPERATOR_LEN: usize = 64;
/// Most port ranges in an exit policy summary.
pub const MAX_EXIT_PORT_RANGES: usize = 256;
/// Most protocol versions one relay can list.
pub const MAX_PROTOCOL_VERSIONS: usize = 32;

/// The relay lets circuits leave the mesh; requires an exit policy.
pub const FLAG_EXIT: u32 = 1 << 0;
/// The relay has AES-GCM hardware acceleration.
pub const FLAG_AES_HW: u32 = 1 << 1;
/// The relay is suitable as a first hop.
pub const FLAG_GUARD: u32 = 1 << 2;
/// Every flag this version defines; any other bit set is an error, not ignored, so a newer
/// relay's meaning cannot be silently dropped.
pub const KNOWN_FLAGS: u32 = FLAG_EXIT | FLAG_AES_HW | FLAG_GUARD;

/// Why a descriptor was refused, or could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DescriptorError {
    /// The encoding is longer than [`MAX_DESCRIPTOR_LEN`].
    #[error("descriptor is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Actual (or would-be) length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are truncated, have trailing data, or hold an unreadable field.
    #[error("malformed descriptor: {0}")]
    Codec(#[from] CodecError),
    /// The magic byte or version is not one this code knows.
    #[error("unknown descriptor magic {magic:#04x} version {version}")]
    UnknownVersion {
        /// The magic byte found.
        magic: u8,
        /// The version byte found.
        version: u8,
    },
    /// The descriptor's signature does not verify under the identity it names.
    #[error("bad signature by relay identity {identity}")]
    BadSignature {
        /// The identity named in the descriptor.
        identity: IdentityKey,
    },
    /// The key asked to sign is not the descriptor's identity.
    #[error("signing key {signer} is not the descriptor identity {identity}")]
    WrongSigner {
        /// The public half of the key offered.
        signer: IdentityKey,
        /// The identity in the descriptor.
        identity: IdentityKey,
    },
    /// An onion-key certificate is malformed or badly signed.
    #[error("onion key #{index}: {error}")]
    OnionKey {
        /// Position of the certificate in the descriptor.
        index: usize,
        /// What is wrong with it.
        error: CertError,
    },
    /// An onion-key certificate is signed by an identity other than the descriptor's.
    #[error("onion key #{index} is certified by {found}, not by the descriptor identity")]
    ForeignOnionKey {
        /// Position of the certificate in the descriptor.
        index: usize,
        /// The identity that signed it.
        found: IdentityKey,
    },
    /// `expires` is not after `published`.
    #[error("descriptor validity is empty (published {published}, expires {expires})")]
    EmptyWindow {
        /// Publication time.
        published: u64,
        /// Expiry time.
        expires: u64,
    },
    /// Flag bits this version does not define are set.
    #[error("unknown flag bits {0:#010x}")]
    UnknownFlags(u32),
    /// The EXIT flag is set but there is no exit policy.
    #[error("EXIT flag set without an exit policy")]
    MissingExitPolicy,
    /// An exit policy is present but the EXIT flag is not set.
    #[error("exit policy present without the EXIT flag")]
    UnexpectedExitPolicy,
    /// A field breaks a rule of the format.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// `now` is before the descriptor's publication time.
    #[error("descriptor not valid until {published} (now {now})")]
    NotYetValid {
        /// Publication time.
        published: u64,
        /// The time checked.
        now: u64,
    },
    /// `now` is at or after the descriptor's expiry.
    #[error("descriptor expired at {expires} (now {now})")]
    Expired {
        /// Expiry time.
        expires: u64,
        /// The time checked.
        now: u64,
    },
    /// None of the onion keys is valid at `now`, so nobody could build a circuit through it.
    #[error("no onion key is valid at {now}")]
    NoCurrentOnionKey {
        /// The time checked.
        now: u64,
    },
}

fn invalid(field: &'static str, reason: &'static str) -> DescriptorError {
    DescriptorError::Invalid { field, reason }
}

/// A compact exit policy, like Tor's microdescriptor `p accept 80,443,1000-2000`.
///
/// Canonical form: 1 to [`MAX_EXIT_PORT_RANGES`] ranges, each `1 <= lo <= hi`, sorted, neither
/// overlapping nor adjacent (adjacent ranges must be merged), so one policy has one encoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExitPolicySummary {
    /// `true`: only the listed ports are allowed; `false`: all but the listed ports are.
    pub accept: bool,
    /// Inclusive port ranges.
    pub ports: Vec<(u16, u16)>,
}

impl ExitPolicySummary {
    /// Whether the policy allows connections to `port`. Port 0 is never allowed.
    pub fn allows_port(&self, port: u16) -> bool {
        if port == 0 {
            return false;
        }
        let listed = self.ports.iter().any(|&(lo, hi)| lo <= port && port <= hi);
        listed == self.accept
    }

    /// Checks the canonical-form rules.
    pub fn validate(&self) -> Result<(), DescriptorError> {
        if self.ports.is_empty() || self.ports.len() > MAX_EXIT_PORT_RANGES {
            return Err(invalid("exit policy", "must list 1 to 256 port ranges"));
        }
        let mut prev_hi: Option<u16> = None;
        for &(lo, hi) in &self.ports {
            if lo == 0 || lo > hi {
                return Err(invalid("exit policy", "each range needs 1 <= lo <= hi"));
            }
            if prev_hi.is_some_and(|p| u32::from(lo) <= u32::from(p) + 1) {
                return Err(invalid("exit policy", "ranges must be sorted, not overlapping and not adjacent"));
            }
            prev_hi = Some(hi);
        }
        Ok(())
    }
}

/// What a relay publishes about itself. See the module docs and `spec/descriptors.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayDescriptor {
    /// The relay's long-term identity; it signs the descriptor and every onion key.
    pub identity: IdentityKey,
    /// 1 to 2 onion-key certificates by `identity`, in increasing `valid_after` order.
    pub onion_keys: Vec<OnionKeyCert>,
    /// 1 to 4 distinct addresses to reach the relay.
    pub addresses: Vec<SocketAddr>,
    /// 1 to 19 ASCII letters or digits, for people; not unique.
    pub nickname: String,
    /// Contact or family id (0 to 64 bytes of UTF-8, no control characters); path selection
    /// avoids two relays with the same non-empty operator in one circuit.
    pub operator: String,
    /// Measured or advertised bandwidth in bytes per second.
    pub bandwidth: u64,
    /// [`FLAG_EXIT`], [`FLAG_AES_HW`], [`FLAG_GUARD`]; other bits must be zero.
    pub flags: u32,
    /// Present if and only if the EXIT flag is set.
    pub exit_policy: Option<ExitPolicySummary>,
    /// Supported protocol versions, strictly increasing, 1 to 32 of them.
    pub protocol_versions: Vec<u8>,
    /// Unix seconds from which the descriptor holds.
    pub published: u64,
    /// Unix seconds from which it no longer holds.
    pub expires: u64,
}

impl RelayDescriptor {
    /// Signs the descriptor (and its onion-key certificates) with `id`, returning
    /// `body || signature`. Fails if `id` is not `self.identity` or a field is invalid.
    pub fn sign(&self, id: &RelayIdentity) -> Result<Vec<u8>, DescriptorError> {
        if id.public() != self.identity {
            return Err(DescriptorError::WrongSigner { signer: id.public(), identity: self.identity });
        }
        self.validate()?;
        let max_body = MAX_DESCRIPTOR_LEN - SIGNATURE_LEN;
        let mut buf = vec![0u8; max_body];
        let len = {
            let mut w = Writer::new(&mut buf);
            self.write_body(&mut w, id)
                .map_err(|_| DescriptorError::TooLarge { len: MAX_DESCRIPTOR_LEN + 1, max: MAX_DESCRIPTOR_LEN })?;
            w.position()
        };
        buf.truncate(len);
        let sig = id.sign(DESCRIPTOR_CONTEXT, &buf);
        buf.extend_from_slice(&sig);
        Ok(buf)
    }

    /// Decodes a signed descriptor and checks, in this order: size, the signature by the
    /// identity it names, every onion-key certificate's signature, every format rule, then
    /// that `now` is in the descriptor's window and some onion key is valid at `now`.
    pub fn decode_and_verify(bytes: &[u8], now: u64) -> Result<Self, DescriptorError> {
        let desc = Self::decode_untimed(bytes, Signatures::Check)?;
        desc.check_time(now)?;
        Ok(desc)
    }

    /// Everything [`Self::decode_and_verify`] checks except the signatures (the descriptor's
    /// and its onion-key certificates'; the 64 bytes of each must still be there), so a fuzzer
    /// reaches the body parser. Exists only with the `fuzzing` feature.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn decode_ignoring_signatures(bytes: &[u8], now: u64) -> Result<Self, DescriptorError> {
        let desc = Self::decode_untimed(bytes, Signatures::Ignore)?;
        desc.check_time(now)?;
        Ok(desc)
    }

    /// Everything [`Self::decode_and_verify`] checks except time (and signatures if `sigs`
    /// says so); the directory checks time against its own window instead of the reader's clock.
    pub(crate) fn decode_untimed(bytes: &[u8], sigs: Signatures) -> Result<Self, DescriptorError> {
        if bytes.len() > MAX_DESCRIPTOR_LEN {
            return Err(DescriptorError::TooLarge { len: bytes.len(), max: MAX_DESCRIPTOR_LEN });
        }
        let (body, sig) = split_signature(bytes, "descriptor signature")?;
        let mut r = Reader::new(body);
        let magic = r.u8("descriptor magic")?;
        let version = r.u8("descriptor version")?;
        if magic != DESCRIPTOR_MAGIC || version != DESCRIPTOR_VERSION {
            return Err(DescriptorError::UnknownVersion { magic, version });
        }
        // Only the identity is read before the signature: it is the key to verify with.
        let identity = IdentityKey(r.array("descriptor identity")?);
        sigs.verify(&identity, DESCRIPTOR_CONTEXT, body, &sig)
            .map_err(|_| DescriptorError::BadSignature { identity })?;

        let published = r.u64("descriptor published")?;
        let expires = r.u64("descriptor expires")?;
        let n_keys = count(&mut r, "onion key count", 1, MAX_ONION_KEYS)?;
        let mut onion_keys = Vec::with_capacity(n_keys);
        for index in 0..n_keys {
            let cert =
                SignedOnionKeyCert::read(&mut r, sigs).map_err(|error| DescriptorError::OnionKey { index, error })?;
            onion_keys.push(cert);
        }
        let n_addrs = count(&mut r, "address count", 1, MAX_ADDRESSES)?;
        let mut addresses = Vec::with_capacity(n_addrs);
        for _ in 0..n_addrs {
            addresses.push(read_address(&mut r)?);
        }
        let nickname = read_string(&mut r, "nickname", MAX_NICKNAME_LEN)?;
        let operator = read_string(&mut r, "operator", MAX_OPERATOR_LEN)?;
        let bandwidth = r.u64("bandwidth")?;
        let flags = r.u32("flags")?;
        // The policy's presence is implied by the flag, so there is no presence byte that
        // could disagree with it.
        let exit_policy = if flags & FLAG_EXIT != 0 { Some(read_exit_policy(&mut r)?) } else { None };
        let n_versions = count(&mut r, "protocol version count", 1, MAX_PROTOCOL_VERSIONS)?;
        let protocol_versions = r.take(n_versions, "protocol versions")?.to_vec();
        r.finish()?;

        let desc = RelayDescriptor {
            identity,
            onion_keys,
            addresses,
            nickname,
            operator,
            bandwidth,
            flags,
            exit_policy,
            protocol_versions,
            published,
            expires,
        };
        // The same rules `sign` enforces, so every decodable descriptor re-encodes exactly.
        desc.validate()?;
        Ok(desc)
    }

    /// Checks every time-independent rule of the format (all but signatures).
    pub fn validate(&self) -> Result<(), DescriptorError> {
        if self.expires <= self.published {
            return Err(DescriptorError::EmptyWindow { published: self.published, expires: self.expires });
        }
        if self.onion_keys.is_empty() || self.onion_keys.len() > MAX_ONION_KEYS {
            return Err(invalid("onion keys", "need 1 or 2 certificates"));
        }
        for (index, cert) in self.onion_keys.iter().enumerate() {
            if cert.identity != self.identity {
                return Err(DescriptorError::ForeignOnionKey { index, found: cert.identity });
            }
            cert.validate().map_err(|error| DescriptorError::OnionKey { index, error })?;
        }
        for pair in self.onion_keys.windows(2) {
            if let [a, b] = pair
                && (a.valid_after >= b.valid_after || a.onion_key == b.onion_key)
            {
                return Err(invalid("onion keys", "must be distinct keys in increasing valid_after order"));
            }
        }
        validate_addresses(&self.addresses)?;
        if self.nickname.is_empty()
            || self.nickname.len() > MAX_NICKNAME_LEN
            || !self.nickname.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(invalid("nickname", "must be 1 to 19 ASCII letters or digits"));
        }
        if self.operator.len() > MAX_OPERATOR_LEN {
            return Err(invalid("operator", "longer than 64 bytes"));
        }
        if self.operator.chars().any(char::is_control) {
            // It ends up in logs and UIs; control characters there are only ever mischief.
            return Err(invalid("operator", "contains control characters"));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(DescriptorError::UnknownFlags(self.flags & !KNOWN_FLAGS));
        }
        match (self.is_exit(), &self.exit_policy) {
            (true, None) => return Err(DescriptorError::MissingExitPolicy),
            (false, Some(_)) => return Err(DescriptorError::UnexpectedExitPolicy),
            (true, Some(policy)) => policy.validate()?,
            (false, None) => {}
        }
        if self.protocol_versions.is_empty()
            || self.protocol_versions.len() > MAX_PROTOCOL_VERSIONS
            || self.protocol_versions.windows(2).any(|p| p.first() >= p.last())
        {
            return Err(invalid("protocol versions", "need 1 to 32, strictly increasing"));
        }
        Ok(())
    }

    /// Checks the descriptor's window and that some onion key is usable at `now`.
    pub fn check_time(&self, now: u64) -> Result<(), DescriptorError> {
        if now < self.published {
            return Err(DescriptorError::NotYetValid { published: self.published, now });
        }
        if now >= self.expires {
            return Err(DescriptorError::Expired { expires: self.expires, now });
        }
        if self.current_onion_key(now).is_none() {
            return Err(DescriptorError::NoCurrentOnionKey { now });
        }
        Ok(())
    }

    /// The onion key to handshake with at `now`: during a rotation overlap both may be
    /// valid, and the newer one is chosen so the old one can retire on schedule.
    pub fn current_onion_key(&self, now: u64) -> Option<&OnionKeyCert> {
        self.onion_keys.iter().filter(|c| c.is_valid_at(now)).max_by_key(|c| c.valid_after)
    }

    /// Whether the relay is an exit.
    pub fn is_exit(&self) -> bool {
        self.flags & FLAG_EXIT != 0
    }

    /// Whether the relay has AES-GCM hardware acceleration.
    pub fn has_aes_hw(&self) -> bool {
        self.flags & FLAG_AES_HW != 0
    }

    /// Whether the relay is suitable as a guard.
    pub fn is_guard(&self) -> bool {
        self.flags & FLAG_GUARD != 0
    }

    /// Writes the signed body; the onion-key certificates are signed here too, which yields
    /// the same bytes every time because Ed25519 signatures are deterministic.
    fn write_body(&self, w: &mut Writer<'_>, id: &RelayIdentity) -> Result<(), CodecError> {
        w.u8(DESCRIPTOR_MAGIC, "descriptor magic")?;
        w.u8(DESCRIPTOR_VERSION, "descriptor version")?;
        w.put(&self.identity.0, "descriptor identity")?;
        w.u64(self.published, "descriptor published")?;
        w.u64(self.expires, "descriptor expires")?;
        w.u8(len_u8(self.onion_keys.len())?, "onion key count")?;
        for cert in &self.onion_keys {
            w.put(&cert.sign(id).encode(), "onion cert")?;
        }
        w.u8(len_u8(self.addresses.len())?, "address count")?;
        for addr in &self.addresses {
            w.socket_addr(addr)?;
        }
        w.u8(len_u8(self.nickname.len())?, "nickname")?;
        w.put(self.nickname.as_bytes(), "nickname")?;
        w.u8(len_u8(self.operator.len())?, "operator")?;
        w.put(self.operator.as_bytes(), "operator")?;
        w.u64(self.bandwidth, "bandwidth")?;
        w.u32(self.flags, "flags")?;
        if let Some(policy) = &self.exit_policy {
            w.u8(u8::from(policy.accept), "exit policy accept")?;
            let n = u16::try_from(policy.ports.len()).map_err(|_| CodecError::Invalid("exit policy"))?;
            w.u16(n, "exit policy count")?;
            for &(lo, hi) in &policy.ports {
                w.u16(lo, "exit port")?;
                w.u16(hi, "exit port")?;
            }
        }
        w.u8(len_u8(self.protocol_versions.len())?, "protocol versions")?;
        w.put(&self.protocol_versions, "protocol versions")
    }
}

fn len_u8(n: usize) -> Result<u8, CodecError> {
    u8::try_from(n).map_err(|_| CodecError::Invalid("list length"))
}

/// Reads a one-byte count and checks it against `min..=max` before anything is allocated.
fn count(r: &mut Reader<'_>, what: &'static str, min: usize, max: usize) -> Result<usize, DescriptorError> {
    let n = usize::from(r.u8(what)?);
    if n < min || n > max {
        return Err(invalid(what, "out of range"));
    }
    Ok(n)
}

fn read_string(r: &mut Reader<'_>, what: &'static str, max: usize) -> Result<String, DescriptorError> {
    let n = count(r, what, 0, max)?;
    String::from_utf8(r.take(n, what)?.to_vec()).map_err(|_| invalid(what, "not UTF-8"))
}

fn read_address(r: &mut Reader<'_>) -> Result<SocketAddr, DescriptorError> {
    r.socket_addr().map_err(|e| match e {
        CodecError::Invalid(_) => invalid("address family", "must be 4 or 6"),
        other => other.into(),
    })
}

fn read_exit_policy(r: &mut Reader<'_>) -> Result<ExitPolicySummary, DescriptorError> {
    let accept = match r.u8("exit policy accept")? {
        0 => false,
        1 => true,
        _ => return Err(invalid("exit policy", "accept byte must be 0 or 1")),
    };
    let n = usize::from(r.u16("exit policy count")?);
    if n == 0 || n > MAX_EXIT_PORT_RANGES {
        return Err(invalid("exit policy", "must list 1 to 256 port ranges"));
    }
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        ports.push((r.u16("exit port")?, r.u16("exit port")?));
    }
    Ok(ExitPolicySummary { accept, ports })
}

fn validate_addresses(addresses: &[SocketAddr]) -> Result<(), DescriptorError> {
    if addresses.is_empty() || addresses.len() > MAX_ADDRESSES {
        return Err(invalid("addresses", "need 1 to 4"));
    }
    for (i, addr) in addresses.iter().enumerate() {
        if addr.port() == 0 {
            return Err(invalid("address", "port 0"));
        }
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(invalid("address", "unspecified or multicast"));
        }
        if let SocketAddr::V6(v6) = addr {
            if v6.flowinfo() != 0 || v6.scope_id() != 0 {
                return Err(invalid("address", "IPv6 flow label and scope must be 0"));
            }
            if v6.ip().to_ipv4_mapped().is_some() {
                return Err(invalid("address", "IPv4-mapped IPv6; use family 4"));
            }
        }
        if addresses.iter().take(i).any(|a| a == addr) {
            return Err(invalid("addresses", "duplicate"));
        }
    }
    Ok(())
}
