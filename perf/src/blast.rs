//! What both load generators (`perf relay`'s [`crate::loadgen`] and `perf exit`'s) share: a
//! round's datagrams prepared ahead in per-circuit pools, sent within an in-flight window that
//! halves after a stall, progress counters shared with the receiving thread, and latency
//! percentiles.
//!
//! A round of `count` datagrams over `n` circuits (lanes) keeps datagram `k` in row `k / n` of
//! lane `k % n`'s pool, so that each lane's datagrams are prepared (sealed) in order by one
//! thread, and sending round-robin is walking `k` upwards.

use anyhow::{Result, anyhow};
use cellproto::cell::CELL_LEN;
use nix::errno::Errno;
use nix::sys::socket::{self as sock, ControlMessage, MsgFlags, SockaddrStorage};
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Datagrams per `sendmmsg`.
pub(crate) const BURST: usize = 64;
/// Cells per GSO send: 45 × 1452 = 65,340 bytes, under the 65,507-byte UDP limit.
const GSO_SEGMENTS: usize = 45;
/// A full window with no arrival for this long means datagrams were lost (long enough that a
/// descheduled relay or sink on a busy machine is not taken for a loss).
const STALL: Duration = Duration::from_millis(100);
/// Smallest window (datagrams in flight) after stalls; the largest is `--window`.
const MIN_WINDOW: usize = 128;

/// Counters the sender and the receiving thread share.
pub(crate) struct Progress {
    epoch: Instant,
    /// Datagrams counted by the receiver.
    pub(crate) received: AtomicU64,
    /// When the last one arrived (ns since `epoch`).
    pub(crate) last_arrival_ns: AtomicU64,
    /// Send time (ns since `epoch`) of each datagram, by sequence number.
    send_ns: Vec<AtomicU64>,
    /// Tells the receiver to finish.
    pub(crate) stop: AtomicBool,
}

impl Progress {
    /// Counters for `datagrams` sequence numbers.
    pub(crate) fn new(datagrams: u64) -> Self {
        Self {
            epoch: Instant::now(),
            received: AtomicU64::new(0),
            last_arrival_ns: AtomicU64::new(0),
            send_ns: (0..datagrams).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
        }
    }

    /// Nanoseconds since the epoch: the one clock of send and arrival times.
    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The latency of datagram `seq` arriving at `now_ns`, if it was sent.
    pub(crate) fn latency(&self, seq: u64, now_ns: u64) -> Option<u64> {
        let sent_at = self.send_ns.get(usize::try_from(seq).ok()?)?.load(Ordering::Relaxed);
        (sent_at > 0).then(|| now_ns.saturating_sub(sent_at))
    }

    /// Counts `n` datagrams that arrived at `now_ns`.
    pub(crate) fn arrived(&self, n: u64, now_ns: u64) {
        if n > 0 {
            self.received.fetch_add(n, Ordering::Relaxed);
            self.last_arrival_ns.store(now_ns, Ordering::Relaxed);
        }
    }
}

