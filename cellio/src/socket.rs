//! The workers' sockets: one `SO_REUSEPORT` group per listening address, one socket per worker,
//! and a classic BPF program that steers each datagram to the worker that owns its LCID.
//!
//! Steering on the LCID (the first 4 bytes of every cell, chosen by the receiver) keeps both
//! directions of a circuit on one worker and spreads load across workers even when every
//! circuit comes from one upstream neighbour (where the kernel's 4-tuple hash would put them
//! all on one socket). The control plane picks LCIDs with [`steering_worker`] so that they
//! land on the worker that holds the circuit.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, SockaddrStorage, sockopt};

/// Socket buffer size we ask for: deep enough to absorb a burst of a few thousand cells while
/// a worker is busy with the previous batch.
const SOCKET_BUFFER: usize = 8 << 20;

/// Binds `workers` UDP sockets to `addr` as one `SO_REUSEPORT` group, in order: socket `i` is
/// index `i` in the group, which is what the steering program returns. Port 0 picks a free
/// port (the first socket's) for the whole group.
///
/// Every socket is non-blocking and close-on-exec, has its buffers raised to 8 MiB (beyond
/// `net.core.rmem_max` when the process has `CAP_NET_ADMIN`; failures are ignored: the kernel
/// default still works, only burst tolerance suffers) and, for a single worker only, UDP GRO
/// enabled where the kernel supports it (see [`gro_enabled`]; with several workers a coalesced
/// datagram would be steered by its first cell alone, while its cells belong to circuits of
/// different workers). With more than one worker, a classic BPF program attached
/// with `SO_ATTACH_REUSEPORT_CBPF` sends each datagram to socket `lcid % workers` (see
/// [`steering_worker`]); datagrams shorter than 4 bytes make the program's load fail, which
/// returns 0: they go to socket 0.
///
/// The group's order is the kernel's: closing a socket of the group moves the last one into
/// its slot, so the sockets must live as long as the group is used.
pub fn bind_group(addr: SocketAddr, workers: usize) -> io::Result<Vec<UdpSocket>> {
    if workers == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a socket group needs at least one worker"));
    }
    let workers_u32 = u32::try_from(workers)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many workers for one socket group"))?;
    let mut sockets: Vec<UdpSocket> = Vec::with_capacity(workers);
    let mut addr = addr;
    for _ in 0..workers {
        let socket = bind_one(addr, workers == 1)?;
        if addr.port() == 0 {
            // The rest of the group must join the port the kernel picked for the first.
            addr.set_port(socket.local_addr()?.port());
        }
        sockets.push(socket);
    }
    if workers > 1 {
        attach_steering(&sockets[0], workers_u32)?;
    }
    Ok(sockets)
}

/// The socket (worker index) the steering program picks for a cell carrying `lcid`, in a group
/// of `workers` sockets: `lcid % workers`. Zero workers yields 0.
pub fn steering_worker(lcid: u32, workers: usize) -> usize {
    match u32::try_from(workers) {
        Ok(0) => 0,
        Ok(w) => (lcid % w) as usize,
        // More workers than LCIDs: the remainder is the LCID itself.
        Err(_) => lcid as usize,
    }
}

/// Whether UDP GRO is on for `socket` (the kernel then hands over runs of same-sized datagrams
/// from one sender as one buffer plus a `UDP_GRO` control message with the segment size).
/// [`bind_group`] turns it on where supported; the io_uring backend follows this setting and
/// the `recvmmsg` backend turns it off.
pub fn gro_enabled(socket: &UdpSocket) -> bool {
    sock::getsockopt(socket, sockopt::UdpGroSegment).unwrap_or(false)
}

/// Turns UDP GRO on or off; errors mean the kernel does not support it (before 5.0).
pub(crate) fn set_gro(socket: &UdpSocket, on: bool) -> io::Result<()> {
    sock::setsockopt(socket, sockopt::UdpGroSegment, &on).map_err(io::Error::from)
}

