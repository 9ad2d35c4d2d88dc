//! nftables: the one table exitd owns (family `inet`, default name [`DEFAULT_TABLE`]).
//!
//! ```text
//! table inet meshvpn_exit {
//!     chain prerouting {    # type nat hook prerouting priority dstnat
//!         iifname TUN ip daddr GATEWAY udp dport 53 dnat ip to UPSTREAM:53   # and tcp, and ip6
//!     }
//!     chain postrouting {   # type nat hook postrouting priority srcnat
//!         oifname WAN ip saddr POOL_V4 masquerade       # and the same for ip6 / POOL_V6
//!     }
//!     chain forward {       # type filter hook forward priority filter; policy accept
//!         iifname TUN ct state { invalid, untracked } counter drop      # would leave un-NATed
//!         oifname TUN ct state { new, invalid, untracked } counter drop # only replies go in
//!         iifname TUN meta nfproto ipv4 meta l4proto != { 1, 6, 17, ... } counter drop  # and ipv6
//!         iifname TUN ip daddr 10.0.0.0/8 [ip daddr != { ALLOWED }] counter drop  # one per denied prefix
//!         iifname TUN meta l4proto { 6, 17, 33, 132, 136 } th dport 25 counter drop  # one per denied port
//!         iifname TUN meta l4proto { 6, 17, 33, 132, 136 } th dport != { ALLOW_PORTS } counter drop
//!         iifname TUN meta nfproto ipv4 tcp flags syn tcp option maxseg size set 1264 ... set rt mtu
//!         oifname TUN meta nfproto ipv4 tcp flags syn tcp option maxseg size set 1264
//!         # and the same for ipv6 with 1244
//!     }
//!     chain input {         # type filter hook input priority filter; policy accept
//!         iifname TUN ct status dnat meta l4proto { 6, 17 } th dport 53 accept  # a local resolver
//!         iifname TUN counter drop                      # nothing else on the exit host
//!     }
//! }
//! ```
//!
//! The ruleset is built with the `nftables` crate's typed JSON schema and applied as one
//! `nft -j -f -` batch, which the kernel commits as one transaction: there is never a moment
//! with half the rules. The drop rules carry counters and a comment naming the rule
//! (`deny 10.0.0.0/8`, `deny port 25`, `deny exit host`), which [`counters`] reports.
//!
//! The forward rules repeat the exit policy that exitd already enforces in user space
//! ([`crate::policy`], built by [`crate::daemon::nat_config`]): defence in depth, so a bug
//! there cannot reach the exit's own network. The kernel judges whole datagrams (conntrack
//! reassembles fragments before the forward hook) and finds the transport header behind IPv6
//! extension headers itself.

