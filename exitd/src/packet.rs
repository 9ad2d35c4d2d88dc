//! Looking inside the IP packets circuits carry, with `pnet`: enough to route, police and
//! anti-spoof them (source, destination, transport protocol, destination port, fragment), with
//! every malformed packet an error — truncated headers, wrong versions, lengths that do not
//! match the bytes, and transport headers cut short.
//!
//! IPv6: the whole extension header chain is walked (RFC 8200 §4; RFC 7045): hop-by-hop
//! (first only), routing, fragment, destination options, and the other headers in the same
//! generic format (mobility, HIP, shim6, the experimental 253 and 254). The walk is bounded by
//! the packet (every header is at least 8 bytes), not by a count: a port behind any number of
//! headers is found. AH and ESP end the walk (the exit refuses AH, which masquerading breaks,
//! and cannot look inside ESP); so does any other number, which the policy then judges as the
//! protocol. A later fragment carries no transport header: it is reported as such, never as a
//! packet "without ports".

use pnet_packet::Packet;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;
use std::net::IpAddr;
use thiserror::Error;

/// IPv6 extension headers in the generic format (next header, length in 8-octet units − 1):
/// hop-by-hop, routing, destination options, mobility, HIP, shim6, experimental.
const GENERIC_EXTENSIONS: [u8; 8] = [0, 43, 60, 135, 139, 140, 253, 254];
/// IPv6 fragment header.
const FRAGMENT: u8 = 44;

/// Why a packet was refused (each is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PacketError {
    /// No bytes.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("IP version {0} is not 4 or 6")]
    BadVersion(u8),
    /// Shorter than its own header, or an extension header longer than the packet.
    #[error("truncated header")]
    Truncated,
    /// The header's length fields disagree with the packet's size.
    #[error("length fields claim {claimed} bytes, packet has {actual}")]
    BadLength {
        /// What the header says.
        claimed: usize,
        /// What arrived.
        actual: usize,
    },
    /// A TCP, UDP, SCTP, DCCP or UDP-Lite header shorter than its minimum in an unfragmented
    /// packet or a first fragment: its port would be hidden (RFC 7112 for first fragments).
    #[error("transport header cut short")]
    TruncatedTransport,
    /// An IPv6 header chain no host would accept: hop-by-hop not first, two fragment headers.
    #[error("invalid IPv6 extension header chain")]
    BadExtensions,
}

impl PacketError {
    /// Stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            PacketError::Empty => "empty",
            PacketError::BadVersion(_) => "bad_version",
            PacketError::Truncated => "truncated",
            PacketError::BadLength { .. } => "bad_length",
            PacketError::TruncatedTransport => "truncated_transport",
            PacketError::BadExtensions => "bad_extensions",
        }
    }
}

/// Where a packet sits in a fragmented datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented (or an IPv6 atomic fragment: offset 0, no more fragments).
    Whole,
    /// The first fragment (offset 0, more to come), with the datagram's identification.
    First(u32),
    /// A later fragment (offset > 0): no transport header in it.
    Later(u32),
}

/// What the exit needs to know about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol number (after IPv6 extension headers; for a later IPv6 fragment,
    /// the fragment header's next header).
    pub protocol: u8,
    /// Destination port for TCP, UDP, SCTP, DCCP and UDP-Lite: always present for those
    /// protocols, except in a later fragment.
    pub dst_port: Option<u16>,
    /// Fragmentation.
    pub fragment: Fragment,
}

/// Parses and validates an IPv4 or IPv6 packet.
pub fn inspect(packet: &[u8]) -> Result<PacketInfo, PacketError> {
    let first = *packet.first().ok_or(PacketError::Empty)?;
    match first >> 4 {
        4 => inspect_v4(packet),
        6 => inspect_v6(packet),
        v => Err(PacketError::BadVersion(v)),
    }
}

/// Only the destination address of an IPv4 or IPv6 packet (the backward path routes by it and
/// needs nothing else); `None` if the packet is too short or not IP.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => <[u8; 4]>::try_from(packet.get(16..20)?).ok().map(IpAddr::from),
        6 => <[u8; 16]>::try_from(packet.get(24..40)?).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The shortest header of the transport protocols with ports (destination port at bytes 2–3).
