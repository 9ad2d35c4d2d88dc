//! meshvpn client as a library: everything `meshvpn` does, in one module per concern.
//!
//! | module | concern |
//! | --- | --- |
//! | [`config`] | the TOML configuration (`meshvpn.example.toml`) |
//! | [`directory`] | where the relays come from: the signed directory file (a [`directory::DirectorySource`]) |
//! | [`relays`] | the usable relays of a verified directory |
//! | [`path`] | path selection (guard, middles, exit), pure policy |
//! | [`guards`] | the kept guard set: retried with backoff, replaced only after a day of failures |
//! | [`tunnel`] | sans-IO: the circuit, keepalive, rebuild to the same exit with the session token, who may say what |
//! | [`session`] | what the exit's ATTACHED may contain before anything is configured |
//! | [`system`] | what `up` changes on the machine (routes, DNS, kill switch) and its undo journal |
//! | [`control`] | the control socket: `status`, `status --watch`, `netcheck` through the client, `down` |
//! | [`daemon`] | the tokio driver: UDP socket, TUN, timers, control socket, signals |
//! | [`endpoint`] | the one UDP endpoint: cells and STUN on one socket, demultiplexed, strays counted |
//! | [`udp`] | the UDP socket to the guard: GSO batches out, GRO runs in |
//! | [`netcheck`] | STUN against relays: reflexive address, NAT mapping and filtering (RFC 5780) |

pub mod config;
pub mod control;
pub mod daemon;
pub mod directory;
pub mod endpoint;
pub mod guards;
pub mod netcheck;
pub mod path;
pub mod relays;
pub mod session;
pub mod system;
pub mod tunnel;
pub mod udp;
