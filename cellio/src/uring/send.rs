//! The sending half of the io_uring backend: `sendmsg` requests, grouped into UDP GSO sends
//! where consecutive datagrams share a destination and a length.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::ptr;
use std::time::{Duration, Instant};

use io_uring::opcode;
use io_uring::types::{CancelBuilder, Fd};

use super::UringDatapath;
use crate::gso::{GsoCmsg, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};
use crate::socket::RawSockAddr;

/// `sendmsg` requests per submission round (the receive re-arm needs one more SQE).
const SEND_SLOTS: usize = 192;
/// iovecs per submission round (a GSO send uses one per segment).
const IOV_POOL: usize = 1024;
/// How long a poll waits for its sends before cancelling them.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// One in-flight `sendmsg`: the header and what it points to (besides the iovecs).
pub(super) struct SendSlot {
    hdr: libc::msghdr,
    addr: RawSockAddr,
    cmsg: GsoCmsg,
    /// Index of its first datagram in `sends`, and how many it carries.
    first: usize,
    count: usize,
}

/// A datagram to send: its bytes (in a ring buffer or in `held`), destination, and whether it
/// must go alone (after a failed GSO send).
pub(super) struct SendItem {
    pub(super) ptr: *const u8,
    pub(super) len: usize,
    pub(super) to: SocketAddr,
    pub(super) solo: bool,
}

/// The slots and iovecs for one submission round, kept for the backend's life (their
/// addresses are in flight while a round is).
pub(super) fn new_slots() -> (Box<[SendSlot]>, Box<[libc::iovec]>) {
    let slots = (0..SEND_SLOTS)
        .map(|_| SendSlot {
            // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
            hdr: unsafe { std::mem::zeroed() },
            addr: RawSockAddr::zeroed(),
            cmsg: GsoCmsg::zeroed(),
            first: 0,
            count: 0,
        })
        .collect();
    let iovs = (0..IOV_POOL).map(|_| libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 }).collect();
    (slots, iovs)
}

impl UringDatapath {
    /// Sends `sends`, in rounds of at most `SEND_SLOTS` requests, waiting for each round. If
    /// it fails, the datagrams never submitted are counted as lost (`tx_errors`): the next
    /// poll recycles them unsent. (Those submitted are counted when they complete.)
    pub(super) fn send_all(&mut self) -> io::Result<()> {
        let mut next = 0;
        let result = self.send_rounds(&mut next);
        if result.is_err() {
            self.stats.tx_errors += self.sends.len().saturating_sub(next) as u64;
        }
        result
    }

    /// [`UringDatapath::send_all`]'s rounds; `next` is the first datagram not yet submitted.
    fn send_rounds(&mut self, next: &mut usize) -> io::Result<()> {
        while *next < self.sends.len() {
            let (mut slot, mut iov) = (0, 0);
            while *next < self.sends.len() && slot < SEND_SLOTS {
                let first = &self.sends[*next];
                let mut n = 1;
                if self.gso && !first.solo && first.len > 0 && first.len <= usize::from(u16::MAX) {
                    while *next + n < self.sends.len()
                        && n < MAX_GSO_SEGMENTS
                        && (n + 1) * first.len <= MAX_GSO_BYTES
                        && !self.sends[*next + n].solo
                        && self.sends[*next + n].len == first.len
                        && self.sends[*next + n].to == first.to
                    {
                        n += 1;
                    }
                }
                if iov + n > IOV_POOL {
                    break;
                }
                self.prepare_send(slot, *next, n, iov)?;
                *next += n;
                slot += 1;
                iov += n;
            }
            self.stats.tx_batches += 1;
            self.wait_sends()?;
        }
        if !self.ring.submission().is_empty() {
            // A re-armed receive with nothing to send.
            self.submit(0, None)?;
        }
        Ok(())
    }

    /// Fills slot `slot` for `sends[first..first + n]` using iovecs from `iov`, and queues it.
    fn prepare_send(&mut self, slot: usize, first: usize, n: usize, iov: usize) -> io::Result<()> {
        for (k, item) in self.sends[first..first + n].iter().enumerate() {
            self.iovs[iov + k] = libc::iovec { iov_base: item.ptr.cast_mut().cast(), iov_len: item.len };
        }
        let (to, len) = (self.sends[first].to, self.sends[first].len);
        let s = &mut self.slots[slot];
        s.first = first;
        s.count = n;
        s.hdr.msg_namelen = s.addr.set(to, self.v6);
        s.hdr.msg_name = (&mut s.addr as *mut RawSockAddr).cast();
        s.hdr.msg_iov = &mut self.iovs[iov];
        s.hdr.msg_iovlen = n as _;
        if n > 1 {
            s.cmsg = GsoCmsg::new(len as u16);
            s.hdr.msg_control = (&mut s.cmsg as *mut GsoCmsg).cast();
            s.hdr.msg_controllen = size_of::<GsoCmsg>() as _;
            self.gso_sends += 1;
        } else {
            s.hdr.msg_control = ptr::null_mut();
            s.hdr.msg_controllen = 0;
        }
        let sqe = opcode::SendMsg::new(Fd(self.socket.as_raw_fd()), &s.hdr).build().user_data(slot as u64);
        // SAFETY: the msghdr, its address and control message live in the boxed `slots`, its
        // iovecs in the boxed `iovs`, and the bytes in ring buffers not yet given back or in
        // `held`; none of these is modified or freed until this request completed, because
        // `poll` waits for every send (`wait_sends`) before reusing slots or recycling.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("submission queue full"))?;
        }
        self.inflight += 1;
        Ok(())
    }

    /// Submits what is queued and waits until no send is in flight; after `SEND_TIMEOUT`
    /// (a send buffer that never drains) cancels them, so that a poll is bounded.
    pub(super) fn wait_sends(&mut self) -> io::Result<()> {
        let mut deadline = Instant::now() + SEND_TIMEOUT;
        let mut cancelled = false;
        loop {
            if self.inflight == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                if cancelled {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "io_uring sends did not complete"));
                }
                // Cancels the receive too; it is re-armed by the next poll.
                tracing::warn!(inflight = self.inflight, "io_uring sends stuck, cancelling them");
                let _ = self.ring.submitter().register_sync_cancel(None, CancelBuilder::any());
                cancelled = true;
                deadline = now + SEND_TIMEOUT;
            }
            self.submit(self.inflight, Some(deadline.saturating_duration_since(now)))?;
            self.drain()?;
        }
    }

    /// Accounts for a completed `sendmsg`; a refused GSO send is retried datagram by datagram.
    pub(super) fn complete_send(&mut self, slot: usize, res: i32) {
        let Some(s) = self.slots.get(slot) else { return };
        let (first, count) = (s.first, s.count);
        self.inflight = self.inflight.saturating_sub(1);
        if res >= 0 {
            self.stats.tx_datagrams += count as u64;
            return;
        }
        if count > 1 {
            // GSO refused (route MTU below the segment, no checksum offload, old kernel):
            // send these alone; stop trying GSO where the device cannot do it at all.
            if matches!(-res, libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT) && self.gso {
                self.gso = false;
                tracing::warn!(error = %io::Error::from_raw_os_error(-res), "UDP GSO unavailable, sending datagrams one by one");
            }
            for i in first..first + count {
                if let Some(item) = self.sends.get(i) {
                    let retry = SendItem { ptr: item.ptr, len: item.len, to: item.to, solo: true };
                    self.sends.push(retry);
                }
            }
            return;
        }
        self.stats.tx_errors += count as u64;
    }
}