pub const fn port_header_len(protocol: u8) -> Option<usize> {
    match protocol {
        6 => Some(20),        // TCP
        17 | 136 => Some(8),  // UDP, UDP-Lite
        33 | 132 => Some(12), // DCCP (generic header), SCTP (common header)
        _ => None,
    }
}

/// The destination port of `transport`, or an error if the protocol has ports and the header
/// is cut short.
fn ports(protocol: u8, transport: &[u8]) -> Result<Option<u16>, PacketError> {
    let Some(min) = port_header_len(protocol) else { return Ok(None) };
    if transport.len() < min {
        return Err(PacketError::TruncatedTransport);
    }
    Ok(Some(u16::from_be_bytes([transport[2], transport[3]])))
}

fn inspect_v4(packet: &[u8]) -> Result<PacketInfo, PacketError> {
    let ip = Ipv4Packet::new(packet).ok_or(PacketError::Truncated)?;
    let header = usize::from(ip.get_header_length()) * 4;
    if header < 20 || header > packet.len() {
        return Err(PacketError::Truncated);
    }
    let total = usize::from(ip.get_total_length());
    if total != packet.len() {
        return Err(PacketError::BadLength { claimed: total, actual: packet.len() });
    }
    let protocol = ip.get_next_level_protocol().0;
    let id = u32::from(ip.get_identification());
    let more = ip.get_flags() & 1 != 0;
    let fragment = match (ip.get_fragment_offset(), more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First(id),
        _ => Fragment::Later(id),
    };
    let dst_port = match fragment {
        Fragment::Later(_) => None,
        _ => ports(protocol, &packet[header..])?,
    };
    Ok(PacketInfo { src: ip.get_source().into(), dst: ip.get_destination().into(), protocol, dst_port, fragment })
}

fn inspect_v6(packet: &[u8]) -> Result<PacketInfo, PacketError> {
    let ip = Ipv6Packet::new(packet).ok_or(PacketError::Truncated)?;
    let total = 40 + usize::from(ip.get_payload_length());
    if total != packet.len() {
        return Err(PacketError::BadLength { claimed: total, actual: packet.len() });
    }
    let (src, dst) = (ip.get_source().into(), ip.get_destination().into());
    let mut protocol = ip.get_next_header().0;
    let mut rest = ip.payload();
    let mut fragment = Fragment::Whole;
    let mut seen_fragment = false;
    let mut first_header = true;
    // Terminates: every step consumes at least 8 bytes of `rest` or returns.
    loop {
        if GENERIC_EXTENSIONS.contains(&protocol) {
            if protocol == 0 && !first_header {
                return Err(PacketError::BadExtensions);
            }
            let [next, units, ..] = rest else { return Err(PacketError::Truncated) };
            let len = (usize::from(*units) + 1) * 8;
            protocol = *next;
            rest = rest.get(len..).ok_or(PacketError::Truncated)?;
        } else if protocol == FRAGMENT {
            if seen_fragment {
                return Err(PacketError::BadExtensions);
            }
            seen_fragment = true;
            let [next, _, hi, lo, a, b, c, d, tail @ ..] = rest else { return Err(PacketError::Truncated) };
            let offset_flags = u16::from_be_bytes([*hi, *lo]);
            let id = u32::from_be_bytes([*a, *b, *c, *d]);
            protocol = *next;
            rest = tail;
            fragment = match (offset_flags >> 3, offset_flags & 1 != 0) {
                (0, false) => Fragment::Whole, // an atomic fragment (RFC 6946): a whole packet
                (0, true) => Fragment::First(id),
                _ => return Ok(PacketInfo { src, dst, protocol, dst_port: None, fragment: Fragment::Later(id) }),
            };
        } else {
            break;
        }
        first_header = false;
    }
    let dst_port = ports(protocol, rest)?;
    Ok(PacketInfo { src, dst, protocol, dst_port, fragment })
}

#[cfg(test)]
#[path = "packet_tests.rs"]
pub(crate) mod tests;
