//! What the client accepts from the exit's ATTACHED before it configures anything on the
//! machine: the only relay that may configure the client is the exit, and even the exit may
//! only hand out usable inner addresses and resolvers inside its own pool.
//!
//! The tunnel checks *who* sent an ATTACHED (the last hop, as the answer to an outstanding
//! ATTACH); [`validate`] checks *what* it says, so that a hostile or broken exit cannot make
//! the kernel refuse the configuration (which used to stop the client) or point DNS outside the
//! tunnel's own network.

use cellproto::command::Attached;
use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};
use thiserror::Error;

/// Shortest IPv4 prefix accepted: a pool larger than a /8 is no exit's, and a prefix of /0
/// would make "the resolver is inside the pool" meaningless.
pub const MIN_IPV4_PREFIX: u8 = 8;
/// Longest IPv4 prefix accepted: the pool must hold the exit's resolver and this client.
pub const MAX_IPV4_PREFIX: u8 = 30;
/// Shortest IPv6 prefix accepted (as [`MIN_IPV4_PREFIX`]).
pub const MIN_IPV6_PREFIX: u8 = 16;
/// Longest IPv6 prefix accepted (as [`MAX_IPV4_PREFIX`]).
pub const MAX_IPV6_PREFIX: u8 = 126;

/// Why an ATTACHED was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Unusable {
    /// The inner address is not a plain unicast address this host could own.
    #[error("inner address {0} is not a global or private unicast address")]
    Address(String),
    /// The prefix length is outside what an exit's pool can be.
    #[error("prefix /{len} of {addr} is outside /{min}../{max}")]
    Prefix {
        /// The address.
        addr: String,
        /// Its prefix length.
        len: u8,
        /// Shortest accepted.
        min: u8,
        /// Longest accepted.
        max: u8,
    },
    /// The IPv4 address is the network or broadcast address of its own prefix.
    #[error("inner address {0} is the network or broadcast address of its prefix")]
    NotAHost(String),
    /// A resolver is not a usable address inside the exit's pool, or is the client itself.
    #[error("resolver {dns} is not a usable address inside the exit's pool {pool} other than the client's own")]
    Resolver {
        /// The resolver.
        dns: String,
        /// The pool it must be in.
        pool: String,
    },
}

/// Checks an ATTACHED's addresses: unicast (not unspecified, loopback, multicast, link-local,
/// broadcast or IPv4-mapped), prefixes of a sane length, the IPv4 address a host of its
/// prefix, and each resolver a usable address inside the announced prefix of its family and
/// not the client's own address.
pub fn validate(a: &Attached) -> Result<(Ipv4Net, Ipv6Net), Unusable> {
    let (v4, p4) = a.ipv4;
    let (v6, p6) = a.ipv6;
    if !usable_v4(v4) {
        return Err(Unusable::Address(v4.to_string()));
    }
    if !usable_v6(v6) {
        return Err(Unusable::Address(v6.to_string()));
    }
    let prefix = |addr: String, len, min, max| Unusable::Prefix { addr, len, min, max };
    if !(MIN_IPV4_PREFIX..=MAX_IPV4_PREFIX).contains(&p4) {
        return Err(prefix(v4.to_string(), p4, MIN_IPV4_PREFIX, MAX_IPV4_PREFIX));
    }
    if !(MIN_IPV6_PREFIX..=MAX_IPV6_PREFIX).contains(&p6) {
        return Err(prefix(v6.to_string(), p6, MIN_IPV6_PREFIX, MAX_IPV6_PREFIX));
    }
    let net4 = Ipv4Net::new(v4, p4).map_err(|_| prefix(v4.to_string(), p4, MIN_IPV4_PREFIX, MAX_IPV4_PREFIX))?;
    let net6 = Ipv6Net::new(v6, p6).map_err(|_| prefix(v6.to_string(), p6, MIN_IPV6_PREFIX, MAX_IPV6_PREFIX))?;
    if v4 == net4.network() || v4 == net4.broadcast() {
        return Err(Unusable::NotAHost(v4.to_string()));
    }
    let (d4, d6) = a.dns;
    let bad4 = !usable_v4(d4) || !net4.contains(&d4) || d4 == v4 || d4 == net4.network() || d4 == net4.broadcast();
    if bad4 {
        return Err(Unusable::Resolver { dns: d4.to_string(), pool: net4.trunc().to_string() });
    }
    if !usable_v6(d6) || !net6.contains(&d6) || d6 == v6 {
        return Err(Unusable::Resolver { dns: d6.to_string(), pool: net6.trunc().to_string() });
    }
    Ok((net4, net6))
}

