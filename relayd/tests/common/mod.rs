//! Test support: relays started in-process on loopback, a UDP client driving cellproto's
//! `Circuit`, an echoing test exit, and a metrics reader. Every socket is on 127.0.0.0/8 and
//! every wait is bounded.
#![allow(dead_code)]

use cellproto::cell::{CELL_LEN, Command, HANDSHAKE_LCID, lcid};
use cellproto::client::{Circuit, CircuitConfig, Event, PathHop};
use cellproto::handshake::{OnionSecret, RelayKeys};
use cellproto::onion::{Direction, payload, payload_mut};
use cellproto::relay::control::{ControlPlane, Created};
use cellproto::relay::{CircuitMap, CircuitTable, Verdict};
use rand_core::OsRng;
use relayd::config::Config;
use relayd::relay::RelayHandle;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relayd-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A running relay and what a client needs to reach it.
pub struct TestRelay {
    pub handle: RelayHandle,
    pub hop: PathHop,
}

/// Starts a relay on an ephemeral loopback port. `extra` is appended to the TOML.
pub fn start_relay(name: &str, workers: usize, datapath: &str, extra: &str) -> TestRelay {
    let dir = tmpdir(name);
    let keys = relayd::keys::keygen(&dir).unwrap();
    let identity = keys.identity.public().0;
    let onion_key = *keys.onion[0].public();
    let text = format!(
        "listen = \"127.0.0.1:9\"\nkey_dir = \"{}\"\nnickname = \"{name}\"\nworkers = {workers}\npin_workers = false\ndatapath = \"{datapath}\"\n{extra}",
        dir.display()
    );
    let mut config = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    if config.metrics.listen.is_some() {
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    }
    let handle = relayd::relay::start(&config, keys).unwrap();
    let hop = PathHop { keys: RelayKeys { identity, onion_key }, addr: handle.local_addr };
    TestRelay { handle, hop }
}

/// Reads the relay's metrics endpoint into (series with labels → value).
pub fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(' '))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN))))
        .collect()
}

/// Polls `cond` every 10 ms until it holds or `timeout` has passed; returns whether it held.
/// Tests wait for the condition they assert, never for a guessed time.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads the metrics endpoint until `cond` holds on a reading (the relay publishes its
/// counters every 100 ms) or 10 s have passed, and returns the last reading: the caller then
/// asserts on it, so a timeout fails with the values in the message.
pub fn metrics_when(addr: SocketAddr, cond: impl Fn(&HashMap<String, f64>) -> bool) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    wait_until(Duration::from_secs(10), || {
        m = metrics(addr);
        cond(&m)
    });
    m
}

/// Sum of a metric over all label sets matching `filter`.
pub fn sum(m: &HashMap<String, f64>, name: &str, filter: &str) -> f64 {
    m.iter().filter(|(k, _)| k.starts_with(name) && k.contains(filter)).map(|(_, v)| v).sum()
}

/// A client circuit over a real UDP socket.
pub struct UdpClient {
    pub socket: UdpSocket,
    pub circuit: Circuit,
}

impl UdpClient {
    pub fn new(bind: &str, path: Vec<PathHop>) -> Self {
        let socket = UdpSocket::bind(bind).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let lcid = 0x4000_0000 | (rand_core::RngCore::next_u32(&mut OsRng) & 0x3FFF_FFFF);
        let config = CircuitConfig { handshake_timeout: Duration::from_millis(300), ..CircuitConfig::default() };
        let circuit = Circuit::new(path, lcid, config, Instant::now(), &mut OsRng).unwrap();
        Self { socket, circuit }
    }

    fn flush(&mut self) {
        let mut cell = [0u8; CELL_LEN];
        while let Some(to) = self.circuit.poll_transmit(Instant::now(), &mut cell, &mut OsRng) {
            self.socket.send_to(&cell, to).unwrap();
        }
    }

