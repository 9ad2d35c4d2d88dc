//! Receive coalescing for the TUN device (userspace GRO), sans-IO.
//!
//! Bulk TCP arrives from a circuit as runs of full-sized segments of one flow. Written one by
//! one into the TUN device, each segment goes through the kernel's receive (or forwarding and
//! NAT) path on its own, which was the client's largest cost in the lab's profile. Instead, consecutive segments of
//! one flow are joined into one GSO super-packet (up to [`MAX_SEGMENTS`] segments, 64 KiB)
//! and written once with a `virtio_net_hdr` saying "TCP segments of `gso_size` bytes, checksum
//! to be completed": the kernel's own GRO result, as wireguard-go and Tailscale do it.
//!
//! Segments are joined only when Linux's GRO would join them: same addresses and ports, the
//! next sequence number, the same ACK, window and options, only ACK (and PSH on the last), IPv4
//! without options or fragments, IPv6 without extension headers, equal payload sizes (the last
//! may be shorter, and ends the run). Everything else is written as it came, behind an empty
//! header. Packets are never dropped here.

use crate::VNET_HDR_LEN;
/// Most segments joined into one write.
pub const MAX_SEGMENTS: usize = 64;

const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const F_NEEDS_CSUM: u8 = 1;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Largest IP packet (IPv4 total length, IPv6 payload length: 16 bits).
const MAX_IP_LEN: usize = 65_535;

/// Where a TCP segment's parts are.
#[derive(Debug, Clone, Copy)]
struct Segment {
    v6: bool,
    ip_len: usize,
    tcp_len: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// A TCP segment that may be joined, or `None`.
fn parse(p: &[u8]) -> Option<Segment> {
    let (v6, ip_len) = match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let frag = be16(p, 6);
            // IHL 5, TCP, the whole packet, not a fragment (MF clear, offset 0).
            if p[0] & 0x0f != 5 || p[9] != 6 || be16(p, 2) != p.len() || frag & 0x3fff != 0 {
                return None;
            }
            (false, 20)
        }
        6 if p.len() >= 40 => {
            if p[6] != 6 || be16(p, 4) + 40 != p.len() {
                return None;
            }
            (true, 40)
        }
        _ => return None,
    };
    let tcp = p.get(ip_len..)?;
    let tcp_len = usize::from(*tcp.get(12)? >> 4) * 4;
    if tcp_len < 20 || tcp.len() <= tcp_len {
        return None;
    }
    let flags = tcp[13];
    if flags & TCP_ACK == 0 || flags & !(TCP_ACK | TCP_PSH) != 0 {
        return None;
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Some(Segment { v6, ip_len, tcp_len, seq, flags, payload: tcp.len() - tcp_len })
}

/// Whether `next` may follow the run whose first packet is `first` (headers only).
fn same_flow(first: &[u8], f: &Segment, next: &[u8], n: &Segment) -> bool {
    if f.v6 != n.v6 || f.tcp_len != n.tcp_len {
        return false;
    }
    let ip_same = if f.v6 {
        // Version, class, flow label; next header and hop limit; addresses.
        first[..4] == next[..4] && first[6..40] == next[6..40]
    } else {
        // TOS; flags (DF); TTL and protocol; addresses. The ID may differ.
        first[1] == next[1] && first[6] == next[6] && first[8..10] == next[8..10] && first[12..20] == next[12..20]
    };
    let (ft, nt) = (&first[f.ip_len..], &next[n.ip_len..]);
    // Ports; ACK number; data offset; window; urgent pointer and options.
    ip_same
        && ft[..4] == nt[..4]
        && ft[8..13] == nt[8..13]
        && ft[14..16] == nt[14..16]
        && ft[18..f.tcp_len] == nt[18..n.tcp_len]
}

