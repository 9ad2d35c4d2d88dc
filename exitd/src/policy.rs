//! The exit policy: which destinations a circuit's packets may reach. By default an exit
//! refuses private, loopback, link-local, CGNAT, multicast, reserved, translated (NAT64,
//! IPv4-mapped and -compatible IPv6) and cloud-metadata destinations and the exit host's own
//! addresses — a circuit must not reach the exit's own network or the exit itself — and TCP
//! and UDP port 25 (spam). Only protocols whose headers the exit understands pass (ICMP, TCP,
//! UDP, DCCP, GRE, ESP, SCTP, UDP-Lite): any other could hide a port. Operators add allowed
//! prefixes (exceptions to the default classes), denied prefixes and ports. Every refusal
//! names its rule, which is the metric label.
//!
//! The policy is stateless: a later fragment (no ports in it) is judged by destination and
//! protocol here, and by [`crate::filter`], which lets it through only after its datagram's
//! first fragment passed. `nft` installs the same rules in the kernel ([`crate::nft`]).

use crate::packet::PacketInfo;
use cellproto::descriptor::ExitPolicySummary;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;

/// The classes every exit refuses unless `allow` lists an exception (rule label, prefixes).
/// Where prefixes overlap, the first class that lists one names the refusal.
const DEFAULT_DENY: [(&str, &[&str]); 11] = [
    ("private", &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]),
    ("loopback", &["127.0.0.0/8", "::1/128"]),
    ("link_local", &["169.254.0.0/16", "fe80::/10"]),
    ("cgnat", &["100.64.0.0/10"]),
    ("multicast", &["224.0.0.0/4", "ff00::/8"]),
    ("unspecified", &["0.0.0.0/8", "::/128", "240.0.0.0/4", "255.255.255.255/32"]),
    // AWS, GCP and Azure instance metadata; also covered by link_local and private, but
    // named so that an `allow` for those ranges does not silently open them.
    ("cloud_metadata", &["169.254.169.254/32", "fd00:ec2::254/128"]),
    // NAT64 (RFC 6052, RFC 8215): a translator on the exit's network would take a circuit to
    // IPv4 addresses the policy refuses.
    ("nat64", &["64:ff9b::/96", "64:ff9b:1::/48"]),
    // IPv4-mapped, IPv4-translated (SIIT) and the deprecated IPv4-compatible IPv6 addresses:
    // IPv4 in an IPv6 disguise.
    ("ipv4_in_ipv6", &["::ffff:0:0/96", "::ffff:0:0:0/96", "::/96"]),
    ("benchmarking", &["198.18.0.0/15", "2001:2::/48"]),
    // IETF protocol assignments (DS-Lite, NAT64 discovery, ...).
    ("ietf_protocol", &["192.0.0.0/24"]),
];

/// Transport protocols the exit forwards, by IP version: those it can police (ICMP, TCP, UDP,
/// DCCP, SCTP, UDP-Lite: ports where they have them) and two it cannot look into but whose
/// destination is all there is to police (GRE, ESP). Anything else — AH (which masquerading
/// breaks anyway), IP in IP, unknown numbers — could hide a port, and is refused.
pub const PROTOCOLS_V4: [u8; 8] = [1, 6, 17, 33, 47, 50, 132, 136];
/// The same for IPv6 (ICMPv6 instead of ICMP).
pub const PROTOCOLS_V6: [u8; 8] = [58, 6, 17, 33, 47, 50, 132, 136];

/// Exit policy options, from exitd's config (`[policy]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Prefixes allowed even inside a default-denied class (never cloud metadata nor the exit
    /// host's own addresses).
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// More prefixes to refuse.
    #[serde(default)]
    pub deny: Vec<IpNet>,
    /// TCP, UDP, SCTP, DCCP and UDP-Lite destination ports to refuse (default: 25).
    #[serde(default = "default_deny_ports")]
    pub deny_ports: Vec<u16>,
    /// If not empty, only these TCP, UDP, SCTP, DCCP and UDP-Lite destination ports are allowed.
    #[serde(default)]
    pub allow_ports: Vec<u16>,
}

