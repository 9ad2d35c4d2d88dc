//! What netcheck reports: each probe and its result, and the whole report as text and JSON.

use super::classify::{Filtering, Mapping};
use cellproto::stun::{Attribute, Class, Message};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;

/// Which RFC 5780 test a probe was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Test {
    /// A plain Binding request to a relay's STUN address (tests I and II).
    Binding,
    /// A Binding request with CHANGE-REQUEST change-port, to be answered from the relay's
    /// other port (the filtering test).
    ChangePort,
    /// A plain Binding request to the primary relay's OTHER-ADDRESS (test III).
    OtherAddress,
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Test::Binding => "binding",
            Test::ChangePort => "change-port",
            Test::OtherAddress => "other-address",
        })
    }
}

/// What came back for one probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ProbeResult {
    /// A Binding success response.
    Answered {
        /// The reflexive address the relay saw (XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS).
        mapped: SocketAddr,
        /// Where the answer came from (the source of the datagram, which is what a NAT filters
        /// on, rather than the RESPONSE-ORIGIN the relay claims).
        from: SocketAddr,
        /// The relay's alternate address (OTHER-ADDRESS), if it offers one.
        other_address: Option<SocketAddr>,
        /// Round trip from the first transmission, in milliseconds.
        rtt_ms: f64,
    },
    /// An error response, or an answer that cannot be used, or the request could not be sent.
    Error {
        /// The STUN error code (e.g. 420), if the relay sent one.
        code: Option<u16>,
        /// What went wrong.
        reason: String,
    },
    /// Nothing came back within the timeout, retransmissions included.
    Timeout,
    /// Not probed: the server's address family differs from the socket's.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One request and its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// The relay's nickname.
    pub server: String,
    /// Where the request went.
    pub addr: SocketAddr,
    /// The local address the request left from (the socket's port, and the IP the kernel
    /// routes from towards `addr`): a reflexive address equal to it means no NAT.
    pub local: SocketAddr,
    /// Which test this was.
    pub test: Test,
    /// What came back.
    pub result: ProbeResult,
}

impl Probe {
    /// The reflexive address, if the relay answered with one.
    pub(super) fn mapped(&self) -> Option<SocketAddr> {
        match self.result {
            ProbeResult::Answered { mapped, .. } => Some(mapped),
            _ => None,
        }
    }

    /// The OTHER-ADDRESS the relay announced, if any and if it is really another address.
    pub(super) fn other_address(&self) -> Option<SocketAddr> {
        match self.result {
            ProbeResult::Answered { other_address: Some(o), .. } if o != self.addr => Some(o),
            _ => None,
        }
    }
}

/// What netcheck found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// This machine's address towards the primary relay (bound port, routed source IP).
    pub local: SocketAddr,
    /// The reflexive address the primary relay saw: what the Internet sees of this socket.
    pub reflexive: SocketAddr,
    /// The relay whose answer gave `reflexive` (RFC 5780's server A).
    pub primary: String,
    /// NAT mapping behaviour.
    pub mapping: Mapping,
    /// NAT filtering behaviour.
    pub filtering: Filtering,
    /// Caveats on the classification.
    pub notes: Vec<String>,
    /// Every request sent and its result, in order.
    pub probes: Vec<Probe>,
    /// Datagrams received that were not an answer to one of our requests (not STUN,
    /// malformed, or an unknown transaction), and so were ignored.
    pub ignored: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Report:")?;
        writeln!(f, "\t* Local address: {}", self.local)?;
        writeln!(f, "\t* Reflexive address: {} (seen by {})", self.reflexive, self.primary)?;
        writeln!(f, "\t* Mapping: {}", self.mapping)?;
        writeln!(f, "\t* Filtering: {}", self.filtering)?;
        for note in &self.notes {
            writeln!(f, "\t  - {note}")?;
        }
        if self.ignored > 0 {
            writeln!(f, "\t* Ignored datagrams: {}", self.ignored)?;
        }
        writeln!(f, "\t* Probes:")?;
        let name_width = self.probes.iter().map(|p| p.server.len()).max().unwrap_or(0);
        for p in &self.probes {
            write!(f, "\t\t- {:<name_width$}  {:<21}  {:<13}  ", p.server, p.addr.to_string(), p.test.to_string())?;
            match &p.result {
                ProbeResult::Answered { mapped, from, rtt_ms, .. } => {
                    write!(f, "{rtt_ms:.1} ms, mapped {mapped}")?;
                    if *from != p.addr {
                        write!(f, ", answered from {from}")?;
                    }
                    writeln!(f)?;
                }
                ProbeResult::Error { code: Some(code), reason } => writeln!(f, "error {code} {reason}")?,
                ProbeResult::Error { code: None, reason } => writeln!(f, "error: {reason}")?,
                ProbeResult::Timeout => writeln!(f, "timeout")?,
                ProbeResult::Skipped { reason } => writeln!(f, "skipped: {reason}")?,
            }
        }
        Ok(())
    }
}

