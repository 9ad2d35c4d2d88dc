//! The kill switch is removed only by `meshvpn down`: the real `meshvpn up --foreground` in a
//! network namespace of its own, against a one-hop exit (cellproto's relay code on a real UDP
//! socket in a second namespace) that answers ATTACH as each test wants. An exit that hands
//! out addresses the kernel refuses, a TUN device that cannot be created, SIGTERM: each stops
//! or stalls the client, and the kill switch (and resolv.conf) must stay until `down`.
//!
//! Needs root (namespaces, TUN, nftables), and FAILS without it, never skips. Namespaces are
//! the `netns` crate's, `mv-ks-{client,exit}-<pid>-<n>`, removed (with whatever still runs in
//! them) when each test ends, also on panic.

use cellproto::cell::{CELL_LEN, Command as Cmd, HANDSHAKE_LCID, lcid};
use cellproto::command::{Attach, Attached, decode_ping};
use cellproto::descriptor::{ExitPolicySummary, FLAG_EXIT, RelayDescriptor};
use cellproto::directory::Directory;
use cellproto::handshake::{HANDSHAKE_VERSION, OnionSecret};
use cellproto::identity::{OnionKeyCert, RelayIdentity};
use cellproto::onion::{Direction, payload, payload_mut};
use cellproto::relay::{CircuitTable, Verdict};
use cellproto::sim::{TestRelay, rng};
use netns::NetNs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CLIENT_IP: &str = "10.201.0.2";
const EXIT: &str = "10.201.0.1:9001";
const TUN: &str = "mvkstun0";
const TABLE: &str = "meshvpn_client";
const ORIGINAL_RESOLV: &str = "nameserver 192.0.2.53\n";

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Every command in a namespace is killed after this long (`timeout`).
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// Polls `f` every 50 ms until it holds; panics with `what` after `secs`.
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The client's namespace and the exit's, joined by a veth pair; removed on drop, with
/// whatever still runs in them.
struct Net {
    client: NetNs,
    exit: NetNs,
    dir: PathBuf,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Net {
    fn new() -> Net {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the kill switch tests need root (namespaces, TUN, nftables)");
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("mvks{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("{tag}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // What a killed earlier run left.
        netns::remove_stale("ks-");
        let (client, exit) = (NetNs::new("ks-client").unwrap(), NetNs::new("ks-exit").unwrap());
        let net = Net { client, exit, dir, _serial: serial };
        net.client.veth("mvks-c", &net.exit, "mvks-e").unwrap();
        net.client.addr("mvks-c", &[&format!("{CLIENT_IP}/24")]).unwrap();
        net.exit.addr("mvks-e", &["10.201.0.1/24"]).unwrap();
        net.client.ip(&["route", "add", "default", "via", "10.201.0.1"]).unwrap();
        net
    }

    /// Runs `argv` in the client's namespace (killed after [`COMMAND_LIMIT`]).
    fn in_client(&self, argv: &[&str]) -> Output {
        let (program, args) = argv.split_first().expect("a command");
        self.client
            .command_within(COMMAND_LIMIT, program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"))
    }

    fn kill_switch_installed(&self) -> bool {
        self.in_client(&["nft", "list", "table", "inet", TABLE]).status.success()
    }

    fn resolv(&self) -> String {
        std::fs::read_to_string(self.dir.join("resolv.conf")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("meshvpn.log")).unwrap_or_default()
    }

    /// `meshvpn up --foreground` in the client namespace, its output in `meshvpn.log`.
    fn up(&self) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("meshvpn.log")).unwrap();
        self.client
            .spawn(
                self.client
                    .command(env!("CARGO_BIN_EXE_meshvpn"))
                    .args(["up", "--foreground", "--config"])
                    .arg(self.dir.join("meshvpn.toml"))
                    .env("RUST_LOG", "info")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log),
            )
            .expect("cannot start meshvpn")
    }

    /// `meshvpn down --config` in the client namespace.
    fn down(&self) -> Output {
        let cfg = self.dir.join("meshvpn.toml");
        self.in_client(&[env!("CARGO_BIN_EXE_meshvpn"), "down", "--config", cfg.to_str().unwrap()])
    }