fn usable_v4(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_link_local() || a.is_broadcast())
        // 0.0.0.0/8 ("this network") and 240.0.0.0/4 (reserved) are not host addresses either.
        && a.octets()[0] != 0
        && a.octets()[0] < 240
}

fn usable_v6(a: Ipv6Addr) -> bool {
    let first = a.segments()[0];
    !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_unicast_link_local())
        // IPv4-mapped (::ffff:0:0/96) and IPv4-compatible (::/96) addresses name IPv4 hosts.
        && a.to_ipv4_mapped().is_none()
        && a.segments()[..6] != [0; 6]
        // Site-local (fec0::/10) is deprecated and routed nowhere.
        && first & 0xffc0 != 0xfec0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Attached {
        Attached {
            token: [1; 32],
            ipv4: ("10.8.0.7".parse().unwrap(), 16),
            ipv6: ("fd00:8::7".parse().unwrap(), 64),
            dns: ("10.8.0.1".parse().unwrap(), "fd00:8::1".parse().unwrap()),
        }
    }

    #[test]
    fn an_exits_usual_answer_passes() {
        let (v4, v6) = validate(&good()).unwrap();
        assert_eq!((v4.to_string(), v6.to_string()), ("10.8.0.7/16".into(), "fd00:8::7/64".into()));
        // Public pools are fine too.
        let public = Attached {
            ipv4: ("198.51.100.9".parse().unwrap(), 24),
            ipv6: ("2001:db8:1::9".parse().unwrap(), 48),
            dns: ("198.51.100.1".parse().unwrap(), "2001:db8:1::1".parse().unwrap()),
            ..good()
        };
        assert!(validate(&public).is_ok());
    }

    #[test]
    fn every_unusable_answer_is_refused_with_its_reason() {
        let g = good();
        let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let cases = [
            (Attached { ipv6: (v6("ff02::1"), 64), ..g }, "ff02::1"),
            (Attached { ipv6: (v6("::ffff:10.8.0.7"), 64), ..g }, "::ffff"),
            (Attached { ipv6: (v6("::10.8.0.7"), 64), ..g }, "::a08"),
            (Attached { ipv6: (v6("fec0::7"), 64), ..g }, "fec0"),
            (Attached { ipv4: (v4("0.1.2.3"), 16), ..g }, "0.1.2.3"),
            (Attached { ipv4: (v4("250.0.0.1"), 16), ..g }, "250.0.0.1"),
            (Attached { ipv4: (v4("255.255.255.255"), 16), ..g }, "255.255.255.255"),
            (Attached { ipv4: (v4("10.8.0.0"), 16), ..g }, "network or broadcast"),
            (Attached { ipv4: (g.ipv4.0, 31), ..g }, "/31"),
            (Attached { ipv4: (g.ipv4.0, 7), ..g }, "/7"),
            (Attached { ipv6: (g.ipv6.0, 127), ..g }, "/127"),
            (Attached { ipv6: (g.ipv6.0, 15), ..g }, "/15"),
            (Attached { dns: (v4("10.9.0.1"), g.dns.1), ..g }, "10.9.0.1"),
            (Attached { dns: (v4("10.8.255.255"), g.dns.1), ..g }, "10.8.255.255"),
            (Attached { dns: (g.dns.0, v6("fd00:9::1")), ..g }, "fd00:9::1"),
            (Attached { dns: (g.dns.0, g.ipv6.0), ..g }, "fd00:8::7"),
        ];
        for (a, word) in cases {
            let err = validate(&a).unwrap_err().to_string();
            assert!(err.contains(word), "{a:?}: {err}");
        }
    }
}