/// One word or so on a result, for the "unreachable" error.
pub(super) fn brief(result: &ProbeResult) -> String {
    match result {
        ProbeResult::Answered { .. } => "answered".into(),
        ProbeResult::Error { code: Some(code), reason } => format!("error {code} {reason}"),
        ProbeResult::Error { code: None, reason } => reason.clone(),
        ProbeResult::Timeout => "timeout".into(),
        ProbeResult::Skipped { reason } => format!("skipped, {reason}"),
    }
}

/// The probe result a decoded Binding response stands for.
pub(crate) fn result_of(message: &Message, from: SocketAddr, rtt_ms: f64) -> ProbeResult {
    let unknown = message.unknown_required();
    if !unknown.is_empty() {
        // RFC 8489 §6.3.3/§6.3.4: a response with unknown comprehension-required attributes
        // fails the transaction.
        let types: Vec<String> = unknown.iter().map(|t| format!("{t:#06x}")).collect();
        let reason = format!("response with unknown comprehension-required attributes {}", types.join(", "));
        return ProbeResult::Error { code: None, reason };
    }
    if message.class == Class::ErrorResponse {
        return match message.attributes.iter().find_map(|a| match a {
            Attribute::ErrorCode { code, reason } => Some((*code, reason.clone())),
            _ => None,
        }) {
            Some((code, reason)) => ProbeResult::Error { code: Some(code), reason },
            None => ProbeResult::Error { code: None, reason: "error response without ERROR-CODE".into() },
        };
    }
    let Some(mapped) = message.reflexive_address() else {
        return ProbeResult::Error { code: None, reason: "success response without a mapped address".into() };
    };
    let other_address = message.attributes.iter().find_map(|a| match a {
        Attribute::OtherAddress(o) => Some(*o),
        _ => None,
    });
    ProbeResult::Answered { mapped, from, other_address, rtt_ms }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netcheck::classify::classify;
    use crate::netcheck::classify::tests::{A, A_ALT, LOCAL, X1, from_alt, sa, scenario};

    #[test]
    fn responses_become_results() {
        let from = sa(A);
        let ok = Message::binding_success([1; 12], sa(X1)).with(Attribute::OtherAddress(sa(A_ALT)));
        assert_eq!(
            result_of(&ok, from, 2.0),
            ProbeResult::Answered { mapped: sa(X1), from, other_address: Some(sa(A_ALT)), rtt_ms: 2.0 }
        );
        let err = Message::binding_error([1; 12], 420, "Unknown Attribute");
        assert_eq!(
            result_of(&err, from, 2.0),
            ProbeResult::Error { code: Some(420), reason: "Unknown Attribute".into() }
        );
        let mut bare = Message::binding_success([1; 12], sa(X1));
        bare.attributes.clear();
        assert!(matches!(result_of(&bare, from, 2.0), ProbeResult::Error { code: None, .. }));
        let strange = Message::binding_success([1; 12], sa(X1)).with(Attribute::Unknown { typ: 0x7777, value: vec![] });
        assert!(matches!(result_of(&strange, from, 2.0), ProbeResult::Error { code: None, .. }));
    }

    #[test]
    fn report_renders_as_text_and_json() {
        let probes = scenario(Some(X1), from_alt(), Some(X1));
        let c = classify(&probes);
        let report = Report {
            local: sa(LOCAL),
            reflexive: sa(X1),
            primary: "a".into(),
            mapping: c.mapping,
            filtering: c.filtering,
            notes: c.notes,
            probes,
            ignored: 2,
        };
        let text = report.to_string();
        assert!(text.contains("Reflexive address: 192.0.2.7:40000"), "{text}");
        assert!(text.contains("Mapping: endpoint-independent"), "{text}");
        assert!(text.contains("Filtering: endpoint-independent or address-dependent"), "{text}");
        assert!(text.contains("single IP address"), "{text}");
        assert!(text.contains("timeout") || text.contains("ms, mapped"), "{text}");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["local"], LOCAL);
        assert_eq!(json["reflexive"], X1);
        assert_eq!(json["mapping"], "endpoint_independent");
        assert_eq!(json["filtering"], "endpoint_independent_or_address_dependent");
        assert_eq!(json["ignored"], 2);
        assert_eq!(json["probes"][0]["test"], "binding");
        assert_eq!(json["probes"][0]["result"]["status"], "answered");
        assert_eq!(json["probes"][0]["result"]["mapped"], X1);
    }
}