use cellproto::cell::TUN_MTU;
use ipnet::IpNet;
use ipnet::{Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use nftables::schema::{NfListObject, Table};
use nftables::types::NfFamily;
use std::borrow::Cow;
use std::io::{ErrorKind, Write};
use std::process::{Command, Stdio};
use thiserror::Error;

mod rules;
pub use rules::PORT_PROTOCOLS;

/// The table's name unless the config says otherwise.
pub const DEFAULT_TABLE: &str = "meshvpn_exit";

const _: () = assert!(TUN_MTU >= 1280 && TUN_MTU <= u16::MAX as usize);

/// TCP MSS for IPv4 through the TUN: its MTU minus a 20-byte IPv4 and a 20-byte TCP header.
pub const MSS_V4: u16 = (TUN_MTU - 40) as u16;

/// TCP MSS for IPv6 through the TUN: its MTU minus a 40-byte IPv6 and a 20-byte TCP header.
pub const MSS_V6: u16 = (TUN_MTU - 60) as u16;

/// Chain names inside the table.
const POSTROUTING: &str = "postrouting";
const PREROUTING: &str = "prerouting";
/// Destination NAT runs before routing (nft's "dstnat" priority).
const PRIO_DSTNAT: i32 = -100;
const FORWARD: &str = "forward";
const INPUT: &str = "input";
/// `priority srcnat` and `priority filter` as numbers (the JSON schema has no names for them).
const PRIO_SRCNAT: i32 = 100;
const PRIO_FILTER: i32 = 0;
/// Linux interface names are at most IFNAMSIZ − 1 bytes.
const IFNAME_MAX: usize = 15;
/// Kept well under nft's 256 bytes; table names also end up on `nft`'s command line.
const TABLE_NAME_MAX: usize = 64;

/// What exitd's table must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// The table's name (default [`DEFAULT_TABLE`]): letters, digits and `_`, starting with a letter.
    pub table: String,
    /// The WAN interface: pool traffic leaving through it is masqueraded.
    pub wan: String,
    /// The TUN interface: circuits' packets enter the kernel through it.
    pub tun: String,
    /// The circuits' inner IPv4 addresses.
    pub pool_v4: Ipv4Net,
    /// The circuits' inner IPv6 addresses.
    pub pool_v6: Ipv6Net,
    /// TCP MSS clamp for IPv4 SYNs to and from the TUN (default [`MSS_V4`]).
    pub mss_v4: u16,
    /// TCP MSS clamp for IPv6 SYNs to and from the TUN (default [`MSS_V6`]).
    pub mss_v6: u16,
    /// Destinations the exit policy denies, dropped again in the forward chain.
    pub deny: Vec<Deny>,
    /// Destination ports the exit policy denies (TCP, UDP, DCCP, SCTP, UDP-Lite).
    pub deny_ports: Vec<u16>,
    /// If not empty, the only destination ports allowed (the same protocols).
    pub allow_ports: Vec<u16>,
    /// If not empty, the only IPv4 protocols forwarded from the TUN.
    pub protocols_v4: Vec<u8>,
    /// If not empty, the only IPv6 protocols (after extension headers) forwarded from the TUN.
    pub protocols_v6: Vec<u8>,
    /// DNS inside the tunnel: queries to `gateway` port 53 (UDP and TCP) from the TUN are
    /// translated to `upstream` port 53, so the kernel forwards them and maps the answers back.
    pub dns: Vec<DnsRedirect>,
}

/// A denied destination prefix and the exceptions inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    /// The prefix.
    pub net: IpNet,
    /// Allowed prefixes inside it.
    pub except: Vec<IpNet>,
}

impl Deny {
    /// `net` with no exception.
    pub fn all(net: impl Into<IpNet>) -> Self {
        Self { net: net.into(), except: Vec::new() }
    }
}

/// One resolver address inside the tunnel and the upstream resolver it stands for (same family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRedirect {
    /// The address clients send DNS to (the exit's own address in the pool).
    pub gateway: std::net::IpAddr,
    /// The resolver exitd forwards to.
    pub upstream: std::net::IpAddr,
}

impl NatConfig {
    /// A config with the default table name and MSS clamps, nothing denied and every protocol
    /// allowed (the conntrack state and exit-host rules are always there).
    pub fn new(wan: impl Into<String>, tun: impl Into<String>, pool_v4: Ipv4Net, pool_v6: Ipv6Net) -> Self {
        Self {
            table: DEFAULT_TABLE.to_owned(),
            wan: wan.into(),
            tun: tun.into(),
            pool_v4,
            pool_v6,
            mss_v4: MSS_V4,
            mss_v6: MSS_V6,
            deny: Vec::new(),
            deny_ports: Vec::new(),
            allow_ports: Vec::new(),
            protocols_v4: Vec::new(),
            protocols_v6: Vec::new(),
            dns: Vec::new(),
        }
    }
}

