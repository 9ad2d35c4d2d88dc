//! UDP GSO and GRO, the one implementation: the `UDP_SEGMENT` control message a GSO send
//! carries, the `UDP_GRO` one a coalesced receive brings, how a coalesced run is cut back into
//! its datagrams, and plain (non-io_uring) `sendmsg`/`recvmsg` calls that use them on a
//! non-blocking socket.
//!
//! The io_uring backend puts [`GsoCmsg`] into its `sendmsg` requests and cuts its GRO receives
//! with [`segment_size`] and [`split`]; the client's `CellSocket` (a tokio socket) calls
//! [`send`] and [`recv`] inside its readiness loop. The `recvmmsg` backend uses neither: it
//! turns GRO off and amortises system calls with `sendmmsg` instead.
//!
//! GSO: one `sendmsg` of up to [`MAX_GSO_BYTES`] holding equal-sized datagrams to one
//! destination, which the kernel (or the NIC) cuts into `segment`-byte datagrams. GRO: the
//! kernel hands over a run of same-sized datagrams from one sender as one buffer, plus the
//! segment size (the last datagram may be shorter).

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::socket::{RawSockAddr, decode_sockaddr};

/// Segments per GSO send (the kernel's `UDP_MAX_SEGMENTS`, 64 on older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Bytes per GSO send: the largest UDP payload over IPv4 (65,535 − 8 UDP − 20 IP; 45 cells).
pub const MAX_GSO_BYTES: usize = 65_507;
/// Room for the largest GRO-coalesced receive (a run is at most 64 KiB).
pub const MAX_GRO_BYTES: usize = 65_536;

/// The `UDP_SEGMENT` control message: `cmsghdr` + `u16` segment size, padded to
/// `CMSG_SPACE(2)` = 24 bytes, in the layout `msg_control` expects.
#[repr(C)]
pub(crate) struct GsoCmsg {
    len: usize,
    level: libc::c_int,
    ty: libc::c_int,
    size: u16,
    pad: [u8; 6],
}

impl GsoCmsg {
    /// An all-zero placeholder (not a valid message; for slots filled later).
    pub(crate) fn zeroed() -> Self {
        GsoCmsg { len: 0, level: 0, ty: 0, size: 0, pad: [0; 6] }
    }

    /// `UDP_SEGMENT` with segments of `size` bytes.
    pub(crate) fn new(size: u16) -> Self {
        GsoCmsg {
            len: size_of::<libc::cmsghdr>() + size_of::<u16>(),
            level: libc::SOL_UDP,
            ty: libc::UDP_SEGMENT,
            size,
            pad: [0; 6],
        }
    }
}

/// The `UDP_GRO` segment size in the control data, if any (parsed by hand: the kernel packs
/// it at an offset that need not be aligned).
fn gro_segment(control: &[u8]) -> Option<usize> {
    const HDR: usize = size_of::<libc::cmsghdr>();
    let mut off = 0;
    while off + HDR <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + 8].try_into().ok()?);
        let level = i32::from_ne_bytes(control[off + 8..off + 12].try_into().ok()?);
        let ty = i32::from_ne_bytes(control[off + 12..off + 16].try_into().ok()?);
        if len < HDR {
            return None;
        }
        if level == libc::SOL_UDP && ty == libc::UDP_GRO {
            let v = i32::from_ne_bytes(control.get(off + HDR..off + HDR + 4)?.try_into().ok()?);
            return usize::try_from(v).ok();
        }
        off += len.div_ceil(8) * 8;
    }
    None
}

/// The size of each datagram in a received payload of `len` bytes with this control data: the
/// `UDP_GRO` segment size when the payload is a coalesced run, else the whole payload (at
/// least 1, so that [`split`] always advances).
pub fn segment_size(control: &[u8], len: usize) -> usize {
    match gro_segment(control) {
        Some(size) if size > 0 && len > size => size,
        _ => len.max(1),
    }
}

/// The datagrams of a received payload of `len` bytes cut in `segment`-byte pieces (the last
/// may be shorter), as ranges of the payload. An empty payload is one empty datagram.
pub fn split(len: usize, segment: usize) -> impl Iterator<Item = Range<usize>> {
    let segment = segment.max(1);
    (0..len.max(1)).step_by(segment).map(move |start| start..(start + segment).min(len))
}

/// One `sendmsg` without waiting: `data` to `to`, as GSO segments of `segment` bytes when it is
/// longer than one (at most [`MAX_GSO_BYTES`] and [`MAX_GSO_SEGMENTS`] segments), else as one
/// datagram. `v6`: the socket is IPv6 (IPv4 destinations are then sent IPv4-mapped).
///
/// Errors are the kernel's: `WouldBlock` when the send buffer is full; EIO, EINVAL or
/// ENOPROTOOPT when it refuses GSO (the caller sends the datagrams one by one instead).
pub fn send(fd: BorrowedFd<'_>, to: SocketAddr, v6: bool, data: &[u8], segment: u16) -> io::Result<usize> {
    let mut addr = RawSockAddr::zeroed();
    let namelen = addr.set(to, v6);
    let mut cmsg = GsoCmsg::new(segment);
    let mut iov = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = (&mut addr as *mut RawSockAddr).cast();
    hdr.msg_namelen = namelen;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if data.len() > usize::from(segment) {
        hdr.msg_control = (&mut cmsg as *mut GsoCmsg).cast();
        hdr.msg_controllen = size_of::<GsoCmsg>() as _;
    }
    // SAFETY: the header's name, iovec and control message point to locals of this frame and
    // `iov` to the caller's `data`, all alive until the call returns; the kernel only reads
    // them.
    let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &hdr, libc::MSG_DONTWAIT) };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// Control data for [`recv`]: `CMSG_SPACE(sizeof(int))` (24 bytes) for `UDP_GRO` and room to
