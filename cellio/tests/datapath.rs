//! The data path on loopback: forwarding, reuseport steering, GSO/GRO, `extra`, fallback,
//! waking a waiting poll.
//! Every loop is bounded by a deadline; every address is 127.0.0.1.

use std::collections::HashSet;
use std::io::{ErrorKind, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cellio::{
    Action, Backend, Datagram, Datapath, DatapathStats, Outgoing, UringDatapath, bind_group, steering_worker,
};
use cellproto::cell::CELL_LEN;
use nix::errno::Errno;
use nix::sys::socket::{self as sock, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sockopt};

const LOCALHOST: &str = "127.0.0.1:0";
/// Where the handler flips a byte, to show the datagram went through it.
const XOR_AT: usize = 100;
const XOR: u8 = 0x5A;

fn localhost() -> SocketAddr {
    LOCALHOST.parse().unwrap()
}

/// A test socket with deep buffers (so that loopback bursts are not dropped) and a read timeout.
fn test_socket() -> UdpSocket {
    let s = UdpSocket::bind(localhost()).unwrap();
    let size: usize = 8 << 20;
    if sock::setsockopt(&s, sockopt::RcvBufForce, &size).is_err() {
        let _ = sock::setsockopt(&s, sockopt::RcvBuf, &size);
    }
    if sock::setsockopt(&s, sockopt::SndBufForce, &size).is_err() {
        let _ = sock::setsockopt(&s, sockopt::SndBuf, &size);
    }
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    s
}

/// A cell carrying `lcid` and `seq`, the other bytes derived from `seq`.
fn cell(lcid: u32, seq: u64) -> Vec<u8> {
    let mut c: Vec<u8> = (0..CELL_LEN).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)).collect();
    c[..4].copy_from_slice(&lcid.to_be_bytes());
    c[4..12].copy_from_slice(&seq.to_be_bytes());
    c
}

/// The sequence number of a forwarded cell, if it is intact (length, pattern, flipped byte).
fn check_forwarded(data: &[u8]) -> Option<u64> {
    if data.len() != CELL_LEN {
        return None;
    }
    let seq = u64::from_be_bytes(data[4..12].try_into().unwrap());
    let mut expected = cell(u32::from_be_bytes(data[..4].try_into().unwrap()), seq);
    expected[XOR_AT] ^= XOR;
    (expected == data).then_some(seq)
}

fn open_one(backend: Backend) -> Box<dyn Datapath> {
    let socket = bind_group(localhost(), 1).unwrap().pop().unwrap();
    cellio::open(socket, backend).unwrap()
}

