//! relayd's TOML configuration. Every option is documented in `relayd.example.toml`, which
//! runs as is on loopback; unknown keys and bad values are errors that name the key.

use crate::cookies::CookieLimits;
use crate::ratelimit::ReplyLimits;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use daemonkit::config::ConfigError;

/// Which data path to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatapathChoice {
    /// io_uring, falling back to recvmmsg/sendmmsg (logged) where unavailable.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// recvmmsg/sendmmsg.
    Recvmmsg,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP address for cells and STUN.
    pub listen: SocketAddr,
    /// Addresses published in the descriptor (default: `listen`).
    #[serde(default)]
    pub public_addresses: Vec<SocketAddr>,
    /// Directory with `identity.key` and `onion.key`.
    pub key_dir: PathBuf,
    /// Relay nickname (1–19 letters and digits).
    pub nickname: String,
    /// Operator contact or family id (path selection avoids two relays of one operator).
    #[serde(default)]
    pub operator: String,
    /// Advertised bandwidth in bytes per second.
    #[serde(default = "default_bandwidth")]
    pub bandwidth: u64,
    /// Offer to be a guard (first hop).
    #[serde(default)]
    pub guard: bool,
    /// Worker threads; 0 = one per CPU core.
    #[serde(default)]
    pub workers: usize,
    /// Pin each worker to its own core.
    #[serde(default = "yes")]
    pub pin_workers: bool,
    /// Data path.
    #[serde(default)]
    pub datapath: DatapathChoice,
    /// Circuits idle this long are torn down.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// How long a published descriptor is valid.
    #[serde(default = "default_descriptor_lifetime")]
    pub descriptor_lifetime_secs: u64,
    /// Limits on circuit creation.
    #[serde(default)]
    pub limits: Limits,
    /// EXTEND policy.
    #[serde(default)]
    pub extend: ExtendPolicy,
    /// Metrics endpoint.
    #[serde(default)]
    pub metrics: Metrics,
    /// STUN options.
    #[serde(default)]
    pub stun: StunOptions,
    /// Benchmark-only switches.
    #[serde(default)]
    pub bench: Bench,
    /// Log filter (`info`, `debug`, `relayd=debug,warn`, …: tracing's `EnvFilter` syntax).
    /// `RUST_LOG`, when set, wins. Changed by SIGHUP.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

/// STUN options.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StunOptions {
    /// A second UDP port on the listen address for RFC 5780 NAT behaviour discovery
    /// (OTHER-ADDRESS, CHANGE-REQUEST change-port). None: plain RFC 8489 Binding only.
    pub alternate_port: Option<u16>,
    /// STUN answers per second per source (IPv4 address, IPv6 /64): a 20-byte request gets
    /// up to 124 bytes, so unlimited answers would make the relay an amplifier.
    #[serde(default = "default_stun_rate")]
    pub rate: f64,
    /// STUN answer burst per source.
    #[serde(default = "default_stun_burst")]
    pub burst: u32,
    /// STUN answers per second per worker over all sources (and on the alternate port).
    #[serde(default = "default_reply_global_rate")]
    pub global_rate: f64,
}

impl Default for StunOptions {
    fn default() -> Self {
        Self {
            alternate_port: None,
            rate: default_stun_rate(),
            burst: default_stun_burst(),
            global_rate: default_reply_global_rate(),
        }
    }
}

impl StunOptions {
    /// The answer limits.
    pub fn replies(&self) -> ReplyLimits {
        ReplyLimits { rate: self.rate, burst: self.burst, global_rate: self.global_rate }
    }
}

/// Switches for the `perf` harness, accepted only by a relayd built with the `bench` feature
/// (perf's build); any other build refuses them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bench {
    /// Forward cells by LCID with no cryptography at all (no header protection, no layer, no
    /// replay check): the same engine's I/O ceiling, for `perf relay`'s null baseline. Cells
    /// forwarded this way are useless to the next hop.
    #[serde(default)]
    pub null_forwarder: bool,
}