/// Why an nftables operation failed; each message says what to do about it.
#[derive(Debug, Error)]
pub enum NftError {
    /// No `nft` executable in `PATH`, `/usr/sbin` or `/sbin`.
    #[error("nft not found: install the nftables package")]
    NotFound,
    /// The kernel refused: no CAP_NET_ADMIN in this network namespace.
    #[error("permission denied: exitd needs CAP_NET_ADMIN (run as root or grant the capability): {0}")]
    PermissionDenied(String),
    /// The table does not exist (for [`list`] and [`counters`]).
    #[error("nftables table inet {0} does not exist: exitd has not installed its rules")]
    NoSuchTable(String),
    /// A config value nft would reject or misread; nothing was changed.
    #[error("invalid nftables config: {0}")]
    InvalidConfig(String),
    /// `nft` could not be started or talked to.
    #[error("could not run nft: {0}")]
    Io(std::io::Error),
    /// `nft` ran and failed: its own error text.
    #[error("nft {action} failed: {stderr}")]
    Failed {
        /// What exitd asked of nft.
        action: &'static str,
        /// nft's error output.
        stderr: String,
    },
    /// `nft` said something exitd cannot parse.
    #[error("unexpected output from nft: {0}")]
    Output(String),
}

/// Installs (or replaces) exitd's table in one atomic `nft` transaction.
///
/// The batch adds the table (so it exists), deletes it, and adds it again with its chains and
/// rules. Deleting rather than only flushing matters: a table left by a crashed or older exitd
/// may hold a chain with other hook settings, which `add chain` cannot change, or chains that
/// no longer exist in this version; flushing would keep those. Running `install` twice leaves
/// exactly one table with each rule once.
pub fn install(cfg: &NatConfig) -> Result<(), NftError> {
    let batch = rules::build(cfg)?;
    apply(batch, "install")
}

/// Removes exitd's table; a table that does not exist is not an error.
///
/// Done as `add table` + `delete table` in one batch, which succeeds whether or not the table
/// existed (nft 1.0.6 has no `destroy`).
pub fn remove(table: &str) -> Result<(), NftError> {
    check_table_name(table)?;
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table_obj(table)));
    batch.delete(NfListObject::Table(table_obj(table)));
    apply(batch, "remove")
}

/// The table as `nft list table inet NAME` prints it, counters included.
pub fn list(table: &str) -> Result<String, NftError> {
    check_table_name(table)?;
    run(&["list", "table", "inet", table], None, "list").map_err(|e| missing_table(e, table))
}

/// Every counter in the table, as (name, packets): rule counters under their rule's comment
/// (e.g. `deny 10.0.0.0/8`, `deny tcp port 25`; `chain CHAIN handle N` for a rule
/// without one), then named counter objects under their names.
pub fn counters(table: &str) -> Result<Vec<(String, u64)>, NftError> {
    check_table_name(table)?;
    let json = run(&["-j", "list", "table", "inet", table], None, "list").map_err(|e| missing_table(e, table))?;
    parse_counters(&json)
}

/// Extracts counters from `nft -j list` output. Read as plain JSON rather than through the
/// crate's typed schema so that a statement the crate does not know (newer nft) cannot make
/// the whole reading fail.
fn parse_counters(json: &str) -> Result<Vec<(String, u64)>, NftError> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| NftError::Output(e.to_string()))?;
    let objects = value
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or_else(|| NftError::Output("no \"nftables\" array".to_owned()))?;
    let mut rules = Vec::new();
    let mut named = Vec::new();
    for object in objects {
        if let Some(rule) = object.get("rule") {
            let Some(exprs) = rule.get("expr").and_then(|e| e.as_array()) else { continue };
            let Some(packets) = exprs.iter().find_map(|s| s.get("counter")?.get("packets")?.as_u64()) else {
                continue;
            };
            let label = match rule.get("comment").and_then(|c| c.as_str()) {
                Some(comment) => comment.to_owned(),
                None => format!(
                    "chain {} handle {}",
                    rule.get("chain").and_then(|c| c.as_str()).unwrap_or("?"),
                    rule.get("handle").and_then(|h| h.as_u64()).unwrap_or(0)
                ),
            };
            rules.push((label, packets));
        } else if let Some(counter) = object.get("counter") {
            if let (Some(name), Some(packets)) =
                (counter.get("name").and_then(|n| n.as_str()), counter.get("packets").and_then(|p| p.as_u64()))
            {
                named.push((name.to_owned(), packets));
            }
        }
    }
    rules.extend(named);
    Ok(rules)
}