/// Polls `dp` on its own thread (as relayd's workers do) until `stop`, or 20 s at most.
fn run(
    mut dp: Box<dyn Datapath>,
    stop: &AtomicBool,
    mut handler: impl FnMut(&mut [Datagram<'_>]) + Send,
) -> DatapathStats {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut extra = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        dp.poll(Duration::from_millis(5), &mut handler, &mut extra).unwrap();
    }
    dp.stats()
}

/// Receives until `want` datagrams came or nothing came for 2 s; returns them.
fn receive(socket: &UdpSocket, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let mut last = Instant::now();
    while got.len() < want && last.elapsed() < Duration::from_secs(2) {
        match socket.recv(&mut buf) {
            Ok(n) => {
                got.push(buf[..n].to_vec());
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("receive: {e}"),
        }
    }
    got
}

fn flip_and_send(to: SocketAddr) -> impl FnMut(&mut [Datagram<'_>]) + Send {
    move |batch: &mut [Datagram<'_>]| {
        assert!(batch.len() <= 64);
        for d in batch.iter_mut() {
            if d.data.len() > XOR_AT {
                d.data[XOR_AT] ^= XOR;
            }
            d.action = Action::Send(to);
        }
    }
}

/// 10,000 cells through the forwarder, sent and received in batches of 64 (so that the test
/// itself is not the bottleneck) and paced by a window of 1024 in flight: all arrive intact.
fn forwarder(dp: Box<dyn Datapath>, label: &str) {
    const CELLS: usize = 10_000;
    const WINDOW: usize = 1024;
    let relay = SockaddrStorage::from(dp.local_addr());
    let sender = test_socket();
    let receiver = test_socket();
    let to = receiver.local_addr().unwrap();
    let stop = AtomicBool::new(false);
    let cells: Vec<Vec<u8>> = (0..CELLS as u64).map(|seq| cell(0x4000_0001, seq)).collect();
    // What should come out, precomputed so that checking is a memcmp (this is a debug build).
    let expected: Vec<Vec<u8>> = cells
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c[XOR_AT] ^= XOR;
            c
        })
        .collect();
    std::thread::scope(|s| {
        let worker = s.spawn(|| run(dp, &stop, flip_and_send(to)));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let mut seen = HashSet::new();
        let mut sent = 0;
        let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(64, None);
        let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(64, None);
        let mut bufs = vec![[0u8; 2048]; 64];
        while seen.len() < CELLS && Instant::now() < deadline {
            if sent < CELLS && sent < seen.len() + WINDOW {
                let burst = &cells[sent..(sent + 64).min(CELLS)];
                let iovs: Vec<[IoSlice<'_>; 1]> = burst.iter().map(|c| [IoSlice::new(c)]).collect();
                let addrs = vec![Some(relay); burst.len()];
                match sock::sendmmsg(sender.as_raw_fd(), &mut send_headers, &iovs, addrs, [], MsgFlags::empty()) {
                    Ok(results) => sent += results.count(),
                    Err(Errno::EAGAIN) => {}
                    Err(e) => panic!("send: {e}"),
                }
            }
            let lens: Vec<usize> = {
                let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                match sock::recvmmsg(receiver.as_raw_fd(), &mut recv_headers, &mut iovs, MsgFlags::MSG_DONTWAIT, None) {
                    Ok(results) => results.map(|m| m.bytes).collect(),
                    Err(Errno::EAGAIN) => {
                        // The window is full or the relay is behind: let it work.
                        if sent >= (seen.len() + WINDOW).min(CELLS) {
                            std::thread::yield_now();
                        }
                        Vec::new()
                    }
                    Err(e) => panic!("receive: {e}"),
                }
            };
            for (buf, len) in bufs.iter().zip(lens) {
                let seq = u64::from_be_bytes(buf[4..12].try_into().unwrap());
                assert!(expected.get(seq as usize).is_some_and(|e| e[..] == buf[..len]), "cell {seq} is intact");
                assert!(seen.insert(seq), "cell {seq} arrived twice");
            }
        }
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let stats = worker.join().unwrap();
        println!(
            "{label}: {} cells forwarded in {elapsed:.2?}: {:.0} cells/s; {stats:?}",
            seen.len(),
            seen.len() as f64 / elapsed.as_secs_f64()
        );
        assert_eq!(seen.len(), CELLS, "lost {} cells (sent {sent})", CELLS - seen.len());
        assert_eq!(stats.rx_datagrams, CELLS as u64);
        assert_eq!(stats.tx_datagrams, CELLS as u64);
        assert_eq!((stats.rx_errors, stats.tx_errors), (0, 0));
    });
}

#[test]
fn forwards_10000_cells_uring() {
    let dp = open_one(Backend::Uring);
    assert_eq!(dp.kind(), "io_uring");
    forwarder(dp, "io_uring (GRO)");
}

#[test]
fn forwards_10000_cells_uring_without_gro() {
    let socket = bind_group(localhost(), 1).unwrap().pop().unwrap();
    sock::setsockopt(&socket, sockopt::UdpGroSegment, &false).unwrap();
    let dp = UringDatapath::new(socket).unwrap();
    assert!(!dp.gro());
    forwarder(Box::new(dp), "io_uring (no GRO)");
}

#[test]
fn forwards_10000_cells_mmsg() {
    let dp = open_one(Backend::Mmsg);
    assert_eq!(dp.kind(), "recvmmsg");
    forwarder(dp, "recvmmsg");
}

/// IPv6 sockets: addresses are decoded and encoded right by both backends.
#[test]
fn forwards_over_ipv6() {
    for backend in [Backend::Uring, Backend::Mmsg] {
        let socket = bind_group("[::1]:0".parse().unwrap(), 1).unwrap().pop().unwrap();
        let mut dp = cellio::open(socket, backend).unwrap();
        let sender = UdpSocket::bind("[::1]:0").unwrap();
        let receiver = UdpSocket::bind("[::1]:0").unwrap();
        receiver.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let (from, to) = (sender.local_addr().unwrap(), receiver.local_addr().unwrap());
        for seq in 0..10 {
            sender.send_to(&cell(0x4000_0005, seq), dp.local_addr()).unwrap();
        }
        let mut handled = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while handled < 10 && Instant::now() < deadline {
            let mut handler = |batch: &mut [Datagram<'_>]| {
                for d in batch.iter_mut() {
                    assert_eq!(d.from, from);
                    d.data[XOR_AT] ^= XOR;
                    d.action = Action::Send(to);
                    handled += 1;
                }
            };
            dp.poll(Duration::from_millis(10), &mut handler, &mut Vec::new()).unwrap();
        }
        assert_eq!(seqs(&receive(&receiver, 10)), (0..10).collect::<Vec<_>>(), "{backend:?}");
    }
}

#[test]
fn auto_picks_io_uring_here() {
    cellio::uring_available().expect("io_uring works on this machine");
    assert_eq!(open_one(Backend::Auto).kind(), "io_uring");
}

/// Cells with LCIDs 0x40000000 + k land on socket `lcid % 4` of a 4-socket group.
#[test]
fn reuseport_steering_by_lcid() {
    let group = bind_group(localhost(), 4).unwrap();
    let port = group[0].local_addr().unwrap().port();
    assert!(group.iter().all(|s| s.local_addr().unwrap().port() == port));
    // GRO stays off in a group: a coalesced run would be steered by its first cell alone.
    assert!(group.iter().all(|s| !cellio::gro_enabled(s)));
    let relay = group[0].local_addr().unwrap();
    let sender = test_socket();
    for k in 0..64u32 {
        sender.send_to(&cell(0x4000_0000 + k, k.into()), relay).unwrap();
    }
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    while got < 64 && Instant::now() < deadline {
        for (index, socket) in group.iter().enumerate() {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    assert_eq!(n, CELL_LEN);
                    let lcid = u32::from_be_bytes(buf[..4].try_into().unwrap());
                    assert_eq!(index, steering_worker(lcid, 4), "LCID {lcid:#x} on socket {index}");
                    assert_eq!(index as u32, lcid % 4);
                    got += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("receive: {e}"),
            }
        }
    }
    assert_eq!(got, 64);
}

/// The same through four datapaths of each backend, polled in turn.
#[test]
fn reuseport_steering_through_datapaths() {
    for backend in [Backend::Uring, Backend::Mmsg] {
        let mut paths: Vec<Box<dyn Datapath>> =
            bind_group(localhost(), 4).unwrap().into_iter().map(|s| cellio::open(s, backend).unwrap()).collect();
        let relay = paths[0].local_addr();
        let sender = test_socket();
        for k in 0..64u32 {
            sender.send_to(&cell(0x4000_0000 + k, k.into()), relay).unwrap();
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 64 && Instant::now() < deadline {
            for (index, dp) in paths.iter_mut().enumerate() {
                let mut handler = |batch: &mut [Datagram<'_>]| {
                    for d in batch.iter() {
                        got.push((index, u32::from_be_bytes(d.data[..4].try_into().unwrap())));
                    }
                };
                dp.poll(Duration::from_millis(1), &mut handler, &mut Vec::new()).unwrap();
            }
        }
        assert_eq!(got.len(), 64, "{backend:?}");
        for (index, lcid) in got {
            assert_eq!(index, (lcid % 4) as usize, "{backend:?}: LCID {lcid:#x} on worker {index}");
        }
    }
}

/// Bytes queued for reading at the UDP socket(s) bound to 127.0.0.1:`port` (the kernel's
/// `rx_queue`, its receive-buffer charge, from /proc/net/udp).
fn queued_bytes(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let queues = fields.get(4)?;
            (fields.get(1) == Some(&local.as_str())).then(|| queues.split_once(':')).flatten()
        })
        .map(|(_, rx)| usize::from_str_radix(rx, 16).unwrap())
        .sum()
}

