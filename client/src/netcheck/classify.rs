//! The judgement of netcheck: RFC 5780's server A and the NAT's mapping and filtering
//! behaviour in RFC 4787's terms, a pure function over the probe results, so that every
//! outcome is tested with made-up results and no NAT.

use super::report::{Probe, ProbeResult, Test};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;

/// NAT mapping behaviour (RFC 4787 §4.1): when is the same local address given the same
/// reflexive address?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    /// The reflexive address is this machine's own address: there is no NAT.
    NoNat,
    /// The same reflexive address whatever the destination.
    EndpointIndependent,
    /// The reflexive address depends on the destination IP only.
    AddressDependent,
    /// The reflexive address depends on the destination IP and port.
    AddressAndPortDependent,
    /// Relays at different IPs saw different reflexive addresses, but no relay offered an
    /// alternate port to tell the two dependent kinds apart.
    AddressDependentOrStricter,
    /// Two ports of one relay saw the same reflexive address, but no relay at another IP
    /// answered to tell these two apart.
    EndpointIndependentOrAddressDependent,
    /// Too few answers to say anything beyond the reflexive address.
    NotDetermined,
}

impl Mapping {
    /// The RFC 4787 wording, for the text report.
    fn describe(self) -> &'static str {
        match self {
            Mapping::NoNat => "none (no NAT)",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "address-dependent",
            Mapping::AddressAndPortDependent => "address-and-port-dependent",
            Mapping::AddressDependentOrStricter => "address-dependent or address-and-port-dependent",
            Mapping::EndpointIndependentOrAddressDependent => "endpoint-independent or address-dependent",
            Mapping::NotDetermined => "not determined",
        }
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// NAT filtering behaviour (RFC 4787 §5): whose packets may come in through a mapping?
///
/// There is no variant for endpoint-independent or address-dependent filtering alone: telling
/// them apart needs an answer from another IP (CHANGE-REQUEST change-IP), and a relay has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filtering {
    /// An answer from the relay's other port came in: the filter does not look at the port.
    EndpointIndependentOrAddressDependent,
    /// The answer from the relay's other port did not come in, though that port answers when
    /// asked directly: only the exact address we sent to may answer.
    AddressAndPortDependent,
    /// No relay could run the test (no alternate port, the request was refused or ignored, or
    /// the alternate port did not answer at all).
    NotDetermined,
}

impl Filtering {
    /// The RFC 4787 wording, for the text report.
    fn describe(self) -> &'static str {
        match self {
            Filtering::EndpointIndependentOrAddressDependent => "endpoint-independent or address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
            Filtering::NotDetermined => "not determined",
        }
    }
}

impl fmt::Display for Filtering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// The NAT's behaviour as far as the probes can tell, and why not further.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classification {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Caveats: why something was not determined, what could not be told apart.
    pub notes: Vec<String>,
}

/// Whether phase 1 sent a Binding request to `addr` (as to a relay of its own). Test III's
/// request does not count: it comes after the filtering test, so it spoils nothing.
pub(super) fn probed(probes: &[Probe], addr: SocketAddr) -> bool {
    probes.iter().any(|p| p.addr == addr && p.test == Test::Binding && !matches!(p.result, ProbeResult::Skipped { .. }))
}

/// RFC 5780's server A: the first relay that answered a Binding request, preferring one with an
/// alternate address we have not sent to (it can run the filtering test and test III).
/// [`run`] and [`classify`] both use it, so they agree on A.
pub(super) fn choose_primary(probes: &[Probe]) -> Option<usize> {
    let answered = || probes.iter().enumerate().filter(|(_, p)| p.test == Test::Binding && p.mapped().is_some());
    answered()
        .find(|(_, p)| p.other_address().is_some_and(|o| !probed(probes, o)))
        .or_else(|| answered().next())
        .map(|(i, _)| i)
}