    /// Receives one datagram for this circuit (bounded wait) and returns the client's event.
    pub fn recv_event(&mut self, wait: Duration) -> Option<(Event, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            self.flush();
            if let Some(ev) = self.circuit.handle_timeout(Instant::now()) {
                return Some((ev, vec![]));
            }
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else { continue };
            let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(&mut buf[..n]) else { continue };
            if lcid(cell) != self.circuit.lcid_in() {
                continue;
            }
            match self.circuit.handle_cell(Instant::now(), cell, &mut OsRng) {
                Ok(Some(ev @ Event::Delivered { len, .. })) => return Some((ev, payload(cell, len).to_vec())),
                Ok(Some(ev)) => return Some((ev, vec![])),
                _ => {}
            }
        }
        None
    }

    /// Builds the circuit; panics after `wait`.
    pub fn build(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.circuit.is_open() {
            assert!(Instant::now() < deadline, "circuit not built in {wait:?}");
            if let Some((Event::Closed(r), _)) = self.recv_event(Duration::from_millis(50)) {
                panic!("circuit closed while building: {r:?}");
            }
        }
    }

    /// Seals `cmd` with `body` for hop `hop` without sending it.
    pub fn seal_only(&mut self, hop: usize, cmd: Command, body: &[u8]) -> (SocketAddr, [u8; CELL_LEN]) {
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..body.len()].copy_from_slice(body);
        let to = self.circuit.seal(hop, cmd, body.len(), &mut cell).unwrap();
        (to, cell)
    }

    /// Sends `cmd` with `body` to hop `hop`; returns the sealed cell as sent.
    pub fn send(&mut self, hop: usize, cmd: Command, body: &[u8]) -> [u8; CELL_LEN] {
        let (to, cell) = self.seal_only(hop, cmd, body);
        self.socket.send_to(&cell, to).unwrap();
        cell
    }

    pub fn ping(&mut self, hop: usize, id: u64) -> bool {
        self.send(hop, Command::Ping, &id.to_be_bytes());
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Some((Event::Delivered { cmd: Command::Pong, hop: h, .. }, body)) =
                self.recv_event(Duration::from_millis(100))
                && h == hop
                && body == id.to_be_bytes()
            {
                return true;
            }
        }
        false
    }
}

/// A minimal exit for tests: answers handshakes and echoes DATA reversed, over loopback UDP.
pub struct EchoExit {
    pub hop: PathHop,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoExit {
    pub fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = socket.local_addr().unwrap();
        let onion = OnionSecret::generate(&mut OsRng);
        let identity = [0x77u8; 32];
        let hop = PathHop { keys: RelayKeys { identity, onion_key: *onion.public() }, addr };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut plane = ControlPlane::new(identity, vec![onion], true);
            let mut circuits = CircuitMap::new();
            let mut next_lcid = 0x6000_0000u32;
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(&mut buf[..n]) else { continue };
                let now = Instant::now();
                if lcid(cell) == HANDSHAKE_LCID {
                    next_lcid += 1;
                    match plane.handle_create(now, from, cell, || next_lcid, &mut OsRng) {
                        Ok(Created::New { reply, circuit }) => {
                            circuits.insert(*circuit);
                            socket.send_to(&reply[..], from).unwrap();
                        }
                        Ok(Created::Repeat { reply }) => drop(socket.send_to(&reply[..], from)),
                        Err(_) => {}
                    }
                    continue;
                }
                let id = lcid(cell);
                let Some((circ, Direction::Forward)) = circuits.lookup(id) else { continue };
                if let Verdict::Deliver { cmd: Command::Data, len } = circ.handle_forward(now, from, cell) {
                    let data: Vec<u8> = payload(cell, len).iter().rev().copied().collect();
                    let mut out = [0u8; CELL_LEN];
                    payload_mut(&mut out)[..len].copy_from_slice(&data);
                    if let Ok(to) = circ.seal_backward(now, Command::Data, len, &mut out) {
                        let _ = socket.send_to(&out, to);
                    }
                }
            }
        });
        Self { hop, stop, thread: Some(thread) }
    }
}

impl Drop for EchoExit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