/// Queues `cells` at the datapath before its first poll (so that they arrive together), then
/// polls until the handler saw them all.
fn burst_through(dp: &mut dyn Datapath, cells: &[Vec<u8>], mut route: impl FnMut(u64) -> SocketAddr) {
    let sender = test_socket();
    for c in cells {
        sender.send_to(c, dp.local_addr()).unwrap();
    }
    // Wait until the kernel has queued them at the data path's socket. A queued datagram is
    // charged at least its length, so this holds only once most of the burst is there (on
    // loopback: all of it), and the first poll then sees a run of cells, not one.
    let port = dp.local_addr().port();
    let want = cells.iter().map(Vec::len).sum::<usize>();
    let deadline = Instant::now() + Duration::from_secs(5);
    while queued_bytes(port) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        queued_bytes(port) >= want,
        "the burst never reached the socket: {} of {want} bytes queued",
        queued_bytes(port)
    );
    let mut handled = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while handled < cells.len() && Instant::now() < deadline {
        let mut handler = |batch: &mut [Datagram<'_>]| {
            for d in batch.iter_mut() {
                let seq = u64::from_be_bytes(d.data[4..12].try_into().unwrap());
                d.data[XOR_AT] ^= XOR;
                d.action = Action::Send(route(seq));
                handled += 1;
            }
        };
        dp.poll(Duration::from_millis(10), &mut handler, &mut Vec::new()).unwrap();
    }
    assert_eq!(handled, cells.len());
}

