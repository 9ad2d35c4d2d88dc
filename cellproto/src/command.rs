//! Bodies of the terminal commands (SPEC.md, "Commands"): typed encode and decode.
//!
//! A body is the payload of a terminal layer, read from the start of the cell body. Decoders
//! return an error on any malformed input and reject trailing bytes.

use crate::codec::{CodecError, Reader, Writer};
use crate::crypto::KEY_LEN;
use crate::handshake::{CREATE_LEN, CREATED_LEN};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// DESTROY reason codes.
pub mod reason {
    /// Closed on request, nothing wrong.
    pub const REQUESTED: u8 = 0;
    /// The peer violated the protocol.
    pub const PROTOCOL: u8 = 1;
    /// An internal error.
    pub const INTERNAL: u8 = 2;
    /// Out of resources or over a limit.
    pub const RESOURCE_LIMIT: u8 = 3;
    /// The relay is shutting down.
    pub const SHUTDOWN: u8 = 4;
    /// The next hop could not be reached.
    pub const CONNECT_FAILED: u8 = 5;
    /// Idle or handshake timeout.
    pub const TIMEOUT: u8 = 6;
    /// AEAD usage limit or maximum age reached: rebuild.
    pub const KEY_LIMIT: u8 = 7;
    /// Refused by policy.
    pub const POLICY: u8 = 8;
}

/// Ask the last hop to extend the circuit to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extend {
    /// UDP address of the next relay.
    pub target: SocketAddr,
    /// Secret of the new link (the new hop gets it inside the handshake).
    pub link_secret: [u8; KEY_LEN],
    /// The CREATE handshake message for the new hop.
    pub handshake: [u8; CREATE_LEN],
}

fn get_addr(r: &mut Reader<'_>) -> Result<SocketAddr, CodecError> {
    let addr = r.socket_addr()?;
    if addr.port() == 0 {
        return Err(CodecError::Invalid("port"));
    }
    Ok(addr)
}

impl Extend {
    /// Writes the body; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, CodecError> {
        let mut w = Writer::new(out);
        w.socket_addr(&self.target)?;
        w.put(&self.link_secret, "link secret")?;
        w.put(&self.handshake, "handshake")?;
        Ok(w.position())
    }

    /// Reads a body.
    pub fn decode(body: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(body);
        let target = get_addr(&mut r)?;
        let link_secret = r.array("link secret")?;
        let handshake = r.array("handshake")?;
        r.finish()?;
        Ok(Self { target, link_secret, handshake })
    }
}

/// The new hop's reply, relayed by the hop that extended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extended {
    /// The CREATED handshake reply.
    pub handshake: [u8; CREATED_LEN],
}

impl Extended {
    /// Writes the body; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, CodecError> {
        let mut w = Writer::new(out);
        w.put(&self.handshake, "handshake")?;
        Ok(w.position())
    }

    /// Reads a body.
    pub fn decode(body: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(body);
        let handshake = r.array("handshake")?;
        r.finish()?;
        Ok(Self { handshake })
    }
}

/// Reads a one-byte DESTROY body (the reason).
pub fn decode_destroy(body: &[u8]) -> Result<u8, CodecError> {
    let mut r = Reader::new(body);
    let reason = r.u8("reason")?;
    r.finish()?;
    Ok(reason)
}

/// Reads a PING or PONG body: an 8-byte identifier chosen by the client.
pub fn decode_ping(body: &[u8]) -> Result<u64, CodecError> {
    let mut r = Reader::new(body);
    let id = r.u64("ping id")?;
    r.finish()?;
    Ok(id)
}

/// Ask the exit for inner addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attach {
    /// Token of an earlier session to resume (same inner addresses), or `None` for a new one.
    pub resume: Option<[u8; 32]>,
}

impl Attach {
    /// Writes the body; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, CodecError> {
        let mut w = Writer::new(out);
        w.u8(u8::from(self.resume.is_some()), "attach flags")?;
        w.put(&self.resume.unwrap_or([0; 32]), "session token")?;
        Ok(w.position())
    }

    /// Reads a body.
    pub fn decode(body: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(body);
        let flags = r.u8("attach flags")?;
        let token = r.array("session token")?;
        r.finish()?;
        match flags {
            0 if token == [0; 32] => Ok(Self { resume: None }),
            1 => Ok(Self { resume: Some(token) }),
            _ => Err(CodecError::Invalid("attach flags")),
        }
    }
}

/// The exit's answer to [`Attach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// Token to resume this session through another path.
    pub token: [u8; 32],
    /// Inner IPv4 address and prefix length.
    pub ipv4: (Ipv4Addr, u8),
    /// Inner IPv6 address and prefix length.
    pub ipv6: (Ipv6Addr, u8),
    /// Resolver addresses inside the tunnel.
    pub dns: (Ipv4Addr, Ipv6Addr),
}

impl Attached {
    /// Writes the body; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, CodecError> {
        let mut w = Writer::new(out);
        w.put(&self.token, "session token")?;
        w.put(&self.ipv4.0.octets(), "inner IPv4")?;
        w.u8(self.ipv4.1, "IPv4 prefix")?;
        w.put(&self.ipv6.0.octets(), "inner IPv6")?;
        w.u8(self.ipv6.1, "IPv6 prefix")?;
        w.put(&self.dns.0.octets(), "DNS IPv4")?;
        w.put(&self.dns.1.octets(), "DNS IPv6")?;
        Ok(w.position())
    }

    /// Reads a body.
    pub fn decode(body: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(body);
        let token = r.array("session token")?;
        let v4 = Ipv4Addr::from(r.array::<4>("inner IPv4")?);
        let p4 = r.u8("IPv4 prefix")?;
        let v6 = Ipv6Addr::from(r.array::<16>("inner IPv6")?);
        let p6 = r.u8("IPv6 prefix")?;
        let d4 = Ipv4Addr::from(r.array::<4>("DNS IPv4")?);
        let d6 = Ipv6Addr::from(r.array::<16>("DNS IPv6")?);
        r.finish()?;
        if p4 > 32 {
            return Err(CodecError::Invalid("IPv4 prefix"));
        }
        if p6 > 128 {
            return Err(CodecError::Invalid("IPv6 prefix"));
        }
        Ok(Self { token, ipv4: (v4, p4), ipv6: (v6, p6), dns: (d4, d6) })
    }
}