/// spare, 8-byte aligned as `cmsghdr` needs.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// What [`recv`] got: `len` bytes from `from`, datagrams of `segment` bytes each (a GRO run;
/// the last may be shorter) or one datagram (`segment == len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The size of each datagram in them (at least 1).
    pub segment: usize,
    /// The sender (IPv4-mapped IPv6 folded into IPv4).
    pub from: SocketAddr,
}

impl Received {
    /// The datagrams, as ranges of the receive buffer.
    pub fn datagrams(&self) -> impl Iterator<Item = Range<usize>> {
        split(self.len, self.segment)
    }
}

/// One `recvmsg` without waiting into `buf` (a datagram, or a GRO run of them when the socket
/// has `UDP_GRO` on: give it [`MAX_GRO_BYTES`]). `WouldBlock` when nothing is queued; a
/// datagram longer than `buf` or with an unknown sender family is consumed and reported as
/// `InvalidData` (the caller counts it as dropped).
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut addr = RawSockAddr::zeroed();
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = (&mut addr as *mut RawSockAddr).cast();
    hdr.msg_namelen = size_of::<RawSockAddr>() as libc::socklen_t;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.0.as_mut_ptr().cast();
    hdr.msg_controllen = control.0.len() as _;
    // SAFETY: the name, iovec and control buffers are locals of this frame or the caller's
    // `buf`, alive and exclusively borrowed until the call returns, and the lengths in `hdr`
    // are their sizes: the kernel writes within them.
    let got = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut hdr, libc::MSG_DONTWAIT) };
    let len = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
    if hdr.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "datagram longer than the receive buffer"));
    }
    let namelen = (hdr.msg_namelen as usize).min(size_of::<RawSockAddr>());
    let from = decode_sockaddr(&addr.as_bytes()[..namelen])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "sender of an unknown address family"))?;
    let control = &control.0[..(hdr.msg_controllen as usize).min(control.0.len())];
    Ok(Received { len, segment: segment_size(control, len), from })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn gro_segment_parses_control_data() {
        let mut control = Vec::new();
        control.extend_from_slice(&20usize.to_ne_bytes());
        control.extend_from_slice(&libc::SOL_UDP.to_ne_bytes());
        control.extend_from_slice(&libc::UDP_GRO.to_ne_bytes());
        control.extend_from_slice(&1452i32.to_ne_bytes());
        assert_eq!(gro_segment(&control), Some(1452));
        assert_eq!(segment_size(&control, 3 * 1452), 1452);
        // A lone datagram that happens to carry the message is one datagram.
        assert_eq!(segment_size(&control, 1452), 1452);
        assert_eq!(gro_segment(&control[..10]), None);
        assert_eq!(gro_segment(&[0u8; 64]), None);
        assert_eq!(segment_size(&[], 0), 1);
    }

    #[test]
    fn split_cuts_runs_and_keeps_empty_datagrams() {
        assert_eq!(split(10, 4).collect::<Vec<_>>(), [0..4, 4..8, 8..10]);
        assert_eq!(split(8, 4).collect::<Vec<_>>(), [0..4, 4..8]);
        assert_eq!(split(0, 1).collect::<Vec<_>>(), vec![0..0; 1]);
        assert_eq!(split(3, 0).collect::<Vec<_>>(), [0..1, 1..2, 2..3]);
    }

    #[test]
    fn gso_send_arrives_as_segments_or_a_gro_run() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let gro = nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::UdpGroSegment, &true).is_ok();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let data: Vec<u8> = (0..5 * 100 + 30).map(|i| i as u8).collect();
        assert_eq!(send(tx.as_fd(), to, false, &data, 100).unwrap(), data.len());
        let mut buf = vec![0u8; MAX_GRO_BYTES];
        let mut datagrams = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while datagrams.len() < 6 && std::time::Instant::now() < deadline {
            match recv(rx.as_fd(), &mut buf) {
                Ok(got) => {
                    assert_eq!(got.from, tx.local_addr().unwrap());
                    datagrams.extend(got.datagrams().map(|r| buf[r].to_vec()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        let lens: Vec<usize> = datagrams.iter().map(Vec::len).collect();
        assert_eq!(lens, [100, 100, 100, 100, 100, 30], "GRO on: {gro}");
        assert_eq!(datagrams.concat(), data);
        let mut small = [0u8; 10];
        send(tx.as_fd(), to, false, &[7u8; 50], 50).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let e = loop {
            match recv(rx.as_fd(), &mut small) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {}
                other => break other.unwrap_err(),
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