/// One's-complement sum of 16-bit words.
pub(crate) fn sum16(bytes: &[u8], mut acc: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// Folds a one's-complement sum into 16 bits.
pub(crate) fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Joins TCP segments into super-packets; hands every packet to write, header included.
#[derive(Debug)]
pub struct Gro {
    /// The run being built: header, then the first packet, then further payloads.
    buf: Vec<u8>,
    run: Option<(Segment, u32, usize)>,
}

impl Default for Gro {
    fn default() -> Self {
        Self { buf: Vec::with_capacity(VNET_HDR_LEN + MAX_IP_LEN), run: None }
    }
}

impl Gro {
    /// Adds one IP packet; earlier packets are written first when it does not continue their run.
    pub fn push(&mut self, packet: &[u8], write: &mut impl FnMut(&[u8])) {
        let seg = parse(packet);
        if let (Some(n), Some((f, next_seq, segments))) = (seg, self.run.as_mut()) {
            let first = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + f.ip_len + f.tcp_len];
            let fits = self.buf.len() - VNET_HDR_LEN + n.payload <= MAX_IP_LEN;
            let joins = n.seq == *next_seq
                && n.payload <= f.payload
                && *segments < MAX_SEGMENTS
                && fits
                && same_flow(first, f, packet, &n);
            if joins {
                self.buf.extend_from_slice(&packet[n.ip_len + n.tcp_len..]);
                *next_seq = next_seq.wrapping_add(n.payload as u32);
                *segments += 1;
                // A short or pushed segment ends the run, as it would in the kernel.
                if n.payload < f.payload || n.flags & TCP_PSH != 0 {
                    let flags_at = VNET_HDR_LEN + f.ip_len + 13;
                    self.buf[flags_at] |= n.flags & TCP_PSH;
                    self.flush(write);
                }
                return;
            }
        }
        self.flush(write);
        self.buf.clear();
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(packet);
        match seg {
            Some(s) if s.flags & TCP_PSH == 0 => self.run = Some((s, s.seq.wrapping_add(s.payload as u32), 1)),
            _ => {
                write(&self.buf);
                self.buf.clear();
            }
        }
    }

    /// Writes the run being built, if any.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8])) {
        let Some((f, _, segments)) = self.run.take() else { return };
        if segments > 1 {
            self.finish(&f);
        }
        write(&self.buf);
        self.buf.clear();
    }

    /// Turns the run into one GSO packet: lengths, IPv4 header checksum, the TCP checksum
    /// field set to the pseudo-header sum for the kernel to complete, and the virtio header.
    fn finish(&mut self, f: &Segment) {
        let (hdr, p) = self.buf.split_at_mut(VNET_HDR_LEN);
        let total = p.len();
        let tcp_total = total - f.ip_len;
        let pseudo = if f.v6 {
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            sum16(&p[8..40], 6 + tcp_total as u32)
        } else {
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[10..12].fill(0);
            let check = !fold(sum16(&p[..20], 0));
            p[10..12].copy_from_slice(&check.to_be_bytes());
            sum16(&p[12..20], 6 + tcp_total as u32)
        };
        let csum_at = f.ip_len + 16;
        p[csum_at..csum_at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
        // struct virtio_net_hdr, in the host's byte order (a legacy header; TUN default).
        hdr[0] = F_NEEDS_CSUM;
        hdr[1] = if f.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
        hdr[2..4].copy_from_slice(&((f.ip_len + f.tcp_len) as u16).to_ne_bytes());
        hdr[4..6].copy_from_slice(&(f.payload as u16).to_ne_bytes());
        hdr[6..8].copy_from_slice(&(f.ip_len as u16).to_ne_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_ne_bytes());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IPv4 (identification 1) or IPv6 TCP segment with timestamps and valid checksums.
    pub(crate) fn tcp(v6: bool, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 32];
        t[0..2].copy_from_slice(&443u16.to_be_bytes());
        t[2..4].copy_from_slice(&50000u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]); // NOP NOP timestamps
        t.extend_from_slice(payload);
        let mut p = if v6 {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(t.len() as u16).to_be_bytes());
            h[6] = 6;
            h[7] = 64;
            h[8..24].copy_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            h[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            h
        } else {
            let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 203, 0, 113, 1, 10, 8, 0, 2];
            h[2..4].copy_from_slice(&((20 + t.len()) as u16).to_be_bytes());
            let c = !fold(sum16(&h, 0));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        };
        let ip_len = p.len();
        p.extend_from_slice(&t);
        let c = !fold(checksum_input(&p, ip_len));
        p[ip_len + 16..ip_len + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// The TCP checksum sum over pseudo-header and segment (checksum field as is).
    pub(crate) fn checksum_input(p: &[u8], ip_len: usize) -> u32 {
        let len = (p.len() - ip_len) as u32;
        let pseudo = if ip_len == 40 { sum16(&p[8..40], 6 + len) } else { sum16(&p[12..20], 6 + len) };
        sum16(&p[ip_len..], pseudo)
    }

    fn run(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut gro = Gro::default();
        let mut out = Vec::new();
        for p in packets {
            gro.push(p, &mut |w| out.push(w.to_vec()));
        }
        gro.flush(&mut |w| out.push(w.to_vec()));
        out
    }

    /// Completes a NEEDS_CSUM packet as the kernel would and checks it verifies.
    fn verify_completed(written: &[u8], ip_len: usize) {
        let mut p = written[VNET_HDR_LEN..].to_vec();
        let at = ip_len + 16;
        let partial = u16::from_be_bytes([p[at], p[at + 1]]);
        p[at..at + 2].fill(0);
        let full = !fold(sum16(&p[ip_len..], u32::from(partial)));
        p[at..at + 2].copy_from_slice(&full.to_be_bytes());
        assert_eq!(fold(checksum_input(&p, ip_len)), 0xffff, "TCP checksum does not verify");
        if ip_len == 20 {
            assert_eq!(fold(sum16(&p[..20], 0)), 0xffff, "IPv4 header checksum");
        }
    }

    #[test]
    fn a_run_becomes_one_gso_packet_ipv4_and_ipv6() {
        for v6 in [false, true] {
            let ip_len = if v6 { 40 } else { 20 };
            let seg = [0xabu8; 1000];
            let packets: Vec<_> = (0..5).map(|i| tcp(v6, 1000 + i * 1000, TCP_ACK, &seg)).collect();
            let out = run(&packets);
            assert_eq!(out.len(), 1);
            let w = &out[0];
            assert_eq!(w[0], F_NEEDS_CSUM);
            assert_eq!(w[1], if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(u16::from_ne_bytes([w[4], w[5]]), 1000, "gso_size");
            assert_eq!(u16::from_ne_bytes([w[2], w[3]]) as usize, ip_len + 32, "hdr_len");
            assert_eq!(w.len(), VNET_HDR_LEN + ip_len + 32 + 5000);
            assert!(w[VNET_HDR_LEN + ip_len + 32..].iter().all(|&b| b == 0xab));
            verify_completed(w, ip_len);
        }
    }

    #[test]
    fn anything_else_passes_unchanged_behind_an_empty_header() {
        let a = tcp(false, 1, TCP_ACK, &[1; 100]);
        let gap = tcp(false, 500, TCP_ACK, &[2; 100]); // not the next sequence number
        let syn = tcp(false, 600, 0x02, &[]);
        let udp = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 53, 0, 53, 0, 8, 0, 0];
        let junk = vec![0xff; 3];
        let out = run(&[a.clone(), gap.clone(), syn.clone(), udp.clone(), junk.clone()]);
        assert_eq!(out.len(), 5);
        for (w, p) in out.iter().zip([a, gap, syn, udp, junk]) {
            assert_eq!(&w[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
            assert_eq!(&w[VNET_HDR_LEN..], &p[..]);
        }
    }

    #[test]
    fn short_or_pushed_segment_ends_the_run() {
        let full = [7u8; 500];
        let p1 = tcp(false, 0, TCP_ACK, &full);
        let p2 = tcp(false, 500, TCP_ACK | TCP_PSH, &full);
        let p3 = tcp(false, 1000, TCP_ACK, &full);
        let p4 = tcp(false, 1500, TCP_ACK, &[7; 100]);
        let p5 = tcp(false, 1600, TCP_ACK, &full);
        let out = run(&[p1, p2, p3, p4, p5]);
        assert_eq!(out.iter().map(|w| w.len() - VNET_HDR_LEN - 52).collect::<Vec<_>>(), vec![1000, 600, 500]);
        assert_eq!(out[0][VNET_HDR_LEN + 20 + 13] & TCP_PSH, TCP_PSH, "PSH carried to the super-packet");
        verify_completed(&out[0], 20);
        verify_completed(&out[1], 20);
        assert_eq!(out[2][..VNET_HDR_LEN], [0; VNET_HDR_LEN], "a lone segment keeps its own checksum");
    }

    #[test]
    fn other_flows_and_changed_acks_are_not_joined_and_size_is_bounded() {
        let a = tcp(false, 0, TCP_ACK, &[1; 1000]);
        let mut b = tcp(false, 1000, TCP_ACK, &[1; 1000]);
        b[20 + 11] ^= 1; // another ACK number
        assert_eq!(run(&[a.clone(), b]).len(), 2);
        let many: Vec<_> = (0..100).map(|i| tcp(false, i * 1000, TCP_ACK, &[1; 1000])).collect();
        let out = run(&many);
        assert!(out.iter().all(|w| w.len() - VNET_HDR_LEN <= MAX_IP_LEN));
        let total: usize = out.iter().map(|w| w.len() - VNET_HDR_LEN - 52).sum();
        assert_eq!(total, 100_000, "every payload byte written once");
    }
}
