//! STUN (RFC 8489) messages on the relay's shared UDP port.
//!
//! The relay answers STUN Binding requests on the same UDP port that carries onion cells, so a
//! client behind a NAT learns its server-reflexive address from a node it already talks to.
//! [`is_stun`] tells the two kinds of datagram apart (RFC 7983 style, on the first byte and the
//! magic cookie); [`decode`] and [`Message::encode`] are the codec. Both are sans-IO: bytes in,
//! values out, and encoding writes into a caller-owned buffer without allocating.
//! [`server::reply`] is the relay's answer to a request, a pure function that relayd sends and
//! the client's tests use to play a relay.
//!
//! Supported: the RFC 8489 header and class/method interleaving, the address attributes (plain
//! and XOR'd), the RFC 5780 NAT-behaviour-discovery attributes, SOFTWARE, USERNAME, ERROR-CODE,
//! UNKNOWN-ATTRIBUTES and FINGERPRINT (verified on decode, appended on request on encode).
//! MESSAGE-INTEGRITY and MESSAGE-INTEGRITY-SHA256 are carried as opaque values and are never
//! verified: the relay does not authenticate STUN.

mod attr;
pub mod server;

pub use attr::Attribute;

use crate::codec::{CodecError, Reader, Writer};
use thiserror::Error;

/// The fixed magic cookie in bytes 4..8 of every RFC 5389/8489 message (RFC 8489 §5). Its
/// presence is what separates STUN from RFC 3489 traffic and from meshvpn cells.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the fixed STUN header: type, length, cookie, transaction id (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;
/// Value XOR'd into the CRC-32 of a FINGERPRINT attribute, ASCII "STUN" (RFC 8489 §14.7), so
/// that a FINGERPRINT never matches the CRC some other protocol puts at the same place.
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Most attributes [`decode`] accepts in one message; more is treated as an attack, not STUN.
pub const MAX_ATTRIBUTES: usize = 64;

/// The Binding method, the only method STUN itself defines (RFC 8489 §18.2).
pub const METHOD_BINDING: u16 = 0x001;
/// Message type of a Binding request (RFC 8489 §18.2).
pub const BINDING_REQUEST: u16 = 0x0001;
/// Message type of a Binding success response (RFC 8489 §18.2).
pub const BINDING_SUCCESS_RESPONSE: u16 = 0x0101;
/// Message type of a Binding error response (RFC 8489 §18.2).
pub const BINDING_ERROR_RESPONSE: u16 = 0x0111;

/// MAPPED-ADDRESS: the reflexive address, not XOR'd (RFC 8489 §14.1).
pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
/// CHANGE-REQUEST: asks the server to answer from its other IP and/or port (RFC 5780 §7.2).
pub const ATTR_CHANGE_REQUEST: u16 = 0x0003;
/// USERNAME: the short- or long-term credential's user name (RFC 8489 §14.3).
pub const ATTR_USERNAME: u16 = 0x0006;
/// MESSAGE-INTEGRITY: HMAC-SHA1 over the message (RFC 8489 §14.5).
pub const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
/// ERROR-CODE: class, number and reason phrase of an error response (RFC 8489 §14.8).
pub const ATTR_ERROR_CODE: u16 = 0x0009;
/// UNKNOWN-ATTRIBUTES: the comprehension-required types a 420 answer did not understand
/// (RFC 8489 §14.13).
pub const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
/// MESSAGE-INTEGRITY-SHA256: HMAC-SHA256, truncated to 16..=32 bytes (RFC 8489 §14.6).
pub const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
/// XOR-MAPPED-ADDRESS: the reflexive address XOR'd with the cookie and transaction id, so NATs
/// that rewrite addresses in payloads leave it alone (RFC 8489 §14.2).
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// PADDING: bytes to make the message larger, for MTU probing (RFC 5780 §7.6).
pub const ATTR_PADDING: u16 = 0x0026;
/// RESPONSE-PORT: the port the response should be sent to (RFC 5780 §7.5).
pub const ATTR_RESPONSE_PORT: u16 = 0x0027;
/// SOFTWARE: a textual description of the sender's software (RFC 8489 §14.14).
pub const ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT: CRC-32 of the message XOR [`FINGERPRINT_XOR`] (RFC 8489 §14.7).
pub const ATTR_FINGERPRINT: u16 = 0x8028;
/// RESPONSE-ORIGIN: the address the response was sent from (RFC 5780 §7.3).
pub const ATTR_RESPONSE_ORIGIN: u16 = 0x802B;
/// OTHER-ADDRESS: the server's alternate address and port (RFC 5780 §7.4).
pub const ATTR_OTHER_ADDRESS: u16 = 0x802C;

