//! The client's TOML configuration. Every option is documented in `meshvpn.example.toml`;
//! unknown keys and bad values are errors that name the key and say what to do.

use cellproto::cell::MAX_HOPS;
use cellproto::identity::IdentityKey;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration file was refused: the same cases, and messages, as relayd's.
pub use daemonkit::config::ConfigError;

/// The whole configuration, as read (relative paths already resolved against the file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The signed directory file (`relayd authority sign`).
    pub directory: PathBuf,
    /// The directory authority's public key (64 hex digits): only its signature is accepted.
    #[serde(deserialize_with = "identity_key")]
    pub authority: IdentityKey,
    /// Relays per circuit, guard and exit included.
    #[serde(default = "default_hops")]
    pub hops: usize,
    /// A preferred exit (identity, 64 hex digits); otherwise one is chosen by weight.
    #[serde(default, deserialize_with = "opt_identity_key")]
    pub exit: Option<IdentityKey>,
    /// Ports the exit's policy must allow.
    #[serde(default = "default_exit_ports")]
    pub exit_ports: Vec<u16>,
    /// Where the chosen guard, the undo journal and the daemon's log live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The control socket `status` and `down` talk to.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// TUN device name.
    #[serde(default = "default_tun")]
    pub tun: String,
    /// resolv.conf to point at the tunnel's resolver while up; empty: leave DNS alone.
    #[serde(default = "default_resolv_conf")]
    pub resolv_conf: PathBuf,
    /// nftables kill switch: while up, nothing leaves but cells to the guard. Once installed,
    /// only `meshvpn down` removes it (not a crash, an error or a stop).
    #[serde(default = "yes")]
    pub kill_switch: bool,
    /// Measure the round trip to every relay (one STUN request each, from this machine's own
    /// address, outside the tunnel) before choosing a path. Off by default: it tells every
    /// relay in the directory where this client is.
    #[serde(default)]
    pub rtt_probes: bool,
    /// Offer AES-256-GCM as well as ChaCha20-Poly1305 in handshakes (each relay picks by its
    /// own hardware). On by default, so the offer says nothing about this machine's CPU;
    /// `false` offers ChaCha20-Poly1305 only (for machines without AES instructions, where
    /// software AES is slow; the offer then reveals that).
    #[serde(default = "yes")]
    pub offer_aes: bool,
    /// Timing of keepalive, failure detection and handshakes.
    #[serde(default)]
    pub timers: Timers,
}

/// Keepalive and handshake timing, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timers {
    /// Send a PING to the exit after this long without receiving anything.
    pub keepalive_ms: u64,
    /// Declare the circuit dead after this long without receiving anything.
    pub dead_after_ms: u64,
    /// First handshake retransmission timeout per hop (doubles per attempt).
    pub handshake_timeout_ms: u64,
    /// Handshake sends per hop before the hop counts as unreachable.
    pub handshake_attempts: u32,
}

impl Default for Timers {
    fn default() -> Self {
        Self { keepalive_ms: 1000, dead_after_ms: 4000, handshake_timeout_ms: 500, handshake_attempts: 3 }
    }
}

impl Timers {
    /// Keepalive interval.
    pub fn keepalive(&self) -> Duration {
        Duration::from_millis(self.keepalive_ms)
    }

    /// Silence after which the circuit is declared dead.
    pub fn dead_after(&self) -> Duration {
        Duration::from_millis(self.dead_after_ms)
    }
}

fn default_hops() -> usize {
    3
}
fn default_exit_ports() -> Vec<u16> {
    vec![80, 443]
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/meshvpn")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/meshvpn/meshvpn.sock")
}
fn default_tun() -> String {
    "meshvpn0".into()
}
fn default_resolv_conf() -> PathBuf {
    PathBuf::from("/etc/resolv.conf")
}
fn yes() -> bool {
    true
}

fn identity_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IdentityKey, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| serde::de::Error::custom("expected 64 hex digits (an identity key)"))
}

