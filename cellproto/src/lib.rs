//! # cellproto — meshvpn's onion cell protocol, without I/O
//!
//! Bytes and time in, bytes and events out: no sockets, threads or clocks in this crate. The
//! daemons (`relayd`, `exitd`) and the client (`meshvpn`) are thin drivers around it. The exact
//! bytes, key schedule and state machines are specified in `SPEC.md` next to this crate.
//!
//! | module | concern |
//! | --- | --- |
//! | [`cell`] | wire constants, cell geometry, command codes |
//! | [`crypto`] | the only module touching AEAD, AES, X25519 and HKDF implementations |
//! | [`onion`] | onion layers, header protection and link tags on one cell, in place |
//! | [`replay`] | RFC 6479 sliding replay window |
//! | [`handshake`] | ntor-v3-style circuit handshake |
//! | [`link`] | CREATE/CREATED/COOKIE and authenticated link-control cells |
//! | [`command`] | bodies of EXTEND, EXTENDED, DESTROY, PING, ATTACH… |
//! | [`client`] | the client's circuit state machine; [`client::tamper`], the evidence of tampering |
//! | [`relay`] | the relay/exit per-circuit state, the batch hot path, the control plane, cookies |
//! | [`node`] | one relay node: every reaction to a cell, time as an argument, caller-owned transmit slots |
//! | `sim` | (feature `sim`) a deterministic network of [`node`]s for tests, benches, fuzzing |
//! | [`identity`], [`descriptor`], [`directory`] | relay keys, signed descriptors, the signed directory |
//! | [`stun`] | STUN (RFC 8489/5780) codec, demultiplexing against cells, the relay's Binding answer |
//! | [`codec`] | bounds-checked byte reading and writing shared by all decoders |
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cell;
pub mod client;
pub mod codec;
pub mod command;
pub mod crypto;
pub mod descriptor;
pub mod directory;
pub mod handshake;
pub mod identity;
pub mod link;
pub mod node;
pub mod onion;
pub mod relay;
pub mod replay;
#[cfg(feature = "sim")]
pub mod sim;
pub mod stun;
