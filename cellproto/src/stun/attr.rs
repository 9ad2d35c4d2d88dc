//! STUN attributes: the typed values and their TLV encoding (RFC 8489 §14, RFC 5780 §7).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{
    ATTR_CHANGE_REQUEST, ATTR_ERROR_CODE, ATTR_FINGERPRINT, ATTR_MAPPED_ADDRESS, ATTR_MESSAGE_INTEGRITY,
    ATTR_MESSAGE_INTEGRITY_SHA256, ATTR_OTHER_ADDRESS, ATTR_PADDING, ATTR_RESPONSE_ORIGIN, ATTR_RESPONSE_PORT,
    ATTR_SOFTWARE, ATTR_UNKNOWN_ATTRIBUTES, ATTR_USERNAME, ATTR_XOR_MAPPED_ADDRESS, MAGIC_COOKIE, StunError, pad,
};
use crate::codec::{Reader, Writer};

/// Longest SOFTWARE value or ERROR-CODE reason phrase: fewer than 128 characters, which is at
/// most 763 bytes of UTF-8 (RFC 8489 §14.8, §14.14).
const MAX_TEXT: usize = 763;
/// Longest USERNAME: "fewer than 509 bytes" (RFC 8489 §14.3).
const MAX_USERNAME: usize = 508;
/// Address family byte for IPv4 (RFC 8489 §14.1).
const FAMILY_V4: u8 = 0x01;
/// Address family byte for IPv6 (RFC 8489 §14.1).
const FAMILY_V6: u8 = 0x02;
/// CHANGE-REQUEST flag asking for a response from the other IP address (RFC 5780 §7.2).
const CHANGE_IP: u32 = 0x4;
/// CHANGE-REQUEST flag asking for a response from the other port (RFC 5780 §7.2).
const CHANGE_PORT: u32 = 0x2;

/// One STUN attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// MAPPED-ADDRESS (0x0001): the reflexive address in the clear (RFC 8489 §14.1).
    MappedAddress(SocketAddr),
    /// XOR-MAPPED-ADDRESS (0x0020): the reflexive address, XOR'd on the wire with the magic
    /// cookie (port, IPv4) or cookie and transaction id (IPv6) (RFC 8489 §14.2).
    XorMappedAddress(SocketAddr),
    /// CHANGE-REQUEST (0x0003, RFC 5780 §7.2). Other flag bits are ignored on decode.
    ChangeRequest {
        /// Answer from the server's other IP address.
        change_ip: bool,
        /// Answer from the server's other port.
        change_port: bool,
    },
    /// RESPONSE-ORIGIN (0x802B): where the response was sent from (RFC 5780 §7.3).
    ResponseOrigin(SocketAddr),
    /// OTHER-ADDRESS (0x802C): the server's alternate address and port (RFC 5780 §7.4).
    OtherAddress(SocketAddr),
    /// RESPONSE-PORT (0x0027): the port to send the response to (RFC 5780 §7.5).
    ResponsePort(u16),
    /// PADDING (0x0026) of this many bytes; the contents are ignored and encoded as zeros
    /// (RFC 5780 §7.6).
    Padding(usize),
    /// SOFTWARE (0x8022): UTF-8 description of the sender, at most 763 bytes (RFC 8489 §14.14).
    Software(String),
    /// USERNAME (0x0006): must be UTF-8 of fewer than 509 bytes, kept as bytes (RFC 8489
    /// §14.3).
    Username(Vec<u8>),
    /// ERROR-CODE (0x0009): `code` is class * 100 + number, in 300..=699, and a UTF-8 reason
    /// of at most 763 bytes (RFC 8489 §14.8).
    ErrorCode {
        /// The error code, e.g. 420.
        code: u16,
        /// The reason phrase.
        reason: String,
    },
    /// UNKNOWN-ATTRIBUTES (0x000A): types a 420 response did not understand (RFC 8489 §14.13).
    UnknownAttributes(Vec<u16>),
    /// MESSAGE-INTEGRITY (0x0008): the HMAC-SHA1, carried but not verified (RFC 8489 §14.5).
    MessageIntegrity([u8; 20]),
    /// MESSAGE-INTEGRITY-SHA256 (0x001C): 16..=32 bytes, a multiple of 4, carried but not
    /// verified (RFC 8489 §14.6).
    MessageIntegritySha256(Vec<u8>),
    /// FINGERPRINT (0x8028): on decode, the verified CRC value; ignored by
    /// [`Message::encode`](super::Message::encode), which computes its own (RFC 8489 §14.7).
    Fingerprint(u32),
    /// Any other attribute, value without padding. A `typ` below 0x8000 is
    /// comprehension-required: see [`Message::unknown_required`](super::Message::unknown_required).
    /// Encoding writes it as is, so `typ` should not be one of the known types above.
    Unknown {
        /// Attribute type.
        typ: u16,
        /// Raw value.
        value: Vec<u8>,
    },
}