fn opt_identity_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<IdentityKey>, D::Error> {
    identity_key(d).map(Some)
}

impl Config {
    /// Reads and checks `path`; relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = daemonkit::config::read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.directory, &mut config.state_dir, &mut config.control_socket] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if !config.resolv_conf.as_os_str().is_empty() && config.resolv_conf.is_relative() {
            config.resolv_conf = base.join(&config.resolv_conf);
        }
        config.check().map_err(|(key, problem)| ConfigError::Value { path: path.into(), key, problem })?;
        Ok(config)
    }

    /// The keys whose change in `new` a running client cannot apply (it needs a restart);
    /// `timers` and the directory file's content are applied live.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut check = |key, same: bool| {
            if !same {
                keys.push(key);
            }
        };
        check("directory", self.directory == new.directory);
        check("authority", self.authority == new.authority);
        check("hops", self.hops == new.hops);
        check("exit", self.exit == new.exit);
        check("exit_ports", self.exit_ports == new.exit_ports);
        check("state_dir", self.state_dir == new.state_dir);
        check("control_socket", self.control_socket == new.control_socket);
        check("tun", self.tun == new.tun);
        check("resolv_conf", self.resolv_conf == new.resolv_conf);
        check("kill_switch", self.kill_switch == new.kill_switch);
        check("rtt_probes", self.rtt_probes == new.rtt_probes);
        check("offer_aes", self.offer_aes == new.offer_aes);
        keys
    }

    /// Range checks, also applied after command-line overrides.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(1..=MAX_HOPS).contains(&self.hops) {
            return Err(("hops", format!("must be 1 to {MAX_HOPS}, not {}", self.hops)));
        }
        if self.exit_ports.contains(&0) {
            return Err(("exit_ports", "must not contain 0".into()));
        }
        if self.tun.is_empty() || self.tun.len() > 15 || !self.tun.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err(("tun", "must be 1 to 15 printable characters without '/'".into()));
        }
        let t = &self.timers;
        if t.keepalive_ms == 0 || t.dead_after_ms <= t.keepalive_ms {
            return Err(("timers", "need keepalive_ms > 0 and dead_after_ms > keepalive_ms".into()));
        }
        if t.handshake_timeout_ms == 0 || t.handshake_attempts == 0 {
            return Err(("timers", "need handshake_timeout_ms > 0 and handshake_attempts > 0".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("meshvpn-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meshvpn.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const AUTH: &str = "authority = \"0000000000000000000000000000000000000000000000000000000000000001\"\n";

    #[test]
    fn example_parses_and_paths_are_relative_to_the_file() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/meshvpn.example.toml")).unwrap();
        let path = write(&text);
        let c = Config::load(&path).unwrap();
        assert_eq!(c.hops, 3);
        assert_eq!(c.directory, path.parent().unwrap().join("directory.bin"));
        assert!(c.kill_switch);
        assert!(!c.rtt_probes, "RTT probes tell every relay where the client is: off by default");
        assert!(c.offer_aes, "offering both suites reveals nothing about the CPU: on by default");
        let minimal = Config::load(&write(&format!("directory = \"d\"\n{AUTH}"))).unwrap();
        assert_eq!((minimal.rtt_probes, minimal.offer_aes), (false, true));
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            (format!("directory = \"d\"\n{AUTH}hops = 0\n"), "hops"),
            (format!("directory = \"d\"\n{AUTH}hops = 9\n"), "hops"),
            (format!("directory = \"d\"\n{AUTH}exit_ports = [0]\n"), "exit_ports"),
            (format!("directory = \"d\"\n{AUTH}tun = \"a/b\"\n"), "tun"),
            (format!("directory = \"d\"\n{AUTH}[timers]\nkeepalive_ms = 5000\n"), "timers"),
        ] {
            let err = Config::load(&write(&text)).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{err}");
        }
        let err = Config::load(&write("directory = \"d\"\nauthority = \"xyz\"\n")).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        let err = Config::load(&write(&format!("directory = \"d\"\n{AUTH}bogus = 1\n"))).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
