//! The fallback backend: `poll(2)`, `recvmmsg(2)` and `sendmmsg(2)`, for kernels or sandboxes
//! without io_uring (`kernel.io_uring_disabled`, seccomp filters, kernels before 6.0).
//!
//! One batch is at most 64 datagrams of up to 2048 bytes received into buffers this backend
//! owns; the worker rewrites them in place, and the marked ones go out with one `sendmmsg` per
//! batch before the next `recvmmsg` reuses the buffers. UDP GRO is turned off on the socket
//! (coalesced datagrams would not fit these buffers), and there is no GSO: `sendmmsg` already
//! amortises the system call, which is what this backend is for.
//!
//! The wait is one `poll(2)` on the socket and the [`Waker`]'s eventfd.
//!
//! The libc calls are made directly rather than through nix's `recvmmsg`/`sendmmsg` wrappers:
//! nix does not reset `msg_namelen` between calls on reused headers (an IPv6 sender after an
//! IPv4 one would be truncated) and its lifetimes force an allocation per call.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::socket::{RawSockAddr, decode_sockaddr, is_v6, set_gro};
use crate::{Action, Datagram, Datapath, DatapathStats, Outgoing, Waker};
use smallvec::SmallVec;

/// Datagrams per `recvmmsg`/`sendmmsg` (and per batch handed to the worker).
const BATCH: usize = 64;
/// Receive buffer size: a cell (1452 bytes) and any STUN message fit; larger datagrams are
/// truncated and counted as receive errors.
const BUF_SIZE: usize = 2048;
/// Batches per `poll` call at most, so that one busy socket does not starve the worker's
/// timers (up to 256 datagrams per call).
const MAX_BATCHES: usize = 4;
/// How long a send may wait for room in the socket's send buffer before its datagrams are
/// counted as lost.
const SEND_WAIT: Duration = Duration::from_millis(10);

/// The `recvmmsg`/`sendmmsg` backend.
pub struct MmsgDatapath {
    socket: UdpSocket,
    local: SocketAddr,
    v6: bool,
    /// `BATCH` receive buffers of `BUF_SIZE` bytes, back to back.
    bufs: Box<[u8]>,
    /// Per receive slot of the last batch: the datagram's length and sender (`None`: dropped
    /// as truncated or with an unknown address family).
    received: Vec<(usize, Option<SocketAddr>)>,
    stats: DatapathStats,
    waker: Waker,
    /// Their readability ends a wait too ([`Datapath::watch`]).
    watched: Vec<std::os::fd::OwnedFd>,
}