/// Classifies the NAT from the probe results (sans-IO: no sockets, so every outcome can be
/// tested with made-up results).
///
/// Mapping: no NAT if every reflexive address equals the local address it was sent from. Else
/// A's reflexive address X1 is compared with those seen by relays at another IP (X2) and by
/// other ports of A's IP (X3, test III): a different X3 means address-and-port-dependent; else
/// an equal X2 means endpoint-independent; else a different X2 with an equal X3 means
/// address-dependent. Missing comparisons give the "or" variants.
///
/// Filtering: an answer to CHANGE-REQUEST change-port from the other port means the filter does
/// not look at ports; none, while that port answers a direct request, means
/// address-and-port-dependent.
pub fn classify(probes: &[Probe]) -> Classification {
    let mut notes = Vec::new();
    let Some(a) = choose_primary(probes) else {
        notes.push("no relay answered a Binding request".to_owned());
        return Classification { mapping: Mapping::NotDetermined, filtering: Filtering::NotDetermined, notes };
    };
    let primary = &probes[a];
    let mapping = classify_mapping(probes, primary, &mut notes);
    let filtering = classify_filtering(probes, primary, &mut notes);
    Classification { mapping, filtering, notes }
}

/// The mapping half of [`classify`]; `primary` answered, by [`choose_primary`]'s choice.
fn classify_mapping(probes: &[Probe], primary: &Probe, notes: &mut Vec<String>) -> Mapping {
    let Some(x1) = primary.mapped() else { return Mapping::NotDetermined };
    // Tests II and III: answers to plain requests that went somewhere else than A. The
    // change-port answer says nothing about mapping (it went to A).
    let others = || {
        probes
            .iter()
            .filter(|p| p.test != Test::ChangePort && p.addr != primary.addr)
            .filter_map(|p| Some((p.addr, p.mapped()?)))
    };
    // No NAT: the relays see the very address we sent from. The local IP is the one the kernel
    // picked towards each relay, so it is one of this host's addresses by construction.
    let all_answers = probes.iter().filter_map(|p| Some((p.local, p.mapped()?)));
    if !primary.local.ip().is_unspecified() && all_answers.clone().all(|(local, mapped)| local == mapped) {
        return Mapping::NoNat;
    }
    // For each kind of destination change, whether any answer differed from X1 (None: no answer
    // of that kind).
    let varies = |same_ip: bool| {
        others()
            .filter(|(addr, _)| (addr.ip() == primary.addr.ip()) == same_ip)
            .fold(None, |acc, (_, x)| Some(acc.unwrap_or(false) || x != x1))
    };
    match (varies(false), varies(true)) {
        (_, Some(true)) => Mapping::AddressAndPortDependent,
        (Some(false), _) => Mapping::EndpointIndependent,
        (Some(true), Some(false)) => Mapping::AddressDependent,
        (Some(true), None) => {
            notes.push(
                "relays at different IPs saw different reflexive addresses; no relay announced an alternate port \
                 (OTHER-ADDRESS), so address-dependent and address-and-port-dependent cannot be told apart"
                    .to_owned(),
            );
            Mapping::AddressDependentOrStricter
        }
        (None, Some(false)) => {
            notes.push(
                "no relay at a second IP answered, so endpoint-independent and address-dependent mapping cannot be \
                 told apart"
                    .to_owned(),
            );
            Mapping::EndpointIndependentOrAddressDependent
        }
        (None, None) => {
            notes.push(
                "only one relay address answered, so mapping could not be compared across destinations".to_owned(),
            );
            Mapping::NotDetermined
        }
    }
}

