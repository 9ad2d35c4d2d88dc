//! exitd as a library: the pieces an exit adds to the relay engine.
//!
//! | module | concern |
//! | --- | --- |
//! | [`packet`] | looking inside IP packets (pnet): source, destination, protocol, port |
//! | [`policy`] | the exit policy: default-denied classes, the exit host, protocols, configured prefixes and ports |
//! | [`filter`] | per worker: DNS to the tunnel resolver, the policy, later fragments only behind an allowed first one |
//! | [`pool`] | inner IPv4/IPv6 addresses and resumable sessions; the only writer of the table |
//! | [`table`] | inner address → circuit, the one map every worker reads |
//! | [`conntrack`] | deleting a released inner address's conntrack entries (ctnetlink) before it is leased again |
//! | [`limits`] | ATTACH rate limits per circuit and per source |
//! | [`counts`] | a worker's packet counters (fixed slots) and its rate-limited drop log |
//! | [`bucket`] | token buckets for per-circuit and per-exit limits |
//! | [`daemon`] | `exitd run`: everything above wired into the relay engine |
//! | [`config`] | exitd's TOML: relayd's options plus `[exit]` and `[policy]` |
//! | [`exit`] | the relay engine's `Terminal` for an exit: TUN both ways, policy, limits, ATTACH |
//! | [`nft`] | the nftables table exitd owns: NAT, forward filter, MSS clamping |

pub mod bucket;
pub mod config;
pub mod conntrack;
pub mod counts;
pub mod daemon;
pub mod exit;
pub mod filter;
pub mod limits;
pub mod nft;
pub mod packet;
pub mod policy;
pub mod pool;
pub mod table;