fn missing_table(e: NftError, table: &str) -> NftError {
    match e {
        NftError::Failed { stderr, .. } if stderr.contains("No such file or directory") => {
            NftError::NoSuchTable(table.to_owned())
        }
        e => e,
    }
}

fn apply(batch: Batch<'_>, action: &'static str) -> Result<(), NftError> {
    let json = serde_json::to_string(&batch.to_nftables())
        .map_err(|e| NftError::InvalidConfig(format!("serializing: {e}")))?;
    run(&["-j", "-f", "-"], Some(&json), action).map(drop)
}

fn table_obj(name: &str) -> Table<'static> {
    Table { family: NfFamily::INet, name: Cow::Owned(name.to_owned()), handle: None }
}

/// Table names reach `nft`'s command line for `list`, where nft parses its arguments as
/// ruleset language: anything beyond an identifier could be read as more commands.
fn check_table_name(name: &str) -> Result<(), NftError> {
    let mut chars = name.chars();
    let ok = name.len() <= TABLE_NAME_MAX
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(NftError::InvalidConfig(format!(
            "table name {name:?}: use 1 to {TABLE_NAME_MAX} letters, digits and '_', starting with a letter"
        )))
    }
}

/// The kernel's rules for interface names (`dev_valid_name`), so a typo fails here with a
/// clear message rather than as a rule that never matches.
fn check_ifname(what: &str, name: &str) -> Result<(), NftError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(NftError::InvalidConfig(format!(
            "{what} interface name {name:?}: use 1 to {IFNAME_MAX} bytes without '/', ':' or spaces"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Running nft

/// Runs `nft ARGS`, feeding `stdin` if given, and returns its standard output.
///
/// exitd runs `nft` itself instead of through `nftables::helper`: the helper leaves nft's
/// standard error attached to exitd's, so its errors would carry no text to classify
/// (permission, missing table) or to show.
fn run(args: &[&str], stdin: Option<&str>, action: &'static str) -> Result<String, NftError> {
    let mut child = spawn(args)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // nft reads its whole input before it answers, so writing first cannot deadlock. A
        // broken pipe means nft already quit: its exit status and stderr say why.
        match pipe.write_all(input.as_bytes()) {
            Err(e) if e.kind() != ErrorKind::BrokenPipe => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NftError::Io(e));
            }
            _ => {}
        }
    }
    let output = child.wait_with_output().map_err(NftError::Io)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = format!("{} {}", output.status, stdout.trim());
    }
    Err(failure(action, stderr))
}

/// Names the cause of a failed `nft` run from its error text.
fn failure(action: &'static str, stderr: String) -> NftError {
    // "Operation not permitted (you must be root)" from netlink (EPERM: no CAP_NET_ADMIN);
    // "Permission denied" when nft cannot even open its input.
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        NftError::PermissionDenied(stderr)
    } else {
        NftError::Failed { action, stderr }
    }
}

