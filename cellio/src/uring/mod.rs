//! The io_uring backend, on the `io-uring` crate directly (tokio-uring lacks multishot receive
//! and buffer rings).
//!
//! - Receive: one multishot `recvmsg` fills buffers the kernel picks from a provided buffer
//!   ring; each completion is one datagram (or, with UDP GRO, a run of same-sized datagrams from
//!   one sender, split here by the `UDP_GRO` segment size). The worker gets the datagrams in
//!   those buffers: no copy.
//! - Send: runs of datagrams to one destination with one length become one `sendmsg` with a
//!   `UDP_SEGMENT` control message (GSO, at most 64 segments and 64 KiB); everything else is one
//!   `sendmsg` each. All of a poll's sends go out with one `submit_and_wait`.
//! - Buffers go back to the ring only after every send of the poll completed (the sends read
//!   them): each poll waits for its own send completions. UDP sends complete inline at submit
//!   time unless the send buffer is full, so this costs no extra system call.
//! - Wake: a multishot `poll` on the [`Waker`]'s eventfd stays armed in the ring; its
//!   completion ends the wait like a datagram does, and the eventfd is then read (reset) with
//!   one `read(2)` (wakes are rare: one per control message). A poll rather than an io_uring
//!   read: older kernels complete a read of an `O_NONBLOCK` file with EAGAIN at once instead
//!   of waiting (the waker's eventfd must stay non-blocking for `wake`), and a poll has no
//!   buffer in flight. Re-armed by the next `poll` if the kernel ended it.
//! - No zero-copy send: for 1452-byte datagrams, pinning pages and the extra notification
//!   completion cost more than the copy they save.
//!
//! Buffers: 512 × 2 KiB without GRO; with GRO 128 × 68 KiB (a coalesced run is up to 64 KiB),
//! about 9 MiB per worker, touched lazily.
//!
//! The ring is created with `SINGLE_ISSUER | DEFER_TASKRUN` (fewest interrupts and no task work
//! on other threads) and disabled, then enabled by the first `poll`: the thread that polls first
//! becomes the ring's only submitter, so a datapath may be opened on one thread and moved to its
//! worker, but must then be polled (and preferably dropped) there.

mod bufring;
mod send;

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::types::{CancelBuilder, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode};

use crate::gso;
use crate::socket::{decode_sockaddr, gro_enabled, is_v6};
use crate::{Action, Datagram, Datapath, DatapathStats, Outgoing, Waker};
use bufring::BufRing;
use send::{SendItem, SendSlot};
use smallvec::SmallVec;

const SQ_ENTRIES: u32 = 256;
/// Room for every buffer's receive completion plus a round of sends.
const CQ_ENTRIES: u32 = 4096;
/// Datagrams handed to the worker per call.
const BATCH: usize = 64;
/// Datagrams per poll at most (more stay queued), so one busy socket does not starve timers.
const MAX_PER_POLL: usize = 256;
/// Bytes reserved for the sender's address in each buffer (≥ `sockaddr_in6`, keeps alignment).
const NAME_LEN: usize = 32;
/// Bytes reserved for control messages with GRO (the `UDP_GRO` one needs 24).
const GRO_CONTROL_LEN: usize = 64;
/// Buffer size with GRO: the `io_uring_recvmsg_out` header (16), the name, the control data and
/// the largest coalesced payload (65,535 bytes) fit in 68 KiB.
const GRO_BUF_SIZE: usize = 68 * 1024;
const BGID: u16 = 0;
/// `user_data` of the receive; a send's is its slot index.
const RECV_TAG: u64 = u64::MAX;
/// `user_data` of the poll on the waker's eventfd.
const WAKE_TAG: u64 = u64::MAX - 1;
/// `user_data` of the poll on watched descriptor `i` ([`Datapath::watch`]): `WATCH_TAG - i`.
const WATCH_TAG: u64 = u64::MAX - 2;
/// Most descriptors one data path watches.
const MAX_WATCHED: usize = 8;

/// A received datagram not yet handed over: buffer id, payload offset and length, sender.
struct Segment {
    bid: u16,
    off: usize,
    len: usize,
    from: SocketAddr,
}

