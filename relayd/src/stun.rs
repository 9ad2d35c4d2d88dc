//! The STUN server on the relay port (RFC 8489 Binding), answering standard STUN clients:
//! XOR-MAPPED-ADDRESS with the sender's reflexive address, RESPONSE-ORIGIN, FINGERPRINT.
//!
//! With `stun.alternate_port` set, the relay also listens on that port of the same IP and
//! speaks RFC 5780 for NAT behaviour discovery: responses carry OTHER-ADDRESS, and
//! CHANGE-REQUEST with "change port" is answered from the other port. "Change IP" needs a
//! second address, which a relay does not have: such requests, and the attributes we do not
//! implement (PADDING, RESPONSE-PORT), get 420 Unknown Attribute as RFC 8489 §6.3.1.1 asks.
//!
//! Answers are rate-limited per source (IPv4 address, IPv6 /64) and per worker in all
//! (`stun.rate`, `stun.burst`, `stun.global_rate`; SPEC.md §14 says SHOULD): a request of 20
//! bytes gets up to 124 back, which would otherwise make the relay an amplifier for spoofed
//! requests. Requests over the limits are dropped and counted (`reason="stun_limit"`).
//!
//! What to answer is decided by cellproto's pure [`reply`] (`cellproto::stun::server`); this
//! module only sends it, within the limits, from the right port.

use crate::metrics::Registry;
use crate::ratelimit::{ReplyLimiter, ReplyLimits};
use cellio::Outgoing;
use cellproto::stun;
use crossbeam_channel::{Receiver, Sender};
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::warn;

pub use cellproto::stun::server::{Answer, reply};

/// The alternate-port STUN socket and what its thread needs.
pub struct Alternate {
    /// The socket on `stun.alternate_port`.
    pub socket: UdpSocket,
    /// A handle on the main port's socket, for change-port answers to requests that came to
    /// the alternate port.
    pub primary: UdpSocket,
    /// Change-port answers the workers hand over (sent from the alternate port).
    pub handover: Receiver<Outgoing>,
    /// Answer limits (`stun.rate`, `stun.burst`, `stun.global_rate`).
    pub limits: ReplyLimits,
    /// New answer limits (SIGHUP).
    pub updates: Receiver<ReplyLimits>,
    /// Where requests over the limits are counted.
    pub registry: Arc<Registry>,
}

/// Serves the alternate port: answers requests that arrive on it (within the same limits as
/// the workers, with a limiter of its own), and sends the change-port answers the workers hand
/// over.
pub fn serve_alternate(a: Alternate, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let Alternate { socket: alt, primary, handover, limits, updates, registry } = a;
    let alt_addr = alt.local_addr()?;
    let primary_addr = primary.local_addr()?;
    alt.set_read_timeout(Some(Duration::from_millis(20)))?;
    std::thread::Builder::new().name("stun-alt".into()).spawn(move || {
        let mut buf = [0u8; 2048];
        let mut limiter = ReplyLimiter::new(limits, Instant::now());
        let mut last_prune = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            while let Ok(l) = updates.try_recv() {
                limiter.reconfigure(l);
            }
            while let Ok(o) = handover.try_recv() {
                if let Err(e) = alt.send_to(o.data(), o.to) {
                    warn!("STUN change-port answer to {} failed: {e}", o.to);
                }
            }
            let now = Instant::now();
            if now.duration_since(last_prune) >= Duration::from_secs(1) {
                last_prune = now;
                limiter.prune(now);
            }
            let Ok((n, from)) = alt.recv_from(&mut buf) else { continue };
            if !stun::is_stun(&buf[..n]) {
                continue;
            }
            let from = cellproto::relay::canonical_addr(from);
            if limiter.allow(from.ip(), Instant::now()).is_err() {
                registry.stun_alternate_limited.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(answer) = reply(from, alt_addr, Some(primary_addr), &buf[..n]) {
                let socket = if answer.from_other { &primary } else { &alt };
                let _ = socket.send_to(&answer.data, from);
            }
        }
    })
}

/// Where workers hand change-port answers.
pub type Handover = Sender<Outgoing>;