impl MmsgDatapath {
    /// Wraps `socket` (any UDP socket; it need not be non-blocking: every call here is). Turns
    /// UDP GRO off on it.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let local = socket.local_addr()?;
        // Unsupported (kernel < 5.0) means it cannot be on either.
        let _ = set_gro(&socket, false);
        Ok(MmsgDatapath {
            v6: is_v6(&socket)?,
            socket,
            local,
            bufs: vec![0u8; BATCH * BUF_SIZE].into_boxed_slice(),
            received: Vec::with_capacity(BATCH),
            stats: DatapathStats::default(),
            waker: Waker::new()?,
            watched: Vec::new(),
        })
    }

    /// One `recvmmsg` without waiting into the buffers; fills `self.received` and returns how
    /// many datagrams arrived (including those dropped as invalid).
    fn recv_batch(&mut self) -> io::Result<usize> {
        self.received.clear();
        let mut names = [RawSockAddr::zeroed(); BATCH];
        let mut iovs: [libc::iovec; BATCH] =
            std::array::from_fn(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 });
        for (iov, buf) in iovs.iter_mut().zip(self.bufs.chunks_exact_mut(BUF_SIZE)) {
            *iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        }
        // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for ((hdr, name), iov) in hdrs.iter_mut().zip(names.iter_mut()).zip(iovs.iter_mut()) {
            hdr.msg_hdr.msg_name = (name as *mut RawSockAddr).cast();
            hdr.msg_hdr.msg_namelen = size_of::<RawSockAddr>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points to its own `names` entry (with its size as namelen) and
        // one iovec covering one distinct `BUF_SIZE` chunk of `self.bufs`; all of these live on
        // this frame or in `self` until the call returns, and the kernel writes only within
        // them. `BATCH` is the length of `hdrs`. MSG_DONTWAIT: never blocks.
        let n = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(0),
                Some(libc::EBADF | libc::ENOTSOCK | libc::EFAULT | libc::EINVAL) => Err(err),
                // Transient (ENOMEM, ENOBUFS, a pending ICMP error): count it and go on.
                _ => {
                    self.stats.rx_errors += 1;
                    Ok(0)
                }
            };
        }
        let n = n as usize;
        for (hdr, name) in hdrs.iter().zip(names.iter()).take(n) {
            let len = hdr.msg_len as usize;
            let from = if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                None
            } else {
                let name_len = (hdr.msg_hdr.msg_namelen as usize).min(size_of::<RawSockAddr>());
                decode_sockaddr(&name.as_bytes()[..name_len])
            };
            if from.is_none() {
                self.stats.rx_errors += 1;
            }
            self.received.push((len.min(BUF_SIZE), from));
        }
        Ok(n)
    }

    /// Waits until the socket is readable, a wake comes or `timeout` passes; returns whether
    /// the socket is readable (`false` on timeout, signal or wake). Consumes the wake: the
    /// caller must not wait again before returning from `poll`.
    fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut fds =
            vec![PollFd::new(self.socket.as_fd(), PollFlags::POLLIN), PollFd::new(self.waker.fd(), PollFlags::POLLIN)];
        fds.extend(self.watched.iter().map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN)));
        match nix::poll::poll(&mut fds, poll_timeout(timeout)) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let revents = |i: usize| fds.get(i).and_then(PollFd::revents).unwrap_or(PollFlags::empty());
        let (socket, wake) = (revents(0), revents(1));
        if (socket | wake).contains(PollFlags::POLLNVAL) {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        if !wake.is_empty() {
            self.waker.reset();
        }
        // POLLERR too: a pending error (ICMP) that the next `recvmmsg` reports and clears.
        Ok(!socket.is_empty())
    }
}

