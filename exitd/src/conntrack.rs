//! The kernel's connection tracking, over its netlink interface (ctnetlink), for one job:
//! deleting what the kernel remembers of an inner address's flows before the address is leased
//! to someone else.
//!
//! Every flow through the exit is masqueraded, so conntrack holds its NAT mapping: a packet
//! from the internet to the exit's WAN address and a masqueraded port is translated back to the
//! inner address that opened the flow, and goes into the TUN device. Those entries outlive the
//! session (an established TCP connection for `nf_conntrack_tcp_timeout_established`, 5 days
//! by default). Were the address leased again with them in place, late replies on the old
//! user's flows — anyone that user talked to can send them — would reach the new user. So the
//! pool keeps a released address out of use until [`Conntrack::flush_sources`] has deleted
//! every entry whose original source is that address, in both families.
//!
//! A flush is a dump of the family's table, checked here (only an entry whose original source
//! is asked for is ever deleted), then one delete per entry by its original tuple, zone and id
//! (the way `conntrack -D` does it); an entry already gone is not an error. For a few IPv4
//! addresses the kernel filters the dump on the original source (`CTA_FILTER`, Linux ≥ 5.8;
//! an older kernel ignores it and sends everything): it walks its table without copying it
//! out. Never for IPv6: the kernel's IPv6 source filter is inverted (Linux 6.18 answers a dump
//! filtered on `fd00::2` with every entry *but* those from `fd00::2`, which would delete
//! nothing), so IPv6 is always one whole dump matched here. Messages are built and parsed with
//! `netlink-packet-netfilter`; the socket is `netlink-sys`'s, with a receive timeout so that
//! the kernel's silence is an error, not a hang.

use ipnet::IpNet;
use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, Parseable,
};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, Tuple};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily, NetfilterSubsystem,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::time::Duration;
use thiserror::Error;

/// `IPCTNL_MSG_CT_GET`: list (with `NLM_F_DUMP`).
const IPCTNL_MSG_CT_GET: u8 = 1;
/// `CTA_ID`: the entry's id, so that a delete removes that entry and no other.
const CTA_ID: u16 = 12;
/// `CTA_ZONE`: the entry's zone (absent for the default zone), needed to find it.
const CTA_ZONE: u16 = 18;
/// `CTA_FILTER`: kernel-side filtering of a dump (nested).
const CTA_FILTER: u16 = 25;
/// `CTA_FILTER_ORIG_FLAGS`: which fields of `CTA_TUPLE_ORIG` must match (a host-order u32).
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
/// `CTA_FILTER_F_CTA_IP_SRC`: the original source address.
const FILTER_IP_SRC: u32 = 1;

/// How long the kernel may take to answer one read.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Up to this many IPv4 addresses are flushed with one kernel-filtered dump each; more with one
/// whole dump matched here (each kernel-filtered dump walks the whole table in the kernel; one
/// whole dump copies it out once).
const FILTERED_DUMPS: usize = 4;
/// Receive buffer: a netlink dump message is at most 32 KiB.
const RECV_BUF: usize = 64 * 1024;

/// Why a flush failed (the addresses concerned stay out of the pool and it is tried again).
#[derive(Debug, Error)]
pub enum ConntrackError {
    /// No netlink socket for netfilter.
    #[error("cannot open a netfilter netlink socket: {0}")]
    Open(io::Error),
    /// Sending or receiving failed, or the kernel did not answer in time.
    #[error("conntrack netlink I/O failed: {0}")]
    Io(io::Error),
    /// The kernel refused the request.
    #[error(
        "the kernel refused to {what} conntrack entries: {err} (exitd needs CAP_NET_ADMIN and the nf_conntrack_netlink module)"
    )]
    Refused {
        /// What was asked ("list", "delete").
        what: &'static str,
        /// The kernel's errno.
        err: io::Error,
    },
    /// An answer that does not parse: nothing is assumed about the entries it held.
    #[error("cannot parse the kernel's conntrack answer: {0}")]
    Decode(String),
}

/// One entry to delete: its family and the attributes that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    family: NetfilterProtoFamily,
    attributes: Vec<ConntrackAttribute>,
}