fn default_deny_ports() -> Vec<u16> {
    vec![25]
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { allow: Vec::new(), deny: Vec::new(), deny_ports: default_deny_ports(), allow_ports: Vec::new() }
    }
}

/// What the policy says about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forward it.
    Allow,
    /// Drop it and count it under this rule.
    Deny(&'static str),
}

/// A prefix the policy refuses, as the nftables mirror installs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedPrefix {
    /// The rule (metric label).
    pub rule: &'static str,
    /// The prefix.
    pub net: IpNet,
    /// Allowed exceptions inside it (the `allow` prefixes that overlap it).
    pub except: Vec<IpNet>,
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct ExitPolicy {
    classes: Vec<(&'static str, Vec<IpNet>)>,
    exit_host: Vec<IpNet>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    deny_ports: Vec<u16>,
    allow_ports: Vec<u16>,
}

/// Rule labels the policy can return, for metrics.
pub const RULES: [&str; 16] = [
    "private",
    "loopback",
    "link_local",
    "cgnat",
    "multicast",
    "unspecified",
    "cloud_metadata",
    "nat64",
    "ipv4_in_ipv6",
    "benchmarking",
    "ietf_protocol",
    "exit_host",
    "denied_prefix",
    "protocol",
    "denied_port",
    "port_not_allowed",
];

impl ExitPolicy {
    /// Compiles the configuration.
    pub fn new(config: &PolicyConfig) -> Self {
        let classes = DEFAULT_DENY
            .iter()
            .map(|(label, nets)| (*label, nets.iter().filter_map(|n| n.parse().ok()).collect()))
            .collect();
        Self {
            classes,
            exit_host: Vec::new(),
            allow: config.allow.clone(),
            deny: config.deny.clone(),
            deny_ports: config.deny_ports.clone(),
            allow_ports: config.allow_ports.clone(),
        }
    }

    /// Also refuses the exit host's own addresses (found at start), whatever `allow` says.
    pub fn with_exit_host(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.exit_host = addrs.into_iter().map(IpNet::from).collect();
        self
    }

    /// The decision for a packet leaving through the exit. A later fragment has no port: it is
    /// judged by destination and protocol (see [`crate::filter`] for the rest).
    pub fn check(&self, p: &PacketInfo) -> Decision {
        if let Some(rule) = self.check_destination(p.dst) {
            return Decision::Deny(rule);
        }
        let known = if p.dst.is_ipv4() { &PROTOCOLS_V4 } else { &PROTOCOLS_V6 };
        if !known.contains(&p.protocol) {
            return Decision::Deny("protocol");
        }
        if let Some(port) = p.dst_port {
            if self.deny_ports.contains(&port) {
                return Decision::Deny("denied_port");
            }
            if !self.allow_ports.is_empty() && !self.allow_ports.contains(&port) {
                return Decision::Deny("port_not_allowed");
            }
        }
        Decision::Allow
    }

    fn check_destination(&self, dst: IpAddr) -> Option<&'static str> {
        if self.deny.iter().any(|n| n.contains(&dst)) {
            return Some("denied_prefix");
        }
        let metadata = self.classes.iter().find(|(l, _)| *l == "cloud_metadata");
        if metadata.is_some_and(|(_, nets)| nets.iter().any(|n| n.contains(&dst))) {
            return Some("cloud_metadata");
        }
        if self.exit_host.iter().any(|n| n.contains(&dst)) {
            return Some("exit_host");
        }
        if self.allow.iter().any(|n| n.contains(&dst)) {
            return None;
        }
        self.classes.iter().find(|(_, nets)| nets.iter().any(|n| n.contains(&dst))).map(|(label, _)| *label)
    }

    /// Every refused prefix with its allowed exceptions, for the nftables mirror: configured
    /// `deny` prefixes, cloud metadata and the exit host's addresses (no exceptions), then the
    /// default classes (with the `allow` prefixes inside them as exceptions). A class prefix
    /// that an `allow` prefix covers entirely is left out.
    pub fn denied_prefixes(&self) -> Vec<DeniedPrefix> {
        let absolute = |rule, nets: &[IpNet]| {
            nets.iter().map(move |&net| DeniedPrefix { rule, net: net.trunc(), except: Vec::new() }).collect::<Vec<_>>()
        };
        let mut out = absolute("denied_prefix", &self.deny);
        for (rule, nets) in &self.classes {
            if *rule == "cloud_metadata" {
                out.extend(absolute(rule, nets));
            }
        }
        out.extend(absolute("exit_host", &self.exit_host));
        for (rule, nets) in self.classes.iter().filter(|(r, _)| *r != "cloud_metadata") {
            for net in nets {
                if self.allow.iter().any(|a| a.contains(net)) {
                    continue;
                }
                let except: Vec<IpNet> = IpNet::aggregate(
                    &self.allow.iter().filter(|a| net.contains(*a)).map(IpNet::trunc).collect::<Vec<_>>(),
                );
                out.push(DeniedPrefix { rule, net: net.trunc(), except });
            }
        }
        out
    }

    /// Refused TCP/UDP/SCTP/DCCP/UDP-Lite destination ports.
    pub fn deny_ports(&self) -> &[u16] {
        &self.deny_ports
    }

    /// If not empty, the only destination ports allowed.
    pub fn allow_ports(&self) -> &[u16] {
        &self.allow_ports
    }

    /// The port summary published in the descriptor (as Tor's microdescriptor "p" line).
    pub fn summary(&self) -> ExitPolicySummary {
        if self.allow_ports.is_empty() {
            ExitPolicySummary { accept: false, ports: ranges(&self.deny_ports) }
        } else {
            let allowed: Vec<u16> = self.allow_ports.iter().copied().filter(|p| !self.deny_ports.contains(p)).collect();
            ExitPolicySummary { accept: true, ports: ranges(&allowed) }
        }
    }
}

