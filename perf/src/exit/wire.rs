//! What the load generator puts on the wire and recognises coming back: IPv4/UDP packets to
//! the echo server (crafted with pnet, for exitd) or bare UDP payloads (plain routing), in
//! per-lane pools prepared ahead of each round, and the classification of what arrives.

use super::{ECHO, ECHO_PORT, HEADERS, SPORT};
use crate::blast::fill_round;
use anyhow::{Result, anyhow, bail};
use cellproto::cell::{CELL_LEN, Command, lcid};
use cellproto::client::{Circuit, Event};
use cellproto::onion::{payload, payload_mut};
use pnet_packet::Packet;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{self, Ipv4Packet, MutableIpv4Packet};
use pnet_packet::udp::{self, MutableUdpPacket, UdpPacket};
use rand_core::OsRng;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Instant;

/// Writes an IPv4/UDP packet of `buf.len()` bytes from `src:sport` to the echo server, whose
/// payload is `seq` (8 bytes, big endian) and then 0xA5; checksums computed.
pub(super) fn write_packet(buf: &mut [u8], src: Ipv4Addr, sport: u16, seq: u64) -> Result<()> {
    let total = buf.len();
    // The buffer is reused: no field may keep an old value (TOS, identification, fragment bits).
    buf[..HEADERS].fill(0);
    buf[HEADERS..HEADERS + 8].copy_from_slice(&seq.to_be_bytes());
    buf[HEADERS + 8..].fill(0xA5);
    {
        let mut u = MutableUdpPacket::new(&mut buf[20..]).ok_or_else(|| anyhow!("packet too short"))?;
        u.set_source(sport);
        u.set_destination(ECHO_PORT);
        u.set_length((total - 20) as u16);
        u.set_checksum(0);
        let c = udp::ipv4_checksum(&u.to_immutable(), &src, &ECHO);
        u.set_checksum(c);
    }
    let mut ip = MutableIpv4Packet::new(buf).ok_or_else(|| anyhow!("packet too short"))?;
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length(total as u16);
    ip.set_ttl(64);
    ip.set_flags(ipv4::Ipv4Flags::DontFragment);
    ip.set_next_level_protocol(IpNextHeaderProtocols::Udp);
    ip.set_source(src);
    ip.set_destination(ECHO);
    ip.set_checksum(0);
    let c = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(c);
    Ok(())
}

/// The sequence number of an echoed packet to `dst`, if it is one.
pub(super) fn echoed_seq(packet: &[u8], dst: Ipv4Addr) -> Option<u64> {
    let ip = Ipv4Packet::new(packet)?;
    if ip.get_source() != ECHO
        || ip.get_destination() != dst
        || ip.get_next_level_protocol() != IpNextHeaderProtocols::Udp
    {
        return None;
    }
    let udp = UdpPacket::new(ip.payload())?;
    if udp.get_source() != ECHO_PORT {
        return None;
    }
    Some(u64::from_be_bytes(udp.payload().get(..8)?.try_into().ok()?))
}

/// How the load generator's packets travel.
pub(super) enum Wire {
    /// UDP payloads on a socket connected to the echo server (the kernel adds the headers).
    Plain { payload_len: usize },
    /// Whole IP packets in DATA cells on 1-hop circuits to exitd, circuit `k % n` for packet `k`.
    Exit { circuits: Mutex<Vec<Circuit>>, index: HashMap<u32, usize>, inner: Vec<Ipv4Addr>, size: usize },
}

/// What a received datagram was.
pub(super) enum Arrival {
    /// Not one of ours.
    Foreign,
    /// An echo, not looked into.
    Counted,
    /// An echo of lane (circuit) `.0` with sequence number `.1`.
    Sample(usize, u64),
    /// Taken for a sample and wrong.
    Bad,
}

impl Wire {
    pub(super) fn lanes(&self) -> usize {
        match self {
            Wire::Plain { .. } => 1,
            Wire::Exit { inner, .. } => inner.len(),
        }
    }

    pub(super) fn datagram_len(&self) -> usize {
        match self {
            Wire::Plain { payload_len } => *payload_len,
            Wire::Exit { .. } => CELL_LEN,
        }
    }

    /// Writes packet `seq` of lane `lane` into `out`: for exitd, a cell sealed on `circuit`
    /// (lane `lane`'s circuit).
    fn prepare(&self, circuit: Option<&mut Circuit>, lane: usize, seq: u64, out: &mut [u8]) -> Result<()> {
        match (self, circuit) {
            (Wire::Plain { .. }, _) => {
                out[..8].copy_from_slice(&seq.to_be_bytes());
                Ok(())
            }
            (Wire::Exit { inner, size, .. }, Some(circuit)) => {
                let cell: &mut [u8; CELL_LEN] = out.try_into().map_err(|_| anyhow!("cell size"))?;
                write_packet(&mut payload_mut(cell)[..*size], inner[lane], SPORT + lane as u16, seq)?;
                circuit.seal_data(*size, cell).map_err(|e| anyhow!("cannot seal: {e}"))?;
                Ok(())
            }
            (Wire::Exit { .. }, None) => bail!("no circuit for lane {lane}"),
        }
    }

