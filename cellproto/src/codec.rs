//! Bounds-checked big-endian reading and writing over byte slices.
//!
//! Every decoder in cellproto reads through [`Reader`], so a short or malformed input becomes a
//! [`CodecError`] instead of a panic, and the same checks are not written again in each module.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use thiserror::Error;

/// Why bytes could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The input ended before the field named here.
    #[error("input truncated while reading {0}")]
    Truncated(&'static str),
    /// Bytes were left over after a complete message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// The output buffer is too small for the message.
    #[error("output buffer too small for {0}")]
    NoSpace(&'static str),
    /// A field holds a value this version does not allow.
    #[error("invalid value for {0}")]
    Invalid(&'static str),
}

/// Reads fields from the front of a byte slice, failing cleanly on short input.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The unread bytes, without consuming them.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Takes the next `n` bytes; `what` names the field in the error.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes exactly `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// Reads a `u16` length prefix and then that many bytes.
    pub fn bytes_u16(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }

    /// Reads a socket address: family (4 or 6), the address bytes, the port. IPv6 flow label
    /// and scope are local matters and are not carried.
    pub fn socket_addr(&mut self) -> Result<SocketAddr, CodecError> {
        let ip = match self.u8("address family")? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>("IPv4 address")?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>("IPv6 address")?)),
            _ => return Err(CodecError::Invalid("address family")),
        };
        Ok(SocketAddr::new(ip, self.u16("port")?))
    }

    /// Fails unless every byte has been read.
    pub fn finish(&self) -> Result<(), CodecError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

/// Writes fields into a caller-owned byte slice, failing cleanly when it is full.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Appends `bytes`; `what` names the field in the error.
    pub fn put(&mut self, bytes: &[u8], what: &'static str) -> Result<(), CodecError> {
        let end = self.pos.checked_add(bytes.len()).ok_or(CodecError::NoSpace(what))?;
        self.buf.get_mut(self.pos..end).ok_or(CodecError::NoSpace(what))?.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8, what: &'static str) -> Result<(), CodecError> {
        self.put(&[v], what)
    }

    /// Appends a big-endian `u16`.
    pub fn u16(&mut self, v: u16, what: &'static str) -> Result<(), CodecError> {
        self.put(&v.to_be_bytes(), what)
    }

    /// Appends a big-endian `u32`.
    pub fn u32(&mut self, v: u32, what: &'static str) -> Result<(), CodecError> {
        self.put(&v.to_be_bytes(), what)
    }

    /// Appends a big-endian `u64`.
    pub fn u64(&mut self, v: u64, what: &'static str) -> Result<(), CodecError> {
        self.put(&v.to_be_bytes(), what)
    }

    /// Appends a socket address as [`Reader::socket_addr`] reads it.
    pub fn socket_addr(&mut self, addr: &SocketAddr) -> Result<(), CodecError> {
        match addr.ip() {
            IpAddr::V4(ip) => {
                self.u8(4, "address family")?;
                self.put(&ip.octets(), "IPv4 address")?;
            }
            IpAddr::V6(ip) => {
                self.u8(6, "address family")?;
                self.put(&ip.octets(), "IPv6 address")?;
            }
        }
        self.u16(addr.port(), "port")
    }

    /// Appends a `u16` length prefix and the bytes.
    pub fn bytes_u16(&mut self, bytes: &[u8], what: &'static str) -> Result<(), CodecError> {
        let n = u16::try_from(bytes.len()).map_err(|_| CodecError::Invalid(what))?;
        self.u16(n, what)?;
        self.put(bytes, what)
    }
}