impl Attribute {
    /// The attribute's type code on the wire.
    pub fn typ(&self) -> u16 {
        match self {
            Attribute::MappedAddress(_) => ATTR_MAPPED_ADDRESS,
            Attribute::XorMappedAddress(_) => ATTR_XOR_MAPPED_ADDRESS,
            Attribute::ChangeRequest { .. } => ATTR_CHANGE_REQUEST,
            Attribute::ResponseOrigin(_) => ATTR_RESPONSE_ORIGIN,
            Attribute::OtherAddress(_) => ATTR_OTHER_ADDRESS,
            Attribute::ResponsePort(_) => ATTR_RESPONSE_PORT,
            Attribute::Padding(_) => ATTR_PADDING,
            Attribute::Software(_) => ATTR_SOFTWARE,
            Attribute::Username(_) => ATTR_USERNAME,
            Attribute::ErrorCode { .. } => ATTR_ERROR_CODE,
            Attribute::UnknownAttributes(_) => ATTR_UNKNOWN_ATTRIBUTES,
            Attribute::MessageIntegrity(_) => ATTR_MESSAGE_INTEGRITY,
            Attribute::MessageIntegritySha256(_) => ATTR_MESSAGE_INTEGRITY_SHA256,
            Attribute::Fingerprint(_) => ATTR_FINGERPRINT,
            Attribute::Unknown { typ, .. } => *typ,
        }
    }

    pub(super) fn is_fingerprint(&self) -> bool {
        matches!(self, Attribute::Fingerprint(_))
    }

    /// Parses the value (padding already removed) of an attribute of type `typ`.
    pub(super) fn decode(typ: u16, value: &[u8], txid: &[u8; 12]) -> Result<Self, StunError> {
        let bad_len = || StunError::BadAttributeLength { typ, len: value.len() };
        let exact = |n: usize| {
            if value.len() == n { Ok(()) } else { Err(bad_len()) }
        };
        let mut r = Reader::new(value);
        Ok(match typ {
            ATTR_MAPPED_ADDRESS => Attribute::MappedAddress(address(typ, value, None)?),
            ATTR_XOR_MAPPED_ADDRESS => Attribute::XorMappedAddress(address(typ, value, Some(txid))?),
            ATTR_RESPONSE_ORIGIN => Attribute::ResponseOrigin(address(typ, value, None)?),
            ATTR_OTHER_ADDRESS => Attribute::OtherAddress(address(typ, value, None)?),
            ATTR_CHANGE_REQUEST => {
                exact(4)?;
                let flags = r.u32("CHANGE-REQUEST")?;
                Attribute::ChangeRequest { change_ip: flags & CHANGE_IP != 0, change_port: flags & CHANGE_PORT != 0 }
            }
            ATTR_RESPONSE_PORT => {
                exact(4)?;
                Attribute::ResponsePort(r.u16("RESPONSE-PORT")?)
            }
            ATTR_PADDING => Attribute::Padding(value.len()),
            ATTR_SOFTWARE => Attribute::Software(text(typ, value)?),
            ATTR_USERNAME => {
                check_username(value)?;
                Attribute::Username(value.to_vec())
            }
            ATTR_ERROR_CODE => {
                // 21 reserved bits (ignored), 3-bit class, 8-bit number, then the reason.
                let (Ok(_reserved), Ok(class), Ok(number)) = (r.u16(""), r.u8(""), r.u8("")) else {
                    return Err(bad_len());
                };
                let (class, number) = (u16::from(class & 0x7), u16::from(number));
                let code = class * 100 + number;
                if !(3..=6).contains(&class) || number > 99 {
                    return Err(StunError::BadErrorCode(code));
                }
                Attribute::ErrorCode { code, reason: text(typ, r.rest())? }
            }
            ATTR_UNKNOWN_ATTRIBUTES => {
                if value.len() % 2 != 0 {
                    return Err(bad_len());
                }
                let mut types = Vec::with_capacity(value.len() / 2);
                while r.remaining() > 0 {
                    types.push(r.u16("UNKNOWN-ATTRIBUTES")?);
                }
                Attribute::UnknownAttributes(types)
            }
            ATTR_MESSAGE_INTEGRITY => {
                exact(20)?;
                Attribute::MessageIntegrity(r.array("MESSAGE-INTEGRITY")?)
            }
            ATTR_MESSAGE_INTEGRITY_SHA256 => {
                if !(16..=32).contains(&value.len()) || value.len() % 4 != 0 {
                    return Err(bad_len());
                }
                Attribute::MessageIntegritySha256(value.to_vec())
            }
            ATTR_FINGERPRINT => {
                exact(4)?;
                Attribute::Fingerprint(r.u32("FINGERPRINT")?)
            }
            _ => Attribute::Unknown { typ, value: value.to_vec() },
        })
    }