/// The filtering half of [`classify`].
fn classify_filtering(probes: &[Probe], primary: &Probe, notes: &mut Vec<String>) -> Filtering {
    let name = &primary.server;
    let Some(other) = primary.other_address() else {
        notes.push("no relay announced an alternate port (OTHER-ADDRESS), so filtering was not tested".to_owned());
        return Filtering::NotDetermined;
    };
    let change = probes.iter().find(|p| p.test == Test::ChangePort && p.addr == primary.addr);
    let direct = probes.iter().find(|p| p.test == Test::OtherAddress && p.addr == other);
    match change.map(|p| &p.result) {
        None => {
            notes.push(format!(
                "{name}'s alternate address {other} was already probed as a relay, which opens the NAT's filter to it, \
                 so filtering was not tested"
            ));
            Filtering::NotDetermined
        }
        Some(ProbeResult::Answered { from, .. }) if *from != primary.addr => {
            notes.push(
                "a relay has a single IP address, so endpoint-independent and address-dependent filtering cannot be \
                 told apart"
                    .to_owned(),
            );
            Filtering::EndpointIndependentOrAddressDependent
        }
        Some(ProbeResult::Answered { .. }) => {
            notes.push(format!("{name} ignored CHANGE-REQUEST and answered from its main port"));
            Filtering::NotDetermined
        }
        Some(ProbeResult::Error { code, reason }) => {
            let code = code.map(|c| format!("{c} ")).unwrap_or_default();
            notes.push(format!("{name} refused CHANGE-REQUEST ({code}{reason})"));
            Filtering::NotDetermined
        }
        Some(ProbeResult::Timeout | ProbeResult::Skipped { .. }) => {
            if direct.is_some_and(|p| p.mapped().is_some()) {
                Filtering::AddressAndPortDependent
            } else {
                notes.push(format!(
                    "{name}'s alternate port {other} did not answer, not even directly, so filtering was not determined"
                ));
                Filtering::NotDetermined
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::netcheck::report::{Probe, ProbeResult, Test};

    pub(crate) const A: &str = "198.51.100.1:3478";
    pub(crate) const A_ALT: &str = "198.51.100.1:3479";
    pub(crate) const B: &str = "203.0.113.9:3478";
    pub(crate) const LOCAL: &str = "192.168.1.5:40000";
    pub(crate) const X1: &str = "192.0.2.7:40000";
    pub(crate) const X_OTHER: &str = "192.0.2.7:40001";

    pub(crate) fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    pub(crate) fn answered(
        server: &str,
        addr: &str,
        test: Test,
        mapped: &str,
        from: &str,
        other: Option<&str>,
    ) -> Probe {
        Probe {
            server: server.into(),
            addr: sa(addr),
            local: sa(LOCAL),
            test,
            result: ProbeResult::Answered {
                mapped: sa(mapped),
                from: sa(from),
                other_address: other.map(sa),
                rtt_ms: 1.0,
            },
        }
    }

    pub(crate) fn failed(server: &str, addr: &str, test: Test, result: ProbeResult) -> Probe {
        Probe { server: server.into(), addr: sa(addr), local: sa(LOCAL), test, result }
    }

    /// A's Binding answer (with OTHER-ADDRESS), B's answer, A's change-port outcome, A's test
    /// III answer, as a scenario.
    pub(crate) fn scenario(b: Option<&str>, change: Option<ProbeResult>, x3: Option<&str>) -> Vec<Probe> {
        let mut probes = vec![answered("a", A, Test::Binding, X1, A, Some(A_ALT))];
        if let Some(x2) = b {
            probes.push(answered("b", B, Test::Binding, x2, B, None));
        }
        if let Some(r) = change {
            probes.push(failed("a", A, Test::ChangePort, r));
        }
        match x3 {
            Some(x3) => probes.push(answered("a", A_ALT, Test::OtherAddress, x3, A_ALT, Some(A))),
            None => probes.push(failed("a", A_ALT, Test::OtherAddress, ProbeResult::Timeout)),
        }
        probes
    }

    pub(crate) fn from_alt() -> Option<ProbeResult> {
        Some(ProbeResult::Answered { mapped: sa(X1), from: sa(A_ALT), other_address: Some(sa(A)), rtt_ms: 1.0 })
    }

    #[test]
    fn mapping_and_filtering_table() {
        use Filtering as F;
        use Mapping as M;
        let timeout = || Some(ProbeResult::Timeout);
        let cases: Vec<(&str, Vec<Probe>, M, F)> = vec![
            (
                "eim, filter open",
                scenario(Some(X1), from_alt(), Some(X1)),
                M::EndpointIndependent,
                F::EndpointIndependentOrAddressDependent,
            ),
            ("eim, apdf", scenario(Some(X1), timeout(), Some(X1)), M::EndpointIndependent, F::AddressAndPortDependent),
            ("adm", scenario(Some(X_OTHER), timeout(), Some(X1)), M::AddressDependent, F::AddressAndPortDependent),
            (
                "apdm",
                scenario(Some(X_OTHER), timeout(), Some(X_OTHER)),
                M::AddressAndPortDependent,
                F::AddressAndPortDependent,
            ),
            // Port variation with the same IP-varied answer still means the port matters.
            (
                "apdm, same x2",
                scenario(Some(X1), timeout(), Some(X_OTHER)),
                M::AddressAndPortDependent,
                F::AddressAndPortDependent,
            ),
            (
                "no b, x3 same",
                scenario(None, from_alt(), Some(X1)),
                M::EndpointIndependentOrAddressDependent,
                F::EndpointIndependentOrAddressDependent,
            ),
            (
                "no b, x3 differs",
                scenario(None, timeout(), Some(X_OTHER)),
                M::AddressAndPortDependent,
                F::AddressAndPortDependent,
            ),
            ("alt port dead", scenario(Some(X1), timeout(), None), M::EndpointIndependent, F::NotDetermined),
            ("no b, alt dead", scenario(None, timeout(), None), M::NotDetermined, F::NotDetermined),
            (
                "change refused",
                scenario(
                    Some(X1),
                    Some(ProbeResult::Error { code: Some(420), reason: "Unknown Attribute".into() }),
                    Some(X1),
                ),
                M::EndpointIndependent,
                F::NotDetermined,
            ),
            (
                "change ignored",
                scenario(
                    Some(X1),
                    Some(ProbeResult::Answered { mapped: sa(X1), from: sa(A), other_address: None, rtt_ms: 1.0 }),
                    Some(X1),
                ),
                M::EndpointIndependent,
                F::NotDetermined,
            ),
            (
                "no alternate, x2 same",
                vec![answered("a", A, Test::Binding, X1, A, None), answered("b", B, Test::Binding, X1, B, None)],
                M::EndpointIndependent,
                F::NotDetermined,
            ),
            (
                "no alternate, x2 differs",
                vec![answered("a", A, Test::Binding, X1, A, None), answered("b", B, Test::Binding, X_OTHER, B, None)],
                M::AddressDependentOrStricter,
                F::NotDetermined,
            ),
            ("lone relay", vec![answered("a", A, Test::Binding, X1, A, None)], M::NotDetermined, F::NotDetermined),
            (
                "b timed out",
                vec![answered("a", A, Test::Binding, X1, A, None), failed("b", B, Test::Binding, ProbeResult::Timeout)],
                M::NotDetermined,
                F::NotDetermined,
            ),
            (
                "no nat",
                vec![answered("a", A, Test::Binding, LOCAL, A, None), answered("b", B, Test::Binding, LOCAL, B, None)],
                M::NoNat,
                F::NotDetermined,
            ),
            (
                "nothing answered",
                vec![failed("a", A, Test::Binding, ProbeResult::Timeout)],
                M::NotDetermined,
                F::NotDetermined,
            ),
            ("no probes", vec![], M::NotDetermined, F::NotDetermined),
            (
                // A's alternate was listed as a relay too and probed in phase 1: filtering
                // cannot be tested, and the probe counts as test III.
                "alternate already probed",
                vec![
                    answered("a", A, Test::Binding, X1, A, Some(A_ALT)),
                    answered("a2", A_ALT, Test::Binding, X1, A_ALT, None),
                ],
                M::EndpointIndependentOrAddressDependent,
                F::NotDetermined,
            ),
        ];
        for (name, probes, mapping, filtering) in cases {
            let c = classify(&probes);
            assert_eq!((c.mapping, c.filtering), (mapping, filtering), "case {name}: {:?}", c.notes);
            let undetermined = c.mapping == M::NotDetermined || c.filtering == F::NotDetermined;
            assert!(!undetermined || !c.notes.is_empty(), "case {name}: not determined needs a note");
        }
    }

    #[test]
    fn primary_prefers_a_relay_with_an_alternate_port() {
        let probes = vec![
            failed("dead", A, Test::Binding, ProbeResult::Timeout),
            answered("plain", B, Test::Binding, X1, B, None),
            answered("rfc5780", "198.51.100.2:3478", Test::Binding, X1, "198.51.100.2:3478", Some("198.51.100.2:3479")),
        ];
        assert_eq!(choose_primary(&probes), Some(2));
        assert_eq!(choose_primary(&probes[..2]), Some(1));
        assert_eq!(choose_primary(&probes[..1]), None);
    }

    #[test]
    fn primary_stays_the_same_after_test_three() {
        // B first in the list, A (with an alternate) second: run picks A, and so must classify
        // once test III has been sent to A's alternate.
        let probes = vec![
            answered("b", B, Test::Binding, X_OTHER, B, None),
            answered("a", A, Test::Binding, X1, A, Some(A_ALT)),
            failed("a", A, Test::ChangePort, ProbeResult::Timeout),
            answered("a", A_ALT, Test::OtherAddress, X1, A_ALT, Some(A)),
        ];
        assert_eq!(choose_primary(&probes[..2]), Some(1));
        assert_eq!(choose_primary(&probes), Some(1));
        let c = classify(&probes);
        assert_eq!((c.mapping, c.filtering), (Mapping::AddressDependent, Filtering::AddressAndPortDependent));
    }
}
