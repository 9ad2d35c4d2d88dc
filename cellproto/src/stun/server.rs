//! The answer a STUN server gives on a relay's port (RFC 8489 Binding, RFC 5780 NAT behaviour
//! discovery), as a pure function of the request, its source and the server's addresses: the
//! relay daemon sends it, and the client's tests answer exactly as a relay does without running
//! one.
//!
//! Responses carry XOR-MAPPED-ADDRESS with the sender's reflexive address, RESPONSE-ORIGIN and
//! FINGERPRINT. With an alternate address (`other`), they also carry OTHER-ADDRESS, and
//! CHANGE-REQUEST with "change port" is answered from the other port. "Change IP" needs a
//! second address, which a relay does not have: such requests, and the attributes not
//! implemented (PADDING, RESPONSE-PORT), get 420 Unknown Attribute as RFC 8489 §6.3.1.1 asks.

use super::{Attribute, Class, METHOD_BINDING, Message};
use std::net::SocketAddr;

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

/// The answer to a datagram that [`is_stun`](super::is_stun) accepted on the socket bound to `local`;
/// `other` is the alternate address, if configured. `None`: drop silently (malformed, not a
/// Binding request).
pub fn reply(from: SocketAddr, local: SocketAddr, other: Option<SocketAddr>, datagram: &[u8]) -> Option<Answer> {
    let request = super::decode(datagram).ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun;

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
