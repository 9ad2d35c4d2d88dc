//! Relays: the usable relays of a verified directory (see [`crate::directory`] for where they
//! come from, [`crate::path`] for how a path is chosen among them).

use crate::netcheck::StunServer;
use cellproto::client::PathHop;
use cellproto::descriptor::RelayDescriptor;
use cellproto::identity::IdentityKey;
use std::time::Duration;

pub use crate::path::{MAX_UNMEASURED_BANDWIDTH, PathError, PathRequest};

/// A usable relay: its verified descriptor and where to reach it.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The verified descriptor.
    pub desc: RelayDescriptor,
    /// Keys and IPv4 address for the handshake.
    pub hop: PathHop,
    /// Measured round trip (STUN), if it answered.
    pub rtt: Option<Duration>,
}

impl Relay {
    /// The relay's identity.
    pub fn id(&self) -> IdentityKey {
        self.desc.identity
    }
}

/// The relays of a verified directory.
#[derive(Debug, Clone)]
pub struct Relays {
    /// Usable relays, in directory (identity) order.
    pub relays: Vec<Relay>,
    /// When the directory was published (unix seconds): a reload must not go back in time.
    pub published: u64,
    /// When it stops holding (unix seconds): no circuit is built through it after that.
    pub expires: u64,
}

impl Relays {
    /// Whether `fresh` (a directory read on SIGHUP, already verified and unexpired) may
    /// replace this one: not if it was published before it, which only a stale or replayed
    /// copy is.
    pub fn check_replacement(&self, fresh: &Relays) -> Result<(), String> {
        if fresh.published < self.published {
            return Err(format!(
                "the file was published at {} (unix time), before the directory in use ({}): a stale or replayed copy",
                fresh.published, self.published
            ));
        }
        Ok(())
    }

    /// Every relay as a STUN server (relays answer STUN on their cell port).
    pub fn stun_servers(&self) -> Vec<StunServer> {
        self.relays.iter().map(|r| StunServer { name: r.desc.nickname.clone(), addr: r.hop.addr }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::tests::net;

    #[test]
    fn an_older_directory_does_not_replace_a_newer_one() {
        let now = Relays { published: 1000, expires: 5000, ..net() };
        let older = Relays { published: 999, expires: 6000, ..net() };
        let same = Relays { published: 1000, ..net() };
        let newer = Relays { published: 2000, ..net() };
        assert!(now.check_replacement(&older).unwrap_err().contains("stale or replayed"));
        assert!(now.check_replacement(&same).is_ok());
        assert!(now.check_replacement(&newer).is_ok());
    }
}
