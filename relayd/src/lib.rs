//! relayd as a library: the relay engine that `relayd` runs and `exitd` reuses. The daemon
//! plumbing (logging, systemd notifications, docs, TOML, key files, time) is `daemonkit`'s; the
//! cell I/O (sockets, io_uring and `recvmmsg` backends, reuseport steering, the outbox) is
//! `cellio`'s.
//!
//! | module | concern |
//! | --- | --- |
//! | [`config`] | TOML configuration |
//! | [`keys`] | the relay's key files (0600) |
//! | [`keycli`] | `keygen`, `rotate-onion`, `descriptor`: the subcommands relayd and exitd share |
//! | [`worker`] | the data-plane driver of a `cellproto::node::Node`: classify → the node handles in place → send |
//! | [`control`] | handshakes, EXTEND, limits, LCID allocation, on their own thread |
//! | [`cookies`] | cookies under load, checked and answered in the workers |
//! | [`extend`] | where EXTEND may send a CREATE |
//! | [`ratelimit`] | per-source limits (CREATE, STUN and COOKIE answers), the under-load state |
//! | [`stun`] | STUN Binding answers on the relay port |
//! | [`metrics`] | Prometheus counters and endpoint |
//! | [`relay`] | wiring it all together |
//! | [`reload`] | SIGHUP: what a new configuration may change while running |
//! | [`terminal`] | the hook an exit plugs into each worker |
//! | [`descriptor`] | the relay's signed descriptor |

pub mod config;
pub mod control;
pub mod cookies;
pub mod descriptor;
pub mod extend;
pub mod keycli;
pub mod keys;
pub mod metrics;
pub mod ratelimit;
pub mod relay;
pub mod reload;
pub mod stun;
pub mod terminal;
pub mod worker;
