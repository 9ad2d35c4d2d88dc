//! cellio, the cell I/O layer: how a worker's datagrams get in and out. relayd's workers and
//! exitd's run on it; it depends on cellproto (cell size, the node's `Transmit` slots) and on
//! no daemon. See README.md.
//!
//! Two backends behind one interface:
//! io_uring (multishot `recvmsg` into a provided buffer ring, batched sends with UDP GSO) and
//! a `recvmmsg`/`sendmmsg` fallback for kernels or sandboxes without io_uring.
//!
//! The worker never sees a socket: it gets a batch of received datagrams in buffers the
//! backend owns, rewrites them in place and marks each one `Send(to)` or `Drop`; the backend
//! sends the marked ones (grouping runs to one destination into GSO sends), sends the extra
//! datagrams the worker originated, and recycles the buffers.
//!
//! A data path may be opened on one thread and moved to its worker, but the io_uring one must
//! then be polled (and should be dropped) on the thread that polled it first: its ring has a
//! single issuer. Sockets are steered per LCID (see [`socket`]), so a worker owns both
//! directions of its circuits.
//!
//! Each data path has a [`Waker`]: another thread (the control thread, after it sent the
//! worker a message) calls [`Waker::wake`] to end a `poll` that is waiting, so that workers can
//! poll with a long timeout and still see their messages at once.

#![deny(clippy::undocumented_unsafe_blocks)]

use cellproto::cell::CELL_LEN;
use cellproto::node::Transmit;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Once};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};

pub mod gso;
mod mmsg;
pub mod socket;
mod uring;

pub use mmsg::MmsgDatapath;
pub use socket::{bind_group, gro_enabled, steering_worker};
pub use uring::UringDatapath;

/// What to do with a received datagram after the worker handled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Drop it (the worker counted why).
    Drop,
    /// Send the (rewritten, same-length) buffer to this address.
    Send(SocketAddr),
}

/// One received datagram, in a buffer the backend owns.
#[derive(Debug)]
pub struct Datagram<'a> {
    /// Sender.
    pub from: SocketAddr,
    /// The datagram's bytes (exactly its length), rewritten in place by the worker.
    pub data: &'a mut [u8],
    /// Set by the worker; `Drop` until then.
    pub action: Action,
}

/// A datagram the worker originated (CREATED, DESTROY, EXTENDED, STUN replies, …), held inline:
/// no heap allocation per datagram, so the exit's return path (one per packet) allocates nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination.
    pub to: SocketAddr,
    len: u16,
    buf: [u8; CELL_LEN],
}

impl Outgoing {
    /// A datagram of `data` (at most [`CELL_LEN`] bytes; longer is cut, which no caller does:
    /// cells are that long, STUN answers far shorter).
    pub fn new(to: SocketAddr, data: &[u8]) -> Self {
        debug_assert!(data.len() <= CELL_LEN, "datagram of {} bytes", data.len());
        let len = data.len().min(CELL_LEN);
        let mut buf = [0u8; CELL_LEN];
        buf[..len].copy_from_slice(&data[..len]);
        Self { to, len: len as u16, buf }
    }

    /// A whole cell.
    pub fn cell(to: SocketAddr, cell: &[u8; CELL_LEN]) -> Self {
        Self { to, len: CELL_LEN as u16, buf: *cell }
    }

    /// The bytes to send.
    pub fn data(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing").field("to", &self.to).field("len", &self.len).finish()
    }
}

/// Datagrams a worker originated, to send at the end of its next poll: a reused vector (once
/// grown, no allocation), and the node's transmit slots ([`Transmit`]).
#[derive(Debug, Default)]
pub struct Outbox {
    items: Vec<Outgoing>,
    /// The last item is a slot lent to the node and not committed yet.
    open: bool,
    /// Cells committed through [`Transmit`] so far (the node's own cells: PONG, DESTROY, …).
    sealed: u64,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a datagram.
    pub fn push(&mut self, o: Outgoing) {
        self.close();
        self.items.push(o);
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.len() == usize::from(self.open)
    }

    /// Cells committed through [`Transmit`] so far.
    pub fn sealed(&self) -> u64 {
        self.sealed
    }

    /// The queued datagrams, for [`Datapath::poll`] (which empties the vector).
    pub fn datagrams(&mut self) -> &mut Vec<Outgoing> {
        self.close();
        &mut self.items
    }

    /// Forgets an uncommitted slot.
    fn close(&mut self) {
        if self.open {
            self.items.pop();
            self.open = false;
        }
    }
}

impl Transmit for Outbox {
    fn slot(&mut self) -> &mut [u8; CELL_LEN] {
        if !self.open {
            self.items.push(Outgoing {
                to: SocketAddr::from(([0, 0, 0, 0], 0)),
                len: CELL_LEN as u16,
                buf: [0; CELL_LEN],
            });
            self.open = true;
        }
        let last = self.items.len() - 1;
        let slot = &mut self.items[last].buf;
        // A slot asked for again before its commit starts over, zeroed (the contract).
        slot.fill(0);
        slot
    }

    fn commit(&mut self, to: SocketAddr) {
        if let Some(last) = self.items.last_mut().filter(|_| self.open) {
            last.to = to;
            self.open = false;
            self.sealed += 1;
        }
    }
}

/// Counters a backend keeps about its own work (exported as metrics by the worker).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DatapathStats {
    /// Datagrams received.
    pub rx_datagrams: u64,
    /// Datagrams sent.
    pub tx_datagrams: u64,
    /// Send system calls or submissions.
    pub tx_batches: u64,
    /// Receives that failed or were truncated.
    pub rx_errors: u64,
    /// Sends that failed (datagrams lost).
    pub tx_errors: u64,
}

