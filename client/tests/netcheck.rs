//! `meshvpn netcheck` against fake relays on loopback: real sockets, answers made by
//! `cellproto::stun::server::reply` exactly as a relay makes them. A NAT cannot be built on loopback, so
//! the fakes simulate one where needed by reporting a rewritten reflexive address.
//!
//! Timing is not asserted here beyond loose bounds: the retransmission schedule and the end of
//! a phase are tested with made-up instants in `netcheck::exchange`. A phase ends as soon as
//! every request is answered, so the generous timeout below costs only the tests in which a
//! relay stays silent, and an answer delayed by a loaded machine does not change a result.

use meshvpn::netcheck::{Filtering, Mapping, Options, ProbeResult, StunServer, Test, run};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a fake relay does with CHANGE-REQUEST change-port.
#[derive(Clone, Copy, PartialEq)]
enum ChangePort {
    /// Answer from the other port, as relayd does.
    Honour,
    /// Send nothing: what the client sees behind an address-and-port-dependent filter.
    Drop,
    /// Answer from the port the request came to, as a server that ignores the flag.
    Ignore,
}

/// How a fake relay behaves.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Listen on an alternate port too, announced as OTHER-ADDRESS.
    alternate: bool,
    change_port: ChangePort,
    /// The reflexive address to report, from the real source and the port asked: how a NAT
    /// in front of the client would have rewritten it.
    nat: fn(SocketAddr, SocketAddr) -> SocketAddr,
    /// Before each answer, send datagrams that are not answers to anything.
    garbage: bool,
    /// Never answer.
    silent: bool,
}

fn no_nat(from: SocketAddr, _to: SocketAddr) -> SocketAddr {
    from
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour { alternate: true, change_port: ChangePort::Honour, nat: no_nat, garbage: false, silent: false }
    }
}

/// A relay's STUN service on `ip`, stopped on drop.
struct FakeRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeRelay {
    fn start(ip: &str, behaviour: Behaviour) -> FakeRelay {
        let primary = UdpSocket::bind((ip, 0)).unwrap();
        let addr = primary.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        if behaviour.alternate {
            let alt = UdpSocket::bind((ip, 0)).unwrap();
            let (p2, a2) = (primary.try_clone().unwrap(), alt.try_clone().unwrap());
            threads.push(serve(alt, Some(p2), behaviour, stop.clone()));
            threads.push(serve(primary, Some(a2), behaviour, stop.clone()));
        } else {
            threads.push(serve(primary, None, behaviour, stop.clone()));
        }
        FakeRelay { addr, stop, threads }
    }

    fn server(&self, name: &str) -> StunServer {
        StunServer { name: name.into(), addr: self.addr }
    }
}

impl Drop for FakeRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Answers Binding requests arriving on `socket`; `other` is the relay's other socket.
fn serve(socket: UdpSocket, other: Option<UdpSocket>, b: Behaviour, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        socket.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let local = socket.local_addr().unwrap();
        let other_addr = other.as_ref().map(|o| o.local_addr().unwrap());
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
            if b.silent {
                continue;
            }
            if b.garbage {
                for junk in garbage() {
                    socket.send_to(&junk, from).unwrap();
                }
            }
            let Some(answer) = cellproto::stun::server::reply((b.nat)(from, local), local, other_addr, &buf[..n])
            else {
                continue;
            };
            let out = match (answer.from_other, b.change_port, &other) {
                (true, ChangePort::Drop, _) => continue,
                (true, ChangePort::Honour, Some(other)) => other,
                _ => &socket,
            };
            out.send_to(&answer.data, from).unwrap();
        }
    })
}

/// Datagrams that are not answers: not STUN, truncated STUN, an answer to a transaction
/// nobody started, a request, a response with a bad fingerprint.
fn garbage() -> Vec<Vec<u8>> {
    use cellproto::stun::Message;
    let encode = |m: Message| {
        let mut out = [0u8; 128];
        let n = m.encode(&mut out, true).unwrap();
        out[..n].to_vec()
    };
    let foreign = encode(Message::binding_success([0xee; 12], "192.0.2.1:1".parse().unwrap()));
    let mut bad_crc = foreign.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    vec![
        b"hello, not STUN".to_vec(),
        foreign[..20].to_vec(),
        foreign,
        encode(Message::binding_request([0xdd; 12])),
        bad_crc,
        Vec::new(),
    ]
}

