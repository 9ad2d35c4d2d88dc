//! Packet inspection tests, and packet builders the policy tests share.

use super::*;
use pnet_packet::ip::IpNextHeaderProtocols as Proto;
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

/// An IPv4 packet of `protocol` around `transport`: fragment `offset` (8-byte units), more
/// fragments flag, identification.
pub fn ip4(protocol: u8, transport: &[u8], offset: u16, more: bool, id: u16) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + transport.len()];
    let len = buf.len() as u16;
    buf[20..].copy_from_slice(transport);
    let mut ip = MutableIpv4Packet::new(&mut buf).unwrap();
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length(len);
    ip.set_ttl(64);
    ip.set_identification(id);
    ip.set_flags(if more { 1 } else { 0 });
    ip.set_fragment_offset(offset);
    ip.set_next_level_protocol(pnet_packet::ip::IpNextHeaderProtocol(protocol));
    ip.set_source([10, 8, 0, 2].into());
    ip.set_destination([192, 0, 2, 1].into());
    buf
}

/// One IPv6 extension header for [`ip6`].
#[derive(Debug, Clone, Copy)]
pub enum Ext {
    /// A header in the generic format (hop-by-hop 0, routing 43, destination options 60,
    /// mobility 135, HIP 139, shim6 140, experimental 253/254, or any number): kind, length
    /// in bytes (a multiple of 8).
    Opt(u8, usize),
    /// A fragment header: offset (8-byte units), more fragments, identification.
    Frag(u16, bool, u32),
    /// An authentication header of this many bytes (a multiple of 4, at least 12).
    Ah(usize),
}

impl Ext {
    fn kind(self) -> u8 {
        match self {
            Ext::Opt(k, _) => k,
            Ext::Frag(..) => 44,
            Ext::Ah(_) => 51,
        }
    }
}

/// An IPv6 packet from fd00::2 to 2001:db8::1: the extension headers `exts` in order, then
/// `transport` as protocol `protocol`.
pub fn ip6(exts: &[Ext], protocol: u8, transport: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(protocol, |e| e.kind());
        match *ext {
            Ext::Opt(_, len) => {
                let mut h = vec![0u8; len];
                h[0] = next;
                h[1] = (len / 8 - 1) as u8;
                // PadN filling the options area (type 1, length).
                h[2] = 1;
                h[3] = (len - 4) as u8;
                body.extend_from_slice(&h);
            }
            Ext::Frag(offset, more, id) => {
                body.extend_from_slice(&[next, 0]);
                body.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                body.extend_from_slice(&id.to_be_bytes());
            }
            Ext::Ah(len) => {
                let mut h = vec![0u8; len];
                h[0] = next;
                h[1] = (len / 4 - 2) as u8;
                body.extend_from_slice(&h);
            }
        }
    }
    body.extend_from_slice(transport);
    let mut buf = vec![0u8; 40 + body.len()];
    buf[40..].copy_from_slice(&body);
    let mut ip = MutableIpv6Packet::new(&mut buf).unwrap();
    ip.set_version(6);
    ip.set_payload_length(body.len() as u16);
    ip.set_next_header(pnet_packet::ip::IpNextHeaderProtocol(exts.first().map_or(protocol, |e| e.kind())));
    ip.set_hop_limit(64);
    ip.set_source("fd00::2".parse().unwrap());
    ip.set_destination("2001:db8::1".parse().unwrap());
    buf
}

/// A 20-byte TCP header (SYN) to `dport`.
pub fn tcp(dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t
}

/// An 8-byte UDP header to `dport`, then `payload`.
pub fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&40000u16.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

fn tcp6(dport: u16, with_hop_by_hop: bool) -> Vec<u8> {
    let exts: &[Ext] = if with_hop_by_hop { &[Ext::Opt(0, 8)] } else { &[] };
    ip6(exts, 6, &tcp(dport))
}

#[test]
fn valid_packets() {
    let p = inspect(&udp4([10, 8, 0, 2], [192, 0, 2, 1], 53, b"q")).unwrap();
    assert_eq!((p.src, p.dst, p.protocol, p.dst_port), ([10, 8, 0, 2].into(), [192, 0, 2, 1].into(), 17, Some(53)));
    let p = inspect(&tcp6(25, true)).unwrap();
    assert_eq!((p.protocol, p.dst_port), (6, Some(25)));
    assert_eq!(inspect(&tcp6(443, false)).unwrap().dst_port, Some(443));
}

/// Issue 10 §6: a TCP header behind 9 extension headers was not reached (the walk stopped
/// after 8), so the packet's port was unknown and passed every port rule.
#[test]
fn nine_extension_headers_are_walked_to_the_tcp_port() {
    let exts = [Ext::Opt(60, 8); 9];
    let p = inspect(&ip6(&exts, 6, &tcp(25))).unwrap();
    assert_eq!((p.protocol, p.dst_port), (6, Some(25)));
    // Every kind in the generic format, long ones too, in one chain.
    let mut exts = vec![Ext::Opt(0, 16), Ext::Opt(43, 24), Ext::Opt(60, 8)];
    exts.extend([Ext::Opt(135, 8), Ext::Opt(139, 8), Ext::Opt(140, 8), Ext::Opt(253, 8), Ext::Opt(254, 2048)]);
    exts.extend([Ext::Opt(60, 8); 30]);
    let p = inspect(&ip6(&exts, 17, &udp(25, b"x"))).unwrap();
    assert_eq!((p.protocol, p.dst_port), (17, Some(25)));
}

#[test]
fn truncated_transport_headers_are_refused() {
    // Unfragmented: a TCP packet whose header stops before its ports, or mid-header.
    for cut in [0, 3, 19] {
        assert!(inspect(&ip4(6, &tcp(25)[..cut], 0, false, 1)).is_err(), "IPv4 TCP cut at {cut}");
        assert!(inspect(&ip6(&[], 6, &tcp(25)[..cut])).is_err(), "IPv6 TCP cut at {cut}");
    }
    assert!(inspect(&ip4(17, &udp(25, b"")[..7], 0, false, 1)).is_err());
    assert!(inspect(&ip4(132, &[0; 11], 0, false, 1)).is_err(), "SCTP common header is 12 bytes");
    // A first fragment must carry the whole transport header (RFC 7112), else its port is
    // hidden in a later fragment.
    assert!(inspect(&ip6(&[Ext::Frag(0, true, 7)], 6, &tcp(25)[..8])).is_err());
    assert!(inspect(&ip4(6, &tcp(25)[..16], 0, true, 7)).is_err());
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
    // An extension header that claims more than the packet has.
    let mut chain = ip6(&[Ext::Opt(60, 8), Ext::Opt(60, 8)], 6, &tcp(80));
    chain[41] = 200;
    assert_eq!(inspect(&chain), Err(PacketError::Truncated));
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
