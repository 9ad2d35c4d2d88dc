//! Segmentation of what a TUN device with offloads hands over (userspace TSO), sans-IO.
//!
//! With `TUNSETOFFLOAD` (checksum, TSO4, TSO6; see [`crate::TunQueue::enable_offloads`]) the
//! kernel stops segmenting and checksumming TCP before a packet reaches the device: one read
//! returns a whole super-packet (up to 64 KiB) behind a `virtio_net_hdr`, which was the exit's
//! largest cost in the lab's profile (a `read`, a copy and a checksum per 1.3 KB segment). This
//! module cuts it into the segments the kernel would have made, each with its own sequence
//! number, lengths, IPv4 identification and complete checksums, so that every segment is an
//! ordinary IP packet again (it travels alone in a cell). A packet with only a partial checksum
//! is completed the same way.

use crate::VNET_HDR_LEN;
use crate::gro::{fold, sum16};
use thiserror::Error;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a frame read from the device could not be turned into packets (it is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TsoError {
    /// Shorter than its headers claim.
    #[error("truncated frame")]
    Truncated,
    /// A GSO type or layout this code does not produce offloads for.
    #[error("unsupported offload (gso type {0})")]
    Unsupported(u8),
    /// The checksum position lies outside the packet.
    #[error("checksum offset outside the packet")]
    BadChecksumOffset,
}

fn ne16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_ne_bytes([b[at], b[at + 1]]))
}

