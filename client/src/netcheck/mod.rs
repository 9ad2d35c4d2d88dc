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
//!
//! | module | concern |
//! | --- | --- |
//! | `exchange.rs` | one phase's requests, retransmissions and answers, sans-IO |
//! | `classify.rs` | server A, mapping and filtering from the results (pure) |
//! | `report.rs` | probes, results, the report as text and JSON |
//! | this file | the phases, over one socket |

mod classify;
mod exchange;
mod report;

pub use classify::{Classification, Filtering, Mapping, classify};
pub use exchange::{Exchange, Outcome, RETRANSMISSIONS};
pub use report::{Probe, ProbeResult, Report, Test};

use anyhow::{Context, bail};
use cellproto::stun::{Attribute, Message};
use classify::{choose_primary, probed};
use rand_core::{OsRng, RngCore};
use report::brief;
use std::collections::HashSet;
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

    report(probes, prober.ignored)
}

/// The report on `probes` (phase 1 at least, in the order sent): server A's reflexive address
/// and the classification. Fails, naming each relay's outcome, if no relay answered.
pub fn report(probes: Vec<Probe>, ignored: u64) -> anyhow::Result<Report> {
    let Some(a) = choose_primary(&probes) else {
        let list: Vec<String> =
            probes.iter().map(|p| format!("{} ({}): {}", p.server, p.addr, brief(&p.result))).collect();
        bail!("netcheck: no relay answered STUN, the relays are unreachable: {}", list.join(", "));
    };
    let Classification { mapping, filtering, notes } = classify(&probes);
    let (local, reflexive) = (probes[a].local, probes[a].mapped().unwrap_or(probes[a].local));
    let primary = probes[a].server.clone();
    Ok(Report { local, reflexive, primary, mapping, filtering, notes, probes, ignored })
}

/// This host's address as `to` sees it without NAT: the bound port, and the bound IP or, if
/// that is unspecified, the source IP the kernel routes from towards `to` (learnt by connecting
/// a throwaway socket, which sends nothing).
pub fn local_towards(bound: SocketAddr, to: SocketAddr) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let routed = UdpSocket::bind(SocketAddr::new(bound.ip(), 0))
        .and_then(|s| s.connect(to).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(bound.ip());
    SocketAddr::new(routed, bound.port())
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
        Probe { server: server.name.clone(), addr: to, local: local_towards(self.bound, to), test, result }
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
