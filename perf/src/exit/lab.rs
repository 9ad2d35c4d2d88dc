//! The lab of `perf exit`: three network namespaces joined by veths (see the module doc of
//! [`super`]), and the UDP echo server in the internet namespace.

use super::{ECHO, ECHO_BATCH, ECHO_PORT, EXIT, EXIT_WAN, SOCKET_BUFFER};
use crate::sys;
use anyhow::{Context, Result, bail};
use netns::NetNs;
use nix::sys::socket::{self as sock, MsgFlags, MultiHeaders, SockaddrStorage};
use std::io::{IoSlice, IoSliceMut};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// The lab's namespaces are `mv-perf-exit-{c,x,i}-<pid>-<n>` (client, exit, internet).
const TAG: &str = "perf-exit";

/// The three namespaces and their veths; deleted when dropped, with whatever still runs in them.
pub(super) struct Lab {
    pub(super) client: NetNs,
    pub(super) exit: NetNs,
    pub(super) internet: NetNs,
}

impl Lab {
    pub(super) fn new() -> Result<Lab> {
        remove_stale_labs();
        let lab = Lab {
            client: NetNs::new(&format!("{TAG}-c"))?,
            exit: NetNs::new(&format!("{TAG}-x"))?,
            internet: NetNs::new(&format!("{TAG}-i"))?,
        };
        lab.exit.veth("ex0", &lab.client, "cl0")?;
        lab.exit.veth("wan0", &lab.internet, "i0")?;
        lab.client.addr("cl0", &["203.0.113.2/24"])?;
        lab.exit.addr("ex0", &["203.0.113.1/24"])?;
        lab.exit.addr("wan0", &["198.18.0.1/24"])?;
        lab.internet.addr("i0", &["198.18.0.2/24"])?;
        // The plain route: client → exit namespace → internet and back, no NAT.
        lab.client.ip(&["route", "add", "198.18.0.0/24", "via", &EXIT.to_string()])?;
        lab.internet.ip(&["route", "add", "203.0.113.0/24", "via", &EXIT_WAN.to_string()])?;
        lab.exit.sysctl("net.ipv4.ip_forward=1").context("cannot enable forwarding in the exit ns")?;
        Ok(lab)
    }
}

/// Runs `f` on a new thread inside `ns` and waits for its result.
pub(super) fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    ns.run(f)?
}

/// Deletes the namespaces and files an earlier `perf exit` left behind when it was killed.
fn remove_stale_labs() {
    for pid in netns::remove_stale(TAG) {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("meshvpn-perf-exit-{pid}")));
    }
}

/// The UDP echo server: a thread in the internet namespace, stopped and joined when dropped.
pub(super) struct Echo {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Echo {
    pub(super) fn start(ns: &NetNs) -> Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let handle = ns.thread("echo", move || {
            let socket = match UdpSocket::bind((ECHO, ECHO_PORT)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    bail!("cannot bind the echo server: {e}");
                }
            };
            sys::deep_buffers(&socket, SOCKET_BUFFER);
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            let _ = tx.send(Ok(()));
            echo_loop(&socket, &flag)
        })?;
        let echo = Echo { stop, handle: Some(handle) };
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(echo),
            Ok(Err(e)) => bail!("echo server: {e}"),
            Err(_) => bail!("the echo server did not start"),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends every datagram back to where it came from, up to 64 per `recvmmsg`/`sendmmsg`.
fn echo_loop(socket: &UdpSocket, stop: &AtomicBool) -> Result<()> {
    let fd = socket.as_raw_fd();
    let mut bufs = vec![[0u8; 2048]; ECHO_BATCH];
    // IPv4 senders only, so reusing the headers (and their address lengths) is safe.
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(ECHO_BATCH, None);
    while !stop.load(Ordering::Relaxed) {
        let got: Vec<(usize, SockaddrStorage)> = {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
            match sock::recvmmsg(fd, &mut headers, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(msgs) => msgs.filter_map(|m| Some((m.bytes, m.address?))).collect(),
                Err(_) => continue,
            }
        };
        let slices: Vec<[IoSlice<'_>; 1]> = got.iter().zip(&bufs).map(|((n, _), b)| [IoSlice::new(&b[..*n])]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = got.iter().map(|(_, a)| Some(*a)).collect();
        let mut done = 0;
        let mut retries = 0;
        while done < slices.len() {
            let mut out = MultiHeaders::<SockaddrStorage>::preallocate(slices.len() - done, None);
            match sock::sendmmsg(fd, &mut out, &slices[done..], &addrs[done..], [], MsgFlags::empty()) {
                Ok(sent) => done += sent.count(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) if retries < 100 => {
                    retries += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => break,
            }
        }
    }
    Ok(())
}
