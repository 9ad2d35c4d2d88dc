//! Relays: the usable relays of a verified directory (see [`crate::directory`] for where they
//! come from, [`crate::path`] for how a path is chosen among them).

use crate::netcheck::StunServer;
use cellproto::client::PathHop;
use cellproto::descriptor::RelayDescriptor;
use cellproto::identity::IdentityKey;
use rand_core::RngCore;
use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

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

    /// Measures the round trip to every relay with one STUN Binding each, all at once from one
    /// socket, waiting at most `timeout`. Relays that do not answer keep `rtt = None`.
    pub fn measure_rtts(&mut self, timeout: Duration) {
        let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else { return };
        let start = Instant::now();
        let mut ids = HashMap::new();
        for (i, r) in self.relays.iter().enumerate() {
            let mut tid = [0u8; 12];
            rand_core::OsRng.fill_bytes(&mut tid);
            let mut buf = [0u8; 64];
            if let Ok(n) = cellproto::stun::Message::binding_request(tid).encode(&mut buf, true) {
                let _ = socket.send_to(&buf[..n], r.hop.addr);
                ids.insert(tid, i);
            }
        }
        let mut buf = [0u8; 512];
        while !ids.is_empty() {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
                break;
            }
            let Ok((n, _)) = socket.recv_from(&mut buf) else { break };
            if let Ok(m) = cellproto::stun::decode(&buf[..n])
                && let Some(i) = ids.remove(&m.transaction_id)
                && let Some(r) = self.relays.get_mut(i)
            {
                r.rtt = Some(start.elapsed());
            }
        }
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