/// Limits on circuit creation: per source (Tor's DoS defaults: 3 circuits/s, burst 90), in all,
/// and when CREATEs need a cookie.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Sustained CREATE rate per source IP (per second).
    #[serde(default = "default_rate")]
    pub create_rate: f64,
    /// CREATE burst per source IP.
    #[serde(default = "default_burst")]
    pub create_burst: u32,
    /// Live circuits per source IP.
    #[serde(default = "default_max_circuits")]
    pub max_circuits_per_ip: u32,
    /// Sources exempt from the per-source limits (other relays, e.g. from the directory). They
    /// still need a cookie under load and count against `max_circuits`.
    #[serde(default)]
    pub exempt: Vec<IpNet>,
    /// Live circuits in all, from every source (exempt ones included).
    #[serde(default = "default_max_circuits_total")]
    pub max_circuits: u32,
    /// CREATEs per second (all sources) above which the relay is under load: CREATEs then need
    /// a cookie (one more round trip for clients) before they cost a handshake. 0: always.
    #[serde(default = "default_load_create_rate")]
    pub load_create_rate: f64,
    /// COOKIE answers per second per worker over all sources (per source: `create_rate` and
    /// `create_burst`; exempt sources only this).
    #[serde(default = "default_reply_global_rate")]
    pub cookie_rate: f64,
    /// CREATEs per second per worker examined under load (cookie MAC, COOKIE answer); beyond
    /// it they are dropped before any cryptography, so a flood's CPU cost is bounded.
    #[serde(default = "default_cookie_check_rate")]
    pub cookie_check_rate: f64,
}

impl Limits {
    /// The limits under load, for the workers.
    pub fn cookie_limits(&self) -> CookieLimits {
        CookieLimits {
            replies: ReplyLimits { rate: self.create_rate, burst: self.create_burst, global_rate: self.cookie_rate },
            checks: self.cookie_check_rate,
        }
    }
}

/// Where EXTEND may go.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendPolicy {
    /// Allow targets in private, loopback, link-local and CGNAT ranges (labs and private
    /// deployments only: otherwise a client could make the relay probe its own network).
    #[serde(default)]
    pub allow_private: bool,
    /// A signed directory (`relayd authority sign`): EXTEND may then go only to the addresses
    /// of the relays it lists. Re-read on SIGHUP. Without it, any public address a client names
    /// is a target (logged as a warning at start).
    pub directory: Option<PathBuf>,
    /// The directory authority's public key (64 hex digits); required with `directory`.
    #[serde(default, deserialize_with = "opt_identity_key")]
    pub authority: Option<cellproto::identity::IdentityKey>,
}

/// Prometheus metrics.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address for `GET /metrics` (text format); none = disabled.
    pub listen: Option<SocketAddr>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            create_rate: default_rate(),
            create_burst: default_burst(),
            max_circuits_per_ip: default_max_circuits(),
            exempt: Vec::new(),
            max_circuits: default_max_circuits_total(),
            load_create_rate: default_load_create_rate(),
            cookie_rate: default_reply_global_rate(),
            cookie_check_rate: default_cookie_check_rate(),
        }
    }
}

fn opt_identity_key<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<cellproto::identity::IdentityKey>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