/// Interrupts a data path's [`Datapath::poll`] from any thread: a handle on the data path's
/// eventfd, cheap to clone and to share.
///
/// A wake while `poll` waits ends the wait at once; a wake while it does not (the worker is
/// busy) makes the next `poll` return without waiting. Wakes do not queue: however many came
/// since, a returning `poll` consumes them all, so one wake is enough per check of the
/// worker's inbox.
#[derive(Debug, Clone)]
pub struct Waker {
    fd: Arc<EventFd>,
}

impl Waker {
    /// A new non-blocking, close-on-exec eventfd.
    pub(crate) fn new() -> io::Result<Waker> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Waker { fd: Arc::new(fd) })
    }

    /// Makes the data path's current or next `poll` return. Never blocks: one system call
    /// (`write(2)` of 1 to the eventfd). A counter at its maximum (EAGAIN) is already a wake.
    pub fn wake(&self) {
        match self.fd.write(1) {
            Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => {}
            // Only EBADF or EINVAL, which a live `EventFd` written 8 bytes cannot give.
            Err(e) => tracing::debug!(error = %e, "cannot wake a data path"),
        }
    }

    /// The eventfd, for the backend to wait on.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Consumes every wake so far (the next wait blocks again). Called by the backend only when
    /// it saw the eventfd readable, and only when `poll` returns after it without waiting again:
    /// the caller then checks its inbox, which holds whatever was sent before those wakes.
    pub(crate) fn reset(&self) {
        // EAGAIN: nothing to consume (the wake was consumed already).
        let _ = self.fd.read();
    }
}

/// One worker's socket and its batched I/O.
///
/// # Waking
///
/// [`Datapath::waker`] gives a [`Waker`] that other threads use to end a `poll` early. The
/// protocol for a worker with an inbox (a channel from the control thread):
///
/// - the sender pushes its message, *then* calls [`Waker::wake`];
/// - the worker checks its inbox after every `poll` returns, and can then poll with a long
///   timeout (bounded only by its own timers), instead of a short one that makes an idle
///   worker wake up hundreds of times a second.
///
/// No message is missed: a wake that comes while `poll` waits ends the wait; one that comes
/// while it does not makes the next `poll` return at once (the eventfd stays readable until a
/// `poll` consumes it, and a `poll` that consumes it always returns right after, without
/// waiting again).
pub trait Datapath: Send {
    /// Waits up to `timeout` for datagrams or a wake ([`Datapath::waker`]); hands what arrived
    /// to `handle` in one or more batches (at most 64 each); then sends every datagram
    /// `handle` marked `Send` and everything in `extra` (which it empties), and recycles the
    /// buffers. Returns the number of datagrams received. A timeout or a wake with nothing
    /// received still sends `extra` (and returns 0).
    fn poll(
        &mut self,
        timeout: Duration,
        handle: &mut dyn FnMut(&mut [Datagram<'_>]),
        extra: &mut Vec<Outgoing>,
    ) -> io::Result<usize>;

    /// The bound local address.
    fn local_addr(&self) -> SocketAddr;

    /// "io_uring" or "recvmmsg", for the log and metrics.
    fn kind(&self) -> &'static str;

    /// Counters so far.
    fn stats(&self) -> DatapathStats;

    /// A handle that ends this data path's current or next `poll` (see the trait docs); every
    /// call returns a clone of the same one.
    fn waker(&self) -> Waker;

    /// From now on, `fd` becoming readable also ends a wait, as a datagram does: an exit's
    /// TUN queue, so a reply from the internet is sealed at once instead of at the next timer.
    /// The data path keeps `fd` (a duplicate of the caller's) open as long as it watches it.
    /// Up to 8 descriptors; more are ignored.
    fn watch(&mut self, fd: std::os::fd::OwnedFd);
}

/// Which backend [`open`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// io_uring where the kernel allows it, else `recvmmsg` (logged once).
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// `recvmmsg`/`sendmmsg`, whatever the kernel offers (also how tests force the fallback).
    Mmsg,
}

/// Opens a worker's data path on `socket` (one of [`bind_group`]'s). With [`Backend::Auto`],
/// a failure to set io_uring up (ENOSYS on old kernels, EPERM from
/// `kernel.io_uring_disabled` or seccomp, EINVAL or missing features before 6.0) falls back to
/// `recvmmsg` with a warning, logged once per process.
pub fn open(socket: UdpSocket, backend: Backend) -> io::Result<Box<dyn Datapath>> {
    match backend {
        Backend::Mmsg => Ok(Box::new(MmsgDatapath::new(socket)?)),
        Backend::Uring => UringDatapath::new(socket)
            .map(|d| Box::new(d) as Box<dyn Datapath>)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring data path unavailable: {e}"))),
        Backend::Auto => match UringDatapath::try_new(socket) {
            Ok(d) => Ok(Box::new(d)),
            Err((error, socket)) => {
                static WARNED: Once = Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(%error, "io_uring unavailable, falling back to recvmmsg/sendmmsg");
                });
                Ok(Box::new(MmsgDatapath::new(socket)?))
            }
        },
    }
}

/// Whether the io_uring backend can run here (a ring with the needed features and a provided
/// buffer ring), and if not, why. For diagnostics and tests; [`open`] checks by itself.
pub fn uring_available() -> Result<(), io::Error> {
    uring::probe()
}
