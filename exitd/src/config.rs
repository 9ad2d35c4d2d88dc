//! exitd's configuration: relayd's file (listen, keys, workers, limits, metrics…) plus an
//! `[exit]` table and a `[policy]` table. Every option is documented in `exitd.example.toml`.

use crate::policy::PolicyConfig;
use daemonkit::config::ConfigError;
use ipnet::{Ipv4Net, Ipv6Net};
use relayd::config::Config as RelayConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The `[exit]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitOptions {
    /// TUN device name.
    #[serde(default = "default_tun")]
    pub tun: String,
    /// The WAN interface traffic leaves by (masquerade).
    pub wan: String,
    /// Inner IPv4 pool; its first host is the exit's own address (gateway, resolver).
    #[serde(default = "default_pool_v4")]
    pub pool_v4: Ipv4Net,
    /// Inner IPv6 pool (a /64 or larger).
    #[serde(default = "default_pool_v6")]
    pub pool_v6: Ipv6Net,
    /// How long a detached session keeps its addresses for a reconnecting client.
    #[serde(default = "default_grace")]
    pub session_grace_secs: u64,
    /// Sessions (attached or within their grace period) one source may hold: the previous
    /// hop's address, i.e. the client on a 1-hop circuit or the middle relay; IPv6 per /64.
    #[serde(default = "default_sessions_per_source")]
    pub sessions_per_source: usize,
    /// ATTACHes per second one source may send (after `attach_burst`).
    #[serde(default = "default_attach_rate")]
    pub attach_rate: f64,
    /// ATTACHes one source may send at once.
    #[serde(default = "default_attach_burst")]
    pub attach_burst: u32,
    /// Per-circuit limit, bytes per second.
    #[serde(default = "default_circuit_rate")]
    pub circuit_rate: u64,
    /// Per-circuit burst, bytes.
    #[serde(default = "default_circuit_burst")]
    pub circuit_burst: u64,
    /// Whole-exit limit, bytes per second.
    #[serde(default = "default_exit_rate")]
    pub exit_rate: u64,
    /// Whole-exit burst, bytes.
    #[serde(default = "default_exit_burst")]
    pub exit_burst: u64,
    /// Turn on IPv4/IPv6 forwarding at start (logged). If false and forwarding is off, exitd
    /// refuses to start.
    #[serde(default = "yes")]
    pub enable_forwarding: bool,
    /// nftables table exitd owns.
    #[serde(default = "default_table")]
    pub nft_table: String,
    /// Upstream resolver for DNS sent to the exit's address inside the tunnel (IPv4).
    #[serde(default = "default_dns_v4")]
    pub dns_upstream_v4: std::net::Ipv4Addr,
    /// Upstream resolver for DNS sent to the exit's IPv6 address inside the tunnel.
    #[serde(default = "default_dns_v6")]
    pub dns_upstream_v6: std::net::Ipv6Addr,
}

fn default_dns_v4() -> std::net::Ipv4Addr {
    // Quad9: filters nothing the client did not ask for, keeps no client addresses; operators
    // running their own resolver set theirs.
    std::net::Ipv4Addr::new(9, 9, 9, 9)
}
fn default_dns_v6() -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0x2620, 0xfe, 0, 0, 0, 0, 0, 0xfe)
}

fn yes() -> bool {
    true
}
fn default_tun() -> String {
    "mvexit0".into()
}
fn default_pool_v4() -> Ipv4Net {
    "10.8.0.0/16".parse().unwrap_or_default()
}
fn default_pool_v6() -> Ipv6Net {
    "fd6d:6573:6800::/64".parse().unwrap_or_default()
}
fn default_grace() -> u64 {
    600
}
fn default_sessions_per_source() -> usize {
    1024
}
fn default_attach_rate() -> f64 {
    20.0
}
fn default_attach_burst() -> u32 {
    200
}
fn default_circuit_rate() -> u64 {
    12_500_000
}
fn default_circuit_burst() -> u64 {
    1_250_000
}
fn default_exit_rate() -> u64 {
    1_250_000_000
}
fn default_exit_burst() -> u64 {
    125_000_000
}
fn default_table() -> String {
    crate::nft::DEFAULT_TABLE.into()
}

/// The whole exitd configuration.
#[derive(Debug, Clone)]
pub struct ExitConfig {
    /// The relay engine's options.
    pub relay: RelayConfig,
    /// `[exit]`.
    pub exit: ExitOptions,
    /// `[policy]`.
    pub policy: PolicyConfig,
}

impl ExitConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::parse(&daemonkit::config::read(path)?, path)?;
        if config.relay.key_dir.is_relative()
            && let Some(parent) = path.parent()
        {
            config.relay.key_dir = parent.join(&config.relay.key_dir);
        }
        Ok(config)
    }

    /// Parses: `[exit]` and `[policy]` are taken out, the rest is relayd's configuration.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse { path: PathBuf::from(path), message };
        let mut table: toml::Table = daemonkit::config::parse_toml(text, path)?;
        let exit =
            table.remove("exit").ok_or_else(|| parse_err("missing [exit] table (with at least `wan`)".into()))?;
        let exit: ExitOptions = exit.try_into().map_err(|e: toml::de::Error| parse_err(format!("in [exit]: {e}")))?;
        let policy = match table.remove("policy") {
            Some(p) => p.try_into().map_err(|e: toml::de::Error| parse_err(format!("in [policy]: {e}")))?,
            None => PolicyConfig::default(),
        };
        let rest = toml::to_string(&table).map_err(|e| parse_err(e.to_string()))?;
        let relay = RelayConfig::parse(&rest, path)?;
        let bad = |key, problem: &str| ConfigError::Value { path: path.into(), key, problem: problem.into() };
        if exit.pool_v4.prefix_len() > 29 || exit.pool_v4.prefix_len() < crate::table::MIN_POOL_V4_PREFIX {
            return Err(bad("exit.pool_v4", "must be a /12 to a /29"));
        }
        if exit.pool_v6.prefix_len() > 64 {
            return Err(bad("exit.pool_v6", "must be a /64 or larger"));
        }
        if exit.circuit_rate == 0 || exit.exit_rate == 0 {
            return Err(bad("exit.circuit_rate", "rates must be positive"));
        }
        if !(exit.attach_rate.is_finite() && exit.attach_rate > 0.0) || exit.attach_burst == 0 {
            return Err(bad("exit.attach_rate", "attach_rate and attach_burst must be positive"));
        }
        if exit.sessions_per_source == 0 {
            return Err(bad("exit.sessions_per_source", "must be at least 1"));
        }
        Ok(Self { relay, exit, policy })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_errors_name_keys() {
        let c = ExitConfig::parse(include_str!("../exitd.example.toml"), Path::new("exitd.example.toml")).unwrap();
        assert_eq!(c.exit.pool_v4.to_string(), "10.8.0.0/16");
        assert_eq!(c.policy.deny_ports, vec![25]);
        let base = "listen = \"127.0.0.1:9001\"\nkey_dir = \"k\"\nnickname = \"x\"\n";
        let err = ExitConfig::parse(base, Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("[exit]"), "{err}");
        let err = ExitConfig::parse(&format!("{base}[exit]\nwan = \"eth0\"\nbogus = 1\n"), Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = ExitConfig::parse(
            &format!("{base}[exit]\nwan = \"eth0\"\n[policy]\ndeny = [\"nope\"]\n"),
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("policy"), "{err}");
        for (extra, key) in [
            ("pool_v4 = \"10.0.0.0/8\"", "exit.pool_v4"),
            ("pool_v4 = \"10.0.0.0/30\"", "exit.pool_v4"),
            ("attach_rate = 0.0", "exit.attach_rate"),
            ("attach_burst = 0", "exit.attach_rate"),
            ("sessions_per_source = 0", "exit.sessions_per_source"),
        ] {
            let err = ExitConfig::parse(&format!("{base}[exit]\nwan = \"eth0\"\n{extra}\n"), Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        assert_eq!((c.exit.sessions_per_source, c.exit.attach_rate, c.exit.attach_burst), (1024, 20.0, 200));
    }
}
