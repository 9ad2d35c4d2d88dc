//! What the exit lets out of a circuit, per worker and sans-IO (time is an argument): DNS to
//! the tunnel resolver, then the stateless [`ExitPolicy`], then fragments.
//!
//! A later fragment has no transport header, so no port to judge. It passes only if the first
//! fragment of its datagram (same source, destination and identification) passed within
//! [`FRAGMENT_TIMEOUT`]: a port the policy refuses cannot travel in later fragments, and a
//! later fragment with no first fragment seen (reordered, or sent alone) is refused. Both
//! fragments of a datagram come from one circuit, so one worker sees them all. The table is
//! bounded; when it is full of live entries, new fragmented datagrams are refused. In the
//! kernel, conntrack reassembles fragments before the forward chain, so the nftables mirror
//! judges whole datagrams too.

use crate::packet::{Fragment, PacketInfo};
use crate::policy::{Decision, ExitPolicy};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// How long a first fragment lets its later fragments through (Linux's `ipfrag_time`).
pub const FRAGMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Fragmented datagrams tracked per worker.
pub const MAX_FRAGMENTED: usize = 4096;

/// What to do with a packet from a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Out through the TUN device.
    Forward,
    /// DNS to the resolver address inside the tunnel: out through the TUN device (nftables
    /// sends it to the upstream resolver), counted as `dns`.
    Dns,
    /// Refused under this rule (the metric label).
    Deny(&'static str),
}

/// A worker's filter: the tunnel resolver's addresses and the fragments in flight.
#[derive(Debug)]
pub struct Filter {
    dns: (Ipv4Addr, Ipv6Addr),
    /// (source, destination, identification) → until when later fragments may pass.
    fragments: HashMap<(IpAddr, IpAddr, u32), Instant>,
}

impl Filter {
    /// A filter letting DNS (UDP and TCP port 53) to `dns` through.
    pub fn new(dns: (Ipv4Addr, Ipv6Addr)) -> Self {
        Self { dns, fragments: HashMap::new() }
    }

    /// The verdict on `p` under `policy` at `now`.
    pub fn check(&mut self, policy: &ExitPolicy, p: &PacketInfo, now: Instant) -> Verdict {
        let (id, first) = match p.fragment {
            Fragment::Whole => return self.judge(policy, p),
            Fragment::First(id) => (id, true),
            Fragment::Later(id) => (id, false),
        };
        let key = (p.src, p.dst, id);
        if !first {
            return match self.fragments.get(&key) {
                Some(&until) if now < until => Verdict::Forward,
                _ => Verdict::Deny("fragment_unmatched"),
            };
        }
        let verdict = self.judge(policy, p);
        if !matches!(verdict, Verdict::Deny(_)) {
            if !self.fragments.contains_key(&key) && self.fragments.len() >= MAX_FRAGMENTED {
                self.fragments.retain(|_, until| now < *until);
                if self.fragments.len() >= MAX_FRAGMENTED {
                    return Verdict::Deny("fragments_full");
                }
            }
            self.fragments.insert(key, now + FRAGMENT_TIMEOUT);
        } else {
            // A refused datagram reusing an identification must not ride on an earlier pass.
            self.fragments.remove(&key);
        }
        verdict
    }

    fn judge(&self, policy: &ExitPolicy, p: &PacketInfo) -> Verdict {
        let to_resolver = p.dst == IpAddr::V4(self.dns.0) || p.dst == IpAddr::V6(self.dns.1);
        if to_resolver && p.dst_port == Some(53) && matches!(p.protocol, 6 | 17) {
            return Verdict::Dns;
        }
        match policy.check(p) {
            Decision::Allow => Verdict::Forward,
            Decision::Deny(rule) => Verdict::Deny(rule),
        }
    }