/// Why a datagram is not a valid STUN message, or a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StunError {
    /// Bounds-checked reading or writing failed (short input, or output buffer too small).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The two top bits of the message type are not zero (RFC 8489 §5), so it is not STUN.
    #[error("message type {0:#06x} has its top two bits set")]
    NotStun(u16),
    /// The magic cookie is wrong: an RFC 3489 message or not STUN at all.
    #[error("magic cookie is {0:#010x}, not 0x2112a442")]
    BadCookie(u32),
    /// The header's length field is not a multiple of 4 (RFC 8489 §5). Since every attribute
    /// is padded to 4 bytes, this is also how a misaligned last attribute shows.
    #[error("message length {0} is not a multiple of 4")]
    UnalignedLength(u16),
    /// The header's length field disagrees with the datagram.
    #[error("header says {header} bytes of attributes, datagram has {actual}")]
    LengthMismatch {
        /// Length from the header.
        header: u16,
        /// Bytes actually following the header.
        actual: usize,
    },
    /// An attribute's value runs past the end of the message.
    #[error("attribute {typ:#06x} of length {len} runs past the end ({remaining} bytes left)")]
    AttributeOverrun {
        /// Attribute type.
        typ: u16,
        /// Its declared value length.
        len: usize,
        /// Bytes left in the message after its header.
        remaining: usize,
    },
    /// A known attribute has a value length its definition does not allow.
    #[error("attribute {typ:#06x} has invalid length {len}")]
    BadAttributeLength {
        /// Attribute type.
        typ: u16,
        /// Its value length.
        len: usize,
    },
    /// An address attribute has a family other than 0x01 (IPv4) or 0x02 (IPv6).
    #[error("attribute {typ:#06x} has unknown address family {family:#04x}")]
    BadAddressFamily {
        /// Attribute type.
        typ: u16,
        /// The family byte.
        family: u8,
    },
    /// A text attribute (SOFTWARE, ERROR-CODE reason) is not UTF-8.
    #[error("attribute {typ:#06x} is not valid UTF-8")]
    BadUtf8 {
        /// Attribute type.
        typ: u16,
    },
    /// ERROR-CODE is outside 300..=699 (class 3..=6, number 0..=99; RFC 8489 §14.8).
    #[error("invalid error code {0}")]
    BadErrorCode(u16),
    /// More than [`MAX_ATTRIBUTES`] attributes.
    #[error("more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes,
    /// An attribute follows FINGERPRINT, which must be last (RFC 8489 §14.7).
    #[error("FINGERPRINT is not the last attribute")]
    FingerprintNotLast,
    /// The FINGERPRINT value is not the CRC-32 of the message.
    #[error("FINGERPRINT is {found:#010x}, message gives {expected:#010x}")]
    FingerprintMismatch {
        /// Value computed over the message.
        expected: u32,
        /// Value in the attribute.
        found: u32,
    },
    /// An attribute other than MESSAGE-INTEGRITY-SHA256 or FINGERPRINT follows
    /// MESSAGE-INTEGRITY, or one other than FINGERPRINT follows MESSAGE-INTEGRITY-SHA256.
    #[error("attribute {0:#06x} follows a MESSAGE-INTEGRITY attribute")]
    AfterIntegrity(u16),
    /// The method does not fit in 12 bits (encoding only).
    #[error("method {0:#x} does not fit in 12 bits")]
    BadMethod(u16),
    /// The encoded message would exceed the 16-bit length field (encoding only).
    #[error("message of {0} bytes of attributes is too long")]
    TooLong(usize),
}

/// The class of a message, the two C bits of the message type (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request, expecting a response (C1 C0 = 0b00).
    Request,
    /// An indication, expecting nothing (0b01).
    Indication,
    /// A success response (0b10).
    SuccessResponse,
    /// An error response, carrying ERROR-CODE (0b11).
    ErrorResponse,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::SuccessResponse => 0b10,
            Class::ErrorResponse => 0b11,
        }
    }

    fn from_bits(bits: u16) -> Class {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::SuccessResponse,
            _ => Class::ErrorResponse,
        }
    }
}

