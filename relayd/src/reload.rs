//! SIGHUP: re-read the configuration and apply what is safe to change in a running relay.
//!
//! Applied at once: `[limits]` (every key), the STUN rates (`stun.rate`, `stun.burst`,
//! `stun.global_rate`), `[extend]` (its directory re-read), `log_level`, and the
//! onion keys in `key_dir` (rotation: `relayd rotate-onion`). Used only by `relayd descriptor`,
//! so in effect for the next descriptor: `nickname`, `operator`, `bandwidth`, `guard`,
//! `public_addresses`, `descriptor_lifetime_secs`. Everything else (sockets, threads, the data
//! path) needs a restart: each such key is logged by name, and the relay keeps running with the
//! old value, which later reloads keep comparing against. A new file that does not parse, or
//! keys that do not load, change nothing.

use crate::config::Config;
use crate::control::ControlUpdate;
use crate::keys::RelayKeys;
use crate::relay::RelayHandle;
use anyhow::{Context, Result, bail};
use cellproto::identity::IdentityKey;
use daemonkit::log::LogControl;
use tracing::{info, warn};

/// What a changed key needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Applied to the running relay.
    Applied,
    /// Only `relayd descriptor` reads it: in effect for the next descriptor.
    Descriptor,
    /// Needs a restart; the running relay keeps the old value.
    Restart,
}

/// One changed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key as written in the file (`limits.create_rate`).
    pub key: &'static str,
    /// What it needs.
    pub effect: Effect,
}

/// The keys that differ between `old` and `new`, with what each needs.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    use Effect::*;
    let checks: [(&'static str, bool, Effect); 28] = [
        ("listen", old.listen != new.listen, Restart),
        ("key_dir", old.key_dir != new.key_dir, Restart),
        ("workers", old.workers != new.workers, Restart),
        ("pin_workers", old.pin_workers != new.pin_workers, Restart),
        ("datapath", old.datapath != new.datapath, Restart),
        ("idle_timeout_secs", old.idle_timeout_secs != new.idle_timeout_secs, Restart),
        ("metrics.listen", old.metrics != new.metrics, Restart),
        ("stun.alternate_port", old.stun.alternate_port != new.stun.alternate_port, Restart),
        ("stun.rate", old.stun.rate != new.stun.rate, Applied),
        ("stun.burst", old.stun.burst != new.stun.burst, Applied),
        ("stun.global_rate", old.stun.global_rate != new.stun.global_rate, Applied),
        ("bench.null_forwarder", old.bench != new.bench, Restart),
        ("log_level", old.log_level != new.log_level, Applied),
        ("limits.create_rate", old.limits.create_rate != new.limits.create_rate, Applied),
        ("limits.create_burst", old.limits.create_burst != new.limits.create_burst, Applied),
        ("limits.max_circuits_per_ip", old.limits.max_circuits_per_ip != new.limits.max_circuits_per_ip, Applied),
        ("limits.exempt", old.limits.exempt != new.limits.exempt, Applied),
        ("limits.max_circuits", old.limits.max_circuits != new.limits.max_circuits, Applied),
        ("limits.load_create_rate", old.limits.load_create_rate != new.limits.load_create_rate, Applied),
        ("limits.cookie_rate", old.limits.cookie_rate != new.limits.cookie_rate, Applied),
        ("limits.cookie_check_rate", old.limits.cookie_check_rate != new.limits.cookie_check_rate, Applied),
        ("extend", old.extend != new.extend, Applied),
        ("nickname", old.nickname != new.nickname, Descriptor),
        ("operator", old.operator != new.operator, Descriptor),
        ("bandwidth", old.bandwidth != new.bandwidth, Descriptor),
        ("guard", old.guard != new.guard, Descriptor),
        ("public_addresses", old.public_addresses != new.public_addresses, Descriptor),
        ("descriptor_lifetime_secs", old.descriptor_lifetime_secs != new.descriptor_lifetime_secs, Descriptor),
    ];
    checks.into_iter().filter(|(_, differs, _)| *differs).map(|(key, _, effect)| Change { key, effect }).collect()
}

/// The running configuration and keys, and how to change them.
pub struct Reloader {
    running: Config,
    identity: IdentityKey,
    onion: Vec<[u8; 32]>,
    log: LogControl,
}

impl Reloader {
    /// For a relay started with `config` and `keys`; `log` changes the log filter.
    pub fn new(config: Config, keys: &RelayKeys, log: LogControl) -> Self {
        let onion = keys.onion.iter().map(|k| *k.public()).collect();
        Self { running: config, identity: keys.identity.public(), onion, log }
    }

    /// The configuration the relay runs with (restart-only keys keep their start values).
    pub fn running(&self) -> &Config {
        &self.running
    }