    /// The directory (one exit, signed by a fresh authority) and the client's configuration.
    fn write_config(&self, exit: &ExitKeys) {
        let authority = RelayIdentity::from_seed(&[42; 32]);
        let now = unix_now();
        let identity = exit.identity.public();
        let desc = RelayDescriptor {
            identity,
            onion_keys: vec![OnionKeyCert {
                identity,
                onion_key: exit.onion_public,
                valid_after: now - 3600,
                expires: now + 86_400,
            }],
            addresses: vec![EXIT.parse().unwrap()],
            nickname: "fakeexit".into(),
            operator: String::new(),
            bandwidth: 1_000_000,
            flags: FLAG_EXIT,
            exit_policy: Some(ExitPolicySummary { accept: false, ports: vec![(25, 25)] }),
            protocol_versions: vec![HANDSHAKE_VERSION],
            published: now - 60,
            expires: now + 86_400,
        };
        let signed = desc.sign(&exit.identity).unwrap();
        let directory = Directory::sign(&[signed], now - 60, now + 3600, &authority).unwrap();
        std::fs::write(self.dir.join("directory.bin"), directory).unwrap();
        std::fs::write(self.dir.join("resolv.conf"), ORIGINAL_RESOLV).unwrap();
        let d = self.dir.display();
        std::fs::write(
            self.dir.join("meshvpn.toml"),
            format!(
                "directory = \"{d}/directory.bin\"\nauthority = \"{}\"\nhops = 1\nstate_dir = \"{d}/state\"\n\
                 control_socket = \"{d}/meshvpn.sock\"\ntun = \"{TUN}\"\nresolv_conf = \"{d}/resolv.conf\"\n\
                 kill_switch = true\n[timers]\nkeepalive_ms = 500\ndead_after_ms = 2000\n\
                 handshake_timeout_ms = 300\nhandshake_attempts = 3\n",
                authority.public()
            ),
        )
        .unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The namespaces (fields) are deleted after this, every process in them killed.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct ExitKeys {
    identity: RelayIdentity,
    onion_public: [u8; 32],
    onion_seed: u64,
}

impl ExitKeys {
    fn new() -> Self {
        let onion_seed = 7;
        let onion = OnionSecret::generate(&mut rng(onion_seed));
        Self { identity: RelayIdentity::from_seed(&[9; 32]), onion_public: *onion.public(), onion_seed }
    }
}

/// A one-hop exit in the exit namespace that answers ATTACH with `answer`; stopped on drop.
struct FakeExit {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeExit {
    fn start(net: &Net, keys: &ExitKeys, answer: Attached) -> FakeExit {
        let identity = keys.identity.public().0;
        let seed = keys.onion_seed;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // Only this thread enters the exit's namespace; the socket stays in it.
        let thread = net.exit.thread("fake-exit", move || {
            let socket = UdpSocket::bind(EXIT).unwrap();
            socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let onion = OnionSecret::generate(&mut rng(seed));
            let mut relay = TestRelay::with_keys(1, identity, onion, true, 11);
            ready_tx.send(()).unwrap();
            let mut cell = [0u8; CELL_LEN];
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut cell) else { continue };
                if n != CELL_LEN {
                    continue;
                }
                let now = Instant::now();
                let out = answer_attach(&mut relay, now, from, &mut cell, answer)
                    .unwrap_or_else(|| relay.handle(now, from, &mut cell));
                for (to, reply) in out {
                    let _ = socket.send_to(&reply, to);
                }
            }
        });
        let thread = thread.expect("cannot start the fake exit");
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("the fake exit did not start");
        FakeExit { stop, thread: Some(thread) }
    }
}

impl Drop for FakeExit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The exit's side of a one-hop circuit: ATTACH answered with `answer`, PING with PONG; other
/// cells (CREATE) go to the honest relay code.
fn answer_attach(
    relay: &mut TestRelay,
    now: Instant,
    from: SocketAddr,
    cell: &mut [u8; CELL_LEN],
    answer: Attached,
) -> Option<Vec<(SocketAddr, [u8; CELL_LEN])>> {
    if lcid(cell) == HANDSHAKE_LCID {
        return None;
    }
    let (circ, Direction::Forward) = relay.node.circuits_mut().lookup(lcid(cell))? else { return None };
    let mut out = [0u8; CELL_LEN];
    let (cmd, len) = match circ.handle_forward(now, from, cell) {
        Verdict::Deliver { cmd: Cmd::Attach, len } => {
            Attach::decode(payload(cell, len)).ok()?;
            (Cmd::Attached, answer.encode(payload_mut(&mut out)).ok()?)
        }
        Verdict::Deliver { cmd: Cmd::Ping, len } => {
            let id = decode_ping(payload(cell, len)).ok()?;
            payload_mut(&mut out)[..8].copy_from_slice(&id.to_be_bytes());
            (Cmd::Pong, 8)
        }
        _ => return Some(vec![]),
    };
    circ.seal_backward(now, cmd, len, &mut out).ok().map(|to| vec![(to, out)])
}

fn honest() -> Attached {
    Attached {
        token: [5; 32],
        ipv4: ("10.8.0.2".parse().unwrap(), 16),
        ipv6: ("fd00:8::2".parse().unwrap(), 64),
        dns: ("10.8.0.1".parse().unwrap(), "fd00:8::1".parse().unwrap()),
    }
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "meshvpn did not exit within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    // `ip netns exec` execs meshvpn, so the child's pid is meshvpn's.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
}

/// `meshvpn down` removes what the stopped client left: the kill switch and resolv.conf.
fn down_restores(net: &Net) {
    let out = net.down();
    assert!(out.status.success(), "meshvpn down: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!net.kill_switch_installed(), "meshvpn down left the kill switch");
    assert_eq!(net.resolv(), ORIGINAL_RESOLV, "meshvpn down did not restore resolv.conf");
}

#[test]
fn exit_answering_with_multicast_addresses_leaves_the_kill_switch_in_place() {
    let net = Net::new();
    let keys = ExitKeys::new();
    net.write_config(&keys);
    let hostile = Attached { ipv6: ("ff02::1".parse().unwrap(), 64), ..honest() };
    let _exit = FakeExit::start(&net, &keys, hostile);
    let mut client = net.up();
    wait_until(20, "the client to refuse the exit's addresses, or to stop", || {
        net.log().contains("unusable inner addresses") || client.try_wait().unwrap().is_some()
    });
    // Refused: the client keeps running with the kill switch, and configured nothing.
    assert!(client.try_wait().unwrap().is_none(), "meshvpn stopped:\n{}", net.log());
    assert!(net.kill_switch_installed(), "no kill switch:\n{}", net.log());
    assert_eq!(net.resolv(), ORIGINAL_RESOLV, "resolv.conf was rewritten");
    let addrs = String::from_utf8_lossy(&net.in_client(&["ip", "-o", "addr"]).stdout).into_owned();
    assert!(!addrs.contains("ff02::1") && !addrs.contains(TUN), "{addrs}");
    // SIGTERM stops it; the kill switch stays until `down`.
    sigterm(&client);
    let status = wait_exit(&mut client, 15);
    assert!(status.success(), "{status}\n{}", net.log());
    assert!(net.kill_switch_installed(), "SIGTERM removed the kill switch:\n{}", net.log());
    down_restores(&net);
}

#[test]
fn up_failing_after_the_kill_switch_leaves_it_in_place() {
    let net = Net::new();
    let keys = ExitKeys::new();
    net.write_config(&keys);
    let _exit = FakeExit::start(&net, &keys, honest());
    // A link with the TUN device's name already exists: creating the TUN device fails after
    // the circuit is up and the kill switch installed.
    net.client.ip(&["link", "add", TUN, "type", "veth", "peer", "name", "mvkstunp"]).unwrap();
    let mut client = net.up();
    let status = wait_exit(&mut client, 30);
    assert!(!status.success(), "meshvpn up should fail:\n{}", net.log());
    assert!(net.log().contains(TUN), "{}", net.log());
    assert!(net.kill_switch_installed(), "the failed up removed the kill switch:\n{}", net.log());
    down_restores(&net);
}

#[test]
fn sigterm_keeps_the_kill_switch_and_dns_and_the_next_up_takes_over() {
    let net = Net::new();
    let keys = ExitKeys::new();
    net.write_config(&keys);
    let _exit = FakeExit::start(&net, &keys, honest());
    let socket = net.dir.join("meshvpn.sock");
    let status =
        || net.in_client(&[env!("CARGO_BIN_EXE_meshvpn"), "status", "--json", "--socket", socket.to_str().unwrap()]);
    let is_up = || String::from_utf8_lossy(&status().stdout).contains("\"state\": \"up\"");
    // Positive control: the fake exit serves an honest client (tunnel up, resolv.conf the exit's).
    let mut client = net.up();
    wait_until(20, "the tunnel to come up", is_up);
    assert!(net.resolv().contains("nameserver 10.8.0.1"), "{}", net.resolv());
    sigterm(&client);
    assert!(wait_exit(&mut client, 15).success(), "{}", net.log());
    assert!(net.kill_switch_installed(), "SIGTERM removed the kill switch:\n{}", net.log());
    assert!(net.resolv().contains("nameserver 10.8.0.1"), "SIGTERM restored DNS: {}", net.resolv());
    // The next up (a systemd restart) takes the journal over: the kill switch never goes.
    let mut again = net.up();
    wait_until(20, "the tunnel to come up again", || {
        assert!(net.kill_switch_installed(), "the kill switch went away during the restart");
        is_up()
    });
    assert!(net.log().contains("taking over its kill switch"), "{}", net.log());
    let out = net.down();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_exit(&mut again, 15).success());
    assert!(!net.kill_switch_installed());
    assert_eq!(net.resolv(), ORIGINAL_RESOLV, "down did not restore the resolv.conf of before the first up");
    assert!(!Path::new(&net.dir.join("state/undo.json")).exists());
}
