//! The STUN server on the relay port (RFC 8489 Binding), answering standard STUN clients:
//! XOR-MAPPED-ADDRESS with the sender's reflexive address, RESPONSE-ORIGIN, FINGERPRINT.
//! Requests that need RFC 5780's second address (CHANGE-REQUEST) or attributes we do not
//! implement get a 420 Unknown Attribute answer, as RFC 8489 §6.3.1.1 asks.

use cellproto::stun::{self, Attribute, Class, METHOD_BINDING, Message};
use std::net::SocketAddr;

/// Largest STUN reply we produce (header, a few addresses, an error reason, fingerprint).
const MAX_REPLY: usize = 512;

/// The reply to a datagram that `stun::is_stun` accepted, or `None` to drop it silently
/// (malformed, not a Binding request).
pub fn reply(from: SocketAddr, local: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    let request = stun::decode(datagram).ok()?;
    if request.class != Class::Request || request.method != METHOD_BINDING {
        return None;
    }
    let mut unknown = request.unknown_required();
    for a in &request.attributes {
        if let Attribute::ChangeRequest { .. } | Attribute::Padding(_) | Attribute::ResponsePort(_) = a {
            unknown.push(a.typ());
        }
    }
    let response = if unknown.is_empty() {
        Message::binding_success(request.transaction_id, from).with(Attribute::ResponseOrigin(local))
    } else {
        Message::binding_error(request.transaction_id, 420, "Unknown Attribute")
            .with(Attribute::UnknownAttributes(unknown))
    };
    let mut out = vec![0u8; MAX_REPLY];
    let len = response.encode(&mut out, true).ok()?;
    out.truncate(len);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_request_gets_reflexive_address() {
        let from: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:9001".parse().unwrap();
        let mut req = [0u8; 64];
        let n = Message::binding_request([7; 12]).encode(&mut req, true).unwrap();
        let out = reply(from, local, &req[..n]).unwrap();
        let resp = stun::decode(&out).unwrap();
        assert_eq!(resp.class, Class::SuccessResponse);
        assert_eq!(resp.transaction_id, [7; 12]);
        assert_eq!(resp.reflexive_address(), Some(from));
        assert!(resp.attributes.contains(&Attribute::ResponseOrigin(local)));
    }

    #[test]
    fn change_request_without_alternate_gets_420() {
        let mut req = [0u8; 64];
        let m =
            Message::binding_request([1; 12]).with(Attribute::ChangeRequest { change_ip: true, change_port: false });
        let n = m.encode(&mut req, true).unwrap();
        let out = reply("192.0.2.7:1".parse().unwrap(), "192.0.2.8:2".parse().unwrap(), &req[..n]).unwrap();
        let resp = stun::decode(&out).unwrap();
        assert_eq!(resp.class, Class::ErrorResponse);
    }

    #[test]
    fn responses_are_not_answered() {
        let mut buf = [0u8; 64];
        let n = Message::binding_success([1; 12], "192.0.2.7:1".parse().unwrap()).encode(&mut buf, true).unwrap();
        assert!(reply("192.0.2.7:1".parse().unwrap(), "192.0.2.8:2".parse().unwrap(), &buf[..n]).is_none());
    }
}