    /// Applies what `new` may change in `relay` and logs every changed key; returns them
    /// (onion keys that changed on disk as `key_dir (onion keys)`). On error nothing changed.
    pub fn apply(&mut self, new: &Config, relay: &RelayHandle) -> Result<Vec<Change>> {
        let mut changes = diff(&self.running, new);
        // Onion keys: re-read from the running key_dir (a new key_dir needs a restart).
        let keys = crate::keys::load(&self.running.key_dir)
            .with_context(|| format!("cannot load keys from {}", self.running.key_dir.display()))?;
        if keys.identity.public() != self.identity {
            bail!(
                "{}/identity.key is not the identity this relay runs with: restart to use a new identity",
                self.running.key_dir.display()
            );
        }
        let onion: Vec<[u8; 32]> = keys.onion.iter().map(|k| *k.public()).collect();
        let rotated = onion != self.onion;
        if new.log_level != self.running.log_level && !self.log.set(&new.log_level)? {
            warn!("log_level changed, but RUST_LOG is set and wins");
        }
        let targets = crate::extend::ExtendTargets::from_config(&new.extend)?;
        // The previous onion key lives as long as the longest-lived descriptor that named it.
        let lifetime = self.running.descriptor_lifetime_secs.max(new.descriptor_lifetime_secs);
        let previous_until = keys.previous_until(lifetime, daemonkit::unix_now());
        relay.update(ControlUpdate {
            limits: new.limits.clone(),
            stun: new.stun.replies(),
            targets,
            onion: rotated.then_some((keys.onion, previous_until)),
        });
        if rotated {
            self.onion = onion;
            changes.push(Change { key: "key_dir (onion keys)", effect: Effect::Applied });
        }
        let r = &mut self.running;
        r.log_level = new.log_level.clone();
        r.limits = new.limits.clone();
        // The rates apply at once; the alternate port needs a restart (kept as running).
        r.stun.rate = new.stun.rate;
        r.stun.burst = new.stun.burst;
        r.stun.global_rate = new.stun.global_rate;
        r.extend = new.extend.clone();
        r.nickname = new.nickname.clone();
        r.operator = new.operator.clone();
        r.bandwidth = new.bandwidth;
        r.guard = new.guard;
        r.public_addresses = new.public_addresses.clone();
        r.descriptor_lifetime_secs = new.descriptor_lifetime_secs;
        log_changes(&changes);
        Ok(changes)
    }
}

/// One line per changed key, saying what happened to it.
pub fn log_changes(changes: &[Change]) {
    for c in changes {
        match c.effect {
            Effect::Applied => info!(key = c.key, "reload: applied"),
            Effect::Descriptor => {
                info!(key = c.key, "reload: changed; used by `descriptor` only, in effect for the next descriptor")
            }
            Effect::Restart => {
                warn!(key = c.key, "reload: changed but needs a restart; still running with the old value")
            }
        }
    }
    let restart = changes.iter().filter(|c| c.effect == Effect::Restart).count();
    info!(changed = changes.len(), needs_restart = restart, "configuration reloaded");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(extra: &str) -> Config {
        let base = "listen = \"127.0.0.1:9001\"\nkey_dir = \"k\"\nnickname = \"a\"\n";
        Config::parse(&format!("{base}{extra}"), Path::new("x.toml")).unwrap()
    }

    #[test]
    fn diff_names_each_key_and_its_effect() {
        let old = parse("");
        assert!(diff(&old, &old).is_empty());
        let new = parse("workers = 3\nlog_level = \"debug\"\nguard = true\n[limits]\ncreate_burst = 5\n");
        let got: Vec<_> = diff(&old, &new).into_iter().map(|c| (c.key, c.effect)).collect();
        assert_eq!(
            got,
            vec![
                ("workers", Effect::Restart),
                ("log_level", Effect::Applied),
                ("limits.create_burst", Effect::Applied),
                ("guard", Effect::Descriptor),
            ]
        );
        let new = parse(
            "[limits]\nmax_circuits = 9\nload_create_rate = 0\ncookie_rate = 5\ncookie_check_rate = 6\n[stun]\nalternate_port = 9002\nrate = 1\nburst = 2\nglobal_rate = 3\n",
        );
        let got: Vec<_> = diff(&old, &new).into_iter().map(|c| (c.key, c.effect)).collect();
        assert_eq!(
            got,
            vec![
                ("stun.alternate_port", Effect::Restart),
                ("stun.rate", Effect::Applied),
                ("stun.burst", Effect::Applied),
                ("stun.global_rate", Effect::Applied),
                ("limits.max_circuits", Effect::Applied),
                ("limits.load_create_rate", Effect::Applied),
                ("limits.cookie_rate", Effect::Applied),
                ("limits.cookie_check_rate", Effect::Applied),
            ]
        );
    }
}