fn seqs(got: &[Vec<u8>]) -> Vec<u64> {
    let mut s: Vec<u64> = got.iter().map(|d| check_forwarded(d).expect("intact cell")).collect();
    s.sort_unstable();
    s
}

/// 64 cells to one destination arrive as 64 separate intact cells (io_uring: as GSO sends).
#[test]
fn gso_run_to_one_destination() {
    let socket = bind_group(localhost(), 1).unwrap().pop().unwrap();
    let mut uring = UringDatapath::new(socket).unwrap();
    run_to_one_destination(&mut uring);
    assert!(uring.gso_sends() > 0, "GSO was used");
    run_to_one_destination(&mut *open_one(Backend::Mmsg));
}

fn run_to_one_destination(dp: &mut dyn Datapath) {
    let receiver = test_socket();
    let to = receiver.local_addr().unwrap();
    let cells: Vec<Vec<u8>> = (0..64).map(|seq| cell(0x4000_0002, seq)).collect();
    burst_through(dp, &cells, |_| to);
    let got = receive(&receiver, 64);
    assert!(got.iter().all(|d| d.len() == CELL_LEN), "{}: one datagram per cell", dp.kind());
    assert_eq!(seqs(&got), (0..64).collect::<Vec<_>>(), "{}", dp.kind());
    assert_eq!(dp.stats().tx_datagrams, 64);
}

