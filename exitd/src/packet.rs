//! Looking inside the IP packets circuits carry, with `pnet`: enough to route, police and
//! anti-spoof them (source, destination, protocol, destination port), with every malformed
//! packet an error — truncated headers, wrong versions, lengths that do not match the bytes.

use pnet_packet::Packet;
use pnet_packet::ip::IpNextHeaderProtocols as Proto;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;
use std::net::IpAddr;
use thiserror::Error;

/// IPv6 extension headers walked to find the transport header (RFC 8200 §4): hop-by-hop,
/// routing, fragment, destination options. At most this many, so a chain cannot loop us.
const MAX_EXTENSION_HEADERS: usize = 8;

/// Why a packet was refused (each is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PacketError {
    /// No bytes.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("IP version {0} is not 4 or 6")]
    BadVersion(u8),
    /// Shorter than its own header.
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
}

impl PacketError {
    /// Stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            PacketError::Empty => "empty",
            PacketError::BadVersion(_) => "bad_version",
            PacketError::Truncated => "truncated",
            PacketError::BadLength { .. } => "bad_length",
        }
    }
}

/// What the exit needs to know about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol number (after IPv6 extension headers).
    pub protocol: u8,
    /// Destination port for TCP, UDP and SCTP, when the header is present (not for later
    /// fragments).
    pub dst_port: Option<u16>,
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

fn ports(protocol: u8, transport: &[u8]) -> Option<u16> {
    let has_ports = protocol == Proto::Tcp.0 || protocol == Proto::Udp.0 || protocol == 132; // SCTP
    if has_ports && transport.len() >= 4 { Some(u16::from_be_bytes([transport[2], transport[3]])) } else { None }
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
    let first_fragment = ip.get_fragment_offset() == 0;
    let dst_port = if first_fragment { ports(protocol, &packet[header..]) } else { None };
    Ok(PacketInfo { src: ip.get_source().into(), dst: ip.get_destination().into(), protocol, dst_port })
}

fn inspect_v6(packet: &[u8]) -> Result<PacketInfo, PacketError> {
    let ip = Ipv6Packet::new(packet).ok_or(PacketError::Truncated)?;
    let total = 40 + usize::from(ip.get_payload_length());
    if total != packet.len() {
        return Err(PacketError::BadLength { claimed: total, actual: packet.len() });
    }
    let mut protocol = ip.get_next_header().0;
    let mut rest = ip.payload();
    let mut first_fragment = true;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match protocol {
            0 | 43 | 60 => {
                // Hop-by-hop, routing, destination options: length in 8-octet units, plus 8.
                let [next, units, ..] = rest else { return Err(PacketError::Truncated) };
                let len = (usize::from(*units) + 1) * 8;
                protocol = *next;
                rest = rest.get(len..).ok_or(PacketError::Truncated)?;
            }
            44 => {
                let [next, _, hi, lo, ..] = rest else { return Err(PacketError::Truncated) };
                first_fragment = (u16::from_be_bytes([*hi, *lo]) >> 3) == 0;
                protocol = *next;
                rest = rest.get(8..).ok_or(PacketError::Truncated)?;
            }
            _ => break,
        }
    }
    let dst_port = if first_fragment { ports(protocol, rest) } else { None };
    Ok(PacketInfo { src: ip.get_source().into(), dst: ip.get_destination().into(), protocol, dst_port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::ipv4::MutableIpv4Packet;
    use pnet_packet::ipv6::MutableIpv6Packet;
    use pnet_packet::udp::MutableUdpPacket;

    /// A UDP/IPv4 packet crafted with pnet.
    pub fn udp4(src: [u8; 4], dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 20 + 8 + payload.len()];
        let len = buf.len() as u16;
        {
            let mut ip = MutableIpv4Packet::new(&mut buf).unwrap();
            ip.set_version(4);
            ip.set_header_length(5);
            ip.set_total_length(len);
            ip.set_ttl(64);
            ip.set_next_level_protocol(Proto::Udp);
            ip.set_source(src.into());
            ip.set_destination(dst.into());
        }
        let mut udp = MutableUdpPacket::new(&mut buf[20..]).unwrap();
        udp.set_source(40000);
        udp.set_destination(dport);
        udp.set_length(8 + payload.len() as u16);
        udp.set_payload(payload);
        buf
    }

    fn tcp6(dport: u16, with_hop_by_hop: bool) -> Vec<u8> {
        let ext = if with_hop_by_hop { 8 } else { 0 };
        let mut buf = vec![0u8; 40 + ext + 20];
        let plen = (ext + 20) as u16;
        {
            let mut ip = MutableIpv6Packet::new(&mut buf).unwrap();
            ip.set_version(6);
            ip.set_payload_length(plen);
            ip.set_next_header(if with_hop_by_hop { pnet_packet::ip::IpNextHeaderProtocol(0) } else { Proto::Tcp });
            ip.set_hop_limit(64);
            ip.set_source("fd00::2".parse().unwrap());
            ip.set_destination("2001:db8::1".parse().unwrap());
        }
        if with_hop_by_hop {
            buf[40] = Proto::Tcp.0;
        }
        buf[40 + ext + 2..40 + ext + 4].copy_from_slice(&dport.to_be_bytes());
        buf
    }

    #[test]
    fn valid_packets() {
        let p = inspect(&udp4([10, 8, 0, 2], [192, 0, 2, 1], 53, b"q")).unwrap();
        assert_eq!((p.src, p.dst, p.protocol, p.dst_port), ([10, 8, 0, 2].into(), [192, 0, 2, 1].into(), 17, Some(53)));
        let p = inspect(&tcp6(25, true)).unwrap();
        assert_eq!((p.protocol, p.dst_port), (6, Some(25)));
        assert_eq!(inspect(&tcp6(443, false)).unwrap().dst_port, Some(443));
    }

    #[test]
    fn malformed_packets() {
        let good = udp4([10, 8, 0, 2], [192, 0, 2, 1], 53, b"query");
        assert_eq!(inspect(&[]), Err(PacketError::Empty));
        assert_eq!(inspect(&good[..10]), Err(PacketError::Truncated));
        let mut v5 = good.clone();
        v5[0] = 0x55;
        assert_eq!(inspect(&v5), Err(PacketError::BadVersion(5)));
        let mut ihl = good.clone();
        ihl[0] = 0x44; // header length 16 bytes: below the minimum
        assert_eq!(inspect(&ihl), Err(PacketError::Truncated));
        let mut long = good.clone();
        long[3] += 1;
        assert!(matches!(inspect(&long), Err(PacketError::BadLength { .. })));
        assert!(matches!(inspect(&good[..good.len() - 1]), Err(PacketError::BadLength { .. })));
        let mut v6 = tcp6(80, true);
        v6.truncate(44);
        v6[5] = 4; // payload length 4: the hop-by-hop header claims 8
        assert_eq!(inspect(&v6), Err(PacketError::Truncated));
    }

    #[test]
    fn destination_only() {
        let v4 = udp4([10, 8, 0, 2], [192, 0, 2, 1], 53, b"q");
        assert_eq!(destination(&v4), Some([192, 0, 2, 1].into()));
        assert_eq!(destination(&tcp6(80, true)), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(destination(&v4[..19]), None);
        assert_eq!(destination(&tcp6(80, false)[..39]), None);
        assert_eq!(destination(&[0x55; 40]), None);
        assert_eq!(destination(&[]), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = inspect(&bytes);
            let _ = destination(&bytes);
        }
    }
}
