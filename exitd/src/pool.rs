//! Inner addresses: each circuit that ATTACHes gets an IPv4 address from a pool (e.g.
//! 10.8.0.0/16) and an IPv6 address from a /64, with a session token. A client whose path
//! broke reconnects through new relays with that token and gets the same addresses back, so
//! its TCP connections survive; addresses return to the pool only after a grace period.
//! The first host address of each pool is the exit's own (gateway and DNS resolver).

use ipnet::{Ipv4Net, Ipv6Net};
use rand_core::CryptoRngCore;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};
use thiserror::Error;

/// A session token: 32 random bytes, the only credential for resuming a session.
pub type Token = [u8; 32];

/// Why an ATTACH could not be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PoolError {
    /// Every IPv4 address is leased.
    #[error("the IPv4 pool is exhausted")]
    Exhausted,
}

/// One session's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The session token.
    pub token: Token,
    /// Inner IPv4 address.
    pub v4: Ipv4Addr,
    /// Inner IPv6 address.
    pub v6: Ipv6Addr,
}

#[derive(Debug)]
struct Session {
    lease: Lease,
    circuit: Option<u32>,
    detached_at: Option<Instant>,
}

/// The pools and the sessions using them.
#[derive(Debug)]
pub struct AddressPool {
    v4: Ipv4Net,
    v6: Ipv6Net,
    grace: Duration,
    next_v4: u32,
    v4_in_use: HashSet<Ipv4Addr>,
    v6_in_use: HashSet<Ipv6Addr>,
    sessions: HashMap<Token, Session>,
    by_circuit: HashMap<u32, Token>,
    by_addr: HashMap<IpAddr, Token>,
}

impl AddressPool {
    /// Pools `v4` and `v6`; detached sessions keep their addresses for `grace`.
    pub fn new(v4: Ipv4Net, v6: Ipv6Net, grace: Duration) -> Self {
        Self {
            v4,
            v6,
            grace,
            next_v4: 2,
            v4_in_use: HashSet::new(),
            v6_in_use: HashSet::new(),
            sessions: HashMap::new(),
            by_circuit: HashMap::new(),
            by_addr: HashMap::new(),
        }
    }

    /// The exit's own addresses in the pools (gateway and resolver): the first hosts.
    pub fn gateway(&self) -> (Ipv4Addr, Ipv6Addr) {
        (offset_v4(self.v4, 1), offset_v6(self.v6, 1))
    }

    /// Attaches `circuit`: resumes the session of `resume` if it is known, else starts one.
    pub fn attach(
        &mut self,
        circuit: u32,
        resume: Option<Token>,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Lease, PoolError> {
        self.detach(circuit, None);
        if let Some(token) = resume
            && let Some(session) = self.sessions.get_mut(&token)
        {
            if let Some(old) = session.circuit.replace(circuit) {
                self.by_circuit.remove(&old);
            }
            session.detached_at = None;
            self.by_circuit.insert(circuit, token);
            return Ok(session.lease);
        }
        let v4 = self.free_v4().ok_or(PoolError::Exhausted)?;
        let v6 = self.free_v6(rng);
        let mut token = [0u8; 32];
        rng.fill_bytes(&mut token);
        let lease = Lease { token, v4, v6 };
        self.v4_in_use.insert(v4);
        self.v6_in_use.insert(v6);
        self.by_addr.insert(IpAddr::V4(v4), token);
        self.by_addr.insert(IpAddr::V6(v6), token);
        self.by_circuit.insert(circuit, token);
        self.sessions.insert(token, Session { lease, circuit: Some(circuit), detached_at: None });
        Ok(lease)
    }

    /// The circuit ended (`now`: its session's grace starts; `None`: only unlink it).
    pub fn detach(&mut self, circuit: u32, now: Option<Instant>) {
        let Some(token) = self.by_circuit.remove(&circuit) else { return };
        if let Some(session) = self.sessions.get_mut(&token)
            && session.circuit == Some(circuit)
        {
            session.circuit = None;
            session.detached_at = now.or(Some(Instant::now()));
        }
    }

    /// Returns the addresses of sessions detached longer than the grace period to the pool.
    pub fn expire(&mut self, now: Instant) {
        let grace = self.grace;
        let expired: Vec<Token> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.detached_at.is_some_and(|t| now.saturating_duration_since(t) >= grace))
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            if let Some(s) = self.sessions.remove(&token) {
                self.v4_in_use.remove(&s.lease.v4);
                self.v6_in_use.remove(&s.lease.v6);
                self.by_addr.remove(&IpAddr::V4(s.lease.v4));
                self.by_addr.remove(&IpAddr::V6(s.lease.v6));
            }
        }
    }

    /// Sessions holding addresses (attached or within their grace period).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The circuit a packet to inner address `addr` belongs to (routing TUN → circuit).
    pub fn circuit_of(&self, addr: IpAddr) -> Option<u32> {
        self.sessions.get(self.by_addr.get(&addr)?)?.circuit
    }

    /// The lease of `circuit` (anti-spoofing: a packet's source must be one of its addresses).
    pub fn lease_of(&self, circuit: u32) -> Option<Lease> {
        Some(self.sessions.get(self.by_circuit.get(&circuit)?)?.lease)
    }

    fn free_v4(&mut self) -> Option<Ipv4Addr> {
        // Hosts 2 ..= 2^(32-prefix) - 2: not the network, not the gateway, not broadcast.
        let size = 1u64 << (32 - u32::from(self.v4.prefix_len()));
        let hosts = size.saturating_sub(3) as u32;
        for _ in 0..hosts {
            let candidate = offset_v4(self.v4, self.next_v4);
            self.next_v4 = if u64::from(self.next_v4) + 2 >= size { 2 } else { self.next_v4 + 1 };
            if !self.v4_in_use.contains(&candidate) {
                return Some(candidate);
            }
        }
        None
    }

    fn free_v6(&mut self, rng: &mut impl CryptoRngCore) -> Ipv6Addr {
        // Random interface identifiers: a /64 has room for far more sessions than exist.
        loop {
            let host_bits = 128 - u32::from(self.v6.prefix_len());
            let mut r = [0u8; 16];
            rng.fill_bytes(&mut r);
            let host = u128::from_be_bytes(r) & ((1u128 << host_bits.min(127)) - 1);
            let candidate = Ipv6Addr::from(u128::from(self.v6.network()) | host);
            if host > 1 && !self.v6_in_use.contains(&candidate) {
                return candidate;
            }
        }
    }
}

