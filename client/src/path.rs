//! Path selection, pure policy: given the relays (with their measured round trips, if any),
//! the guards the guard set offers, what failed recently and a random source, which path to
//! build. No I/O and no clock: the tunnel asks, the daemon never does.
//!
//! Rules, as Tor's: a persistent guard (chosen by [`crate::guards`], kept across runs, so one
//! observer at the first hop is all a client ever meets), an exit whose flag and policy fit,
//! middles from the rest; no two relays of a circuit share a /16 (IPv4) or /32 (IPv6), or a
//! non-empty operator. Choices are random, weighted by bandwidth, capped at
//! [`MAX_UNMEASURED_BANDWIDTH`] because descriptors declare it themselves, and, if the client
//! measured them (`rtt_probes`, off by default), by round trip time.

use crate::relays::{Relay, Relays};
use cellproto::identity::IdentityKey;
use rand_core::RngCore;
use std::net::IpAddr;
use thiserror::Error;

/// The bandwidth weight, in bytes per second, at which a relay's self-declared bandwidth is
/// capped: 12.5 MB/s (100 Mbit/s, relayd's default). A descriptor's bandwidth is the relay's
/// own claim and nothing checks it, so claiming more must not buy more circuits (Tor caps
/// unmeasured relays the same way, at 10 MB/s); declaring less still lowers a slow relay's
/// share. Measured bandwidths, once the directory carries them, would replace the claim.
pub const MAX_UNMEASURED_BANDWIDTH: u64 = 12_500_000;

/// Why no path could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    /// No exit fits.
    #[error("no usable exit: {0}")]
    NoExit(String),
    /// No guard fits.
    #[error("no usable guard (a relay with the guard flag, up, compatible with the exit)")]
    NoGuard,
    /// Not enough middles.
    #[error("not enough usable middle relays for {hops} hops (distinct /16s and operators needed)")]
    NoMiddle {
        /// The circuit length asked for.
        hops: usize,
    },
}

/// What a path must satisfy.
#[derive(Debug, Clone, Default)]
pub struct PathRequest {
    /// Relays in the circuit.
    pub hops: usize,
    /// This exit and no other (the session's, or the configured one).
    pub exit: Option<IdentityKey>,
    /// The guard: this one or no path ([`PathError::NoGuard`]); `None` draws one by weight.
    pub guard: Option<IdentityKey>,
    /// Ports the exit must allow.
    pub exit_ports: Vec<u16>,
    /// Relays not to use now (failed recently).
    pub avoid: Vec<IdentityKey>,
}

/// Whether two addresses share a /16 (IPv4) or /32 (IPv6): likely one network operator.
fn same_subnet(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.octets()[..2] == b.octets()[..2],
        (IpAddr::V6(a), IpAddr::V6(b)) => a.segments()[..2] == b.segments()[..2],
        _ => false,
    }
}

/// Whether `a` and `b` may be in one circuit.
fn compatible(a: &Relay, b: &Relay) -> bool {
    a.id() != b.id()
        && !same_subnet(a.hop.addr.ip(), b.hop.addr.ip())
        && (a.desc.operator.is_empty() || a.desc.operator != b.desc.operator)
}

/// Selection weight: bandwidth, capped at [`MAX_UNMEASURED_BANDWIDTH`], discounted by round
/// trip (unmeasured: counted as 50 ms, and a relay that did not answer the probe at all as 1 s).
fn weight(r: &Relay, measured: bool) -> u64 {
    let rtt_ms = match (r.rtt, measured) {
        (Some(rtt), _) => rtt.as_secs_f64() * 1000.0,
        (None, true) => 1000.0,
        (None, false) => 50.0,
    };
    let bandwidth = r.desc.bandwidth.clamp(1, MAX_UNMEASURED_BANDWIDTH);
    ((bandwidth as f64) / (rtt_ms + 10.0)).max(1.0) as u64
}

impl Relays {
    fn measured(&self) -> bool {
        self.relays.iter().any(|r| r.rtt.is_some())
    }

    fn by_id(&self, id: &IdentityKey) -> Option<&Relay> {
        self.relays.iter().find(|r| r.id() == *id)
    }

