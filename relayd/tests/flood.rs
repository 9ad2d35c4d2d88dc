//! Floods and spoofing on loopback (every source is an address of 127.0.0.0/8, which Linux
//! lets a socket bind to): a spoofed CREATE flood under load costs no handshake while honest
//! clients still build (they resend with the cookie), an exempt address spoofed under load
//! gets nothing either, the global circuit cap, and the STUN rate limit per source.
//!
//! "Spoofed" here means what the relay cannot tell apart from spoofing: sources that send and
//! never read an answer. Every wait is bounded; ordering, not sleeping, decides the results:
//! the control thread handles CREATEs in order, so once an honest client's circuit is built,
//! every CREATE queued before it has been handled.

mod common;

use cellproto::cell::CELL_LEN;
use cellproto::handshake::{ClientHandshake, ClientRequest, RelayKeys};
use cellproto::link::encode_create;
use common::*;
use rand_core::OsRng;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Handshakes the relay has computed (each costs three X25519 operations).
fn handshakes(m: &HashMap<String, f64>) -> f64 {
    m.get("relayd_handshakes_total{result=\"ok\"}").copied().unwrap_or(0.0)
        + m.get("relayd_handshakes_total{result=\"failed\"}").copied().unwrap_or(0.0)
}

fn under_load(m: &HashMap<String, f64>) -> bool {
    m.get("relayd_under_load").copied().unwrap_or(0.0) == 1.0
}

/// Sockets bound to `count` loopback sources 127.0.`net`.1.. (never read: spoofed sources).
fn spoofers(net: u8, count: u8) -> Vec<UdpSocket> {
    (1..=count).map(|i| UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, net, i), 0)).unwrap()).collect()
}

/// One CREATE handshake message, replayed with a different reply LCID each time.
struct Replayer {
    message: Vec<u8>,
    next: u32,
}

impl Replayer {
    fn new(keys: &RelayKeys) -> Self {
        let req = ClientRequest { hop: 1, offer_aes: true, link_secret: None };
        let hs = ClientHandshake::start(keys, &req, &mut OsRng).unwrap();
        Self { message: hs.message().to_vec(), next: 0x4000_0000 }
    }

    fn send(&mut self, from: &UdpSocket, to: SocketAddr) {
        let mut cell = [0u8; CELL_LEN];
        let message = self.message.as_slice().try_into().unwrap();
        encode_create(&mut cell, self.next, message, None, None, &mut OsRng);
        self.next += 1;
        let _ = from.send_to(&cell, to);
    }
}

