//! The kill switch: an nftables table that, while meshvpn is up, drops everything leaving the
//! machine except through the TUN device, on loopback, or as UDP to the guard's cell port. It
//! holds while a circuit is rebuilt and if the exit dies, so nothing leaks then either.
//!
//! The table is written as `nft` text and loaded with `nft -f -`: one transaction that replaces
//! the previous version whole (no moment without rules), and text an operator recognises in
//! `nft list table inet meshvpn_client`.

use super::run;
use anyhow::{Context, Result};
use std::net::SocketAddr;

/// The table's name.
pub const TABLE: &str = "meshvpn_client";

/// The ruleset text.
pub fn ruleset(table: &str, tun: &str, guard: SocketAddr) -> String {
    let (fam, ip) = match guard {
        SocketAddr::V4(a) => ("ip", a.ip().to_string()),
        SocketAddr::V6(a) => ("ip6", a.ip().to_string()),
    };
    let port = guard.port();
    // `table … {}` then `delete table` makes the load succeed whether or not it existed.
    format!(
        r#"table inet {table} {{}}
delete table inet {table}
table inet {table} {{
    chain output {{
        type filter hook output priority filter; policy drop;
        oifname "lo" accept
        oifname "{tun}" accept
        {fam} daddr {ip} udp dport {port} accept
        counter drop comment "meshvpn kill switch: would have left outside the tunnel"
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        oifname "{tun}" accept
        counter drop comment "meshvpn kill switch: forwarded outside the tunnel"
    }}
}}
"#
    )
}

/// Installs or replaces the table.
pub fn install(table: &str, tun: &str, guard: SocketAddr) -> Result<()> {
    run("nft", &["-f", "-"], Some(&ruleset(table, tun, guard)))
        .map(drop)
        .context("cannot install the kill switch (nftables table)")
}

/// Removes the table if present.
pub fn remove(table: &str) -> Result<()> {
    run("nft", &["-f", "-"], Some(&format!("table inet {table} {{}}\ndelete table inet {table}\n"))).map(drop)
}

/// Packets the kill switch dropped (sum of its counters), if the table is there.
pub fn dropped(table: &str) -> Option<u64> {
    let out = run("nft", &["list", "table", "inet", table], None).ok()?;
    let words: Vec<&str> = out.split_whitespace().collect();
    Some(words.windows(2).filter(|w| w[0] == "packets").filter_map(|w| w[1].parse::<u64>().ok()).sum())
}