impl Datapath for MmsgDatapath {
    fn poll(
        &mut self,
        timeout: Duration,
        handle: &mut dyn FnMut(&mut [Datagram<'_>]),
        extra: &mut Vec<Outgoing>,
    ) -> io::Result<usize> {
        let mut total = 0;
        let mut batches = 0;
        let mut waited = false;
        while batches < MAX_BATCHES {
            // Receive first and wait only when the socket is empty: under load, this saves the
            // poll(2) call per batch.
            let n = self.recv_batch()?;
            if n == 0 {
                if total > 0 || waited || !self.wait(timeout)? {
                    break;
                }
                waited = true;
                continue;
            }
            batches += 1;
            self.stats.rx_datagrams += self.received.iter().filter(|r| r.1.is_some()).count() as u64;
            // On the stack: no allocation per batch.
            let mut batch: SmallVec<[Datagram<'_>; BATCH]> = SmallVec::new();
            for (buf, &(len, from)) in self.bufs.chunks_exact_mut(BUF_SIZE).zip(self.received.iter()) {
                if let Some(from) = from {
                    batch.push(Datagram { from, data: &mut buf[..len], action: Action::Drop });
                }
            }
            total += batch.len();
            handle(&mut batch);
            let marked = batch.iter().filter_map(|d| match d.action {
                Action::Send(to) => Some((&*d.data, to)),
                Action::Drop => None,
            });
            let sender = Sender { fd: self.socket.as_raw_fd(), v6: self.v6 };
            sender.send_all(marked.chain(extra.iter().map(|o| (o.data(), o.to))), &mut self.stats);
            extra.clear();
            if n < BATCH {
                break;
            }
        }
        if !extra.is_empty() {
            let sender = Sender { fd: self.socket.as_raw_fd(), v6: self.v6 };
            sender.send_all(extra.iter().map(|o| (o.data(), o.to)), &mut self.stats);
            extra.clear();
        }
        Ok(total)
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn kind(&self) -> &'static str {
        "recvmmsg"
    }

    fn stats(&self) -> DatapathStats {
        self.stats
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn watch(&mut self, fd: std::os::fd::OwnedFd) {
        self.watched.push(fd);
    }
}

/// The sending half, apart from the receive buffers so that it can run while the worker's
/// batch still borrows them.
struct Sender {
    fd: RawFd,
    v6: bool,
}

impl Sender {
    /// Sends every `(bytes, destination)` with one `sendmmsg` per 64, counting what was lost.
    fn send_all<'a>(&self, mut items: impl Iterator<Item = (&'a [u8], SocketAddr)>, stats: &mut DatapathStats) {
        let mut names = [RawSockAddr::zeroed(); BATCH];
        let mut iovs: [libc::iovec; BATCH] =
            std::array::from_fn(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 });
        loop {
            let mut n = 0;
            let mut namelens = [0 as libc::socklen_t; BATCH];
            for (bytes, to) in items.by_ref().take(BATCH) {
                namelens[n] = names[n].set(to, self.v6);
                // The kernel only reads through this pointer (sendmmsg), never writes.
                iovs[n] = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
                n += 1;
            }
            if n == 0 {
                return;
            }
            // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
            let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for i in 0..n {
                hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut RawSockAddr).cast();
                hdrs[i].msg_hdr.msg_namelen = namelens[i];
                hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            self.send_batch(&mut hdrs[..n], stats);
        }
    }

    /// One batch: retries the rest after a partial send, skips a datagram the kernel refuses
    /// (the first unsent one is the culprit), and waits briefly for room on EAGAIN.
    fn send_batch(&self, hdrs: &mut [libc::mmsghdr], stats: &mut DatapathStats) {
        let mut start = 0;
        let mut waits = 0;
        // Bounded: each round sends, skips one datagram or waits (at most 3 times).
        let mut rounds = hdrs.len() + 8;
        while start < hdrs.len() && rounds > 0 {
            rounds -= 1;
            let rest = &mut hdrs[start..];
            // SAFETY: `rest` is a valid slice of initialised headers whose names and iovecs
            // point to `send_all`'s arrays and the caller's byte slices, all alive until this
            // call returns; the kernel only reads them (and writes `msg_len`).
            let sent =
                unsafe { libc::sendmmsg(self.fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, libc::MSG_DONTWAIT) };
            stats.tx_batches += 1;
            if sent > 0 {
                stats.tx_datagrams += sent as u64;
                start += sent as usize;
                continue;
            }
            let errno = if sent == 0 { libc::EIO } else { io::Error::last_os_error().raw_os_error().unwrap_or(0) };
            match errno {
                libc::EINTR => {}
                libc::EAGAIN | libc::ENOBUFS => {
                    if waits >= 3 || !wait_fd(self.fd, libc::POLLOUT, SEND_WAIT).unwrap_or(false) {
                        break;
                    }
                    waits += 1;
                }
                // This datagram cannot go (unreachable, wrong family, EMSGSIZE, firewall).
                _ => {
                    stats.tx_errors += 1;
                    start += 1;
                }
            }
        }
        stats.tx_errors += (hdrs.len() - start) as u64;
    }
}

/// `timeout` in whole milliseconds for `poll(2)`, rounded up so that a sub-millisecond timeout
/// still waits rather than spins; at most `i32::MAX` ms (24 days).
fn poll_timeout(timeout: Duration) -> PollTimeout {
    PollTimeout::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(PollTimeout::MAX)
}

/// `poll(2)` on one descriptor: `Ok(true)` when ready, `Ok(false)` on timeout or signal.
fn wait_fd(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events, revents: 0 };
    let ms = i32::from(poll_timeout(timeout));
    // SAFETY: `pfd` is one valid pollfd on this frame, and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::EINTR) { Ok(false) } else { Err(err) };
    }
    if pfd.revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(r > 0)
}