/// Alternating destinations (no runs to group) and two runs: every cell arrives where it went.
#[test]
fn gso_alternating_and_runs_to_two_destinations() {
    for backend in [Backend::Uring, Backend::Mmsg] {
        for alternate in [true, false] {
            let mut dp = open_one(backend);
            let (a, b) = (test_socket(), test_socket());
            let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
            let cells: Vec<Vec<u8>> = (0..64).map(|seq| cell(0x4000_0003, seq)).collect();
            let to_first = |seq: u64| if alternate { seq % 2 == 0 } else { seq < 32 };
            burst_through(&mut *dp, &cells, |seq| if to_first(seq) { to_a } else { to_b });
            let (got_a, got_b) = (receive(&a, 32), receive(&b, 32));
            let want_a: Vec<u64> = (0..64).filter(|&s| to_first(s)).collect();
            let want_b: Vec<u64> = (0..64).filter(|&s| !to_first(s)).collect();
            assert_eq!(seqs(&got_a), want_a, "{backend:?} alternate={alternate}");
            assert_eq!(seqs(&got_b), want_b, "{backend:?} alternate={alternate}");
        }
    }
}

/// Cells that arrive coalesced (the sender uses GSO, the relay socket has GRO on) are split
/// back into cells by the io_uring backend.
#[test]
fn gro_receive_is_split_into_cells() {
    let socket = bind_group(localhost(), 1).unwrap().pop().unwrap();
    assert!(cellio::gro_enabled(&socket), "GRO is supported on this kernel");
    let mut dp = UringDatapath::new(socket).unwrap();
    assert!(dp.gro());
    let relay = SockaddrStorage::from(dp.local_addr());
    let receiver = test_socket();
    let to = receiver.local_addr().unwrap();
    let sender = test_socket();
    // 90 cells in two GSO sends of 45 (the most one UDP datagram can hold).
    for chunk in 0..2u64 {
        let cells: Vec<Vec<u8>> = (chunk * 45..chunk * 45 + 45).map(|seq| cell(0x4000_0004, seq)).collect();
        let iov: Vec<std::io::IoSlice<'_>> = cells.iter().map(|c| std::io::IoSlice::new(c)).collect();
        let segment = CELL_LEN as u16;
        let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
        let n = sock::sendmsg(sender.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&relay)).unwrap();
        assert_eq!(n, 45 * CELL_LEN);
    }
    let mut handled = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while handled.len() < 90 && Instant::now() < deadline {
        let mut handler = |batch: &mut [Datagram<'_>]| {
            assert!(batch.len() <= 64);
            for d in batch.iter_mut() {
                assert_eq!(d.data.len(), CELL_LEN);
                handled.push(u64::from_be_bytes(d.data[4..12].try_into().unwrap()));
                d.data[XOR_AT] ^= XOR;
                d.action = Action::Send(to);
            }
        };
        dp.poll(Duration::from_millis(10), &mut handler, &mut Vec::new()).unwrap();
    }
    handled.sort_unstable();
    assert_eq!(handled, (0..90).collect::<Vec<_>>());
    assert!(dp.gro_segments() >= 45, "receives were coalesced: {}", dp.gro_segments());
    assert_eq!(seqs(&receive(&receiver, 90)), (0..90).collect::<Vec<_>>());
}

/// `extra` goes out on a timeout with nothing received, and is emptied.
#[test]
fn extra_is_sent_on_timeout() {
    for backend in [Backend::Uring, Backend::Mmsg] {
        let mut dp = open_one(backend);
        let receiver = test_socket();
        let to = receiver.local_addr().unwrap();
        let mut extra: Vec<Outgoing> = (0..3u8).map(|i| Outgoing::new(to, &[i; 100])).collect();
        extra.push(Outgoing::new(to, b"odd one"));
        let start = Instant::now();
        let n =
            dp.poll(Duration::from_millis(50), &mut |_| panic!("nothing was sent to the relay"), &mut extra).unwrap();
        assert_eq!(n, 0);
        assert!(start.elapsed() >= Duration::from_millis(40), "{backend:?} waited for the timeout");
        assert!(extra.is_empty());
        let mut got = receive(&receiver, 4);
        got.sort();
        assert_eq!(got, vec![vec![0; 100], vec![1; 100], vec![2; 100], b"odd one".to_vec()], "{backend:?}");
        assert_eq!(dp.stats().tx_datagrams, 4);
    }
}