    /// A relay for which `ok` holds, drawn by weight.
    pub fn pick<'a>(&'a self, ok: impl Fn(&Relay) -> bool, rng: &mut impl RngCore) -> Option<&'a Relay> {
        let measured = self.measured();
        let cands: Vec<(&Relay, u64)> =
            self.relays.iter().filter(|r| ok(r)).map(|r| (r, weight(r, measured))).collect();
        let total: u64 = cands.iter().map(|c| c.1).sum();
        if total == 0 {
            return None;
        }
        let mut x = rng.next_u64() % total;
        for (r, w) in &cands {
            if x < *w {
                return Some(r);
            }
            x -= w;
        }
        None
    }

    /// Whether `r` can be the exit for `req`.
    pub fn exit_fits(r: &Relay, req: &PathRequest) -> bool {
        r.desc.is_exit()
            && r.desc.exit_policy.as_ref().is_some_and(|p| req.exit_ports.iter().all(|&port| p.allows_port(port)))
    }

    /// Chooses a path: the guard `req.guard` (none other: the guard set decides guards; only
    /// without one is a guard drawn by weight), then the exit, then middles.
    pub fn select(&self, req: &PathRequest, rng: &mut impl RngCore) -> Result<Vec<Relay>, PathError> {
        let usable = |r: &Relay| !req.avoid.contains(&r.id());
        let exit_ok = |r: &Relay| usable(r) && Self::exit_fits(r, req) && req.exit.is_none_or(|e| e == r.id());
        if req.hops == 1 {
            let exit = self.pick(exit_ok, rng).ok_or_else(|| PathError::NoExit(self.why_no_exit(req)))?;
            return Ok(vec![exit.clone()]);
        }
        // The guard must leave room for some exit; a kept guard is used if it does.
        let guard_ok =
            |g: &Relay| usable(g) && g.desc.is_guard() && self.relays.iter().any(|e| exit_ok(e) && compatible(g, e));
        let no_guard = || {
            if self.relays.iter().any(exit_ok) { PathError::NoGuard } else { PathError::NoExit(self.why_no_exit(req)) }
        };
        let guard = match req.guard {
            Some(id) => self.by_id(&id).filter(|g| guard_ok(g)).ok_or_else(no_guard)?,
            None => self.pick(guard_ok, rng).ok_or_else(no_guard)?,
        };
        let exit = self
            .pick(|e| exit_ok(e) && compatible(guard, e), rng)
            .ok_or_else(|| PathError::NoExit(self.why_no_exit(req)))?;
        let mut path = vec![guard.clone(), exit.clone()];
        while path.len() < req.hops {
            let middle = self
                .pick(|m| usable(m) && !m.desc.is_exit() && path.iter().all(|p| compatible(p, m)), rng)
                .or_else(|| self.pick(|m| usable(m) && path.iter().all(|p| compatible(p, m)), rng))
                .ok_or(PathError::NoMiddle { hops: req.hops })?;
            let at = path.len() - 1;
            path.insert(at, middle.clone());
        }
        Ok(path)
    }

    /// A path through the first of `guards` (best first; `None` for a one-hop path, which has
    /// no guard) that gives one. `failed` relays are never used; `suspects` (the middles of a
    /// circuit that failed without a culprit) are avoided if another path exists.
    pub fn select_through(
        &self,
        req: &mut PathRequest,
        guards: &[Option<IdentityKey>],
        failed: &[IdentityKey],
        suspects: &[IdentityKey],
        rng: &mut impl RngCore,
    ) -> Result<Vec<Relay>, PathError> {
        if guards.is_empty() {
            // No guard in the set: the directory lists none that fits. Let path selection say
            // whether the exit is the problem too; a path it draws is not used (guards come
            // only from the set).
            req.guard = None;
            return self.select(req, rng).and(Err(PathError::NoGuard));
        }
        let mut last = Err(PathError::NoGuard);
        for guard in guards {
            req.guard = *guard;
            let wary = PathRequest { avoid: [failed, suspects].concat(), ..req.clone() };
            last = self.select(&wary, rng).or_else(|_| self.select(req, rng));
            if last.is_ok() {
                break;
            }
        }
        last
    }

    /// Whether some guard of `guards` gives a path to an exit other than the one `req` names.
    pub fn another_exit_fits(&self, req: &PathRequest, guards: &[Option<IdentityKey>], rng: &mut impl RngCore) -> bool {
        guards.iter().any(|g| self.select(&PathRequest { exit: None, guard: *g, ..req.clone() }, rng).is_ok())
    }

    fn why_no_exit(&self, req: &PathRequest) -> String {
        match req.exit {
            Some(id) => match self.by_id(&id) {
                None => format!("exit {id} is not in the directory"),
                Some(r) if req.avoid.contains(&id) => format!("exit {} ({id}) does not answer", r.desc.nickname),
                Some(r) => format!("exit {} ({id}) does not allow ports {:?}", r.desc.nickname, req.exit_ports),
            },
            None => format!("no exit allows ports {:?}, or every such exit failed recently", req.exit_ports),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cellproto::client::PathHop;
    use cellproto::descriptor::RelayDescriptor;
    use cellproto::descriptor::{ExitPolicySummary, FLAG_EXIT, FLAG_GUARD};
    use cellproto::handshake::RelayKeys;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;
    use std::net::SocketAddr;

    pub(crate) fn relay(n: u8, ip: [u8; 4], operator: &str, flags: u32) -> Relay {
        let desc = RelayDescriptor {
            identity: IdentityKey([n; 32]),
            onion_keys: vec![],
            addresses: vec![SocketAddr::from((ip, 9001))],
            nickname: format!("r{n}"),
            operator: operator.into(),
            bandwidth: 1000,
            flags,
            exit_policy: (flags & FLAG_EXIT != 0).then(|| ExitPolicySummary { accept: false, ports: vec![(25, 25)] }),
            protocol_versions: vec![1],
            published: 0,
            expires: 1,
        };
        let hop = PathHop { keys: RelayKeys { identity: [n; 32], onion_key: [n; 32] }, addr: desc.addresses[0] };
        Relay { desc, hop, rtt: None }
    }

    pub(crate) fn net() -> Relays {
        Relays {
            published: 0,
            expires: u64::MAX,
            relays: vec![
                relay(1, [10, 1, 0, 1], "a", FLAG_GUARD),
                relay(2, [10, 2, 0, 1], "b", 0),
                relay(3, [10, 3, 0, 1], "c", 0),
                relay(4, [10, 4, 0, 1], "d", FLAG_EXIT),
                relay(5, [10, 4, 9, 9], "e", 0), // same /16 as the exit
                relay(6, [10, 6, 0, 1], "d", 0), // same operator as the exit
            ],
        }
    }

    pub(crate) fn req(hops: usize) -> PathRequest {
        PathRequest { hops, exit_ports: vec![80, 443], ..Default::default() }
    }

    #[test]
    fn paths_obey_guard_exit_subnet_and_operator_rules() {
        let relays = net();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for _ in 0..200 {
            let path = relays.select(&req(3), &mut rng).unwrap();
            let ids: Vec<u8> = path.iter().map(|r| r.id().0[0]).collect();
            assert_eq!(ids[0], 1, "the only guard");
            assert_eq!(ids[2], 4, "the only exit");
            assert!(ids[1] == 2 || ids[1] == 3, "middle {ids:?} shares a /16 or operator with the exit");
        }
    }

    #[test]
    fn kept_exit_and_avoided_middles_are_honoured() {
        let relays = net();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut r = req(3);
        r.exit = Some(IdentityKey([4; 32]));
        r.avoid = vec![IdentityKey([2; 32])];
        for _ in 0..50 {
            let path = relays.select(&r, &mut rng).unwrap();
            assert_eq!(path[1].id(), IdentityKey([3; 32]));
        }
        r.avoid.push(IdentityKey([3; 32]));
        assert_eq!(relays.select(&r, &mut rng).unwrap_err(), PathError::NoMiddle { hops: 3 });
        r.avoid = vec![IdentityKey([4; 32])];
        assert!(matches!(relays.select(&r, &mut rng), Err(PathError::NoExit(why)) if why.contains("does not answer")));
    }

    #[test]
    fn exit_policy_and_one_hop() {
        let relays = net();
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let path = relays.select(&req(1), &mut rng).unwrap();
        assert_eq!(path.len(), 1);
        assert!(path[0].desc.is_exit());
        let mut r = req(3);
        r.exit_ports = vec![25];
        assert!(matches!(relays.select(&r, &mut rng), Err(PathError::NoExit(_))));
    }

    #[test]
    fn relay_claiming_huge_bandwidth_is_not_picked_almost_always() {
        // Five middles declare 12.5 MB/s; one claims u64::MAX bytes per second.
        let mut relays = net();
        for r in &mut relays.relays {
            r.desc.bandwidth = 12_500_000;
        }
        relays.relays[2].desc.bandwidth = u64::MAX;
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let liar = IdentityKey([3; 32]);
        let n = 2000;
        let picked =
            (0..n).filter(|_| relays.pick(|r| !r.desc.is_exit(), &mut rng).map(Relay::id) == Some(liar)).count();
        // Five candidates (relays 1, 2, 3, 5, 6): a fair share is 1/5; allow sampling noise.
        assert!(picked < n * 3 / 10, "the liar was picked {picked} times out of {n}");
    }
}
