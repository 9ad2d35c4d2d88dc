//! The client's UDP socket, batched: cells to the guard leave in UDP GSO batches (one
//! `sendmsg` for up to [`GSO_CELLS`] cells) and arrive coalesced by UDP GRO (one `recvmsg` for
//! a run of cells from the guard), so a bulk transfer costs a few system calls per 40 cells
//! instead of one per cell. Where the kernel refuses GSO (old kernels, some devices) the
//! socket falls back to one datagram per cell, once and for good, with a log line.
//!
//! The system calls, the GSO and GRO control messages and the cutting of a GRO run into
//! datagrams are cellio's ([`cellio::gso`], which relayd's io_uring backend uses too); what
//! stays here is what a tokio client needs around them: waiting for readiness (`try_io`), the
//! queue of cells for one guard, and the fallback.

use cellio::gso;
use cellproto::cell::CELL_LEN;
use nix::sys::socket::{setsockopt, sockopt};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::warn;

/// Cells per GSO send: the most that fit the 64 KiB datagram limit.
pub const GSO_CELLS: usize = gso::MAX_GSO_BYTES / CELL_LEN;
/// Room for the largest GRO-coalesced read.
const RX_BUF: usize = gso::MAX_GRO_BYTES;
/// Socket buffers: room for bursts at multi-gigabit rates (the kernel caps them at
/// `net.core.rmem_max`/`wmem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket that sends cells in batches and receives them coalesced.
pub struct CellSocket {
    socket: UdpSocket,
    gso: bool,
    /// The receive buffer: after [`CellSocket::try_recv`], cells back to back.
    pub rx: Box<[u8]>,
    tx: Vec<u8>,
    tx_to: Option<SocketAddr>,
    rx_errors: u64,
    tx_dropped: u64,
}

impl CellSocket {
    /// Binds an IPv4 socket on an ephemeral port, with GRO on and large buffers.
    pub async fn bind() -> io::Result<Self> {
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER);
        let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER);
        // Without GRO (kernel < 5.0) every read is one datagram, which is fine too.
        let _ = setsockopt(&socket, sockopt::UdpGroSegment, &true);
        Ok(Self {
            socket,
            gso: true,
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            tx: Vec::with_capacity(GSO_CELLS * CELL_LEN),
            tx_to: None,
            rx_errors: 0,
            tx_dropped: 0,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends one datagram that is not a cell (a STUN request) at once, beside the queued cells.
    pub async fn send_datagram(&mut self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.socket.send_to(datagram, to).await.map(drop)
    }

    /// Waits until a datagram may be read.
    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Reads one datagram, or one GRO run of them, into [`CellSocket::rx`] without waiting:
    /// the bytes read, the size of each datagram in them, and the sender. A datagram that
    /// cannot be a cell or STUN (longer than the buffer, unknown sender family) is consumed,
    /// counted in [`CellSocket::rx_errors`] and skipped.
    pub fn try_recv(&mut self) -> io::Result<gso::Received> {
        let rx = &mut self.rx;
        let socket = &self.socket;
        loop {
            match socket.try_io(Interest::READABLE, || gso::recv(socket.as_fd(), rx)) {
                Err(e) if e.kind() == io::ErrorKind::InvalidData => self.rx_errors += 1,
                other => return other,
            }
        }
    }

    /// Datagrams received and dropped as unusable (see [`CellSocket::try_recv`]).
    pub fn rx_errors(&self) -> u64 {
        self.rx_errors
    }

    /// Cells lost by failed sends so far (each counted once, however many a failed batch held).
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped
    }

    /// Queues a cell for `to` without sending; `false` (not queued) if the queue holds cells
    /// for another address: [`CellSocket::flush`] first.
    pub fn queue(&mut self, to: SocketAddr, cell: &[u8; CELL_LEN]) -> bool {
        if self.tx_to.is_some_and(|t| t != to) {
            return false;
        }
        self.tx_to = Some(to);
        self.tx.extend_from_slice(cell);
        true
    }

    /// Cells queued and not yet sent.
    pub fn queued(&self) -> usize {
        self.tx.len() / CELL_LEN
    }

    /// Queues a cell for `to`, sending what is queued first if it is a full batch or for
    /// another address. If that send fails, this cell is lost with the cells it could not
    /// send (all counted in [`CellSocket::tx_dropped`]).
    pub async fn send(&mut self, to: SocketAddr, cell: &[u8; CELL_LEN]) -> io::Result<()> {
        if self.tx_to.is_some_and(|t| t != to) || self.queued() >= GSO_CELLS {
            if let Err(e) = self.flush().await {
                self.tx_dropped += 1;
                return Err(e);
            }
        }
        self.queue(to, cell);
        Ok(())
    }

    /// Sends the queued cells, [`GSO_CELLS`] per system call. On an error the cells not sent
    /// are counted in [`CellSocket::tx_dropped`] (and the queue emptied).
    pub async fn flush(&mut self) -> io::Result<()> {
        let Some(to) = self.tx_to.take() else { return Ok(()) };
        let mut result = Ok(());
        let mut at = 0;
        while at < self.tx.len() {
            let end = self.tx.len().min(at + GSO_CELLS * CELL_LEN);
            let sent = self.send_batch(to, at..end).await;
            if let Err((e, unsent)) = sent {
                self.tx_dropped += ((self.tx.len() - end) / CELL_LEN + unsent) as u64;
                result = Err(e);
                break;
            }
            at = end;
        }
        self.tx.clear();
        result
    }

    /// Sends `tx[range]`: one GSO send, or one datagram per cell without GSO. An error comes
    /// with the number of cells of the range not sent.
    async fn send_batch(&mut self, to: SocketAddr, range: std::ops::Range<usize>) -> Result<(), (io::Error, usize)> {
        let cells = range.len() / CELL_LEN;
        if self.gso && cells > 1 {
            loop {
                self.socket.writable().await.map_err(|e| (e, cells))?;
                let tx = &self.tx[range.clone()];
                let socket = &self.socket;
                let sent =
                    socket.try_io(Interest::WRITABLE, || gso::send(socket.as_fd(), to, false, tx, CELL_LEN as u16));
                match sent {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)) => {
                        warn!("UDP GSO refused ({e}); sending one datagram per cell from now on");
                        self.gso = false;
                        break;
                    }
                    Err(e) => return Err((e, cells)),
                }
            }
        }
        for (i, cell) in self.tx[range].chunks(CELL_LEN).enumerate() {
            self.socket.send_to(cell, to).await.map_err(|e| (e, cells - i))?;
        }
        Ok(())
    }
}