    /// Length of the value without padding; validates what encoding would write, so that what
    /// [`Attribute::encode`] produces always decodes.
    pub(super) fn value_len(&self) -> Result<usize, StunError> {
        let typ = self.typ();
        let len = match self {
            Attribute::MappedAddress(a)
            | Attribute::XorMappedAddress(a)
            | Attribute::ResponseOrigin(a)
            | Attribute::OtherAddress(a) => match a {
                SocketAddr::V4(_) => 8,
                SocketAddr::V6(_) => 20,
            },
            Attribute::ChangeRequest { .. } | Attribute::ResponsePort(_) => 4,
            Attribute::Fingerprint(_) => 4,
            Attribute::Padding(n) => *n,
            Attribute::Software(s) => check_text(typ, s)?,
            Attribute::Username(u) => check_username(u)?,
            Attribute::ErrorCode { code, reason } => {
                if !(300..=699).contains(code) {
                    return Err(StunError::BadErrorCode(*code));
                }
                4 + check_text(typ, reason)?
            }
            Attribute::UnknownAttributes(t) => 2 * t.len(),
            Attribute::MessageIntegrity(_) => 20,
            Attribute::MessageIntegritySha256(v) => {
                if !(16..=32).contains(&v.len()) || v.len() % 4 != 0 {
                    return Err(StunError::BadAttributeLength { typ, len: v.len() });
                }
                v.len()
            }
            Attribute::Unknown { value, .. } => value.len(),
        };
        if len > usize::from(u16::MAX) {
            return Err(StunError::BadAttributeLength { typ, len });
        }
        Ok(len)
    }

    /// Writes type, length, value and zero padding.
    pub(super) fn encode(&self, w: &mut Writer<'_>, txid: &[u8; 12]) -> Result<(), StunError> {
        let len = self.value_len()?;
        let len16 = u16::try_from(len).map_err(|_| StunError::BadAttributeLength { typ: self.typ(), len })?;
        w.u16(self.typ(), "attribute type")?;
        w.u16(len16, "attribute length")?;
        match self {
            Attribute::MappedAddress(a) | Attribute::ResponseOrigin(a) | Attribute::OtherAddress(a) => {
                put_address(w, *a, None)?;
            }
            Attribute::XorMappedAddress(a) => put_address(w, *a, Some(txid))?,
            Attribute::ChangeRequest { change_ip, change_port } => {
                let ip = if *change_ip { CHANGE_IP } else { 0 };
                let port = if *change_port { CHANGE_PORT } else { 0 };
                w.u32(ip | port, "CHANGE-REQUEST")?;
            }
            Attribute::ResponsePort(p) => {
                w.u16(*p, "RESPONSE-PORT")?;
                w.u16(0, "RESPONSE-PORT")?;
            }
            Attribute::Padding(n) => zeros(w, *n, "PADDING")?,
            Attribute::Software(s) => w.put(s.as_bytes(), "SOFTWARE")?,
            Attribute::Username(u) => w.put(u, "USERNAME")?,
            Attribute::ErrorCode { code, reason } => {
                w.u16(0, "ERROR-CODE")?;
                w.u8(u8::try_from(code / 100).unwrap_or(0), "ERROR-CODE")?;
                w.u8(u8::try_from(code % 100).unwrap_or(0), "ERROR-CODE")?;
                w.put(reason.as_bytes(), "ERROR-CODE")?;
            }
            Attribute::UnknownAttributes(types) => {
                for t in types {
                    w.u16(*t, "UNKNOWN-ATTRIBUTES")?;
                }
            }
            Attribute::MessageIntegrity(v) => w.put(v, "MESSAGE-INTEGRITY")?,
            Attribute::MessageIntegritySha256(v) => w.put(v, "MESSAGE-INTEGRITY-SHA256")?,
            Attribute::Fingerprint(v) => w.u32(*v, "FINGERPRINT")?,
            Attribute::Unknown { value, .. } => w.put(value, "attribute value")?,
        }
        zeros(w, pad(len), "attribute padding")
    }
}