/// Splits a message type into class and 12-bit method. RFC 8489 §5 interleaves them as
/// `M11..M7 C1 M6..M4 C0 M3..M0` below the two zero bits, for RFC 3489 compatibility.
fn split_type(typ: u16) -> (Class, u16) {
    let method = (typ & 0x000F) | ((typ & 0x00E0) >> 1) | ((typ & 0x3E00) >> 2);
    let class = ((typ >> 7) & 0b10) | ((typ >> 4) & 0b01);
    (Class::from_bits(class), method)
}

/// The inverse of [`split_type`]; fails if `method` does not fit in 12 bits.
fn join_type(class: Class, method: u16) -> Result<u16, StunError> {
    if method > 0x0FFF {
        return Err(StunError::BadMethod(method));
    }
    let c = class.bits();
    Ok((method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | ((c & 0b01) << 4) | ((c & 0b10) << 7))
}

/// A decoded STUN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Request, indication, success or error response.
    pub class: Class,
    /// The 12-bit method; [`METHOD_BINDING`] is the only one the relay answers.
    pub method: u16,
    /// The 96-bit transaction id that pairs a response with its request.
    pub transaction_id: [u8; 12],
    /// Attributes in wire order. On decode this includes a verified [`Attribute::Fingerprint`]
    /// if one was present; on encode FINGERPRINT entries here are skipped (see
    /// [`Message::encode`]).
    pub attributes: Vec<Attribute>,
}

impl Message {
    /// A Binding request with no attributes, as a client sends it (RFC 8489 §6.1).
    pub fn binding_request(transaction_id: [u8; 12]) -> Message {
        Message { class: Class::Request, method: METHOD_BINDING, transaction_id, attributes: Vec::new() }
    }

    /// A Binding success response telling the client it was seen from `reflexive`, carried in
    /// XOR-MAPPED-ADDRESS (RFC 8489 §6.3.1.1).
    pub fn binding_success(transaction_id: [u8; 12], reflexive: std::net::SocketAddr) -> Message {
        Message {
            class: Class::SuccessResponse,
            method: METHOD_BINDING,
            transaction_id,
            attributes: vec![Attribute::XorMappedAddress(reflexive)],
        }
    }

    /// A Binding error response with ERROR-CODE `code` and `reason` (RFC 8489 §6.3.1.1); for
    /// 420 the caller adds [`Attribute::UnknownAttributes`].
    pub fn binding_error(transaction_id: [u8; 12], code: u16, reason: &str) -> Message {
        Message {
            class: Class::ErrorResponse,
            method: METHOD_BINDING,
            transaction_id,
            attributes: vec![Attribute::ErrorCode { code, reason: reason.to_owned() }],
        }
    }

    /// Appends `attribute` and returns the message, for building responses in one expression.
    #[must_use]
    pub fn with(mut self, attribute: Attribute) -> Message {
        self.attributes.push(attribute);
        self
    }

    /// The reflexive address of a response: XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS if only that
    /// is present (RFC 8489 §14.1 keeps the latter for old servers).
    pub fn reflexive_address(&self) -> Option<std::net::SocketAddr> {
        let find = |want_xor: bool| {
            self.attributes.iter().find_map(|a| match a {
                Attribute::XorMappedAddress(s) if want_xor => Some(*s),
                Attribute::MappedAddress(s) if !want_xor => Some(*s),
                _ => None,
            })
        };
        find(true).or_else(|| find(false))
    }

    /// The comprehension-required attribute types (below 0x8000) this codec does not know. A
    /// server answers a request that has any with a 420 error listing them (RFC 8489 §6.3.1);
    /// a client treats a response that has any as failed.
    pub fn unknown_required(&self) -> Vec<u16> {
        self.attributes
            .iter()
            .filter_map(|a| match a {
                Attribute::Unknown { typ, .. } if *typ < 0x8000 => Some(*typ),
                _ => None,
            })
            .collect()
    }

