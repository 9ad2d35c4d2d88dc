//! `meshvpn netcheck`: STUN (RFC 8489) against relays to learn this machine's reflexive
//! address, and RFC 5780 behaviour discovery for the NAT in front of it.
//! (To be written: see the module interface below.)

use serde::Serialize;
use std::net::SocketAddr;

/// A STUN server to probe: a relay's nickname and its UDP address (relays answer STUN on
/// their cell port; some also on an alternate port announced as OTHER-ADDRESS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunServer {
    /// The relay's nickname, for the report.
    pub name: String,
    /// Where to send Binding requests.
    pub addr: SocketAddr,
}

/// What netcheck found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {}

impl std::fmt::Display for Report {
    fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

/// Probes `servers` and classifies the NAT.
pub fn run_blocking(_servers: &[StunServer]) -> anyhow::Result<Report> {
    anyhow::bail!("not written yet")
}