fn default_log_level() -> String {
    "info".into()
}
fn yes() -> bool {
    true
}
fn default_bandwidth() -> u64 {
    12_500_000
}
fn default_idle() -> u64 {
    300
}
fn default_descriptor_lifetime() -> u64 {
    86_400
}
fn default_rate() -> f64 {
    3.0
}
fn default_burst() -> u32 {
    90
}
fn default_max_circuits() -> u32 {
    1000
}
/// See relayd/README.md ("Floods and spoofing"): a circuit costs the relay about 9 KiB
/// (measured), so 50,000 circuits hold some 450 MiB, room on a 2 GiB cloud VM, and several times
/// what a busy Tor relay carries.
fn default_max_circuits_total() -> u32 {
    50_000
}
/// A handshake costs the control thread about 0.1 ms (three X25519), so it does some 10,000 a
/// second; 1,000 a second leaves it mostly idle and is far above what honest clients send.
fn default_load_create_rate() -> f64 {
    1000.0
}
/// Twice `cookie_rate`: a flood up to that rate is examined in full (honest clients get their
/// cookie at `cookie_rate / flood rate`); beyond, the worker spends at most about 0.3 core on it
/// (3.5 µs to check a CREATE, 4.2 µs more to answer it, measured).
fn default_cookie_check_rate() -> f64 {
    40_000.0
}
fn default_stun_rate() -> f64 {
    10.0
}
fn default_stun_burst() -> u32 {
    20
}
/// 20,000 answers a second per worker: about 29 MB/s of COOKIEs at most (1:1 with what a
/// flooder sends), 2.5 MB/s of STUN answers.
fn default_reply_global_rate() -> f64 {
    20_000.0
}