fn offset_v4(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).wrapping_add(n))
}

fn offset_v6(net: Ipv6Net, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()).wrapping_add(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn pool(v4: &str) -> AddressPool {
        AddressPool::new(v4.parse().unwrap(), "fd6d:6573:6800::/64".parse().unwrap(), Duration::from_secs(600))
    }

    #[test]
    fn attach_resume_release() {
        let mut p = pool("10.8.0.0/16");
        assert_eq!(p.gateway().0, Ipv4Addr::new(10, 8, 0, 1));
        let a = p.attach(1, None, &mut OsRng).unwrap();
        let b = p.attach(2, None, &mut OsRng).unwrap();
        assert_eq!(a.v4, Ipv4Addr::new(10, 8, 0, 2));
        assert_ne!(a.v4, b.v4);
        assert_ne!(a.v6, b.v6);
        assert_eq!(p.circuit_of(IpAddr::V4(a.v4)), Some(1));
        // Circuit 1 dies; its client comes back on circuit 7 with the token: same addresses.
        let t0 = Instant::now();
        p.detach(1, Some(t0));
        assert_eq!(p.circuit_of(IpAddr::V4(a.v4)), None);
        p.expire(t0 + Duration::from_secs(60));
        let again = p.attach(7, Some(a.token), &mut OsRng).unwrap();
        assert_eq!(again, a);
        assert_eq!(p.circuit_of(IpAddr::V6(a.v6)), Some(7));
        // An unknown token starts a new session.
        let c = p.attach(8, Some([9; 32]), &mut OsRng).unwrap();
        assert_ne!(c.token, [9; 32]);
        // After the grace period the addresses return to the pool.
        p.detach(7, Some(t0));
        p.expire(t0 + Duration::from_secs(601));
        assert_eq!(p.lease_of(7), None);
        assert_ne!(p.attach(9, Some(a.token), &mut OsRng).unwrap().token, a.token);
    }

    #[test]
    fn small_pool_exhausts_then_recycles() {
        let mut p = pool("10.9.0.0/29"); // hosts .2 ..= .6
        let leases: Vec<Lease> = (0..5).map(|c| p.attach(c, None, &mut OsRng).unwrap()).collect();
        assert!(leases.iter().all(|l| l.v4.octets()[3] >= 2 && l.v4.octets()[3] <= 6));
        assert_eq!(p.attach(99, None, &mut OsRng), Err(PoolError::Exhausted));
        let t0 = Instant::now();
        p.detach(0, Some(t0));
        p.expire(t0 + Duration::from_secs(601));
        assert_eq!(p.attach(99, None, &mut OsRng).unwrap().v4, leases[0].v4);
    }
}