    /// Encodes the message into `out` and returns the number of bytes written. Nothing is
    /// allocated.
    ///
    /// Attributes are written in order, each padded with zeros to a 4-byte boundary. Any
    /// [`Attribute::Fingerprint`] in `attributes` is skipped, since its value depends on the
    /// exact bytes; with `fingerprint` set a fresh FINGERPRINT is appended, computed with the
    /// header length already covering it (RFC 8489 §14.7). Fails if `out` is too small, the
    /// method exceeds 12 bits, an attribute value is invalid or too long, or attributes follow
    /// MESSAGE-INTEGRITY in a way [`decode`] would reject.
    pub fn encode(&self, out: &mut [u8], fingerprint: bool) -> Result<usize, StunError> {
        let typ = join_type(self.class, self.method)?;
        // First pass: validate and size everything, so the header length is written once.
        let mut body = 0usize;
        let mut count = usize::from(fingerprint);
        let mut order = Integrity::None;
        for a in self.attributes.iter().filter(|a| !a.is_fingerprint()) {
            order = order.next(a.typ())?;
            let len = a.value_len()?;
            body = body.saturating_add(4 + len + pad(len));
            count += 1;
        }
        if count > MAX_ATTRIBUTES {
            return Err(StunError::TooManyAttributes);
        }
        if fingerprint {
            body = body.saturating_add(8);
        }
        let len = u16::try_from(body).map_err(|_| StunError::TooLong(body))?;

        let mut w = Writer::new(out);
        w.u16(typ, "message type")?;
        w.u16(len, "message length")?;
        w.u32(MAGIC_COOKIE, "magic cookie")?;
        w.put(&self.transaction_id, "transaction id")?;
        for a in self.attributes.iter().filter(|a| !a.is_fingerprint()) {
            a.encode(&mut w, &self.transaction_id)?;
        }
        let pos = w.position();
        if !fingerprint {
            return Ok(pos);
        }
        let crc = crc32(out.get(..pos).ok_or(CodecError::NoSpace("FINGERPRINT"))?) ^ FINGERPRINT_XOR;
        let tail = out.get_mut(pos..).ok_or(CodecError::NoSpace("FINGERPRINT"))?;
        let mut w = Writer::new(tail);
        w.u16(ATTR_FINGERPRINT, "FINGERPRINT")?;
        w.u16(4, "FINGERPRINT")?;
        w.u32(crc, "FINGERPRINT")?;
        Ok(pos + 8)
    }
}

/// Where we are relative to the integrity attributes, whose position RFC 8489 §14.5/§14.6 fix:
/// after MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and FINGERPRINT may follow, after
/// MESSAGE-INTEGRITY-SHA256 only FINGERPRINT.
#[derive(Clone, Copy)]
enum Integrity {
    None,
    Sha1,
    Sha256,
}

impl Integrity {
    /// The state after an attribute of type `typ` (never FINGERPRINT, handled by the caller).
    fn next(self, typ: u16) -> Result<Integrity, StunError> {
        match (self, typ) {
            (Integrity::None, ATTR_MESSAGE_INTEGRITY) => Ok(Integrity::Sha1),
            (Integrity::None | Integrity::Sha1, ATTR_MESSAGE_INTEGRITY_SHA256) => Ok(Integrity::Sha256),
            (Integrity::None, _) => Ok(Integrity::None),
            _ => Err(StunError::AfterIntegrity(typ)),
        }
    }
}

/// Padding bytes after a value of `len` bytes, to the next 4-byte boundary (RFC 8489 §14).
fn pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Whether `datagram` is a STUN message, for demultiplexing the relay's shared UDP port
/// (RFC 7983 style).
///
/// True iff it is at least 20 bytes, its first byte is 0..=3 (top two bits zero, RFC 8489 §5),
/// bytes 4..8 are [`MAGIC_COOKIE`], and the length field (bytes 2..4) is a multiple of 4 equal to
/// the datagram length minus 20. This is unambiguous against meshvpn cells: a cell starts with
/// its link circuit id, whose top two bits are never both zero, so its first byte is always
/// 0x40 or more. Attributes are not looked at; [`decode`] does that.
pub fn is_stun(datagram: &[u8]) -> bool {
    let mut r = Reader::new(datagram);
    let (Ok(typ), Ok(len), Ok(cookie)) = (r.u16(""), r.u16(""), r.u32("")) else {
        return false;
    };
    datagram.len() >= HEADER_LEN
        && typ & 0xC000 == 0
        && cookie == MAGIC_COOKIE
        && len % 4 == 0
        && usize::from(len) == datagram.len() - HEADER_LEN
}