    /// Fragmented datagrams tracked now.
    pub fn fragments_tracked(&self) -> usize {
        self.fragments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::inspect;
    use crate::packet::tests::{Ext, ip4, ip6, tcp, udp};
    use crate::policy::PolicyConfig;

    fn filter() -> (Filter, ExitPolicy) {
        let policy = ExitPolicy::new(&PolicyConfig { allow_ports: vec![53, 443], ..PolicyConfig::default() });
        (Filter::new((Ipv4Addr::new(10, 8, 0, 1), "fd6d:6573:6800::1".parse().unwrap())), policy)
    }

    fn check(f: &mut Filter, policy: &ExitPolicy, packet: &[u8], now: Instant) -> Verdict {
        match inspect(packet) {
            Ok(info) => f.check(policy, &info, now),
            Err(e) => Verdict::Deny(e.label()),
        }
    }

    /// A datagram to a refused port, split so that only its first fragment has the port: the
    /// later fragments must not pass on their own.
    #[test]
    fn later_fragments_pass_only_behind_an_allowed_first_fragment() {
        let (mut f, policy) = filter();
        let t0 = Instant::now();
        let later_v6 = |id| ip6(&[Ext::Frag(2, false, id)], 17, &[0u8; 16]);
        let later_v4 = |id| ip4(17, &[0u8; 16], 2, false, id as u16);
        // Alone, or behind a refused first fragment: refused.
        assert_eq!(check(&mut f, &policy, &later_v6(1), t0), Verdict::Deny("fragment_unmatched"));
        let first_22 = ip6(&[Ext::Frag(0, true, 1)], 17, &udp(22, &[0; 8]));
        assert_eq!(check(&mut f, &policy, &first_22, t0), Verdict::Deny("port_not_allowed"));
        assert_eq!(check(&mut f, &policy, &later_v6(1), t0), Verdict::Deny("fragment_unmatched"));
        assert_eq!(check(&mut f, &policy, &later_v4(1), t0), Verdict::Deny("fragment_unmatched"));
        // Behind an allowed first fragment: through, until the timeout.
        let first_443 = ip6(&[Ext::Frag(0, true, 2)], 17, &udp(443, &[0; 8]));
        assert_eq!(check(&mut f, &policy, &first_443, t0), Verdict::Forward);
        assert_eq!(check(&mut f, &policy, &later_v6(2), t0 + Duration::from_secs(1)), Verdict::Forward);
        assert_eq!(check(&mut f, &policy, &later_v6(2), t0 + FRAGMENT_TIMEOUT), Verdict::Deny("fragment_unmatched"));
        // The same identification reused by a refused datagram closes the door again.
        let first_v4 = ip4(17, &udp(443, &[0; 8]), 0, true, 3);
        assert_eq!(check(&mut f, &policy, &first_v4, t0), Verdict::Forward);
        assert_eq!(check(&mut f, &policy, &later_v4(3), t0), Verdict::Forward);
        assert_eq!(check(&mut f, &policy, &ip4(6, &tcp(25), 0, true, 3), t0), Verdict::Deny("denied_port"));
        assert_eq!(check(&mut f, &policy, &later_v4(3), t0), Verdict::Deny("fragment_unmatched"));
    }

    #[test]
    fn dns_to_the_tunnel_resolver_and_nothing_else_there() {
        let (mut f, policy) = filter();
        let t0 = Instant::now();
        let mut q = crate::packet::tests::udp4([10, 8, 0, 2], [10, 8, 0, 1], 53, b"q");
        assert_eq!(check(&mut f, &policy, &q, t0), Verdict::Dns);
        q[23] = 54; // port 54
        assert_eq!(check(&mut f, &policy, &q, t0), Verdict::Deny("private"));
        assert_eq!(check(&mut f, &policy, &ip6(&[], 6, &tcp(53)), t0), Verdict::Forward, "DNS elsewhere: the policy's");
    }

    #[test]
    fn the_fragment_table_is_bounded() {
        let (mut f, policy) = filter();
        let t0 = Instant::now();
        for id in 0..MAX_FRAGMENTED as u32 {
            assert_eq!(check(&mut f, &policy, &ip6(&[Ext::Frag(0, true, id)], 6, &tcp(443)), t0), Verdict::Forward);
        }
        let one_more = ip6(&[Ext::Frag(0, true, u32::MAX)], 6, &tcp(443));
        assert_eq!(check(&mut f, &policy, &one_more, t0), Verdict::Deny("fragments_full"));
        assert_eq!(f.fragments_tracked(), MAX_FRAGMENTED);
        // Expired entries make room.
        assert_eq!(check(&mut f, &policy, &one_more, t0 + FRAGMENT_TIMEOUT), Verdict::Forward);
        assert_eq!(f.fragments_tracked(), 1);
    }
}