/// Prepares datagrams `base .. base + count` (sequence numbers) of a round into the pools,
/// lanes in parallel: `write(lane state, lane, seq, slot)` for each, in order within a lane.
pub(crate) fn fill_round<L: Send>(
    lanes: &mut [L],
    pools: &mut [Vec<u8>],
    dlen: usize,
    base: u64,
    count: usize,
    write: impl Fn(&mut L, usize, u64, &mut [u8]) -> Result<()> + Sync,
) -> Result<()> {
    let n = lanes.len();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
    let per = n.div_ceil(threads);
    let write = &write;
    std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .chunks_mut(per)
            .zip(pools.chunks_mut(per))
            .enumerate()
            .map(|(t, (lanes, pools))| {
                s.spawn(move || -> Result<()> {
                    for (j, (lane, pool)) in lanes.iter_mut().zip(pools.iter_mut()).enumerate() {
                        let c = t * per + j;
                        for (r, slot) in pool.chunks_exact_mut(dlen).enumerate() {
                            let k = r * n + c;
                            if k >= count {
                                break;
                            }
                            write(lane, c, base + k as u64, slot)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow!("sealing thread panicked"))?)
    })
}

/// Datagram `k` of a round: lane `k % n`, row `k / n`.
pub(crate) fn datagram_at(pools: &[Vec<u8>], n: usize, dlen: usize, k: usize) -> &[u8] {
    let r = k / n;
    &pools[k % n][r * dlen..(r + 1) * dlen]
}

/// The order in which the datagrams `0..count` of a round are sent: round-robin over the
/// circuits one by one; with GSO, round-robin in runs of `GSO_SEGMENTS` cells of one circuit,
/// so that each GSO send (which the relay receives whole, with UDP GRO, and its socket group
/// steers by the first cell's LCID) holds cells of one circuit only.
pub(crate) fn send_order(n: usize, count: usize, gso: bool) -> Vec<usize> {
    if !gso {
        return (0..count).collect();
    }
    let rows = count.div_ceil(n);
    let mut order = Vec::with_capacity(count);
    for block in (0..rows).step_by(GSO_SEGMENTS) {
        for c in 0..n {
            order.extend((block..(block + GSO_SEGMENTS).min(rows)).map(|r| r * n + c).filter(|&k| k < count));
        }
    }
    order
}

/// Percentile `p` of sorted nanosecond samples, in µs (0 without samples).
pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// `a / b`, or 0 when `b` is not positive (a rate or ratio of a run that measured nothing).
pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The in-flight window: big enough to keep the relay busy, small enough that the queue in
/// front of it (and so the latency) stays bounded. It halves when it has been full with
/// nothing arriving for [`STALL`] (the datagrams in flight are written off as lost) and grows
/// back by a burst after each window's worth sent without such a stall.
pub(crate) struct Window {
    pub(crate) size: usize,
    max: usize,
    written_off: u64,
    pub(crate) stalls: u64,
    clean: usize,
    stalled_since: Option<(Instant, u64)>,
}

impl Window {
    pub(crate) fn new(size: usize) -> Self {
        let size = size.max(MIN_WINDOW);
        Self { size, max: size, written_off: 0, stalls: 0, clean: 0, stalled_since: None }
    }

    /// How many datagrams may be sent now; 0 means wait (and handles a stall).
    pub(crate) fn room(&mut self, sent: u64, received: u64) -> usize {
        let in_flight = sent.saturating_sub(received + self.written_off) as usize;
        if in_flight + BURST <= self.size {
            self.stalled_since = None;
            return self.size - in_flight;
        }
        match self.stalled_since {
            Some((since, at)) if at == received && since.elapsed() >= STALL => {
                // Nothing arrived for a while with the window full: those datagrams are lost.
                self.written_off = sent.saturating_sub(received);
                self.stalls += 1;
                self.size = (self.size / 2).max(MIN_WINDOW);
                self.clean = 0;
                self.stalled_since = None;
            }
            Some((_, at)) if at == received => {}
            _ => self.stalled_since = Some((Instant::now(), received)),
        }
        0
    }

    pub(crate) fn sent(&mut self, n: usize) {
        self.clean += n;
        if self.clean >= self.size {
            self.clean = 0;
            self.size = (self.size + BURST).min(self.max);
        }
    }
}

/// One round's prepared datagrams (see the module doc).
pub(crate) struct Round<'a> {
    pub(crate) pools: &'a [Vec<u8>],
    /// Lanes (circuits).
    pub(crate) n: usize,
    /// Bytes per datagram.
    pub(crate) dlen: usize,
    /// Sequence number of datagram 0.
    pub(crate) base: u64,
    pub(crate) count: usize,
}

/// A connected socket's sending side.
pub(crate) struct Sender {
    pub(crate) fd: RawFd,
    /// Cells of one circuit in one `sendmsg` with UDP GSO instead of `sendmmsg` bursts.
    pub(crate) gso: bool,
}

impl Sender {
    /// Sends the round's datagrams in [`send_order`] within the window, stamping their send
    /// times; returns how many were sent: all, unless `deadline` passed or `abort` was set
    /// while the window was full.
    pub(crate) fn blast(
        &self,
        round: &Round<'_>,
        progress: &Progress,
        window: &mut Window,
        sent_total: &mut u64,
        deadline: Instant,
        abort: Option<&AtomicBool>,
    ) -> std::io::Result<usize> {
        let Round { pools, n, dlen, base, count } = *round;
        let order = send_order(n, count, self.gso);
        let burst = if self.gso { GSO_SEGMENTS } else { BURST };
        let mut i = 0;
        let mut datagrams: Vec<&[u8]> = Vec::with_capacity(burst);
        while i < count {
            let room = window.room(*sent_total, progress.received.load(Ordering::Relaxed));
            if room == 0 {
                if Instant::now() >= deadline || abort.is_some_and(|a| a.load(Ordering::Relaxed)) {
                    break;
                }
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            let mut m = burst.min(room).min(count - i);
            if self.gso {
                // One GSO send carries cells of one circuit only (see `send_order`).
                let c = order[i] % n;
                m = order[i..i + m].iter().take_while(|&&k| k % n == c).count();
            }
            datagrams.clear();
            datagrams.extend(order[i..i + m].iter().map(|&k| datagram_at(pools, n, dlen, k)));
            let now = progress.now_ns();
            for &k in &order[i..i + m] {
                if let Some(slot) = progress.send_ns.get((base + k as u64) as usize) {
                    slot.store(now, Ordering::Relaxed);
                }
            }
            if self.gso { self.send_gso(&datagrams) } else { self.send_mmsg(&datagrams) }?;
            i += m;
            *sent_total += m as u64;
            window.sent(m);
        }
        Ok(i)
    }

    /// One `sendmmsg` (repeated after a partial send) on the connected socket.
    fn send_mmsg(&self, datagrams: &[&[u8]]) -> std::io::Result<()> {
        let n = datagrams.len().min(BURST);
        let slices: Vec<[IoSlice<'_>; 1]> = datagrams[..n].iter().map(|c| [IoSlice::new(c)]).collect();
        let no_addrs: Vec<Option<SockaddrStorage>> = vec![None; n];
        let mut done = 0;
        let mut retries = 0;
        while done < n {
            let mut headers = sock::MultiHeaders::<SockaddrStorage>::preallocate(n - done, None);
            let sent = sock::sendmmsg(self.fd, &mut headers, &slices[done..], &no_addrs[done..], [], MsgFlags::empty());
            match sent {
                Ok(results) => done += results.count(),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN | Errno::ENOBUFS) if retries < 1000 => {
                    retries += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// One `sendmsg` with a `UDP_SEGMENT` control message: the kernel splits it into cells.
    fn send_gso(&self, cells: &[&[u8]]) -> std::io::Result<()> {
        let iov: Vec<IoSlice<'_>> = cells.iter().map(|c| IoSlice::new(c)).collect();
        let seg = CELL_LEN as u16;
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        let cmsg: &[ControlMessage<'_>] = if cells.len() > 1 { &cmsg } else { &[] };
        loop {
            match sock::sendmsg::<SockaddrStorage>(self.fd, &iov, cmsg, MsgFlags::empty(), None) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOBUFS) => std::thread::sleep(Duration::from_micros(50)),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_order_is_a_permutation_with_single_circuit_gso_runs() {
        for (n, count) in [(1, 10), (4, 1000), (64, 20_000), (7, 1234), (64, 10)] {
            for gso in [false, true] {
                let mut order = send_order(n, count, gso);
                assert_eq!(order.len(), count);
                if gso {
                    // Within a circuit, cells go out in sealing (counter) order.
                    for c in 0..n {
                        let rows: Vec<usize> = order.iter().filter(|&&k| k % n == c).map(|&k| k / n).collect();
                        assert!(rows.windows(2).all(|w| w[0] < w[1]));
                    }
                }
                order.sort_unstable();
                assert!(order.iter().enumerate().all(|(i, &k)| i == k));
            }
        }
    }

    #[test]
    fn window_halves_on_stall_and_grows_back() {
        let mut w = Window::new(1024);
        assert_eq!(w.room(0, 0), 1024);
        assert_eq!(w.room(1024, 0), 0);
        w.stalled_since = Some((Instant::now() - STALL, 0));
        assert_eq!(w.room(1024, 0), 0);
        assert_eq!((w.size, w.stalls, w.written_off), (512, 1, 1024));
        assert_eq!(w.room(1024, 0), 512);
        for _ in 0..64 {
            w.sent(1024);
        }
        assert_eq!(w.size, 1024);
    }

    #[test]
    fn rounds_fill_every_lane_in_order() {
        let (n, rows, dlen) = (3, 4, 8);
        let mut lanes = vec![0u64; n];
        let mut pools: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; rows * dlen]).collect();
        fill_round(&mut lanes, &mut pools, dlen, 100, 10, |calls, _, seq, slot| {
            *calls += 1;
            slot.copy_from_slice(&seq.to_be_bytes());
            Ok(())
        })
        .unwrap();
        for k in 0..10 {
            assert_eq!(datagram_at(&pools, n, dlen, k), &(100 + k as u64).to_be_bytes());
        }
        assert_eq!(lanes, vec![4, 3, 3]);
        assert_eq!(percentile(&[1000, 2000, 3000, 4000], 0.5), 2.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }
}
