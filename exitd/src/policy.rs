//! The exit policy: which destinations a circuit's packets may reach. By default an exit
//! refuses private, loopback, link-local, CGNAT, multicast and cloud-metadata destinations —
//! a circuit must not reach the exit's own network — and TCP port 25 (spam). Operators add
//! allowed prefixes (exceptions to the default classes), denied prefixes and ports. Every
//! refusal names its rule, which is the metric label.

use crate::packet::PacketInfo;
use cellproto::descriptor::ExitPolicySummary;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;

/// The classes every exit refuses unless `allow` lists an exception (rule label, prefixes).
const DEFAULT_DENY: [(&str, &[&str]); 7] = [
    ("private", &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]),
    ("loopback", &["127.0.0.0/8", "::1/128"]),
    ("link_local", &["169.254.0.0/16", "fe80::/10"]),
    ("cgnat", &["100.64.0.0/10"]),
    ("multicast", &["224.0.0.0/4", "ff00::/8"]),
    ("unspecified", &["0.0.0.0/8", "::/128", "240.0.0.0/4", "255.255.255.255/32"]),
    // AWS, GCP and Azure instance metadata; also covered by link_local and private, but
    // named so that an `allow` for those ranges does not silently open them.
    ("cloud_metadata", &["169.254.169.254/32", "fd00:ec2::254/128"]),
];

/// Exit policy options, from exitd's config (`[policy]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Prefixes allowed even inside a default-denied class (never cloud metadata).
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// More prefixes to refuse.
    #[serde(default)]
    pub deny: Vec<IpNet>,
    /// TCP and UDP destination ports to refuse (default: 25).
    #[serde(default = "default_deny_ports")]
    pub deny_ports: Vec<u16>,
    /// If not empty, only these TCP and UDP destination ports are allowed.
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

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct ExitPolicy {
    classes: Vec<(&'static str, Vec<IpNet>)>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    deny_ports: Vec<u16>,
    allow_ports: Vec<u16>,
}

/// Rule labels the policy can return, for metrics.
pub const RULES: [&str; 10] = [
    "private",
    "loopback",
    "link_local",
    "cgnat",
    "multicast",
    "unspecified",
    "cloud_metadata",
    "denied_prefix",
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
            allow: config.allow.clone(),
            deny: config.deny.clone(),
            deny_ports: config.deny_ports.clone(),
            allow_ports: config.allow_ports.clone(),
        }
    }

    /// The decision for a packet leaving through the exit.
    pub fn check(&self, p: &PacketInfo) -> Decision {
        if let Some(rule) = self.check_destination(p.dst) {
            return Decision::Deny(rule);
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
        let dst = match dst {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(dst, IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|n| n.contains(&dst)) {
            return Some("denied_prefix");
        }
        let metadata = self.classes.iter().find(|(l, _)| *l == "cloud_metadata");
        if metadata.is_some_and(|(_, nets)| nets.iter().any(|n| n.contains(&dst))) {
            return Some("cloud_metadata");
        }
        if self.allow.iter().any(|n| n.contains(&dst)) {
            return None;
        }
        self.classes.iter().find(|(_, nets)| nets.iter().any(|n| n.contains(&dst))).map(|(label, _)| *label)
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

    fn to(dst: &str, port: Option<u16>) -> PacketInfo {
        PacketInfo { src: "10.8.0.2".parse().unwrap(), dst: dst.parse().unwrap(), protocol: 6, dst_port: port }
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
            ("::ffff:10.0.0.1", "private"),
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
}