impl Config {
    /// Reads and validates a configuration file. Relative `key_dir` is relative to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::parse(&daemonkit::config::read(path)?, path)?;
        if let Some(parent) = path.parent() {
            if config.key_dir.is_relative() {
                config.key_dir = parent.join(&config.key_dir);
            }
            if let Some(dir) = config.extend.directory.as_mut().filter(|d| d.is_relative()) {
                *dir = parent.join(&*dir);
            }
        }
        Ok(config)
    }

    /// Parses and validates configuration text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = daemonkit::config::parse_toml(text, path)?;
        let bad = |key, problem: &str| ConfigError::Value { path: path.into(), key, problem: problem.into() };
        let nick_ok =
            (1..=19).contains(&config.nickname.len()) && config.nickname.chars().all(|c| c.is_ascii_alphanumeric());
        if !nick_ok {
            return Err(bad("nickname", "must be 1 to 19 ASCII letters and digits"));
        }
        if config.listen.port() == 0 {
            return Err(bad("listen", "needs a port other than 0"));
        }
        if !(config.limits.create_rate > 0.0 && config.limits.create_rate.is_finite()) {
            return Err(bad("limits.create_rate", "must be a positive number"));
        }
        if config.limits.create_burst == 0 {
            return Err(bad("limits.create_burst", "must be at least 1"));
        }
        if config.limits.max_circuits == 0 {
            return Err(bad("limits.max_circuits", "must be at least 1"));
        }
        if !(config.limits.load_create_rate >= 0.0 && config.limits.load_create_rate.is_finite()) {
            return Err(bad("limits.load_create_rate", "must be 0 (always under load) or a positive number"));
        }
        if !(config.limits.cookie_rate > 0.0 && config.limits.cookie_rate.is_finite()) {
            return Err(bad("limits.cookie_rate", "must be a positive number"));
        }
        if !(config.limits.cookie_check_rate > 0.0 && config.limits.cookie_check_rate.is_finite()) {
            return Err(bad("limits.cookie_check_rate", "must be a positive number"));
        }
        if !(config.stun.rate > 0.0 && config.stun.rate.is_finite()) {
            return Err(bad("stun.rate", "must be a positive number"));
        }
        if config.stun.burst == 0 {
            return Err(bad("stun.burst", "must be at least 1"));
        }
        if !(config.stun.global_rate > 0.0 && config.stun.global_rate.is_finite()) {
            return Err(bad("stun.global_rate", "must be a positive number"));
        }
        if config.idle_timeout_secs == 0 {
            return Err(bad("idle_timeout_secs", "must be at least 1"));
        }
        if !(60..=7 * 86_400).contains(&config.descriptor_lifetime_secs) {
            return Err(bad("descriptor_lifetime_secs", "must be between 60 and 604800"));
        }
        if config.stun.alternate_port.is_some_and(|p| p == 0 || p == config.listen.port()) {
            return Err(bad("stun.alternate_port", "must be a port other than 0 and other than listen's"));
        }
        if !daemonkit::log::is_valid_filter(&config.log_level) {
            return Err(bad("log_level", "is not a log filter (e.g. \"info\" or \"relayd=debug,warn\")"));
        }
        if config.bench.null_forwarder && !cfg!(feature = "bench") {
            return Err(bad(
                "bench.null_forwarder",
                "exists only in builds for the perf harness (cargo feature `bench`); a relay never forwards cells without cryptography",
            ));
        }
        if config.extend.directory.is_some() != config.extend.authority.is_some() {
            return Err(bad("extend.directory", "and extend.authority go together"));
        }
        if config.workers > 1024 {
            return Err(bad("workers", "must be at most 1024"));
        }
        Ok(config)
    }

    /// Worker count with 0 resolved to the number of CPU cores.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }

    /// Addresses for the descriptor.
    pub fn published_addresses(&self) -> Vec<SocketAddr> {
        if self.public_addresses.is_empty() { vec![self.listen] } else { self.public_addresses.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../relayd.example.toml");
        let c = Config::parse(text, Path::new("relayd.example.toml")).unwrap();
        assert_eq!(c.limits, Limits::default(), "the example lists the defaults");
        assert_eq!(c.stun, StunOptions::default());
    }

    #[test]
    fn packaged_config_parses() {
        let text = include_str!("../../deploy/debian/relayd.toml");
        let c = Config::parse(text, Path::new("relayd.toml")).unwrap();
        assert_eq!((c.limits.clone(), c.stun.clone()), (Limits::default(), StunOptions::default()));
    }

    #[test]
    fn errors_name_the_key() {
        let base = "listen = \"127.0.0.1:9001\"\nkey_dir = \"k\"\nnickname = \"a\"\n";
        let err = Config::parse(&format!("{base}bogus = 1\n"), Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = Config::parse(&format!("{base}workers = \"many\"\n"), Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("workers"), "{err}");
        let err = Config::parse(
            "listen = \"127.0.0.1:9001\"\nkey_dir = \"k\"\nnickname = \"bad name!\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nickname"), "{err}");
        let err =
            Config::parse(&format!("{base}[limits]\ncreate_rate = 0\n"), Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("limits.create_rate"), "{err}");
        for (extra, key) in [
            ("[limits]\nmax_circuits = 0\n", "limits.max_circuits"),
            ("[limits]\nload_create_rate = -1\n", "limits.load_create_rate"),
            ("[limits]\ncookie_rate = 0\n", "limits.cookie_rate"),
            ("[limits]\ncookie_check_rate = nan\n", "limits.cookie_check_rate"),
            ("[stun]\nrate = 0\n", "stun.rate"),
            ("[stun]\nburst = 0\n", "stun.burst"),
            ("[stun]\nglobal_rate = inf\n", "stun.global_rate"),
        ] {
            let err = Config::parse(&format!("{base}{extra}"), Path::new("x.toml")).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    /// The null forwarder is refused unless the build is perf's (feature `bench`). `cargo test
    /// --workspace` builds relayd with perf's features, so the refusal is checked here when
    /// relayd is tested alone (`cargo test -p relayd`) and on the packaged binary by
    /// deploy/test-packages.
    #[test]
    fn null_forwarder_only_in_bench_builds() {
        let text = "listen = \"127.0.0.1:9001\"\nkey_dir = \"k\"\nnickname = \"a\"\n[bench]\nnull_forwarder = true\n";
        let parsed = Config::parse(text, Path::new("x.toml"));
        if cfg!(feature = "bench") {
            assert!(parsed.is_ok());
        } else {
            let err = parsed.unwrap_err().to_string();
            assert!(err.contains("bench.null_forwarder"), "{err}");
        }
    }
}
