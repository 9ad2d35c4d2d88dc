//! The client's UDP socket, batched: cells to the guard leave in UDP GSO batches (one
//! `sendmsg` for up to [`GSO_CELLS`] cells) and arrive coalesced by UDP GRO (one `recvmsg` for
//! a run of cells from the guard), so a bulk transfer costs a few system calls per 40 cells
//! instead of one per cell. Where the kernel refuses GSO (old kernels, some devices) the
//! socket falls back to one datagram per cell, once and for good, with a log line.

use cellproto::cell::CELL_LEN;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt, sockopt,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::warn;

/// Cells per GSO send: the most that fit the 64 KiB datagram limit.
pub const GSO_CELLS: usize = 65_507 / CELL_LEN;
/// Room for the largest GRO-coalesced read.
const RX_BUF: usize = 65_536;
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

    /// Reads one datagram, or one GRO run of them, into [`CellSocket::rx`] without waiting.
    /// Returns the bytes read, the size of each datagram in them, and the sender.
    pub fn try_recv(&mut self) -> io::Result<(usize, usize, SocketAddr)> {
        let fd = self.socket.as_raw_fd();
        let rx = &mut self.rx;
        self.socket.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(rx)];
            let mut cmsg = nix::cmsg_space!(i32);
            let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
            let mut segment = msg.bytes;
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::UdpGroSegments(size) = c {
                    segment = usize::try_from(size).unwrap_or(msg.bytes);
                }
            }
            let from = msg.address.as_ref().and_then(sockaddr).ok_or_else(|| io::Error::other("no sender address"))?;
            Ok((msg.bytes, segment.max(1), from))
        })
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
    /// another address.
    pub async fn send(&mut self, to: SocketAddr, cell: &[u8; CELL_LEN]) -> io::Result<()> {
        if self.tx_to.is_some_and(|t| t != to) || self.queued() >= GSO_CELLS {
            self.flush().await?;
        }
        self.queue(to, cell);
        Ok(())
    }

    /// Sends the queued cells, [`GSO_CELLS`] per system call.
    pub async fn flush(&mut self) -> io::Result<()> {
        let Some(to) = self.tx_to.take() else { return Ok(()) };
        let mut result = Ok(());
        let mut at = 0;
        while at < self.tx.len() && result.is_ok() {
            let end = self.tx.len().min(at + GSO_CELLS * CELL_LEN);
            result = self.send_batch(to, at..end).await;
            at = end;
        }
        self.tx.clear();
        result
    }

    async fn send_batch(&mut self, to: SocketAddr, range: std::ops::Range<usize>) -> io::Result<()> {
        if self.gso && range.len() > CELL_LEN {
            let addr = SockaddrStorage::from(to);
            let segment = CELL_LEN as u16;
            let fd = self.socket.as_raw_fd();
            loop {
                self.socket.writable().await?;
                let tx = &self.tx[range.clone()];
                let sent = self.socket.try_io(Interest::WRITABLE, || {
                    let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
                    Ok(sendmsg(fd, &[IoSlice::new(tx)], &cmsg, MsgFlags::empty(), Some(&addr))?)
                });
                match sent {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)) => {
                        warn!("UDP GSO refused ({e}); sending one datagram per cell from now on");
                        self.gso = false;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for cell in self.tx[range].chunks(CELL_LEN) {
            self.socket.send_to(cell, to).await?;
        }
        Ok(())
    }
}

fn sockaddr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}