/// The io_uring backend.
pub struct UringDatapath {
    // Declared first so that the ring is closed before the memory it used is freed.
    ring: IoUring,
    socket: UdpSocket,
    local: SocketAddr,
    v6: bool,
    /// Waiting for the first poll to enable the ring (see the module doc).
    disabled: bool,
    gro: bool,
    gso: bool,
    /// Whether the multishot receive is armed.
    armed: bool,
    waker: Waker,
    /// Whether the multishot poll on the waker's eventfd is armed.
    wake_armed: bool,
    /// Descriptors whose readability ends a wait, and whether each one's multishot poll is armed.
    watched: Vec<(std::os::fd::OwnedFd, bool)>,
    /// A wake was consumed (the eventfd reset) and `poll` has not returned since: it must not
    /// wait (the caller has yet to look at what the wake was for).
    woken: bool,
    /// Sends submitted and not completed (nonzero only after an error inside `poll`).
    inflight: usize,
    bufs: BufRing,
    /// The `msghdr` the multishot receive was armed with (the kernel reads its name and
    /// control lengths; `RecvMsgOut::parse` needs it too).
    recv_hdr: Box<libc::msghdr>,
    /// Receive completions not yet handed over: (buffer id, result).
    pending: VecDeque<(u16, usize)>,
    /// Buffers handed over in this poll, to give back once its sends completed.
    consumed: Vec<u16>,
    segments: Vec<Segment>,
    sends: Vec<SendItem>,
    /// The worker's extra datagrams, kept alive until their sends completed.
    held: Vec<Outgoing>,
    slots: Box<[SendSlot]>,
    iovs: Box<[libc::iovec]>,
    cqes: Vec<(u64, i32, u32)>,
    stats: DatapathStats,
    /// Datagrams split out of GRO receives, and GSO sends (for tests and diagnostics).
    gro_segments: u64,
    gso_sends: u64,
}

// SAFETY: the raw pointers inside (`msghdr`s, iovecs, `SendItem::ptr`, the regions) point into
// heap memory this struct owns or into the worker's datagrams during one `poll` call; nothing
// is shared with another thread, so moving the whole struct to another thread is sound. (The
// kernel's single-issuer rule is enforced at run time: see the module doc.)
unsafe impl Send for UringDatapath {}