/// Decodes and validates one STUN message; every malformed input is an error, never a panic.
///
/// Checks the header as [`is_stun`] does (with a precise error), then each attribute: it must
/// fit with its padding (padding bytes are ignored, as RFC 8489 §14 requires), known attributes
/// must have valid lengths, address families and UTF-8 text, at most [`MAX_ATTRIBUTES`] may
/// appear, nothing but MESSAGE-INTEGRITY-SHA256/FINGERPRINT may follow MESSAGE-INTEGRITY and
/// nothing but FINGERPRINT may follow MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.5/§14.6 say to
/// ignore such attributes; this codec rejects the message, as no sender has a reason to put them
/// there), and FINGERPRINT must be last and match.
///
/// Unknown attributes are not an error: they come back as [`Attribute::Unknown`], and the caller
/// decides. Unknown comprehension-required ones (type below 0x8000, see
/// [`Message::unknown_required`]) MUST make a server answer 420 and a client fail the
/// transaction (RFC 8489 §6.3.1, §6.3.3). MESSAGE-INTEGRITY values are not verified.
pub fn decode(datagram: &[u8]) -> Result<Message, StunError> {
    let mut r = Reader::new(datagram);
    let typ = r.u16("message type")?;
    let len = r.u16("message length")?;
    let cookie = r.u32("magic cookie")?;
    let transaction_id = r.array::<12>("transaction id")?;
    if typ & 0xC000 != 0 {
        return Err(StunError::NotStun(typ));
    }
    if cookie != MAGIC_COOKIE {
        return Err(StunError::BadCookie(cookie));
    }
    if len % 4 != 0 {
        return Err(StunError::UnalignedLength(len));
    }
    if usize::from(len) != r.remaining() {
        return Err(StunError::LengthMismatch { header: len, actual: r.remaining() });
    }
    let (class, method) = split_type(typ);

    let mut attributes = Vec::new();
    let mut order = Integrity::None;
    while r.remaining() > 0 {
        if attributes.len() >= MAX_ATTRIBUTES {
            return Err(StunError::TooManyAttributes);
        }
        // Everything before this attribute: what a FINGERPRINT here covers.
        let start = datagram.len() - r.remaining();
        let atyp = r.u16("attribute type")?;
        let alen = usize::from(r.u16("attribute length")?);
        if alen > r.remaining() {
            return Err(StunError::AttributeOverrun { typ: atyp, len: alen, remaining: r.remaining() });
        }
        // The padding always fits: the header length is a multiple of 4 and every attribute
        // before this one was padded, so `r.remaining()` is too.
        let value = r.take(alen, "attribute value")?;
        r.take(pad(alen), "attribute padding")?;

        if atyp == ATTR_FINGERPRINT {
            if r.remaining() != 0 {
                return Err(StunError::FingerprintNotLast);
            }
            let Attribute::Fingerprint(found) = Attribute::decode(atyp, value, &transaction_id)? else {
                return Err(StunError::BadAttributeLength { typ: atyp, len: alen });
            };
            // FINGERPRINT is last, so the received header length already covers it, exactly
            // as the sender had it when computing the CRC (RFC 8489 §14.7).
            let covered = datagram.get(..start).ok_or(CodecError::Truncated("FINGERPRINT"))?;
            let expected = crc32(covered) ^ FINGERPRINT_XOR;
            if found != expected {
                return Err(StunError::FingerprintMismatch { expected, found });
            }
            attributes.push(Attribute::Fingerprint(found));
            continue;
        }
        order = order.next(atyp)?;
        attributes.push(Attribute::decode(atyp, value, &transaction_id)?);
    }
    Ok(Message { class, method, transaction_id, attributes })
}

/// The CRC-32 lookup table (IEEE 802.3, reflected polynomial 0xEDB88320), built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

/// The CRC-32 that FINGERPRINT uses (RFC 8489 §14.7 refers to ITU V.42, the same as zlib's).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c = CRC_TABLE[usize::from((c as u8) ^ b)] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn type_interleaving() {
        assert_eq!(split_type(BINDING_REQUEST), (Class::Request, METHOD_BINDING));
        assert_eq!(split_type(0x0011), (Class::Indication, METHOD_BINDING));
        assert_eq!(split_type(BINDING_SUCCESS_RESPONSE), (Class::SuccessResponse, 1));
        assert_eq!(split_type(BINDING_ERROR_RESPONSE), (Class::ErrorResponse, 1));
        // TURN Allocate (0x003) error response is 0x0113 (RFC 8656 §17).
        assert_eq!(split_type(0x0113), (Class::ErrorResponse, 0x003));
        for t in 0..0x4000u16 {
            let (c, m) = split_type(t);
            assert_eq!(join_type(c, m), Ok(t));
        }
        assert_eq!(join_type(Class::Request, 0x1000), Err(StunError::BadMethod(0x1000)));
    }
}