/// A flood in the background: replayed CREATEs from `sources`, about `per_ms` every
/// millisecond, until dropped (or after 60 s).
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(sources: Vec<UdpSocket>, keys: &RelayKeys, to: SocketAddr, per_ms: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let mut replay = Replayer::new(keys);
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut next = sources.iter().cycle();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                for _ in 0..per_ms {
                    replay.send(next.next().unwrap(), to);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the relay is under load (bounded), then builds an honest circuit from
/// `honest`: once it is built, every flooded CREATE queued before its CREATE has been handled.
/// Returns whether the relay went under load and the handshake count then.
fn barrier(r: &TestRelay, honest: &str) -> (bool, f64) {
    let maddr = r.handle.metrics_addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut loaded = under_load(&metrics(maddr));
    while !loaded && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        loaded = under_load(&metrics(maddr));
    }
    let mut client = UdpClient::new(honest, vec![r.hop]);
    client.build(Duration::from_secs(30));
    assert!(client.ping(1, 1), "honest circuit does not work");
    (loaded, handshakes(&metrics(maddr)))
}

/// Polls the metrics until `ok` holds for them (bounded); returns the last reading.
fn metrics_until(r: &TestRelay, ok: impl Fn(&HashMap<String, f64>) -> bool) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(r.handle.metrics_addr.unwrap());
        if ok(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The attack: a relay is flooded with replayed CREATEs from many spoofed sources. Under load
/// they must get a COOKIE, not a handshake; an honest client resends with the cookie and builds.
#[test]
fn spoofed_create_flood_under_load_costs_no_handshakes() {
    let r = start_relay("spoofflood", 2, "auto", "[metrics]\nlisten = \"127.0.0.1:1\"\n");
    // 3 CREATEs a millisecond from 100 sources: well above the default 1,000 a second.
    let flood = Flood::start(spoofers(1, 100), &r.hop.keys, r.hop.addr, 3);
    let (loaded, before) = barrier(&r, "127.0.0.2:0");
    // Under load now (the flood keeps it there): one more honest client (a new source) builds.
    let mut client = UdpClient::new("127.0.0.3:0", vec![r.hop]);
    client.build(Duration::from_secs(30));
    assert!(client.ping(1, 2));
    // Worker counters are published every 100 ms and a loaded machine floods slowly: wait (with
    // the flood still on) until the relay has answered a hundred COOKIEs, then judge.
    let m = metrics_until(&r, |m| sum(m, "relayd_cookies_total", "result=\"sent\"") >= 100.0);
    drop(flood);
    assert_eq!(handshakes(&m) - before, 1.0, "spoofed CREATEs cost handshakes under load");
    assert!(under_load(&m), "the relay left load during the flood");
    assert!(loaded, "the relay never went under load");
    assert!(sum(&m, "relayd_cookies_total", "result=\"sent\"") >= 100.0, "COOKIEs answered");
    let m = metrics_until(&r, |m| sum(m, "relayd_cookies_total", "result=\"valid\"") >= 2.0);
    assert!(sum(&m, "relayd_cookies_total", "result=\"valid\"") >= 2.0, "the honest clients' cookies");
    r.handle.shutdown();
}

/// The attack: `limits.exempt` holds the other relays' addresses; a flooder spoofs one of them
/// to skip the limits. Under load an exempt source needs a cookie like anyone else.
#[test]
fn spoofed_exempt_source_under_load_gets_no_handshakes() {
    let r = start_relay(
        "exemptspoof",
        2,
        "auto",
        "[limits]\nexempt = [\"127.0.0.0/8\"]\n[metrics]\nlisten = \"127.0.0.1:1\"\n",
    );
    // One exempt source (no per-source limit applies to it), never reading: spoofed.
    let flood = Flood::start(spoofers(4, 1), &r.hop.keys, r.hop.addr, 3);
    let (loaded, before) = barrier(&r, "127.0.0.2:0");
    // An honest exempt relay (it reads the cookie) still builds.
    let mut client = UdpClient::new("127.0.0.3:0", vec![r.hop]);
    client.build(Duration::from_secs(30));
    let m = metrics(r.handle.metrics_addr.unwrap());
    drop(flood);
    assert_eq!(handshakes(&m) - before, 1.0, "a spoofed exempt source got handshakes under load");
    assert!(loaded, "the relay never went under load");
    r.handle.shutdown();
}

/// The attack: many sources, each within its own limits, together hold more circuits than the
/// relay can afford. `limits.max_circuits` caps them all, exempt sources included.
#[test]
fn circuits_beyond_the_global_cap_are_refused() {
    let r = start_relay(
        "globalcap",
        2,
        "auto",
        "[limits]\nmax_circuits = 5\nexempt = [\"127.0.0.0/8\"]\n[metrics]\nlisten = \"127.0.0.1:1\"\n",
    );
    let maddr = r.handle.metrics_addr.unwrap();
    let mut clients = Vec::new();
    for i in 0..5u8 {
        let mut c = UdpClient::new(&format!("127.0.5.{}:0", i + 1), vec![r.hop]);
        c.build(Duration::from_secs(10));
        clients.push(c);
    }
    let mut late = UdpClient::new("127.0.5.9:0", vec![r.hop]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !late.circuit.is_open() {
        let _ = late.recv_event(Duration::from_millis(50));
    }
    assert!(!late.circuit.is_open(), "a sixth circuit was built over max_circuits = 5");
    let m = metrics(maddr);
    assert!(m["relayd_creates_refused_total{reason=\"circuit_cap\"}"] >= 1.0);
    assert_eq!(m["relayd_circuit_cap{what=\"limit\"}"], 5.0);
    assert_eq!(m["relayd_circuit_cap{what=\"used\"}"], 5.0);
    assert!(clients.iter_mut().all(|c| c.ping(1, 3)), "circuits under the cap keep working");
    r.handle.shutdown();
}

/// The attack: a 20-byte STUN request gets up to 124 bytes back (amplification towards a
/// spoofed source). A flood from one source gets at most the bucket (burst, then the rate).
#[test]
fn stun_flood_from_one_source_gets_at_most_the_bucket() {
    use cellproto::stun::Message;
    // The defaults: 10 answers per second per source, burst 20.
    let r = start_relay("stunflood", 2, "auto", "[metrics]\nlisten = \"127.0.0.1:1\"\n");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let started = Instant::now();
    for i in 0..200u32 {
        let mut req = [0u8; 64];
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let n = Message::binding_request(id).encode(&mut req, true).unwrap();
        sock.send_to(&req[..n], r.hop.addr).unwrap();
    }
    let mut answers = 0;
    let mut buf = [0u8; 512];
    while sock.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    let allowed = 20 + (10.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(answers >= 20, "the burst was not answered: {answers}");
    assert!(answers <= allowed, "{answers} answers to one source, the bucket allows {allowed}");
    // Another source is unaffected.
    let other = UdpSocket::bind("127.0.0.2:0").unwrap();
    other.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut req = [0u8; 64];
    let n = Message::binding_request([9; 12]).encode(&mut req, true).unwrap();
    other.send_to(&req[..n], r.hop.addr).unwrap();
    assert!(other.recv_from(&mut buf).is_ok(), "another source got no STUN answer");
    // Worker counters are published every 100 ms: wait until the drops are counted.
    let m = metrics_until(&r, |m| sum(m, "relayd_drops_total", "reason=\"stun_limit\"") >= 150.0);
    assert!(sum(&m, "relayd_drops_total", "reason=\"stun_limit\"") >= 150.0);
    r.handle.shutdown();
}

/// A client that does receive (not spoofed) gets its cookies, but they do not lift the
/// per-source limits: a flood of cookie'd CREATEs from one source is cut at the burst.
#[test]
fn cookies_do_not_lift_per_source_limits() {
    use cellproto::link::decode_cookie_reply;
    let r =
        start_relay("cookieflood", 2, "auto", "[limits]\nload_create_rate = 0\n[metrics]\nlisten = \"127.0.0.1:1\"\n");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut replay = Replayer::new(&r.hop.keys);
    let message: [u8; cellproto::handshake::CREATE_LEN] = replay.message.as_slice().try_into().unwrap();
    for _ in 0..200 {
        replay.send(&sock, r.hop.addr);
    }
    let mut cookies = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        let Ok(cell) = <&[u8; CELL_LEN]>::try_from(&buf[..n]) else { continue };
        if let Ok(cookie) = decode_cookie_reply(cell, &message) {
            cookies.push((cellproto::cell::lcid(cell), cookie));
        }
    }
    assert!((90..=95).contains(&cookies.len()), "{} COOKIEs to one source; the burst is 90", cookies.len());
    for (lcid, cookie) in &cookies {
        let mut cell = [0u8; CELL_LEN];
        encode_create(&mut cell, *lcid, &message, None, Some(cookie), &mut OsRng);
        sock.send_to(&cell, r.hop.addr).unwrap();
    }
    let mut created = 0;
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        created += usize::from(n == CELL_LEN);
    }
    // The COOKIEs spent the source's CREATE tokens' worth of answers; the CREATEs with them
    // then meet the same per-source bucket in the control thread.
    assert!(created <= 95, "{created} circuits for one source");
    let m = metrics(r.handle.metrics_addr.unwrap());
    assert!(sum(&m, "relayd_cookies_total", "result=\"valid\"") >= 90.0);
    assert!(sum(&m, "relayd_drops_total", "reason=\"cookie_limit\"") >= 100.0);
    r.handle.shutdown();
}

/// A dual-stack listener (`[::]`) sees IPv4 peers as IPv4-mapped IPv6: every table keys on the
/// IPv4 form, so the cookie an IPv4 client got is valid for it, and its STUN bucket is one.
#[test]
fn dual_stack_listener_keys_ipv4_peers_canonically() {
    use cellproto::stun::{Message, decode};
    let dir = tmpdir("dualstack");
    let keys = relayd::keys::keygen(&dir).unwrap();
    let identity = keys.identity.public().0;
    let onion_key = *keys.onion[0].public();
    let text = format!(
        "listen = \"[::]:9\"\nkey_dir = \"{}\"\nnickname = \"dual\"\nworkers = 2\npin_workers = false\n\
         [limits]\nload_create_rate = 0\n[metrics]\nlisten = \"127.0.0.1:1\"\n",
        dir.display()
    );
    let mut config = relayd::config::Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    config.listen = "[::]:0".parse().unwrap();
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let handle = relayd::relay::start(&config, keys).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", handle.local_addr.port()).parse().unwrap();
    let hop = cellproto::client::PathHop { keys: RelayKeys { identity, onion_key }, addr };
    // Under load from the start: the IPv4 client builds through a cookie.
    let mut client = UdpClient::new("127.0.0.1:0", vec![hop]);
    client.build(Duration::from_secs(10));
    assert!(client.ping(1, 4));
    // STUN: the reflexive address is the IPv4 one, and one source has one bucket.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let started = Instant::now();
    for i in 0..100u8 {
        let mut req = [0u8; 64];
        let n = Message::binding_request([i; 12]).encode(&mut req, true).unwrap();
        sock.send_to(&req[..n], addr).unwrap();
    }
    let mut buf = [0u8; 512];
    let mut answers = 0;
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        assert_eq!(decode(&buf[..n]).unwrap().reflexive_address(), Some(sock.local_addr().unwrap()));
        answers += 1;
    }
    let allowed = 20 + (10.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!((20..=allowed).contains(&answers), "{answers} STUN answers; the bucket allows {allowed}");
    let m = metrics(handle.metrics_addr.unwrap());
    assert_eq!(sum(&m, "relayd_cookies_total", "result=\"valid\""), 1.0);
    handle.shutdown();
}

/// SIGHUP's path (`RelayHandle::update`, as `reload.rs` calls it): new STUN rates and a new
/// circuit cap reach the workers and the control thread at once.
#[test]
fn reloaded_limits_reach_the_workers() {
    use cellproto::stun::Message;
    use relayd::config::{ExtendPolicy, Limits, StunOptions};
    use relayd::control::ControlUpdate;
    let r = start_relay("reloadlimits", 2, "auto", "[metrics]\nlisten = \"127.0.0.1:1\"\n");
    let stun = StunOptions { rate: 0.001, burst: 3, ..StunOptions::default() };
    let limits = Limits { max_circuits: 7, ..Limits::default() };
    let targets = relayd::extend::ExtendTargets::from_config(&ExtendPolicy::default()).unwrap();
    r.handle.update(ControlUpdate { limits, stun: stun.replies(), targets, onion: None });
    let m = metrics_until(&r, |m| m.get("relayd_circuit_cap{what=\"limit\"}") == Some(&7.0));
    assert_eq!(m["relayd_circuit_cap{what=\"limit\"}"], 7.0, "the control thread did not take the new cap");
    // The workers took theirs before the control thread's next message, so STUN sent now
    // meets the new burst of 3.
    let sock = UdpSocket::bind("127.0.0.5:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    for i in 0..20u8 {
        let mut req = [0u8; 64];
        let n = Message::binding_request([i; 12]).encode(&mut req, true).unwrap();
        sock.send_to(&req[..n], r.hop.addr).unwrap();
    }
    let mut buf = [0u8; 512];
    let mut answers = 0;
    while sock.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    assert_eq!(answers, 3, "the new STUN burst is not in force");
    r.handle.shutdown();
}
