//! `meshvpn netcheck`: STUN (RFC 8489) against relays to learn this machine's reflexive
//! address, and RFC 5780 behaviour discovery for the NAT in front of it, reported in the terms
//! of RFC 4787 (endpoint-independent, address-dependent, address-and-port-dependent).
//!
//! Everything runs from one local UDP socket, because NAT mappings belong to a local port: a
//! second socket would be a second mapping and would say nothing about the first. The probes go
//! in three phases, in this order because a NAT's filter remembers whom we sent to:
//!
//! 1. a Binding request to every relay at once (RFC 5780 test I, and test II against the relays
//!    with another IP), which gives the reflexive address and picks the primary relay A;
//! 2. if A announced OTHER-ADDRESS, a Binding request to A with CHANGE-REQUEST change-port (the
//!    filtering test). It must come before anything is sent to A's other port, or the NAT would
//!    already let that port's answers in, whatever its filtering;
//! 3. then a plain Binding request to A's other address (test III, the mapping towards the
//!    same IP on another port), which also shows whether that port is reachable at all.
//!
//! Each phase waits at most [`Options::timeout`], so a run takes at most three times that. The
//! I/O ([`run`]) is separate from the judgement ([`classify`]), a pure function over the
//! [`Probe`] results, so every classification can be tested without a NAT.

mod exchange;

use anyhow::{Context, bail};
use cellproto::stun::{Attribute, Class, Message};
use exchange::{Exchange, Outcome};
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Largest datagram we read; STUN answers from relays are a few hundred bytes, and anything
/// longer is not a relay's answer anyway (it is read truncated and then ignored).
const MAX_DATAGRAM: usize = 1500;
/// Longest a phase may wait, whatever [`Options::timeout`] says.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// A STUN server to probe: a relay's nickname and its UDP address (relays answer STUN on
/// their cell port; some also on an alternate port announced as OTHER-ADDRESS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunServer {
    /// The relay's nickname, for the report.
    pub name: String,
    /// Where to send Binding requests.
    pub addr: SocketAddr,
}

/// How to run the probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// How long one phase waits for its answers, retransmissions included (at most 60 s). The
    /// first send is at 0, retransmissions at 1/10, 3/10 and 7/10 of it (doubling intervals,
    /// as RFC 8489 §6.2.1 does); a run has at most three phases.
    pub timeout: Duration,
    /// Local address to bind; `None` binds the unspecified address of the servers' family on
    /// an ephemeral port, as the data path does.
    pub bind: Option<SocketAddr>,
}

impl Default for Options {
    /// One second per phase: the whole run takes at most three seconds.
    fn default() -> Self {
        Options { timeout: Duration::from_secs(1), bind: None }
    }
}