/// Starts `nft` from `PATH`, or from /usr/sbin or /sbin, which a service's `PATH` may lack.
fn spawn(args: &[&str]) -> Result<std::process::Child, NftError> {
    for program in ["nft", "/usr/sbin/nft", "/sbin/nft"] {
        let spawned = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(child) => return Ok(child),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                return Err(NftError::PermissionDenied(format!("cannot execute {program}: {e}")));
            }
            Err(e) => return Err(NftError::Io(e)),
        }
    }
    Err(NftError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::build;

    fn cfg() -> NatConfig {
        let mut c = NatConfig::new("wan0", "tun0", "10.8.0.0/16".parse().unwrap(), "fd00:8::/64".parse().unwrap());
        let ten: IpNet = "10.0.0.0/8".parse().unwrap();
        c.deny = vec![Deny::all(ten), Deny::all("10.0.0.1/8".parse::<IpNet>().unwrap())];
        c.deny_ports = vec![25, 25];
        c
    }

    #[test]
    fn mss_defaults_follow_the_tun_mtu() {
        assert_eq!((MSS_V4, MSS_V6), (1264, 1244));
    }

    #[test]
    fn batch_replaces_the_table_and_dedups() {
        let json = serde_json::to_string(&build(&cfg()).unwrap().to_nftables()).unwrap();
        assert!(json.starts_with(r#"{"nftables":[{"add":{"table""#), "{json}");
        assert_eq!(json.matches(r#""delete":{"table""#).count(), 1);
        assert_eq!(json.matches(r#""comment":"deny 10.0.0.0/8""#).count(), 1);
        assert_eq!(json.matches(r#""comment":"deny port 25""#).count(), 1);
        assert_eq!(json.matches(r#""masquerade":null"#).count(), 2);
    }

    #[test]
    fn bad_names_are_refused_before_nft_runs() {
        for bad in ["", "1x", "x y", "x;flush ruleset", "x\"", &"x".repeat(65)] {
            assert!(matches!(check_table_name(bad), Err(NftError::InvalidConfig(_))), "{bad:?}");
        }
        let mut c = cfg();
        c.tun = "a/b".into();
        assert!(matches!(build(&c), Err(NftError::InvalidConfig(_))));
        c.tun = "0123456789abcdef".into();
        assert!(matches!(build(&c), Err(NftError::InvalidConfig(_))));
        c.tun = "wan0".into();
        assert!(matches!(build(&c), Err(NftError::InvalidConfig(_))));
        let mut c = cfg();
        c.mss_v6 = 0;
        assert!(matches!(build(&c), Err(NftError::InvalidConfig(_))));
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = failure("install", "Operation not permitted (you must be root)\nnetlink: Error: ...".to_owned());
        assert!(matches!(e, NftError::PermissionDenied(_)));
        assert!(e.to_string().starts_with("permission denied: exitd needs CAP_NET_ADMIN"), "{e}");
        let e = failure("install", "Error: Could not process rule: No such file or directory".to_owned());
        assert_eq!(e.to_string(), "nft install failed: Error: Could not process rule: No such file or directory");
        assert_eq!(NftError::NotFound.to_string(), "nft not found: install the nftables package");
        assert!(matches!(missing_table(e, "t"), NftError::NoSuchTable(t) if t == "t"));
    }

    #[test]
    fn counters_parse_rules_and_named_counters() {
        let json = r#"{"nftables":[{"metainfo":{}},
            {"rule":{"chain":"forward","handle":8,"comment":"deny 10.0.0.0/8",
              "expr":[{"match":{}},{"counter":{"packets":3,"bytes":84}},{"drop":null}]}},
            {"rule":{"chain":"forward","handle":9,"expr":[{"counter":{"packets":1,"bytes":1}}]}},
            {"rule":{"chain":"postrouting","handle":4,"expr":[{"masquerade":null}]}},
            {"counter":{"name":"c1","packets":7,"bytes":1}}]}"#;
        assert_eq!(
            parse_counters(json).unwrap(),
            vec![("deny 10.0.0.0/8".to_owned(), 3), ("chain forward handle 9".to_owned(), 1), ("c1".to_owned(), 7)]
        );
        assert!(matches!(parse_counters("not json"), Err(NftError::Output(_))));
        assert!(matches!(parse_counters("{}"), Err(NftError::Output(_))));
    }
}