/// Splits one frame read from an offloading TUN device (virtio header first) into plain IP
/// packets, handing each to `out` (which may keep nothing: `scratch` is reused). Returns how
/// many packets it made.
pub fn segment(frame: &[u8], scratch: &mut Vec<u8>, out: &mut impl FnMut(&[u8])) -> Result<usize, TsoError> {
    let (hdr, packet) = frame.split_at_checked(VNET_HDR_LEN).ok_or(TsoError::Truncated)?;
    let (flags, gso_type, gso_size) = (hdr[0], hdr[1] & !GSO_ECN, ne16(hdr, 4));
    if gso_type == GSO_NONE {
        if flags & F_NEEDS_CSUM == 0 {
            out(packet);
            return Ok(1);
        }
        let (start, offset) = (ne16(hdr, 6), ne16(hdr, 8));
        let at = start + offset;
        if at + 2 > packet.len() || start > packet.len() {
            return Err(TsoError::BadChecksumOffset);
        }
        scratch.clear();
        scratch.extend_from_slice(packet);
        // The field holds the pseudo-header sum; the sum over the rest completes it.
        let partial = u32::from(u16::from_be_bytes([scratch[at], scratch[at + 1]]));
        scratch[at..at + 2].fill(0);
        let sum = !fold(sum16(&scratch[start..], partial));
        scratch[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        out(scratch);
        return Ok(1);
    }
    let v6 = match gso_type {
        GSO_TCPV4 => false,
        GSO_TCPV6 => true,
        other => return Err(TsoError::Unsupported(other)),
    };
    let ip_len = if v6 {
        // TSO6 with extension headers is not split here.
        if packet.len() < 40 || packet[6] != 6 {
            return Err(TsoError::Unsupported(gso_type));
        }
        40
    } else {
        let ihl = usize::from(packet.first().ok_or(TsoError::Truncated)? & 0x0f) * 4;
        if ihl < 20 || packet.len() < ihl || packet[9] != 6 {
            return Err(TsoError::Unsupported(gso_type));
        }
        ihl
    };
    let tcp_len = usize::from(packet.get(ip_len + 12).ok_or(TsoError::Truncated)? >> 4) * 4;
    let hdr_len = ip_len + tcp_len;
    if tcp_len < 20 || packet.len() < hdr_len || gso_size == 0 {
        return Err(TsoError::Truncated);
    }
    let (headers, payload) = packet.split_at(hdr_len);
    let seq = u32::from_be_bytes([headers[ip_len + 4], headers[ip_len + 5], headers[ip_len + 6], headers[ip_len + 7]]);
    let id = u16::from_be_bytes([headers[4], headers[5]]);
    let chunks = payload.len().div_ceil(gso_size);
    for (i, chunk) in payload.chunks(gso_size).enumerate() {
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(chunk);
        let total = scratch.len();
        if v6 {
            scratch[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            scratch[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            scratch[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            scratch[10..12].fill(0);
            let check = !fold(sum16(&scratch[..ip_len], 0));
            scratch[10..12].copy_from_slice(&check.to_be_bytes());
        }
        let tcp = ip_len;
        let offset = (i * gso_size) as u32;
        scratch[tcp + 4..tcp + 8].copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        if i + 1 < chunks {
            scratch[tcp + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            scratch[tcp + 13] &= !TCP_CWR;
        }
        scratch[tcp + 16..tcp + 18].fill(0);
        let tcp_total = (total - ip_len) as u32;
        let pseudo = if v6 { sum16(&scratch[8..40], 6 + tcp_total) } else { sum16(&scratch[12..20], 6 + tcp_total) };
        let check = !fold(sum16(&scratch[tcp..], pseudo));
        scratch[tcp + 16..tcp + 18].copy_from_slice(&check.to_be_bytes());
        out(scratch);
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gro::Gro;
    use crate::gro::tests::{checksum_input, tcp};

    /// Both checksums of an IPv4 TCP packet verify.
    fn valid(p: &[u8]) -> bool {
        fold(sum16(&p[..20], 0)) == 0xffff && fold(checksum_input(p, 20)) == 0xffff
    }

    #[test]
    fn a_super_packet_becomes_the_kernel_s_segments() {
        // Make the super-packet the way the kernel would hand it over: GRO of real segments.
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let segs: Vec<Vec<u8>> = payload
            .chunks(1000)
            .enumerate()
            .map(|(i, c)| tcp(false, 100 + 1000 * i as u32, if i == 2 { 0x18 } else { 0x10 }, c))
            .collect();
        let mut frames = Vec::new();
        let mut gro = Gro::default();
        for s in &segs {
            gro.push(s, &mut |w| frames.push(w.to_vec()));
        }
        gro.flush(&mut |w| frames.push(w.to_vec()));
        assert_eq!(frames.len(), 1);
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let n = segment(&frames[0], &mut scratch, &mut |p| out.push(p.to_vec())).unwrap();
        assert_eq!(n, 3);
        for (i, (got, want)) in out.iter().zip(&segs).enumerate() {
            assert!(valid(got), "segment {i} checksums");
            // Same bytes as the originals but the IPv4 id (GRO keeps the first one's).
            assert_eq!(got[20..], want[20..], "segment {i}");
            assert_eq!(u16::from_be_bytes([got[4], got[5]]), 1 + i as u16);
        }
    }

    #[test]
    fn partial_checksums_are_completed_and_plain_packets_pass() {
        let mut p = tcp(false, 1, 0x18, b"hello");
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&p);
        assert_eq!(segment(&frame, &mut Vec::new(), &mut |q| assert_eq!(q, &p[..])).unwrap(), 1);
        // Replace the TCP checksum by the pseudo-header sum, as the kernel leaves it.
        let tl = (p.len() - 20) as u32;
        let pseudo = fold(sum16(&p[12..20], 6 + tl));
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let mut frame = vec![F_NEEDS_CSUM, 0, 0, 0, 0, 0];
        frame.extend_from_slice(&20u16.to_ne_bytes());
        frame.extend_from_slice(&16u16.to_ne_bytes());
        frame.extend_from_slice(&p);
        let mut out = Vec::new();
        segment(&frame, &mut Vec::new(), &mut |q| out.push(q.to_vec())).unwrap();
        assert!(valid(&out[0]));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut scratch = Vec::new();
        let mut none = |_: &[u8]| panic!("nothing to hand on");
        assert_eq!(segment(&[0; 4], &mut scratch, &mut none), Err(TsoError::Truncated));
        let mut bad_off = vec![F_NEEDS_CSUM, 0, 0, 0, 0, 0, 200, 0, 16, 0];
        bad_off.extend_from_slice(&[0x45; 30]);
        assert_eq!(segment(&bad_off, &mut scratch, &mut none), Err(TsoError::BadChecksumOffset));
        let udp = [0, 5, 0, 0, 100, 0, 0, 0, 0, 0, 0x45, 0, 0, 28];
        assert_eq!(segment(&udp, &mut scratch, &mut none), Err(TsoError::Unsupported(5)));
        let short = [0, GSO_TCPV4, 0, 0, 100, 0, 0, 0, 0, 0, 0x45, 0, 0, 28];
        assert!(segment(&short, &mut scratch, &mut none).is_err());
    }
}