/// NAT mapping behaviour (RFC 4787 §4.1): when is the same local address given the same
/// reflexive address?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// Which RFC 5780 test a probe was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    fn mapped(&self) -> Option<SocketAddr> {
        match self.result {
            ProbeResult::Answered { mapped, .. } => Some(mapped),
            _ => None,
        }
    }

    /// The OTHER-ADDRESS the relay announced, if any and if it is really another address.
    fn other_address(&self) -> Option<SocketAddr> {
        match self.result {
            ProbeResult::Answered { other_address: Some(o), .. } if o != self.addr => Some(o),
            _ => None,
        }
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

/// What netcheck found.
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// Probes `servers` with the default [`Options`] (at most three seconds) and classifies the
/// NAT.
pub fn run_blocking(servers: &[StunServer]) -> anyhow::Result<Report> {
    run(servers, &Options::default())
}

/// Probes `servers` (in order of preference for the primary relay) and classifies the NAT.
///
/// Fails if `servers` is empty, if the socket cannot be bound, or if no relay answered.
pub fn run(servers: &[StunServer], options: &Options) -> anyhow::Result<Report> {
    if servers.is_empty() {
        bail!("netcheck: no STUN servers to probe (the relay directory lists none)");
    }
    // One socket has one family. IPv4 first when there is a choice: that is where NATs are.
    let bind = options.bind.unwrap_or_else(|| {
        let v4 = servers.iter().any(|s| s.addr.is_ipv4());
        let ip = if v4 { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
        SocketAddr::new(ip, 0)
    });
    let socket = UdpSocket::bind(bind).with_context(|| format!("netcheck: binding a UDP socket on {bind}"))?;
    let mut prober = Prober {
        bound: socket.local_addr().context("netcheck: local address of the UDP socket")?,
        socket,
        timeout: options.timeout,
        issued: HashSet::new(),
        ignored: 0,
    };

    // Phase 1: tests I and II, to every relay of our family at once.
    let mut probes: Vec<Probe> = Vec::new();
    let mut requests = Vec::new();
    for s in servers {
        if s.addr.is_ipv4() != prober.bound.is_ipv4() {
            let reason = format!("the socket is {}", if prober.bound.is_ipv4() { "IPv4" } else { "IPv6" });
            probes.push(prober.probe(s, s.addr, Test::Binding, ProbeResult::Skipped { reason }));
        } else {
            requests.push((probes.len(), Message::binding_request(prober.new_id()?)));
            probes.push(prober.probe(s, s.addr, Test::Binding, ProbeResult::Timeout));
        }
    }
    prober.exchange(&mut probes, requests)?;

    let Some(a) = choose_primary(&probes) else {
        let list: Vec<String> =
            probes.iter().map(|p| format!("{} ({}): {}", p.server, p.addr, brief(&p.result))).collect();
        bail!("netcheck: no relay answered STUN, the relays are unreachable: {}", list.join(", "));
    };
    let primary = StunServer { name: probes[a].server.clone(), addr: probes[a].addr };

    // Phases 2 and 3, only if A has an alternate address we have not yet sent to: once the
    // NAT has seen us send there, its answers get in whatever the filtering.
    if let Some(other) = probes[a].other_address().filter(|o| !probed(&probes, *o)) {
        let change = Message::binding_request(prober.new_id()?)
            .with(Attribute::ChangeRequest { change_ip: false, change_port: true });
        let requests = vec![(probes.len(), change)];
        probes.push(prober.probe(&primary, primary.addr, Test::ChangePort, ProbeResult::Timeout));
        prober.exchange(&mut probes, requests)?;

        let requests = vec![(probes.len(), Message::binding_request(prober.new_id()?))];
        probes.push(prober.probe(&primary, other, Test::OtherAddress, ProbeResult::Timeout));
        prober.exchange(&mut probes, requests)?;
    }

    let Classification { mapping, filtering, notes } = classify(&probes);
    let (local, reflexive) = (probes[a].local, probes[a].mapped().unwrap_or(probes[a].local));
    Ok(Report { local, reflexive, primary: primary.name, mapping, filtering, notes, probes, ignored: prober.ignored })
}

/// One word or so on a result, for the "unreachable" error.
fn brief(result: &ProbeResult) -> String {
    match result {
        ProbeResult::Answered { .. } => "answered".into(),
        ProbeResult::Error { code: Some(code), reason } => format!("error {code} {reason}"),
        ProbeResult::Error { code: None, reason } => reason.clone(),
        ProbeResult::Timeout => "timeout".into(),
        ProbeResult::Skipped { reason } => format!("skipped, {reason}"),
    }
}

/// Whether phase 1 sent a Binding request to `addr` (as to a relay of its own). Test III's
/// request does not count: it comes after the filtering test, so it spoils nothing.
fn probed(probes: &[Probe], addr: SocketAddr) -> bool {
    probes.iter().any(|p| p.addr == addr && p.test == Test::Binding && !matches!(p.result, ProbeResult::Skipped { .. }))
}

/// RFC 5780's server A: the first relay that answered a Binding request, preferring one with an
/// alternate address we have not sent to (it can run the filtering test and test III).
/// [`run`] and [`classify`] both use it, so they agree on A.
fn choose_primary(probes: &[Probe]) -> Option<usize> {
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

/// The socket and the bookkeeping shared by the phases.
struct Prober {
    socket: UdpSocket,
    bound: SocketAddr,
    timeout: Duration,
    /// Every transaction id sent, so that late answers to an earlier phase (a retransmission
    /// answered twice) are not counted as foreign.
    issued: HashSet<[u8; 12]>,
    ignored: u64,
}

impl Prober {
    /// A fresh random transaction id (RFC 8489 §6: uniformly random, so answers cannot be
    /// forged blind).
    fn new_id(&mut self) -> anyhow::Result<[u8; 12]> {
        let mut id = [0u8; 12];
        OsRng.try_fill_bytes(&mut id).map_err(|e| anyhow::anyhow!("netcheck: random transaction id: {e}"))?;
        self.issued.insert(id);
        Ok(id)
    }

    /// A probe record for a request to `to` on behalf of `server`.
    fn probe(&self, server: &StunServer, to: SocketAddr, test: Test, result: ProbeResult) -> Probe {
        Probe { server: server.name.clone(), addr: to, local: self.local_towards(to), test, result }
    }

    /// Our address as `to` sees it without NAT: the bound port, and the bound IP or, if that is
    /// unspecified, the source IP the kernel routes from towards `to` (learnt by connecting a
    /// throwaway socket, which sends nothing).
    fn local_towards(&self, to: SocketAddr) -> SocketAddr {
        if !self.bound.ip().is_unspecified() {
            return self.bound;
        }
        let routed = UdpSocket::bind(SocketAddr::new(self.bound.ip(), 0))
            .and_then(|s| s.connect(to).and_then(|()| s.local_addr()))
            .map(|a| a.ip())
            .unwrap_or(self.bound.ip());
        SocketAddr::new(routed, self.bound.port())
    }

    /// Sends `requests` (probe index, message), retransmits, and fills in the probes' results
    /// from the answers, all within `self.timeout`: the I/O around one [`Exchange`], which
    /// decides what is sent when and what each answer means. Unanswered probes keep their
    /// `Timeout`.
    fn exchange(&mut self, probes: &mut [Probe], requests: Vec<(usize, Message)>) -> anyhow::Result<()> {
        let requests = requests.into_iter().map(|(i, m)| (i, probes[i].addr, m)).collect();
        let mut phase = Exchange::new(requests, Instant::now(), self.timeout.min(MAX_TIMEOUT))
            .context("netcheck: encoding a Binding request")?;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let now = Instant::now();
            while let Some((i, to, request)) = phase.poll_transmit(now) {
                if let Err(e) = self.socket.send_to(request, to) {
                    let probe = phase.send_failed(i);
                    probes[probe].result = ProbeResult::Error { code: None, reason: format!("send to {to}: {e}") };
                }
            }
            let Some(wake) = phase.poll_timeout(now) else { return Ok(()) };
            // A zero read timeout is an error for std, hence the floor.
            let wait = wake.saturating_duration_since(now).max(Duration::from_millis(1));
            self.socket.set_read_timeout(Some(wait)).context("netcheck: socket read timeout")?;
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => match phase.handle(Instant::now(), &buf[..n], from, &self.issued) {
                    Outcome::Answer { probe, result } => probes[probe].result = result,
                    Outcome::Ignored => self.ignored += 1,
                    Outcome::Expected => {}
                },
                // Timeouts, and ICMP errors some kernels report on unconnected sockets: the
                // deadline decides when to stop, not these.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock
                            | ErrorKind::TimedOut
                            | ErrorKind::Interrupted
                            | ErrorKind::ConnectionRefused
                            | ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => return Err(e).context("netcheck: receiving STUN answers"),
            }
        }
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

    const A: &str = "198.51.100.1:3478";
    const A_ALT: &str = "198.51.100.1:3479";
    const B: &str = "203.0.113.9:3478";
    const LOCAL: &str = "192.168.1.5:40000";
    const X1: &str = "192.0.2.7:40000";
    const X_OTHER: &str = "192.0.2.7:40001";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn answered(server: &str, addr: &str, test: Test, mapped: &str, from: &str, other: Option<&str>) -> Probe {
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

    fn failed(server: &str, addr: &str, test: Test, result: ProbeResult) -> Probe {
        Probe { server: server.into(), addr: sa(addr), local: sa(LOCAL), test, result }
    }

    /// A's Binding answer (with OTHER-ADDRESS), B's answer, A's change-port outcome, A's test
    /// III answer, as a scenario.
    fn scenario(b: Option<&str>, change: Option<ProbeResult>, x3: Option<&str>) -> Vec<Probe> {
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

    fn from_alt() -> Option<ProbeResult> {
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