/// Odd datagrams (empty, shorter than an LCID, larger than a buffer, to an impossible
/// destination) are delivered or counted, never a panic or an error.
#[test]
fn odd_inputs_are_counted_not_fatal() {
    let no_gro = bind_group(localhost(), 1).unwrap().pop().unwrap();
    sock::setsockopt(&no_gro, sockopt::UdpGroSegment, &false).unwrap();
    let paths = [open_one(Backend::Uring), Box::new(UringDatapath::new(no_gro).unwrap()), open_one(Backend::Mmsg)];
    for (backend, mut dp) in ["io_uring GRO", "io_uring", "recvmmsg"].into_iter().zip(paths) {
        let sender = test_socket();
        let relay = dp.local_addr();
        for len in [0usize, 3, 3000] {
            sender.send_to(&vec![0x42; len], relay).unwrap();
        }
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        let mut lens = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && lens.len() + dp.stats().rx_errors as usize <= 2 {
            let mut handler = |batch: &mut [Datagram<'_>]| {
                for d in batch.iter_mut() {
                    lens.push(d.data.len());
                    // An IPv6 destination from an IPv4 socket cannot be sent to.
                    d.action = Action::Send(v6);
                }
            };
            dp.poll(Duration::from_millis(10), &mut handler, &mut Vec::new()).unwrap();
        }
        lens.sort_unstable();
        let stats = dp.stats();
        assert!(lens.starts_with(&[0, 3]), "{backend:?}: {lens:?}");
        // 3000 bytes fit the io_uring GRO buffers, not the 2 KiB ones (truncated: counted).
        let delivered_3000 = backend == "io_uring GRO";
        assert_eq!(lens.len(), if delivered_3000 { 3 } else { 2 }, "{backend:?}: {lens:?} {stats:?}");
        assert_eq!(lens.len() as u64 + stats.rx_errors, 3, "{backend:?}: {lens:?} {stats:?}");
        assert_eq!(stats.tx_errors, lens.len() as u64, "{backend:?}: {stats:?}");
    }
}

/// One `poll(timeout)` with no traffic expected: returns how long it took.
fn idle_poll(dp: &mut dyn Datapath, timeout: Duration) -> Duration {
    let start = Instant::now();
    let n = dp.poll(timeout, &mut |_| panic!("nothing was sent to the relay"), &mut Vec::new()).unwrap();
    assert_eq!(n, 0, "{}", dp.kind());
    start.elapsed()
}

/// A `poll(5 s)` blocked on this thread returns promptly after another thread calls `wake()`,
/// then the eventfd is reset: the next `poll(50 ms)` waits for its timeout. Repeated, so that
/// the io_uring poll on the eventfd is shown to stay armed (or be re-armed). (The data path
/// stays on this thread: an io_uring one must be polled by a single thread.)
#[test]
fn wake_interrupts_a_blocked_poll() {
    for backend in [Backend::Uring, Backend::Mmsg] {
        let mut dp = open_one(backend);
        let waker = dp.waker();
        let woken = AtomicBool::new(false);
        for round in 0..3 {
            woken.store(false, Ordering::SeqCst);
            let (latency, spurious) = std::thread::scope(|s| {
                // From another thread, with a clone: as the control thread would.
                let waking = s.spawn(|| {
                    let waker = waker.clone();
                    // Let the poll block (if it is slow to, the wake comes first: same result).
                    std::thread::sleep(Duration::from_millis(100));
                    woken.store(true, Ordering::SeqCst);
                    let at = Instant::now();
                    waker.wake();
                    at
                });
                // Polls until a poll returns after the wake; one that returns before it (no
                // traffic, no wake, a long timeout) is a spurious return, counted.
                let mut spurious = 0;
                while !{
                    idle_poll(&mut *dp, Duration::from_secs(5));
                    woken.load(Ordering::SeqCst)
                } {
                    spurious += 1;
                }
                let returned = Instant::now();
                (returned.saturating_duration_since(waking.join().unwrap()), spurious)
            });
            println!("{backend:?} round {round}: poll returned {latency:?} after wake()");
            assert_eq!(spurious, 0, "{backend:?}: poll returned before the wake");
            // Well under 1 ms unloaded; generous for a loaded machine (not the 5 s timeout).
            assert!(latency < Duration::from_secs(1), "{backend:?}: poll returned {latency:?} after wake()");
            let waited = idle_poll(&mut *dp, Duration::from_millis(50));
            assert!(waited >= Duration::from_millis(40), "{backend:?}: eventfd not reset: waited {waited:?}");
        }
    }
}