/// Sorted, merged, non-adjacent ranges from a list of ports (port 0 dropped).
fn ranges(ports: &[u16]) -> Vec<(u16, u16)> {
    let mut sorted: Vec<u16> = ports.iter().copied().filter(|p| *p != 0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for p in sorted {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == p => *hi = p,
            _ => out.push((p, p)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::{Ext, ip4, ip6, tcp, udp};

    fn to(dst: &str, port: Option<u16>) -> PacketInfo {
        PacketInfo {
            src: "10.8.0.2".parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: 6,
            dst_port: port,
            fragment: crate::packet::Fragment::Whole,
        }
    }

    #[test]
    fn default_classes_and_port_25() {
        let p = ExitPolicy::new(&PolicyConfig::default());
        for (dst, rule) in [
            ("10.1.1.1", "private"),
            ("192.168.1.1", "private"),
            ("127.0.0.1", "loopback"),
            ("169.254.1.1", "link_local"),
            ("169.254.169.254", "cloud_metadata"),
            ("fd00:ec2::254", "cloud_metadata"),
            ("100.64.1.1", "cgnat"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("::1", "loopback"),
            ("fe80::1", "link_local"),
            ("::ffff:10.0.0.1", "ipv4_in_ipv6"),
        ] {
            assert_eq!(p.check(&to(dst, Some(80))), Decision::Deny(rule), "{dst}");
        }
        assert_eq!(p.check(&to("192.0.2.1", Some(25))), Decision::Deny("denied_port"));
        assert_eq!(p.check(&to("192.0.2.1", Some(443))), Decision::Allow);
        assert_eq!(p.check(&to("2001:db8::1", None)), Decision::Allow);
        assert!(RULES.iter().all(|r| r.len() < 20));
    }

    #[test]
    fn configured_exceptions_and_ports() {
        let config = PolicyConfig {
            allow: vec!["10.99.0.0/16".parse().unwrap(), "169.254.0.0/16".parse().unwrap()],
            deny: vec!["198.51.100.0/24".parse().unwrap()],
            deny_ports: vec![25, 465],
            allow_ports: vec![80, 443, 465, 8080, 8081],
        };
        let p = ExitPolicy::new(&config);
        assert_eq!(p.check(&to("10.99.1.1", Some(80))), Decision::Allow);
        assert_eq!(p.check(&to("169.254.169.254", Some(80))), Decision::Deny("cloud_metadata"), "metadata never opens");
        assert_eq!(p.check(&to("198.51.100.9", Some(80))), Decision::Deny("denied_prefix"));
        assert_eq!(p.check(&to("192.0.2.1", Some(22))), Decision::Deny("port_not_allowed"));
        assert_eq!(p.check(&to("192.0.2.1", Some(465))), Decision::Deny("denied_port"));
        let s = p.summary();
        assert!(s.accept);
        assert_eq!(s.ports, vec![(80, 80), (443, 443), (8080, 8081)]);
        assert!(s.validate().is_ok());
        let d = ExitPolicy::new(&PolicyConfig::default()).summary();
        assert_eq!((d.accept, d.ports), (false, vec![(25, 25)]));
    }

    fn check(p: &ExitPolicy, packet: &[u8]) -> Decision {
        match crate::packet::inspect(packet) {
            Ok(info) => p.check(&info),
            Err(e) => Decision::Deny(e.label()),
        }
    }

    /// Issue 10 §6: port 25 behind 9 IPv6 extension headers passed `deny_ports` and
    /// `allow_ports` (the walk stopped after 8 headers and the port was unknown).
    #[test]
    fn port_25_behind_nine_extension_headers_is_denied() {
        let packet = ip6(&[Ext::Opt(60, 8); 9], 6, &tcp(25));
        assert_eq!(check(&ExitPolicy::new(&PolicyConfig::default()), &packet), Decision::Deny("denied_port"));
        let reduced = PolicyConfig { allow_ports: vec![443], ..PolicyConfig::default() };
        let reduced = ExitPolicy::new(&reduced);
        assert_eq!(check(&reduced, &ip6(&[Ext::Opt(60, 8); 9], 6, &tcp(22))), Decision::Deny("port_not_allowed"));
        assert_eq!(check(&reduced, &ip6(&[Ext::Opt(60, 8); 9], 6, &tcp(443))), Decision::Allow);
        // Behind headers the kernel does not walk either (mobility, experimental).
        let packet = ip6(&[Ext::Opt(135, 8), Ext::Opt(253, 16)], 17, &udp(22, b"x"));
        assert_eq!(check(&reduced, &packet), Decision::Deny("port_not_allowed"));
    }

    /// A port hidden by cutting the transport header short, or by leaving it out of the first
    /// fragment, is not "no port": the packet is refused.
    #[test]
    fn hidden_ports_are_refused() {
        let reduced = ExitPolicy::new(&PolicyConfig { allow_ports: vec![443], ..PolicyConfig::default() });
        for packet in [
            ip4(6, &tcp(22)[..2], 0, false, 1),
            ip4(17, &udp(22, b"")[..4], 0, true, 1),
            ip6(&[Ext::Frag(0, true, 9)], 6, &tcp(22)[..4]),
            ip6(&[Ext::Frag(0, true, 9)], 60, &[6, 0, 1, 4, 0, 0, 0, 0]),
        ] {
            assert_ne!(check(&reduced, &packet), Decision::Allow, "{packet:02x?}");
        }
    }

    /// Protocols whose headers the exit does not understand (unknown next headers, AH, which
    /// masquerading breaks anyway, IP in IP) are refused: a port could hide behind them.
    #[test]
    fn unknown_protocols_are_denied() {
        let p = ExitPolicy::new(&PolicyConfig::default());
        for (packet, what) in [
            (ip6(&[], 200, &tcp(25)), "unknown next header"),
            (ip6(&[Ext::Ah(16)], 6, &tcp(25)), "AH over IPv6"),
            (ip4(51, &[6, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, false, 1), "AH over IPv4"),
            (ip4(4, &[0x45; 20], 0, false, 1), "IP in IP"),
            (ip6(&[], 41, &[0x60; 40]), "IPv6 in IPv6"),
            (ip4(58, &[128, 0, 0, 0], 0, false, 1), "ICMPv6 in IPv4"),
        ] {
            assert_eq!(check(&p, &packet), Decision::Deny("protocol"), "{what}");
        }
        for (packet, what) in [
            (ip4(1, &[8, 0, 0, 0, 0, 0, 0, 0], 0, false, 1), "ICMP"),
            (ip6(&[], 58, &[128, 0, 0, 0, 0, 0, 0, 0]), "ICMPv6"),
            (ip4(50, &[0; 16], 0, false, 1), "ESP"),
            (ip6(&[Ext::Opt(0, 8)], 17, &udp(443, b"q")), "UDP behind hop-by-hop"),
        ] {
            assert_eq!(check(&p, &packet), Decision::Allow, "{what}");
        }
    }

    #[test]
    fn translated_and_reserved_destinations_are_denied() {
        let p = ExitPolicy::new(&PolicyConfig::default());
        for dst in [
            "64:ff9b::a00:1",   // NAT64 well-known prefix (to 10.0.0.1 on the exit's network)
            "64:ff9b::808:808", // ... and to a public address: the translator is not ours
            "64:ff9b:1::1",     // local-use NAT64
            "198.18.0.1",       // benchmarking
            "198.19.255.254",
            "192.0.0.8",      // IETF protocol assignments
            "::ffff:8.8.8.8", // IPv4-mapped
            "::ffff:10.0.0.1",
            "::8.8.8.8", // IPv4-compatible
        ] {
            assert_ne!(p.check(&to(dst, Some(443))), Decision::Allow, "{dst}");
        }
    }

    /// The nftables mirror refuses exactly the destinations the policy refuses.
    fn mirror_refuses(p: &ExitPolicy, dst: IpAddr) -> bool {
        p.denied_prefixes().iter().any(|d| d.net.contains(&dst) && !d.except.iter().any(|e| e.contains(&dst)))
    }

    fn exceptions() -> ExitPolicy {
        let config = PolicyConfig {
            allow: ["10.99.0.0/16", "10.100.0.0/16", "169.254.0.0/16", "fd00:1::/32", "100.64.0.0/10"]
                .map(|n| n.parse().unwrap())
                .into(),
            deny: ["198.51.100.0/24", "10.99.1.0/24"].map(|n| n.parse().unwrap()).into(),
            ..PolicyConfig::default()
        };
        ExitPolicy::new(&config).with_exit_host(["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()])
    }

    #[test]
    fn the_mirror_has_the_policys_prefixes_and_exceptions() {
        let p = exceptions();
        let d = p.denied_prefixes();
        let ten = d.iter().find(|d| d.net.to_string() == "10.0.0.0/8").unwrap();
        assert_eq!(ten.except.iter().map(|e| e.to_string()).collect::<Vec<_>>(), ["10.99.0.0/16", "10.100.0.0/16"]);
        assert!(d.iter().all(|d| d.net.to_string() != "100.64.0.0/10"), "a class entirely allowed is left out");
        let metadata = d.iter().find(|d| d.rule == "cloud_metadata").unwrap();
        assert!(metadata.except.is_empty());
        assert!(d.iter().any(|d| d.rule == "exit_host" && d.net.to_string() == "192.0.2.7/32"));
        for dst in
            ["10.99.1.5", "10.99.2.5", "10.98.0.1", "169.254.169.254", "169.254.1.1", "192.0.2.7", "198.51.100.9"]
        {
            let dst: IpAddr = dst.parse().unwrap();
            assert_eq!(p.check_destination(dst).is_some(), mirror_refuses(&p, dst), "{dst}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_mirror_agrees_with_the_policy_on_every_address(v4 in proptest::prelude::any::<u32>(), v6 in proptest::prelude::any::<u128>(), pick in 0usize..6) {
            let p = exceptions();
            // Addresses near the interesting prefixes, and anywhere.
            let v6_bases = [0u128, 0xfd00_0001u128 << 96, 0x0064_ff9b_u128 << 96, 0xfe80u128 << 112, 0xffff_0000_0000u128, 0x2001_0db8u128 << 96];
            let v6 = v6_bases[pick] | (v6 & ((1u128 << 80) - 1));
            for dst in [IpAddr::V4(v4.into()), IpAddr::V4((0x0a00_0000 | (v4 & 0x00ff_ffff)).into()), IpAddr::V6(v6.into())] {
                proptest::prop_assert_eq!(p.check_destination(dst).is_some(), mirror_refuses(&p, dst), "{}", dst);
            }
        }
    }
}
