//! The baseline: what a straightforward relay gets. One tokio task on a current-thread runtime:
//! `recv_from` → CREATE, CREATED or a cell for a circuit → `send_to`. The same cryptography
//! and state machines as relayd (cellproto's `ControlPlane`, `CircuitMap`, `HopCircuit`), the
//! same 8 MiB socket buffers, but no batching, no io_uring, no GSO/GRO, no separate control
//! thread and no worker pinning. It answers STUN (for the readiness probe) and PING, and exits
//! when stdin closes.

use crate::sys;
use anyhow::{Context, Result, bail};
use cellproto::cell::{CELL_LEN, Command, HANDSHAKE_LCID, is_valid_lcid, lcid};
use cellproto::command::decode_ping;
use cellproto::link::LinkControl;
use cellproto::onion::{Direction, payload, payload_mut};
use cellproto::relay::control::{Answer, ControlPlane, Created};
use cellproto::relay::{CircuitMap, CircuitTable, Verdict};
use rand_core::{OsRng, RngCore};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// `perf tokio-relay` options.
#[derive(clap::Args, Debug)]
pub struct TokioRelayArgs {
    /// UDP address to listen on (loopback).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory with identity.key and onion.key (`relayd keygen`).
    #[arg(long)]
    pub key_dir: PathBuf,
}

/// Runs the baseline relay until stdin reaches end of file.
pub fn run(args: TokioRelayArgs) -> Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!("--listen must be a loopback address");
    }
    let keys = relayd::keys::load(&args.key_dir)
        .with_context(|| format!("cannot load keys from {}", args.key_dir.display()))?;
    let socket = std::net::UdpSocket::bind(args.listen).with_context(|| format!("cannot bind {}", args.listen))?;
    sys::deep_buffers(&socket, 8 << 20);
    socket.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    sys::stop_on_stdin_eof(stop.clone());
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::process::exit(0);
    });
    let plane = ControlPlane::new(keys.identity.public().0, keys.onion, cellproto::crypto::local_aes_hw());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(socket, plane))
}

async fn serve(socket: std::net::UdpSocket, mut plane: ControlPlane) -> Result<()> {
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let local = socket.local_addr()?;
    let mut circuits = CircuitMap::new();
    let mut used: HashSet<u32> = HashSet::new();
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let now = Instant::now();
        let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(&mut buf[..n]) else {
            if let Some(reply) = stun_reply(from, local, &buf[..n]) {
                socket.send_to(&reply, from).await?;
            }
            continue;
        };
        let id = lcid(cell);
        if id == HANDSHAKE_LCID {
            let alloc = || alloc_lcid(&mut used);
            match plane.handle_create(now, from, cell, alloc, &mut OsRng) {
                Ok(Created::New { reply, circuit }) => {
                    circuits.insert(*circuit);
                    socket.send_to(&reply[..], from).await?;
                }
                Ok(Created::Repeat { reply }) => {
                    socket.send_to(&reply[..], from).await?;
                }
                Err(_) => {}
            }
            continue;
        }
        if plane.is_pending(id) {
            if let Ok(Answer::Extended(ext)) = plane.handle_created(now, from, cell, &mut OsRng) {
                let ext = *ext;
                let circuit = ext.circuit;
                if circuits.set_next(circuit, ext.link)
                    && let Some(circ) = circuits.get_mut(circuit)
                {
                    let mut out = [0u8; CELL_LEN];
                    if let Ok(len) = ext.extended.encode(payload_mut(&mut out))
                        && let Ok(to) = circ.seal_backward(now, Command::Extended, len, &mut out)
                    {
                        socket.send_to(&out, to).await?;
                    }
                }
            }
            continue;
        }
        let verdict = match circuits.lookup(id) {
            Some((circ, Direction::Forward)) => circ.handle_forward(now, from, cell),
            Some((circ, Direction::Backward)) => circ.handle_backward(now, from, cell),
            None => continue,
        };
        match verdict {
            Verdict::Send(to) => {
                socket.send_to(&cell[..], to).await?;
            }
            Verdict::Deliver { cmd: Command::Extend, len } => {
                let body = payload(cell, len).to_vec();
                let alloc = || alloc_lcid(&mut used);
                if let Ok(Some((target, create))) = plane.handle_extend(now, id, &body, alloc, &mut OsRng) {
                    socket.send_to(&create[..], target).await?;
                }
            }
            Verdict::Deliver { cmd: Command::Ping, len } => {
                if let (Ok(ping), Some(circ)) = (decode_ping(payload(cell, len)), circuits.get_mut(id)) {
                    let mut out = [0u8; CELL_LEN];
                    payload_mut(&mut out)[..8].copy_from_slice(&ping.to_be_bytes());
                    if let Ok(to) = circ.seal_backward(now, Command::Pong, 8, &mut out) {
                        socket.send_to(&out, to).await?;
                    }
                }
            }
            Verdict::Control { msg: LinkControl::Destroy { .. }, .. } => {
                circuits.remove(id);
            }
            _ => {}
        }
    }
}

/// The answer to a STUN Binding request (the orchestrator's readiness probe).
fn stun_reply(from: SocketAddr, local: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    use cellproto::stun::{self, Attribute, Class, METHOD_BINDING, Message};
    if !stun::is_stun(datagram) {
        return None;
    }
    let request = stun::decode(datagram).ok()?;
    if request.class != Class::Request || request.method != METHOD_BINDING {
        return None;
    }
    let response = Message::binding_success(request.transaction_id, from).with(Attribute::ResponseOrigin(local));
    let mut out = vec![0u8; 512];
    let len = response.encode(&mut out, true).ok()?;
    out.truncate(len);
    Some(out)
}

/// A fresh valid LCID not used before.
fn alloc_lcid(used: &mut HashSet<u32>) -> u32 {
    loop {
        let id = 0x4000_0000 | (OsRng.next_u32() & 0x3FFF_FFFF);
        if is_valid_lcid(id) && used.insert(id) {
            return id;
        }
    }
}