/// A wake while nobody polls makes the next `poll(5 s)` return at once; several wakes are
/// consumed together; and datagrams still flow after wakes.
#[test]
fn wake_before_poll_returns_at_once() {
    for backend in [Backend::Uring, Backend::Mmsg] {
        let mut dp = open_one(backend);
        let waker = dp.waker();
        // io_uring: the first poll enables the ring and arms the eventfd poll; wake after it too.
        let waited = idle_poll(&mut *dp, Duration::from_millis(50));
        assert!(waited >= Duration::from_millis(40), "{backend:?}: waited {waited:?}");
        for wakes in [1, 3] {
            for _ in 0..wakes {
                waker.wake();
            }
            let waited = idle_poll(&mut *dp, Duration::from_secs(5));
            assert!(waited < Duration::from_secs(1), "{backend:?}: {wakes} wake(s) before poll: waited {waited:?}");
            let waited = idle_poll(&mut *dp, Duration::from_millis(50));
            assert!(waited >= Duration::from_millis(40), "{backend:?}: eventfd not reset: waited {waited:?}");
        }
        // A wake before the very first poll (io_uring: before the ring is even enabled).
        let mut fresh = open_one(backend);
        fresh.waker().wake();
        let waited = idle_poll(&mut *fresh, Duration::from_secs(5));
        assert!(waited < Duration::from_secs(1), "{backend:?}: wake before the first poll: waited {waited:?}");
        let waited = idle_poll(&mut *fresh, Duration::from_millis(50));
        assert!(waited >= Duration::from_millis(40), "{backend:?}: eventfd not reset: waited {waited:?}");
        // Traffic after wakes: a cell still arrives, is handled and forwarded, promptly.
        let sender = test_socket();
        let receiver = test_socket();
        let to = receiver.local_addr().unwrap();
        waker.wake();
        sender.send_to(&cell(0x4000_0006, 7), dp.local_addr()).unwrap();
        let mut handled = 0;
        let start = Instant::now();
        while handled == 0 && start.elapsed() < Duration::from_secs(5) {
            let mut handler = |batch: &mut [Datagram<'_>]| {
                for d in batch.iter_mut() {
                    d.data[XOR_AT] ^= XOR;
                    d.action = Action::Send(to);
                    handled += 1;
                }
            };
            dp.poll(Duration::from_secs(5), &mut handler, &mut Vec::new()).unwrap();
        }
        assert_eq!(handled, 1, "{backend:?}");
        assert!(start.elapsed() < Duration::from_secs(1), "{backend:?}: {:?}", start.elapsed());
        assert_eq!(seqs(&receive(&receiver, 1)), vec![7], "{backend:?}");
        assert_eq!(dp.stats().rx_errors, 0, "{backend:?}");
    }
}

/// The waker is a cheap handle usable from any thread, and outlives its data path harmlessly.
#[test]
fn waker_is_send_sync_and_outlives_the_datapath() {
    fn send_sync<T: Send + Sync + Clone>(_: &T) {}
    for backend in [Backend::Uring, Backend::Mmsg] {
        let dp = open_one(backend);
        let waker = dp.waker();
        send_sync(&waker);
        drop(dp);
        for _ in 0..1000 {
            waker.wake();
        }
    }
}