impl UringDatapath {
    /// Opens the backend on `socket`; fails when io_uring, provided buffer rings or multishot
    /// `recvmsg` (kernel 6.0) are unavailable.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        Self::try_new(socket).map_err(|(e, _)| e)
    }

    /// As [`UringDatapath::new`], giving the socket back on failure (for the fallback).
    pub(crate) fn try_new(socket: UdpSocket) -> Result<Self, (io::Error, UdpSocket)> {
        match Self::build(&socket) {
            Ok(parts) => Self::assemble(parts, socket),
            Err(e) => Err((e, socket)),
        }
    }

    fn build(socket: &UdpSocket) -> io::Result<(IoUring, bool)> {
        socket.local_addr()?;
        let (ring, disabled) = new_ring()?;
        check_kernel(&ring)?;
        Ok((ring, disabled))
    }

    fn assemble((ring, disabled): (IoUring, bool), socket: UdpSocket) -> Result<Self, (io::Error, UdpSocket)> {
        let gro = gro_enabled(&socket);
        let (buf_size, buf_count, control_len) =
            if gro { (GRO_BUF_SIZE, 128u16, GRO_CONTROL_LEN) } else { (2048, 512u16, 0) };
        let parts = (|| -> io::Result<(SocketAddr, bool, BufRing, Waker)> {
            Ok((socket.local_addr()?, is_v6(&socket)?, BufRing::new(&ring, buf_size, buf_count, BGID)?, Waker::new()?))
        })();
        let (local, v6, bufs, waker) = match parts {
            Ok(p) => p,
            Err(e) => return Err((e, socket)),
        };
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
        recv_hdr.msg_controllen = control_len as _;
        let (slots, iovs) = send::new_slots();
        Ok(UringDatapath {
            ring,
            socket,
            local,
            v6,
            disabled,
            gro,
            gso: true,
            armed: false,
            waker,
            wake_armed: false,
            watched: Vec::new(),
            woken: false,
            inflight: 0,
            bufs,
            recv_hdr,
            pending: VecDeque::new(),
            consumed: Vec::new(),
            segments: Vec::with_capacity(MAX_PER_POLL + 64),
            sends: Vec::new(),
            held: Vec::new(),
            slots,
            iovs,
            cqes: Vec::new(),
            stats: DatapathStats::default(),
            gro_segments: 0,
            gso_sends: 0,
        })
    }

    /// Whether UDP GRO receives are expected (the socket had it on at open).
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Datagrams split out of coalesced (GRO) receives so far.
    pub fn gro_segments(&self) -> u64 {
        self.gro_segments
    }

    /// `sendmsg` requests that carried several datagrams (UDP GSO) so far.
    pub fn gso_sends(&self) -> u64 {
        self.gso_sends
    }

    /// Arms the multishot receive if it is not and the kernel has buffers for it, and the
    /// poll on the waker's eventfd if it is not.
    fn arm(&mut self) -> io::Result<()> {
        if !self.wake_armed {
            let sqe = opcode::PollAdd::new(Fd(self.waker.fd().as_raw_fd()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(WAKE_TAG);
            // SAFETY: a poll request points to no memory of ours: only the eventfd, which the
            // kernel holds a reference to while the request is in flight (and which `waker`
            // keeps open anyway). `Drop` cancels it with the receive.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                self.ring.submit()?;
                // SAFETY: as above.
                unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("submission queue full"))?;
            }
            self.wake_armed = true;
        }
        for (i, (fd, armed)) in self.watched.iter_mut().enumerate().filter(|(_, w)| !w.1) {
            let sqe = opcode::PollAdd::new(Fd(fd.as_raw_fd()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(WATCH_TAG - i as u64);
            // SAFETY: as for the waker's poll: no memory of ours, only the descriptor, which
            // `watched` keeps open until `Drop` has cancelled the request.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                self.ring.submit()?;
                // SAFETY: as above.
                unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("submission queue full"))?;
            }
            *armed = true;
        }
        if self.armed || self.bufs.in_ring() == 0 {
            return Ok(());
        }
        let sqe =
            opcode::RecvMsgMulti::new(Fd(self.socket.as_raw_fd()), &*self.recv_hdr, BGID).build().user_data(RECV_TAG);
        // SAFETY: `recv_hdr` is boxed (stable address) and lives as long as the ring; the
        // buffers it fills come from the registered ring, which outlives the request (`Drop`
        // cancels it or leaks the memory).
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("submission queue full"))?;
        }
        self.armed = true;
        Ok(())
    }

    /// Moves every completion out of the queue: receives to `pending`, sends to their slots.
    fn drain(&mut self) -> io::Result<()> {
        self.cqes.clear();
        self.cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        let mut fatal = None;
        for i in 0..self.cqes.len() {
            let (tag, res, flags) = self.cqes[i];
            match tag {
                RECV_TAG => {
                    if !cqueue::more(flags) {
                        self.armed = false;
                    }
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        let ours = self.bufs.taken(bid);
                        if res >= 0 && ours {
                            self.pending.push_back((bid, res as usize));
                        } else if ours {
                            self.stats.rx_errors += 1;
                            self.consumed.push(bid);
                        }
                    } else if res < 0 {
                        match -res {
                            // Out of buffers (re-armed once some are back) or cancelled.
                            libc::ENOBUFS | libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                            // The socket or the kernel refuses the request itself: retrying
                            // would spin.
                            e @ (libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EOPNOTSUPP) => {
                                self.stats.rx_errors += 1;
                                fatal = Some(e);
                            }
                            _ => self.stats.rx_errors += 1,
                        }
                    }
                }
                WAKE_TAG => {
                    if !cqueue::more(flags) {
                        self.wake_armed = false;
                    }
                    if res > 0 {
                        // Readable: consume the wakes; `poll` returns without waiting again.
                        self.waker.reset();
                        self.woken = true;
                    } else if res < 0 {
                        match -res {
                            // Cancelled (quiesce, stuck sends) or ended: re-armed next poll.
                            libc::ECANCELED | libc::EINTR | libc::EAGAIN | libc::ENOMEM => {}
                            // Re-arming would fail the same way and end every wait at once.
                            e => fatal = Some(e),
                        }
                    }
                }
                tag if tag <= WATCH_TAG && tag > WATCH_TAG - MAX_WATCHED as u64 => {
                    if !cqueue::more(flags)
                        && let Some((_, armed)) = self.watched.get_mut((WATCH_TAG - tag) as usize)
                    {
                        *armed = false;
                    }
                    // Readable: the caller reads it after `poll` returns. Errors (cancelled,
                    // ended) just re-arm; the descriptor is the caller's to check.
                    if res > 0 {
                        self.woken = true;
                    }
                }
                slot => self.complete_send(slot as usize, res),
            }
        }
        match fatal {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    /// Turns up to `MAX_PER_POLL` pending receives into `segments`.
    fn take_segments(&mut self) {
        while self.segments.len() < MAX_PER_POLL {
            let Some((bid, res)) = self.pending.pop_front() else { break };
            self.consumed.push(bid);
            // SAFETY: the kernel gave buffer `bid` back with this completion and does not touch
            // it until we provide it again; it lies inside `bufs` (`taken` checked `bid`), and this
            // shared borrow ends before any mutable one below.
            let buf = unsafe { std::slice::from_raw_parts(self.bufs.buffer(bid), self.bufs.size()) };
            let Ok(out) = RecvMsgOut::parse(&buf[..res.min(buf.len())], &self.recv_hdr) else {
                self.stats.rx_errors += 1;
                continue;
            };
            let from = if out.is_name_data_truncated() { None } else { decode_sockaddr(out.name_data()) };
            let (Some(from), false) = (from, out.is_payload_truncated()) else {
                self.stats.rx_errors += 1;
                continue;
            };
            let payload = out.payload_data();
            let off = payload.as_ptr() as usize - buf.as_ptr() as usize;
            let seg = gso::segment_size(out.control_data(), payload.len());
            if seg < payload.len() {
                self.gro_segments += payload.len().div_ceil(seg) as u64;
            }
            for r in gso::split(payload.len(), seg) {
                self.segments.push(Segment { bid, off: off + r.start, len: r.len(), from });
            }
        }
    }

    /// `io_uring_enter`: submits and waits for `want` completions (at most `timeout`).
    /// A timeout or a signal is not an error: the caller looks at what completed.
    fn submit(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        let r = match timeout {
            Some(t) => {
                let ts = Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None => self.ring.submit_and_wait(want),
        };
        match r {
            Ok(_) => Ok(()),
            // ETIME: timeout; EBUSY: completion queue overflow, drained next.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Gives this poll's buffers back to the kernel and forgets its sends.
    fn recycle(&mut self) {
        for bid in self.consumed.drain(..) {
            self.bufs.provide(bid);
        }
        self.bufs.publish();
        self.segments.clear();
        self.sends.clear();
        self.held.clear();
    }
}

impl Datapath for UringDatapath {
    fn poll(
        &mut self,
        timeout: Duration,
        handle: &mut dyn FnMut(&mut [Datagram<'_>]),
        extra: &mut Vec<Outgoing>,
    ) -> io::Result<usize> {
        if self.disabled {
            // This thread becomes the ring's single issuer.
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
        if self.inflight > 0 {
            // An error interrupted the last poll's sends; their buffers are still in use.
            self.wait_sends()?;
        }
        // Anything left by an interrupted poll (a panicking handler) goes back first.
        self.recycle();
        self.arm()?;
        if self.pending.is_empty() && !self.woken {
            // The kernel rejects absurd timespecs; an hour is as good as forever here.
            self.submit(1, Some(timeout.min(Duration::from_secs(3600))))?;
        }
        self.drain()?;
        self.take_segments();
        let mut received = 0;
        for chunk in self.segments.chunks(BATCH) {
            // On the stack: no allocation per batch.
            let mut batch: SmallVec<[Datagram<'_>; BATCH]> = chunk
                .iter()
                .map(|s| Datagram {
                    from: s.from,
                    // SAFETY: each segment is a distinct range inside a buffer the kernel gave
                    // back and does not touch until `recycle`; no other reference to these
                    // bytes exists while the batch lives.
                    data: unsafe { std::slice::from_raw_parts_mut(self.bufs.buffer(s.bid).add(s.off), s.len) },
                    action: Action::Drop,
                })
                .collect();
            received += batch.len();
            handle(&mut batch);
            for d in &batch {
                if let Action::Send(to) = d.action {
                    self.sends.push(SendItem { ptr: d.data.as_ptr(), len: d.data.len(), to, solo: false });
                }
            }
        }
        self.stats.rx_datagrams += received as u64;
        // `held` is empty here (recycled above): take the caller's vector whole instead of
        // moving each inline datagram, and give it ours (empty, its capacity kept) back. No
        // pointer into `held` is taken before this, and `held` does not grow until `recycle`.
        let first_extra = self.held.len();
        if first_extra == 0 {
            std::mem::swap(&mut self.held, extra);
        } else {
            self.held.append(extra);
        }
        for o in &self.held[first_extra..] {
            let data = o.data();
            self.sends.push(SendItem { ptr: data.as_ptr(), len: data.len(), to: o.to, solo: false });
        }
        self.send_all()?;
        self.recycle();
        // Whatever woke this poll is the caller's to look at now (a wake consumed by an
        // earlier, failed poll is kept until a poll returns normally).
        self.woken = false;
        Ok(received)
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn kind(&self) -> &'static str {
        "io_uring"
    }

    fn stats(&self) -> DatapathStats {
        self.stats
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn watch(&mut self, fd: std::os::fd::OwnedFd) {
        if self.watched.len() < MAX_WATCHED {
            self.watched.push((fd, false));
        }
    }
}

impl UringDatapath {
    /// Stops the kernel from using our memory: the multishot receive may still write into the
    /// buffers, a send (after an error) may still read them. Cancels them synchronously, with
    /// the poll on the waker's eventfd; returns whether that is confirmed.
    fn quiesce(&mut self) -> bool {
        let watch_armed = self.watched.iter().any(|w| w.1);
        if !self.armed && !self.wake_armed && !watch_armed && self.inflight == 0 {
            return true;
        }
        let ts = Timespec::new().sec(1);
        match self.ring.submitter().register_sync_cancel(Some(ts), CancelBuilder::any()) {
            // ENOENT: nothing left to cancel (the receive had already ended).
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                tracing::debug!(error = %e, "cannot cancel io_uring requests");
                false
            }
            _ => {
                self.armed = false;
                self.wake_armed = false;
                self.watched.iter_mut().for_each(|w| w.1 = false);
                self.inflight = 0;
                true
            }
        }
    }
}

impl Drop for UringDatapath {
    fn drop(&mut self) {
        if !self.quiesce() {
            // Leak rather than free memory under the kernel's feet (another thread than the
            // ring's issuer, a kernel without synchronous cancellation).
            tracing::warn!("io_uring requests still in flight at drop: leaking their buffers");
            self.bufs.leak();
            std::mem::forget(std::mem::take(&mut self.held));
        }
    }
}

/// Sets a ring up with the best flags the kernel accepts. Returns whether it is disabled
/// (to be enabled by the polling thread).
fn new_ring() -> io::Result<(IoUring, bool)> {
    let best = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_submit_all()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_r_disabled()
        .build(SQ_ENTRIES);
    if let Ok(ring) = best {
        return Ok((ring, true));
    }
    // Before 6.1 (DEFER_TASKRUN) or 5.19 (COOP_TASKRUN): fewer optimisations, same behaviour.
    if let Ok(ring) =
        IoUring::builder().setup_cqsize(CQ_ENTRIES).setup_submit_all().setup_coop_taskrun().build(SQ_ENTRIES)
    {
        return Ok((ring, false));
    }
    Ok((IoUring::builder().setup_cqsize(CQ_ENTRIES).build(SQ_ENTRIES)?, false))
}

/// What this backend needs beyond a ring: timed waits (5.11), `recvmsg`/`sendmsg`, and
/// multishot `recvmsg` (6.0; probed through `SEND_ZC`, which arrived in the same release).
fn check_kernel(ring: &IoUring) -> io::Result<()> {
    let unsupported = |what: &str| io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks {what}"));
    if !ring.params().is_feature_ext_arg() {
        return Err(unsupported("timed waits (kernel < 5.11)"));
    }
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, what) in [
        (opcode::RecvMsg::CODE, "recvmsg"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::SendZc::CODE, "multishot recvmsg (kernel < 6.0)"),
    ] {
        if !probe.is_supported(code) {
            return Err(unsupported(what));
        }
    }
    Ok(())
}

/// Checks that a ring with a provided buffer ring can be set up here.
pub(crate) fn probe() -> io::Result<()> {
    let region = bufring::Region::new(4096)?;
    let (ring, _) = new_ring()?;
    check_kernel(&ring)?;
    // SAFETY: `region` is one zeroed page (room for 8 entries), declared before the ring so
    // that it outlives it even on an early return (the ring is closed first).
    unsafe { ring.submitter().register_buf_ring_with_flags(region.addr(), 8, BGID, 0)? };
    ring.submitter().unregister_buf_ring(BGID)?;
    drop(ring);
    drop(region);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed() -> UringDatapath {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut dp = UringDatapath::new(socket).unwrap();
        dp.poll(Duration::from_millis(1), &mut |_| {}, &mut Vec::new()).unwrap();
        assert!(dp.armed);
        dp
    }

    #[test]
    fn quiesce_cancels_the_receive() {
        let mut dp = armed();
        assert!(dp.wake_armed);
        assert!(dp.quiesce());
        assert!(!dp.armed);
        assert!(!dp.wake_armed);
    }

    #[test]
    fn drop_on_another_thread_than_the_issuer() {
        // The kernel refuses the cancellation (single issuer): the buffers are leaked, safely.
        let dp = armed();
        std::thread::spawn(move || drop(dp)).join().unwrap();
    }
}
