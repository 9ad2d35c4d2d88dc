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

use crate::datapath::Outgoing;
use crate::metrics::Registry;
use crate::ratelimit::{ReplyLimiter, ReplyLimits};
use cellproto::stun::{self, Attribute, Class, METHOD_BINDING, Message};
use crossbeam_channel::{Receiver, Sender};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::warn;

/// Largest STUN reply we produce (header, a few addresses, an error reason, fingerprint).
const MAX_REPLY: usize = 512;

/// An answer, and whether it must leave from the other port (CHANGE-REQUEST change-port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The encoded response.
    pub data: Vec<u8>,
    /// Send it from the other socket.
    pub from_other: bool,
}

/// The answer to a datagram that `stun::is_stun` accepted on the socket bound to `local`;
/// `other` is the alternate address, if configured. `None`: drop silently (malformed, not a
/// Binding request).
pub fn reply(from: SocketAddr, local: SocketAddr, other: Option<SocketAddr>, datagram: &[u8]) -> Option<Answer> {
    let request = stun::decode(datagram).ok()?;
    if request.class != Class::Request || request.method != METHOD_BINDING {
        return None;
    }
    let mut unknown = request.unknown_required();
    let mut from_other = false;
    for a in &request.attributes {
        match a {
            Attribute::ChangeRequest { change_ip: false, change_port } if other.is_some() => from_other = *change_port,
            Attribute::ChangeRequest { .. } | Attribute::Padding(_) | Attribute::ResponsePort(_) => {
                unknown.push(a.typ())
            }
            _ => {}
        }
    }
    let response = if unknown.is_empty() {
        let origin = if from_other { other.unwrap_or(local) } else { local };
        let mut m = Message::binding_success(request.transaction_id, from).with(Attribute::ResponseOrigin(origin));
        if let Some(other) = other {
            // RFC 5780 §6.1: MAPPED-ADDRESS too, for older clients of the NAT tests.
            m = m.with(Attribute::OtherAddress(other)).with(Attribute::MappedAddress(from));
        }
        m
    } else {
        from_other = false;
        Message::binding_error(request.transaction_id, 420, "Unknown Attribute")
            .with(Attribute::UnknownAttributes(unknown))
    };
    let mut out = vec![0u8; MAX_REPLY];
    let len = response.encode(&mut out, true).ok()?;
    out.truncate(len);
    Some(Answer { data: out, from_other })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(m: Message) -> Vec<u8> {
        let mut req = [0u8; 128];
        let n = m.encode(&mut req, true).unwrap();
        req[..n].to_vec()
    }

    #[test]
    fn binding_request_gets_reflexive_address() {
        let from: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:9001".parse().unwrap();
        let out = reply(from, local, None, &request(Message::binding_request([7; 12]))).unwrap();
        assert!(!out.from_other);
        let resp = stun::decode(&out.data).unwrap();
        assert_eq!(resp.class, Class::SuccessResponse);
        assert_eq!(resp.transaction_id, [7; 12]);
        assert_eq!(resp.reflexive_address(), Some(from));
        assert!(resp.attributes.contains(&Attribute::ResponseOrigin(local)));
        assert!(!resp.attributes.iter().any(|a| matches!(a, Attribute::OtherAddress(_))));
    }

    #[test]
    fn rfc5780_other_address_and_change_port() {
        let from: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:9001".parse().unwrap();
        let other: SocketAddr = "198.51.100.1:9002".parse().unwrap();
        let plain = reply(from, local, Some(other), &request(Message::binding_request([1; 12]))).unwrap();
        assert!(stun::decode(&plain.data).unwrap().attributes.contains(&Attribute::OtherAddress(other)));
        let change =
            Message::binding_request([2; 12]).with(Attribute::ChangeRequest { change_ip: false, change_port: true });
        let out = reply(from, local, Some(other), &request(change)).unwrap();
        assert!(out.from_other);
        assert!(stun::decode(&out.data).unwrap().attributes.contains(&Attribute::ResponseOrigin(other)));
    }

    #[test]
    fn change_ip_or_change_without_alternate_gets_420() {
        let from: SocketAddr = "192.0.2.7:1".parse().unwrap();
        let local: SocketAddr = "192.0.2.8:2".parse().unwrap();
        let other: SocketAddr = "192.0.2.8:3".parse().unwrap();
        let ip =
            Message::binding_request([1; 12]).with(Attribute::ChangeRequest { change_ip: true, change_port: false });
        let port =
            Message::binding_request([1; 12]).with(Attribute::ChangeRequest { change_ip: false, change_port: true });
        for (m, other) in [(ip, Some(other)), (port, None)] {
            let out = reply(from, local, other, &request(m)).unwrap();
            assert!(!out.from_other);
            assert_eq!(stun::decode(&out.data).unwrap().class, Class::ErrorResponse);
        }
    }

    #[test]
    fn responses_are_not_answered() {
        let m = Message::binding_success([1; 12], "192.0.2.7:1".parse().unwrap());
        assert!(reply("192.0.2.7:1".parse().unwrap(), "192.0.2.8:2".parse().unwrap(), None, &request(m)).is_none());
    }
}