fn bind_one(addr: SocketAddr, gro: bool) -> io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd: OwnedFd = sock::socket(family, SockType::Datagram, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    sock::setsockopt(&fd, sockopt::ReusePort, &true)?;
    // Forced sizes need CAP_NET_ADMIN; without it, the plain option is capped by rmem_max and
    // wmem_max. Either way a smaller buffer only lowers burst tolerance, so errors are ignored.
    if sock::setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = sock::setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if sock::setsockopt(&fd, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = sock::setsockopt(&fd, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    // GRO is an optimisation (kernel ≥ 5.0); gro_enabled() tells the backend whether it took.
    // Only for a single worker: the reuseport program steers a coalesced datagram by its first
    // cell's LCID, and a neighbour's GRO run mixes circuits that other workers own.
    if gro {
        let _ = sock::setsockopt(&fd, sockopt::UdpGroSegment, &true);
    }
    sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(UdpSocket::from(fd))
}

/// Attaches `ld [0]; mod #workers; ret a` to the group `socket` belongs to.
fn attach_steering(socket: &UdpSocket, workers: u32) -> io::Result<()> {
    let mut program = [
        // A = the first 4 payload bytes, big-endian (the LCID).
        libc::sock_filter { code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, jt: 0, jf: 0, k: 0 },
        // A = A % workers.
        libc::sock_filter { code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16, jt: 0, jf: 0, k: workers },
        // The socket index in the reuseport group.
        libc::sock_filter { code: (libc::BPF_RET | libc::BPF_A) as u16, jt: 0, jf: 0, k: 0 },
    ];
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    // SAFETY (of the raw pointer inside `fprog`; the call itself is nix's safe wrapper):
    // `filter` points to `program`, 3 valid instructions that live on this stack frame until
    // after the call, and `len` is their count. The kernel copies and checks the program
    // during setsockopt and keeps no reference to our memory.
    sock::setsockopt(socket, sockopt::AttachReusePortCbpf, &fprog)?;
    Ok(())
}

/// A socket address in the C layout, big enough for IPv4 and IPv6, for `msg_name`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) union RawSockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawSockAddr {
    /// An all-zero address (family `AF_UNSPEC`).
    pub(crate) fn zeroed() -> Self {
        RawSockAddr { v6: sockaddr_in6(&SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)) }
    }

    /// Encodes `addr`, as an IPv4-mapped IPv6 address when the socket is IPv6 (`v6_socket`), and
    /// returns the length to put in `msg_namelen`.
    pub(crate) fn set(&mut self, addr: SocketAddr, v6_socket: bool) -> libc::socklen_t {
        match addr {
            SocketAddr::V4(a) if v6_socket => {
                let mapped = SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0);
                self.v6 = sockaddr_in6(&mapped);
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
            SocketAddr::V4(a) => {
                self.v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(a) => {
                self.v6 = sockaddr_in6(&a);
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    /// The raw bytes, for [`decode_sockaddr`] after the kernel wrote an address here.
    pub(crate) fn as_bytes(&self) -> &[u8; size_of::<RawSockAddr>()] {
        // SAFETY: `sockaddr_in6` spans all 28 bytes of the union without padding, and every
        // value starts from `zeroed()` (which writes it whole); later writes of either variant
        // or by the kernel only replace bytes. So all bytes are initialised integers, the
        // alignment of a byte array is 1, and the borrow ties the result to `self`.
        unsafe { &*(self as *const RawSockAddr).cast::<[u8; size_of::<RawSockAddr>()]>() }
    }
}

fn sockaddr_in6(a: &SocketAddrV6) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: a.port().to_be(),
        sin6_flowinfo: a.flowinfo().to_be(),
        sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
        sin6_scope_id: a.scope_id(),
    }
}

/// Decodes a `sockaddr_in` or `sockaddr_in6` as the kernel wrote it (`name` holds exactly the
/// bytes it wrote). Anything else, or a truncated address, is `None`. An IPv4-mapped IPv6
/// source (an IPv4 peer of a dual-stack socket) comes out as the IPv4 address, so that every
/// comparison and limit after this point sees one peer as one address; sends map it back.
pub(crate) fn decode_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    if family == libc::AF_INET as u16 {
        let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
    } else if family == libc::AF_INET6 as u16 {
        let flowinfo = u32::from_be_bytes(name.get(4..8)?.try_into().ok()?);
        let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
        let scope_id = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
        let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope_id));
        Some(cellproto::relay::canonical_addr(addr))
    } else {
        None
    }
}

/// Whether the socket is an IPv6 one (then IPv4 destinations are sent as IPv4-mapped).
pub(crate) fn is_v6(socket: &UdpSocket) -> io::Result<bool> {
    Ok(socket.local_addr()?.is_ipv6())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_formula() {
        assert_eq!(steering_worker(0x4000_0003, 4), 3);
        assert_eq!(steering_worker(0x4000_0003, 1), 0);
        assert_eq!(steering_worker(7, 0), 0);
    }

    #[test]
    fn sockaddr_round_trip() {
        for addr in ["127.0.0.1:4433", "[::1]:9", "[fe80::1%2]:53"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut raw = RawSockAddr::zeroed();
            let len = raw.set(addr, false) as usize;
            assert_eq!(decode_sockaddr(&raw.as_bytes()[..len]), Some(addr));
        }
        let mut raw = RawSockAddr::zeroed();
        let len = raw.set("127.0.0.1:7".parse().unwrap(), true) as usize;
        assert_eq!(decode_sockaddr(&raw.as_bytes()[..len]), Some("127.0.0.1:7".parse().unwrap()));
        assert_eq!(decode_sockaddr(&[0u8; 3]), None);
        assert_eq!(decode_sockaddr(&[9u8; 28]), None);
    }
}