/// Appends `n` zero bytes.
fn zeros(w: &mut Writer<'_>, n: usize, what: &'static str) -> Result<(), StunError> {
    const Z: [u8; 64] = [0; 64];
    let mut left = n;
    while left > 0 {
        let k = left.min(Z.len());
        w.put(Z.get(..k).unwrap_or_default(), what)?;
        left -= k;
    }
    Ok(())
}

/// Checks a text value's length for encoding and returns it.
fn check_text(typ: u16, s: &str) -> Result<usize, StunError> {
    if s.len() > MAX_TEXT {
        return Err(StunError::BadAttributeLength { typ, len: s.len() });
    }
    Ok(s.len())
}

/// Checks a USERNAME value: UTF-8 of fewer than 509 bytes (RFC 8489 §14.3). It stays bytes in
/// [`Attribute::Username`] because credentials are compared byte for byte.
fn check_username(value: &[u8]) -> Result<usize, StunError> {
    if value.len() > MAX_USERNAME {
        return Err(StunError::BadAttributeLength { typ: ATTR_USERNAME, len: value.len() });
    }
    std::str::from_utf8(value).map_err(|_| StunError::BadUtf8 { typ: ATTR_USERNAME })?;
    Ok(value.len())
}

/// Parses a UTF-8 text value of at most [`MAX_TEXT`] bytes.
fn text(typ: u16, value: &[u8]) -> Result<String, StunError> {
    if value.len() > MAX_TEXT {
        return Err(StunError::BadAttributeLength { typ, len: value.len() });
    }
    String::from_utf8(value.to_vec()).map_err(|_| StunError::BadUtf8 { typ })
}

/// The XOR mask for an address: the cookie followed by the transaction id (RFC 8489 §14.2).
fn mask(txid: &[u8; 12]) -> [u8; 16] {
    let mut m = [0u8; 16];
    let (cookie, rest) = m.split_at_mut(4);
    cookie.copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    rest.copy_from_slice(txid);
    m
}

/// XORs `bytes` with the start of `mask`, if there is a mask.
fn xor<const N: usize>(mut bytes: [u8; N], mask: Option<&[u8; 16]>) -> [u8; N] {
    if let Some(m) = mask {
        for (b, k) in bytes.iter_mut().zip(m) {
            *b ^= k;
        }
    }
    bytes
}

/// Parses an address value: reserved byte (ignored), family, port, address (RFC 8489 §14.1),
/// XOR'd when `txid` is given (RFC 8489 §14.2).
fn address(typ: u16, value: &[u8], txid: Option<&[u8; 12]>) -> Result<SocketAddr, StunError> {
    let m = txid.map(mask);
    let mut r = Reader::new(value);
    let bad_len = StunError::BadAttributeLength { typ, len: value.len() };
    let (Ok(_reserved), Ok(family), Ok(port)) = (r.u8(""), r.u8(""), r.array::<2>("")) else {
        return Err(bad_len);
    };
    let port = u16::from_be_bytes(xor(port, m.as_ref()));
    let ip = match (family, r.remaining()) {
        (FAMILY_V4, 4) => IpAddr::V4(Ipv4Addr::from(xor(r.array::<4>("IPv4")?, m.as_ref()))),
        (FAMILY_V6, 16) => IpAddr::V6(Ipv6Addr::from(xor(r.array::<16>("IPv6")?, m.as_ref()))),
        (FAMILY_V4 | FAMILY_V6, _) => return Err(bad_len),
        (family, _) => return Err(StunError::BadAddressFamily { typ, family }),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Writes an address value, XOR'd when `txid` is given. IPv6 flow info and scope id are not
/// carried.
fn put_address(w: &mut Writer<'_>, addr: SocketAddr, txid: Option<&[u8; 12]>) -> Result<(), StunError> {
    let m = txid.map(mask);
    let family = if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
    w.u8(0, "address")?;
    w.u8(family, "address")?;
    w.put(&xor(addr.port().to_be_bytes(), m.as_ref()), "address")?;
    match addr.ip() {
        IpAddr::V4(ip) => w.put(&xor(ip.octets(), m.as_ref()), "address")?,
        IpAddr::V6(ip) => w.put(&xor(ip.octets(), m.as_ref()), "address")?,
    }
    Ok(())
}