    /// [`Wire::prepare`] of one datagram outside the rounds (probes, pings).
    pub(super) fn prepare_one(&self, lane: usize, seq: u64, out: &mut [u8]) -> Result<()> {
        match self {
            Wire::Exit { circuits, .. } => {
                let mut circuits = circuits.lock().map_err(|_| anyhow!("poisoned"))?;
                self.prepare(circuits.get_mut(lane), lane, seq, out)
            }
            Wire::Plain { .. } => self.prepare(None, lane, seq, out),
        }
    }

    /// Prepares packets `base .. base + count` of a round: packet `base + k` into row `k / n` of
    /// `pools[k % n]` (`base` is a multiple of n). Circuits are sealed in parallel.
    pub(super) fn fill(&self, pools: &mut [Vec<u8>], base: u64, count: usize) -> Result<()> {
        let dlen = self.datagram_len();
        match self {
            Wire::Plain { .. } => fill_round(&mut [()], pools, dlen, base, count, |_, lane, seq, slot| {
                self.prepare(None, lane, seq, slot)
            }),
            Wire::Exit { circuits, .. } => {
                let mut circuits = circuits.lock().map_err(|_| anyhow!("poisoned"))?;
                fill_round(&mut circuits[..], pools, dlen, base, count, |circuit, lane, seq, slot| {
                    self.prepare(Some(circuit), lane, seq, slot)
                })
            }
        }
    }

    /// Classifies a received datagram; with `sample`, looks inside (opens the cell).
    pub(super) fn arrival(&self, data: &mut [u8], sample: bool) -> Arrival {
        match self {
            Wire::Plain { payload_len } => {
                if data.len() != *payload_len {
                    return Arrival::Bad;
                }
                if !sample {
                    return Arrival::Counted;
                }
                Arrival::Sample(0, u64::from_be_bytes(data[..8].try_into().unwrap_or_default()))
            }
            Wire::Exit { circuits, index, inner, .. } => {
                let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(data) else { return Arrival::Foreign };
                let Some(&c) = index.get(&lcid(cell)) else { return Arrival::Foreign };
                if !sample {
                    return Arrival::Counted;
                }
                let Ok(mut circuits) = circuits.lock() else { return Arrival::Bad };
                match circuits[c].handle_cell(Instant::now(), cell, &mut OsRng) {
                    Ok(Some(Event::Delivered { cmd: Command::Data, len, .. })) => {
                        match echoed_seq(payload(cell, len), inner[c]) {
                            Some(seq) => Arrival::Sample(c, seq),
                            None => Arrival::Bad,
                        }
                    }
                    _ => Arrival::Bad,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_valid_in_reused_buffers_and_echoes_parse() {
        let src = Ipv4Addr::new(10, 8, 0, 2);
        let mut buf = vec![0xA5u8; 1200];
        write_packet(&mut buf, src, SPORT + 3, 77).unwrap();
        let ip = Ipv4Packet::new(&buf).unwrap();
        assert_eq!(ip.get_checksum(), ipv4::checksum(&ip));
        assert_eq!((ip.get_dscp(), ip.get_ecn(), ip.get_fragment_offset()), (0, 0, 0));
        assert_eq!(ip.get_flags(), ipv4::Ipv4Flags::DontFragment);
        assert_eq!(usize::from(ip.get_total_length()), buf.len());
        let u = UdpPacket::new(ip.payload()).unwrap();
        assert_eq!(u.get_checksum(), udp::ipv4_checksum(&u, &src, &ECHO));
        assert_eq!((u.get_source(), u.get_destination()), (SPORT + 3, ECHO_PORT));
        // What the echo server sends back, as exitd reads it from its TUN.
        let mut reply = buf.clone();
        {
            let mut ip = MutableIpv4Packet::new(&mut reply).unwrap();
            ip.set_source(ECHO);
            ip.set_destination(src);
            let mut u = MutableUdpPacket::new(&mut reply[20..]).unwrap();
            u.set_source(ECHO_PORT);
            u.set_destination(SPORT + 3);
        }
        assert_eq!(echoed_seq(&reply, src), Some(77));
        assert_eq!(echoed_seq(&reply, Ipv4Addr::new(10, 8, 0, 3)), None, "another circuit's address");
        assert_eq!(echoed_seq(&buf, src), None, "not an echo");
        assert_eq!(echoed_seq(&reply[..20], src), None);
    }
}