/// Per phase. Answers on loopback come in microseconds; this leaves room for a loaded machine.
fn fast() -> Options {
    Options { timeout: Duration::from_secs(2), ..Options::default() }
}

/// Slack for the loose upper bounds on a run's duration (the exact schedule is a unit test).
const SLACK: Duration = Duration::from_secs(10);

#[test]
fn loopback_has_no_nat_and_open_filtering() {
    let a = FakeRelay::start("127.0.0.1", Behaviour::default());
    let b = FakeRelay::start("127.0.0.2", Behaviour { alternate: false, ..Behaviour::default() });
    let report = run(&[a.server("alpha"), b.server("beta")], &fast()).unwrap();
    assert_eq!(report.mapping, Mapping::NoNat, "{report}");
    assert_eq!(report.filtering, Filtering::EndpointIndependentOrAddressDependent, "{report}");
    assert_eq!(report.reflexive, report.local);
    assert_eq!(report.local.ip().to_string(), "127.0.0.1");
    assert_eq!(report.primary, "alpha");
    assert_eq!(report.ignored, 0);
    let tests: Vec<Test> = report.probes.iter().map(|p| p.test).collect();
    assert_eq!(tests, [Test::Binding, Test::Binding, Test::ChangePort, Test::OtherAddress]);
    assert!(report.probes.iter().all(|p| matches!(p.result, ProbeResult::Answered { .. })), "{report}");
    // The change-port answer came from the other port.
    let ProbeResult::Answered { from, .. } = report.probes[2].result else { unreachable!() };
    assert_eq!((from.ip(), from == a.addr), (a.addr.ip(), false));

    let text = report.to_string();
    assert!(text.contains("Mapping: none (no NAT)"), "{text}");
    assert!(text.contains("alpha") && text.contains("beta"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    for field in ["local", "reflexive", "mapping", "filtering", "probes", "ignored"] {
        assert!(json.get(field).is_some(), "no {field} in {json}");
    }
    assert_eq!(json["mapping"], "no_nat");
}

#[test]
fn simulated_address_dependent_mapping() {
    // B, at the other IP, sees another port: the NAT picked a new mapping for it.
    let a = FakeRelay::start("127.0.0.1", Behaviour::default());
    let nat = |from: SocketAddr, _| SocketAddr::new(from.ip(), from.port().wrapping_add(1));
    let b = FakeRelay::start("127.0.0.2", Behaviour { alternate: false, nat, ..Behaviour::default() });
    let report = run(&[a.server("a"), b.server("b")], &fast()).unwrap();
    assert_eq!(report.mapping, Mapping::AddressDependent, "{report}");
}

#[test]
fn relay_with_alternate_port_is_primary_wherever_listed() {
    let plain = FakeRelay::start("127.0.0.2", Behaviour { alternate: false, ..Behaviour::default() });
    let full = FakeRelay::start("127.0.0.1", Behaviour { change_port: ChangePort::Drop, ..Behaviour::default() });
    let report = run(&[plain.server("plain"), full.server("full")], &fast()).unwrap();
    assert_eq!(report.primary, "full", "{report}");
    assert_eq!(report.filtering, Filtering::AddressAndPortDependent, "{report}");
    assert_eq!(report.probes.len(), 4, "{report}");
}

#[test]
fn simulated_address_and_port_dependent_mapping_and_filtering() {
    // Every destination port gets its own mapping, and the other port's answers are filtered.
    let nat = |from: SocketAddr, to: SocketAddr| SocketAddr::new(from.ip(), from.port() ^ (to.port() & 0xff));
    let a = FakeRelay::start("127.0.0.1", Behaviour { nat, change_port: ChangePort::Drop, ..Behaviour::default() });
    let options = fast();
    let started = Instant::now();
    let report = run(&[a.server("a")], &options).unwrap();
    assert_eq!(report.mapping, Mapping::AddressAndPortDependent, "{report}");
    assert_eq!(report.filtering, Filtering::AddressAndPortDependent, "{report}");
    assert_eq!(report.probes[1].result, ProbeResult::Timeout);
    // Three phases at most (a loose bound: the exact schedule is tested in netcheck::exchange).
    assert!(started.elapsed() < options.timeout * 3 + SLACK, "{:?}", started.elapsed());
}

#[test]
fn without_alternate_port_filtering_is_not_determined() {
    let a = FakeRelay::start("127.0.0.1", Behaviour { alternate: false, ..Behaviour::default() });
    let nat = |from: SocketAddr, _| SocketAddr::new(from.ip(), from.port().wrapping_add(7));
    let b = FakeRelay::start("127.0.0.2", Behaviour { alternate: false, nat, ..Behaviour::default() });
    let report = run(&[a.server("a"), b.server("b")], &fast()).unwrap();
    assert_eq!(report.mapping, Mapping::AddressDependentOrStricter, "{report}");
    assert_eq!(report.filtering, Filtering::NotDetermined, "{report}");
    assert!(report.notes.iter().any(|n| n.contains("OTHER-ADDRESS")), "{report}");
    assert_eq!(report.probes.len(), 2);
}

#[test]
fn change_request_ignored_is_not_determined() {
    let a = FakeRelay::start("127.0.0.1", Behaviour { change_port: ChangePort::Ignore, ..Behaviour::default() });
    let report = run(&[a.server("a")], &fast()).unwrap();
    assert_eq!(report.filtering, Filtering::NotDetermined, "{report}");
    assert!(report.notes.iter().any(|n| n.contains("ignored CHANGE-REQUEST")), "{report}");
}

#[test]
fn garbage_is_ignored_and_counted() {
    let a = FakeRelay::start("127.0.0.1", Behaviour { garbage: true, ..Behaviour::default() });
    let report = run(&[a.server("a")], &fast()).unwrap();
    assert_eq!(report.mapping, Mapping::NoNat, "{report}");
    assert_eq!(report.reflexive, report.local);
    // Six junk datagrams before each of the three answers; all but the empty one might race
    // with the end of a phase, so only the first phase's are sure to be read.
    assert!(report.ignored >= 6, "{report}");
    assert!(report.to_string().contains("Ignored datagrams"), "{report}");
}

#[test]
fn silent_relays_fail_within_the_bound() {
    let a = FakeRelay::start("127.0.0.1", Behaviour { silent: true, ..Behaviour::default() });
    let b = FakeRelay::start("127.0.0.2", Behaviour { silent: true, ..Behaviour::default() });
    let options = Options { timeout: Duration::from_millis(300), ..Options::default() };
    let started = Instant::now();
    let err = run(&[a.server("quiet-a"), b.server("quiet-b")], &options).unwrap_err().to_string();
    let elapsed = started.elapsed();
    // It waited the whole phase (nothing can answer sooner), and gave up (a loose bound).
    assert!(elapsed >= options.timeout && elapsed < options.timeout + SLACK, "{elapsed:?}");
    assert!(err.contains("unreachable") && err.contains("quiet-a") && err.contains("quiet-b"), "{err}");
    assert!(err.contains(&a.addr.to_string()) && err.contains("timeout"), "{err}");
}

#[test]
fn one_silent_relay_is_reported_as_timeout() {
    let a = FakeRelay::start("127.0.0.1", Behaviour { silent: true, ..Behaviour::default() });
    let b = FakeRelay::start("127.0.0.2", Behaviour::default());
    let report = run(&[a.server("quiet"), b.server("loud")], &fast()).unwrap();
    assert_eq!(report.primary, "loud");
    assert_eq!(report.probes[0].result, ProbeResult::Timeout);
    assert!(report.to_string().contains("timeout"), "{report}");
}

#[test]
fn no_servers_is_an_error() {
    let err = run(&[], &fast()).unwrap_err().to_string();
    assert!(err.contains("no STUN servers"), "{err}");
}

#[test]
fn other_family_is_skipped() {
    let a = FakeRelay::start("127.0.0.1", Behaviour { alternate: false, ..Behaviour::default() });
    let v6 = StunServer { name: "six".into(), addr: "[::1]:9".parse().unwrap() };
    let report = run(&[v6, a.server("four")], &fast()).unwrap();
    assert!(matches!(report.probes[0].result, ProbeResult::Skipped { .. }), "{report}");
    assert_eq!(report.primary, "four");
}
