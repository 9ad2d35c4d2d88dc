//! Where a relay sends the CREATE of an EXTEND. A client names the target, so without a policy
//! a relay would send handshake cells to any ip:port on request: a reflector towards any host,
//! and a probe of the relay's own network. With a directory configured, only the addresses of
//! the relays it lists are targets; private, loopback, link-local and CGNAT ranges never are
//! unless `extend.allow_private` (labs, private deployments) says so.

use crate::control::is_private;
use anyhow::{Context, Result, bail};
use cellproto::directory::Directory;
use cellproto::identity::IdentityKey;
use cellproto::relay::canonical_addr;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

/// The EXTEND target policy in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendTargets {
    allow_private: bool,
    /// Addresses of the relays in the configured directory; `None`: no directory configured.
    relays: Option<HashSet<SocketAddr>>,
}

impl ExtendTargets {
    /// A policy with no directory: any public address (private ones only if `allow_private`).
    pub fn any_public(allow_private: bool) -> Self {
        Self { allow_private, relays: None }
    }

    /// A policy limited to the relays of a verified directory.
    pub fn from_directory(allow_private: bool, directory: &Directory) -> Self {
        let relays = directory.relays.iter().flat_map(|r| r.addresses.iter().copied().map(canonical_addr)).collect();
        Self { allow_private, relays: Some(relays) }
    }

    /// Reads and verifies `path` under `authority` at `now`.
    pub fn load(allow_private: bool, path: &Path, authority: &IdentityKey, now: u64) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read extend.directory {}", path.display()))?;
        let directory = Directory::decode_and_verify(&bytes, authority, now)
            .with_context(|| format!("extend.directory {} refused", path.display()))?;
        if directory.relays.is_empty() {
            bail!("extend.directory {} lists no relay", path.display());
        }
        Ok(Self::from_directory(allow_private, &directory))
    }

    /// Whether a CREATE may go to `target`; the error says why not.
    pub fn allows(&self, target: SocketAddr) -> Result<(), &'static str> {
        let target = canonical_addr(target);
        if target.port() == 0 || target.ip().is_unspecified() || target.ip().is_multicast() {
            return Err("not a unicast address");
        }
        if !self.allow_private && is_private(target.ip()) {
            return Err("private address (extend.allow_private = false)");
        }
        match &self.relays {
            Some(relays) if !relays.contains(&target) => Err("not a relay of extend.directory"),
            _ => Ok(()),
        }
    }

    /// The policy `config` asks for, its directory read and verified now.
    pub fn from_config(extend: &crate::config::ExtendPolicy) -> Result<Self> {
        match (&extend.directory, &extend.authority) {
            (Some(path), Some(authority)) => Self::load(extend.allow_private, path, authority, daemonkit::unix_now()),
            _ => Ok(Self::any_public(extend.allow_private)),
        }
    }

    /// Relay addresses the policy allows, if it is limited to a directory.
    pub fn relay_count(&self) -> Option<usize> {
        self.relays.as_ref().map(HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(addrs: &[&str], allow_private: bool) -> ExtendTargets {
        ExtendTargets { allow_private, relays: Some(addrs.iter().map(|a| a.parse().unwrap()).collect()) }
    }

    #[test]
    fn only_directory_relays_and_no_private_ranges() {
        let t = with(&["198.51.100.7:9001", "[2001:db8::7]:9001"], false);
        assert_eq!(t.allows("198.51.100.7:9001".parse().unwrap()), Ok(()));
        assert_eq!(t.allows("[::ffff:198.51.100.7]:9001".parse().unwrap()), Ok(()), "IPv4-mapped is the same relay");
        assert!(t.allows("198.51.100.7:22".parse().unwrap()).is_err(), "another port of a relay's host");
        assert!(t.allows("203.0.113.9:9001".parse().unwrap()).is_err(), "any host a client names");
        let any = ExtendTargets::any_public(false);
        assert!(any.allows("10.0.0.1:9001".parse().unwrap()).is_err());
        assert!(any.allows("[::ffff:127.0.0.1]:9001".parse().unwrap()).is_err());
        assert!(any.allows("169.254.169.254:80".parse().unwrap()).is_err());
        assert!(any.allows("0.0.0.0:9001".parse().unwrap()).is_err());
        assert!(any.allows("203.0.113.9:9001".parse().unwrap()).is_ok());
        assert!(ExtendTargets::any_public(true).allows("10.0.0.1:9001".parse().unwrap()).is_ok());
        // A private relay in the directory still needs allow_private (a lab).
        let lab = with(&["172.17.0.1:9001"], false);
        assert!(lab.allows("172.17.0.1:9001".parse().unwrap()).is_err());
        assert!(with(&["172.17.0.1:9001"], true).allows("172.17.0.1:9001".parse().unwrap()).is_ok());
    }
}
