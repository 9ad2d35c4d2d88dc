//! The load generator's sink, hop 2 of every circuit: its own thread and UDP socket (with UDP
//! GRO). It answers the relay's CREATE with cellproto's `ControlPlane`, owns the `HopCircuit`s,
//! counts every cell that arrives on one of its circuits, and samples latency: with the relay's
//! cryptography on, it opens every 16th cell (it is the last hop) and reads its sequence
//! number; with the null forwarder (the relay did not remove its layer) it matches the cell's
//! first 16 body bytes against those of every 16th cell sealed.

use super::{SAMPLE_EVERY, SINK_IDENTITY, Shared};
use crate::sys;
use cellproto::cell::{CELL_LEN, Command, HANDSHAKE_LCID, lcid};
use cellproto::handshake::OnionSecret;
use cellproto::onion::{Direction, payload};
use cellproto::relay::control::{ControlPlane, Created};
use cellproto::relay::{CircuitMap, CircuitTable, Verdict};
use rand_core::OsRng;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// What the sink thread found.
#[derive(Debug, Default)]
pub(super) struct SinkOutput {
    pub(super) latencies_ns: Vec<u64>,
    pub(super) bad: u64,
    pub(super) socket_drops: u64,
}

/// The bytes the sink matches in null mode: the first 16 body bytes (AEAD output, unique).
pub(super) fn fingerprint(cell: &[u8]) -> [u8; 16] {
    let mut f = [0u8; 16];
    f.copy_from_slice(&cell[12..28]);
    f
}

/// The sink: answers CREATE, counts cells, samples latency (see the module doc).
pub(super) fn sink_loop(socket: UdpSocket, onion: OnionSecret, shared: &Shared) -> SinkOutput {
    let mut plane = ControlPlane::new(SINK_IDENTITY, vec![onion], cellproto::crypto::local_aes_hw());
    let mut circuits = CircuitMap::new();
    let mut next_lcid = 0x6000_0000u32;
    let mut out = SinkOutput::default();
    let mut buf = vec![0u8; 1 << 16];
    let mut cmsg = nix::cmsg_space!(i32);
    let mut count = 0u64;
    let fd = socket.as_raw_fd();
    let progress = &shared.progress;
    while !progress.stop.load(Ordering::Relaxed) {
        let Some((len, Some(from), segment)) = sys::recv_gro(fd, &mut buf, &mut cmsg) else { continue };
        let now_ns = progress.now_ns();
        let mut fingerprints = if shared.null { shared.fingerprints.lock().ok() } else { None };
        let mut arrived = 0;
        for chunk in buf[..len].chunks_mut(segment) {
            let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(chunk) else { continue };
            let id = lcid(cell);
            if id == HANDSHAKE_LCID {
                let alloc = || {
                    next_lcid += 1;
                    next_lcid
                };
                match plane.handle_create(Instant::now(), from, cell, alloc, &mut OsRng) {
                    Ok(Created::New { reply, circuit }) => {
                        circuits.insert(*circuit);
                        let _ = socket.send_to(&reply[..], from);
                    }
                    Ok(Created::Repeat { reply }) => {
                        let _ = socket.send_to(&reply[..], from);
                    }
                    Err(_) => {}
                }
                continue;
            }
            if !circuits.contains_lcid(id) {
                continue;
            }
            arrived += 1;
            count += 1;
            let seq = if let Some(fp) = fingerprints.as_mut() {
                fp.remove(&fingerprint(&cell[..]))
            } else if count % SAMPLE_EVERY == 0 {
                match circuits.lookup(id) {
                    Some((circ, Direction::Forward)) => match circ.handle_forward(Instant::now(), from, cell) {
                        Verdict::Deliver { cmd: Command::Data, len } if len >= 8 => {
                            let mut seq = [0u8; 8];
                            seq.copy_from_slice(&payload(cell, len)[..8]);
                            Some(u64::from_be_bytes(seq))
                        }
                        _ => {
                            out.bad += 1;
                            None
                        }
                    },
                    _ => None,
                }
            } else {
                None
            };
            if let Some(latency) = seq.and_then(|s| progress.latency(s, now_ns)) {
                out.latencies_ns.push(latency);
            }
        }
        drop(fingerprints);
        progress.arrived(arrived, now_ns);
    }
    out.socket_drops = socket.local_addr().map_or(0, |a| sys::udp_socket_drops(a.port()));
    out
}