/// A ctnetlink socket.
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack").field("seq", &self.seq).finish_non_exhaustive()
    }
}

impl Conntrack {
    /// A socket to the kernel's conntrack, in the calling thread's network namespace.
    pub fn open() -> Result<Self, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(ConntrackError::Open)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(ConntrackError::Open)?;
        let timeout = nix::sys::time::TimeVal::new(RECV_TIMEOUT.as_secs() as _, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| ConntrackError::Open(e.into()))?;
        Ok(Self { socket, seq: 0, buf: vec![0; RECV_BUF] })
    }

    /// Deletes every entry whose original source is one of `sources` (IPv4 and IPv6 alike);
    /// returns how many were deleted.
    pub fn flush_sources(&mut self, sources: &[IpAddr]) -> Result<u64, ConntrackError> {
        let mut entries = Vec::new();
        for v4 in [true, false] {
            let wanted: HashSet<IpAddr> = sources.iter().copied().filter(|a| a.is_ipv4() == v4).collect();
            if v4 && wanted.len() <= FILTERED_DUMPS {
                for &addr in &wanted {
                    self.dump(family(v4), Some(addr), &|src| src == addr, &mut entries)?;
                }
            } else if !wanted.is_empty() {
                self.dump(family(v4), None, &|src| wanted.contains(&src), &mut entries)?;
            }
        }
        self.delete(entries)
    }

    /// Deletes every entry whose original source is in one of `nets` (a whole pool, at start
    /// and stop); returns how many were deleted.
    pub fn flush_prefixes(&mut self, nets: &[IpNet]) -> Result<u64, ConntrackError> {
        let entries = self.matching(nets)?;
        self.delete(entries)
    }

    /// How many entries have their original source in one of `nets`.
    pub fn count_prefixes(&mut self, nets: &[IpNet]) -> Result<usize, ConntrackError> {
        Ok(self.matching(nets)?.len())
    }

    fn matching(&mut self, nets: &[IpNet]) -> Result<Vec<Entry>, ConntrackError> {
        let mut entries = Vec::new();
        for v4 in [true, false] {
            let nets: Vec<IpNet> = nets.iter().copied().filter(|n| n.addr().is_ipv4() == v4).collect();
            if !nets.is_empty() {
                self.dump(family(v4), None, &|src| nets.iter().any(|n| n.contains(&src)), &mut entries)?;
            }
        }
        Ok(entries)
    }

    /// Lists the `family` table (filtered by the kernel on original source `only`, if given)
    /// and adds the entries whose original source `wanted` accepts to `out`.
    fn dump(
        &mut self,
        family: NetfilterProtoFamily,
        only: Option<IpAddr>,
        wanted: &dyn Fn(IpAddr) -> bool,
        out: &mut Vec<Entry>,
    ) -> Result<(), ConntrackError> {
        self.request(NLM_F_DUMP, dump_request(family, only), "list", &mut |m| {
            if let Some(entry) = entry_from(m, wanted) {
                out.push(entry);
            }
        })
    }

    /// Deletes `entries` one by one; an entry already gone is not an error.
    fn delete(&mut self, entries: Vec<Entry>) -> Result<u64, ConntrackError> {
        let mut deleted = 0;
        for entry in entries {
            let message = NetfilterMessage::new(
                NetfilterHeader::new(entry.family, 0, 0),
                ConntrackMessage::Delete(entry.attributes),
            );
            match self.request(NLM_F_ACK, message, "delete", &mut |_| {}) {
                Ok(()) => deleted += 1,
                Err(ConntrackError::Refused { err, .. }) if err.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Sends `message` and reads the answers to it until the dump ends or the kernel acks,
    /// handing each conntrack message to `each`.
    fn request(
        &mut self,
        flags: u16,
        message: NetfilterMessage,
        what: &'static str,
        each: &mut dyn FnMut(&NetfilterMessage),
    ) -> Result<(), ConntrackError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(ConntrackError::Io)?;
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0).map_err(ConntrackError::Io)?;
            if n > self.buf.len() {
                return Err(ConntrackError::Decode(format!("a {n}-byte message was cut to {}", self.buf.len())));
            }
            let mut offset = 0;
            while offset < n {
                let answer = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buf[offset..n])
                    .map_err(|e| ConntrackError::Decode(e.to_string()))?;
                let len = answer.header.length as usize;
                if len == 0 {
                    return Err(ConntrackError::Decode("a zero-length netlink message".into()));
                }
                offset += len.next_multiple_of(4);
                if answer.header.sequence_number != self.seq {
                    // The rest of an earlier request that failed half way.
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::Done(done) if done.code != 0 => {
                        return Err(refused(what, done.code));
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(refused(what, code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => each(&m),
                    _ => {}
                }
            }
        }
    }
}

fn refused(what: &'static str, code: i32) -> ConntrackError {
    ConntrackError::Refused { what, err: io::Error::from_raw_os_error(code.saturating_abs()) }
}

fn family(v4: bool) -> NetfilterProtoFamily {
    if v4 { NetfilterProtoFamily::IPv4 } else { NetfilterProtoFamily::IPv6 }
}

/// A dump of the `family` table: whole, or filtered by the kernel on original source `only`.
fn dump_request(family: NetfilterProtoFamily, only: Option<IpAddr>) -> NetfilterMessage {
    let header = NetfilterHeader::new(family, 0, 0);
    let Some(addr) = only else { return NetfilterMessage::new(header, ConntrackMessage::Get(Vec::new())) };
    let tuple = ConntrackAttribute::CtaTupleOrig(vec![Tuple::Ip(vec![IPTuple::SourceAddress(addr)])]);
    let flags = DefaultNla::new(CTA_FILTER_ORIG_FLAGS, FILTER_IP_SRC.to_ne_bytes().to_vec());
    // Sent as plain attributes: the kernel parses CTA_FILTER strictly and needs its nested
    // flag, which the crate's `ConntrackAttribute::Other` does not emit.
    let attributes = vec![as_default(&tuple), DefaultNla::new(CTA_FILTER | NLA_F_NESTED, bytes(&flags))];
    NetfilterMessage::new(
        header,
        NetfilterMessageInner::Other {
            subsys: NetfilterSubsystem::Conntrack,
            message_type: IPCTNL_MSG_CT_GET,
            attributes,
        },
    )
}

/// An attribute as it goes on the wire.
fn bytes(nla: &impl Emitable) -> Vec<u8> {
    let mut out = vec![0; nla.buffer_len()];
    nla.emit(&mut out);
    out
}

/// A typed attribute as a plain one, flags kept.
fn as_default(nla: &impl Emitable) -> DefaultNla {
    let wire = bytes(nla);
    // Parsing what was just emitted cannot fail; an empty attribute would only widen the dump.
    NlaBuffer::new_checked(&wire[..])
        .and_then(|b| DefaultNla::parse(&b))
        .unwrap_or_else(|_| DefaultNla::new(0, Vec::new()))
}

/// The original source of a dumped entry.
fn original_source(attributes: &[ConntrackAttribute]) -> Option<IpAddr> {
    attributes.iter().find_map(|a| match a {
        ConntrackAttribute::CtaTupleOrig(tuple) => tuple.iter().find_map(|t| match t {
            Tuple::Ip(ip) => ip.iter().find_map(|i| match i {
                IPTuple::SourceAddress(src) => Some(*src),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}

/// The entry a dumped message describes, if its original source is `wanted`: what a delete
/// needs to name it (original tuple, zone, id).
fn entry_from(message: &NetfilterMessage, wanted: &dyn Fn(IpAddr) -> bool) -> Option<Entry> {
    let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)) = &message.inner else { return None };
    if !original_source(attributes).is_some_and(wanted) {
        return None;
    }
    let naming = attributes
        .iter()
        .filter(|a| match a {
            ConntrackAttribute::CtaTupleOrig(_) => true,
            ConntrackAttribute::Other(nla) => matches!(nla.kind() & NLA_TYPE_MASK, CTA_ZONE | CTA_ID),
            _ => false,
        })
        .cloned()
        .collect();
    Some(Entry { family: message.header.family, attributes: naming })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkDeserializable;
    use netlink_packet_netfilter::conntrack::{ProtoTuple, Protocol};

    fn roundtrip(message: NetfilterMessage) -> NetfilterMessage {
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let header = packet.header;
        NetfilterMessage::deserialize(&header, &bytes[16..]).unwrap()
    }

    #[test]
    fn the_dump_filter_is_the_original_source_with_the_nested_flag() {
        let msg = dump_request(NetfilterProtoFamily::IPv4, Some("10.9.0.2".parse().unwrap()));
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        // netlink header (16), nfgenmsg (4), then CTA_TUPLE_ORIG { CTA_TUPLE_IP { V4_SRC } }
        // and CTA_FILTER { ORIG_FLAGS = IP_SRC }, both nested.
        let body = &bytes[20..];
        assert_eq!(u16::from_ne_bytes([body[2], body[3]]), 1 | NLA_F_NESTED, "CTA_TUPLE_ORIG");
        assert_eq!(u16::from_ne_bytes([body[6], body[7]]), 1 | NLA_F_NESTED, "CTA_TUPLE_IP");
        assert_eq!(&body[8..12], &[8, 0, 1, 0], "CTA_IP_V4_SRC");
        assert_eq!(&body[12..16], &[10, 9, 0, 2]);
        assert_eq!(u16::from_ne_bytes([body[18], body[19]]), CTA_FILTER | NLA_F_NESTED);
        assert_eq!(&body[20..28], &[&[8, 0, 1, 0][..], &FILTER_IP_SRC.to_ne_bytes()].concat()[..]);
        assert_eq!(body.len(), 28);
        // IPCTNL_MSG_CT_GET of the conntrack subsystem, IPv4.
        assert_eq!(packet.header.message_type, 0x0101);
        assert_eq!(bytes[16], libc::AF_INET as u8);
        let whole = dump_request(NetfilterProtoFamily::IPv6, None);
        assert_eq!(whole.inner, NetfilterMessageInner::Conntrack(ConntrackMessage::Get(Vec::new())));
    }

    #[test]
    fn only_wanted_entries_are_named_by_tuple_zone_and_id() {
        let tuple = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress("fd6d:6573:6800::2".parse().unwrap()),
                IPTuple::DestinationAddress("2001:db8::1".parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::SourcePort(40000),
                ProtoTuple::DestinationPort(7),
            ]),
        ];
        let attributes = vec![
            ConntrackAttribute::CtaTupleOrig(tuple.clone()),
            ConntrackAttribute::CtaTupleReply(tuple.clone()),
            ConntrackAttribute::CtaTimeout(30),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ID, vec![0, 0, 0, 42])),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 7])),
            ConntrackAttribute::CtaMark(3),
        ];
        let dumped = roundtrip(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv6, 0, 0),
            ConntrackMessage::New(attributes),
        ));
        let held: IpAddr = "fd6d:6573:6800::2".parse().unwrap();
        let entry = entry_from(&dumped, &|src| src == held).expect("its original source is wanted");
        assert_eq!(entry.family, NetfilterProtoFamily::IPv6);
        assert_eq!(
            entry.attributes,
            vec![
                ConntrackAttribute::CtaTupleOrig(tuple),
                ConntrackAttribute::Other(DefaultNla::new(CTA_ID, vec![0, 0, 0, 42])),
                ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 7])),
            ]
        );
        assert_eq!(entry_from(&dumped, &|src| src != held), None, "another source is never named");
        let other = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv6, 0, 0),
            ConntrackMessage::Get(Vec::new()),
        );
        assert_eq!(entry_from(&other, &|_| true), None);
        let no_tuple = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::New(vec![ConntrackAttribute::CtaMark(1)]),
        );
        assert_eq!(entry_from(&no_tuple, &|_| true), None, "no original source, nothing to match");
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = refused("delete", -libc::EPERM);
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
        assert!(matches!(e, ConntrackError::Refused { err, .. } if err.raw_os_error() == Some(libc::EPERM)));
    }
}
