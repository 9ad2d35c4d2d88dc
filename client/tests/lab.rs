//! End-to-end tests on the lab (`deploy/lab`): a client behind a NAT router, a guard, two
//! middles, an exit and an "internet" host in network namespaces, with the real `relayd`,
//! `exitd` and `meshvpn` binaries from `target/release` (`scripts/test` builds them first).
//!
//! Needs root (namespaces, veths, nftables, TUN): without it every test FAILS, never skips, so
//! that a CI run without root cannot pass unnoticed. Each test brings up its own lab with its
//! own `LAB_PREFIX` (mvt1, mvt2, ...), one at a time (a static mutex: two cores), and a guard
//! runs `deploy/lab down` when the test ends, also on panic. Every command runs under
//! `timeout`, so a hung daemon fails the test instead of hanging CI. No packet leaves the
//! namespaces a test made. `deploy/lab` (a shell script) makes and removes the namespaces; the
//! tests reach into them with the `netns` crate.

use netns::NetNs;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One lab at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const CLIENT_V4: &str = "192.168.77.2";
const NAT_LAN_V4: &str = "192.168.77.1";
const NAT_WAN_V4: &str = "172.20.0.1";
const GUARD: &str = "172.16.0.1";
const GUARD_PORT: &str = "9001";
const EXIT_V4: &str = "172.19.0.1";
const EXIT_V6: &str = "2001:db8:19::1";
const INET_V4: &str = "172.21.0.1";
const INET_V6: &str = "2001:db8:21::1";
const PAGE_TEXT: &str = "hello from internet.lab";
const TUN: &str = "mvtun0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("client/ has a parent").to_path_buf()
}

/// Release binaries: `LAB_BIN`, else `$CARGO_TARGET_DIR/release`, else `<repo>/target/release`
/// (the hostile guard in its `examples/`).
fn bin_dir() -> PathBuf {
    let dir = match std::env::var_os("LAB_BIN") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target"))
            .join("release"),
    };
    for b in ["relayd", "exitd", "meshvpn", "examples/hostile-guard"] {
        assert!(
            dir.join(b).is_file(),
            "{} not found: the lab tests run the release binaries; run \
             `cargo build --release -p relayd -p exitd -p meshvpn --bin meshvpn --example hostile-guard` \
             first (scripts/test does)",
            dir.join(b).display()
        );
    }
    dir
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the lab tests need root (network namespaces, veths, nftables, TUN): run them as root, as CI does"
    );
}

/// Runs `argv` under `timeout` (SIGTERM after `secs`, SIGKILL 5 s later), capturing output.
fn run(secs: u64, argv: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &secs.to_string()]).args(argv).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // ip, nft and tcpdump live in /usr/sbin, which a non-login PATH may lack.
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{path}:/usr/sbin:/sbin"));
    cmd.output().unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` every 200 ms until it is true; panics with `what` after `secs`.
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A lab brought up by `deploy/lab up`, torn down by `deploy/lab down` on drop.
struct Lab {
    prefix: String,
    dir: PathBuf,
    bin: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// `deploy/lab up ARGS` with prefix `mvt{n}` (after a `down` that clears what a crashed
    /// earlier run may have left).
    fn up(n: u32, args: &[&str]) -> Lab {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        require_root();
        let prefix = format!("mvt{n}");
        let lab =
            Lab { dir: PathBuf::from(format!("/run/meshvpn-lab/{prefix}")), bin: bin_dir(), prefix, _serial: serial };
        lab.lab(60, &["down"]);
        let mut argv = vec!["up"];
        argv.extend_from_slice(args);
        let out = lab.lab(240, &argv);
        assert!(out.status.success(), "deploy/lab up {args:?} failed:\n{}\n{}", text(&out), lab.logs());
        lab
    }

    /// Runs `deploy/lab ARGS` with this lab's environment.
    fn lab(&self, secs: u64, args: &[&str]) -> Output {
        let script = repo().join("deploy/lab");
        let mut argv = vec![script.to_str().expect("utf-8 path")];
        argv.extend_from_slice(args);
        run(
            secs,
            &argv,
            &[
                ("LAB_PREFIX", &self.prefix),
                ("LAB_DIR", self.dir.to_str().expect("utf-8 path")),
                ("LAB_BIN", self.bin.to_str().expect("utf-8 path")),
                ("LAB_HOPS", "3"),
                ("RUST_BACKTRACE", "0"),
            ],
        )
    }

    fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// NODE's namespace (the lab's: dropping the handle leaves it).
    fn netns(&self, node: &str) -> NetNs {
        NetNs::existing(&self.ns(node)).unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// Runs ARGV in NODE's namespace under `timeout` (SIGTERM after `secs`, SIGKILL 5 s later).
    fn exec(&self, node: &str, secs: u64, argv: &[&str]) -> Output {
        let (program, args) = argv.split_first().expect("a command");
        self.netns(node)
            .command_within(Duration::from_secs(secs), program)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"))
    }

    fn meshvpn(&self) -> String {
        self.bin.join("meshvpn").to_string_lossy().into_owned()
    }

    fn client_config(&self) -> PathBuf {
        self.dir.join("client/meshvpn.toml")
    }

    fn socket(&self) -> String {
        self.dir.join("client/meshvpn.sock").to_string_lossy().into_owned()
    }

    fn client_if(&self) -> String {
        format!("{}-lan", self.prefix)
    }

    /// `meshvpn up` (daemonizing) through the lab, which waits for state "up".
    fn client_up(&self) {
        let out = self.lab(150, &["client", "up"]);
        assert!(out.status.success(), "meshvpn up failed:\n{}\n{}", text(&out), self.logs());
    }

    /// `meshvpn status --json`.
    fn status(&self) -> Value {
        let out = self.exec("client", 15, &[&self.meshvpn(), "status", "--socket", &self.socket(), "--json"]);
        assert!(out.status.success(), "meshvpn status --json failed:\n{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status is not JSON ({e}):\n{}", text(&out)))
    }

    fn state(&self) -> Option<String> {
        let out = self.exec("client", 15, &[&self.meshvpn(), "status", "--socket", &self.socket(), "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["state"].as_str().map(str::to_owned)
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.join(rel)).unwrap_or_default()
    }

    /// The tails of the lab's logs, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["meshvpn-up.log", "meshvpn-down.log", "exit.log", "guard.log", "mid1.log", "mid2.log"] {
            let t = self.read(&format!("logs/{f}"));
            let tail: Vec<&str> = t.lines().rev().take(15).collect();
            s += &format!("--- logs/{f} (last lines)\n");
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        let daemon = self.read("client/state/meshvpn.log");
        if !daemon.is_empty() {
            s += "--- client/state/meshvpn.log (last lines)\n";
            let tail: Vec<&str> = daemon.lines().rev().take(30).collect();
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }

    /// Sends `signal` to every process in the client's namespace: only meshvpn lives there
    /// (the lab runs curl and the like in it only on demand; `pkill -f` would match its own
    /// `timeout` wrapper). Returns how many it signalled.
    fn signal_client(&self, signal: nix::sys::signal::Signal) -> usize {
        let pids = self.netns("client").pids();
        for &pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
        pids.len()
    }

    /// Waits (bounded) until no process is left in the client's namespace.
    fn wait_client_gone(&self, what: &str) {
        wait_until(15, what, || self.netns("client").pids().is_empty());
    }

    /// curl from the client namespace; (success, body or error).
    fn curl(&self, url: &str, secs: u64) -> (bool, String) {
        let out = self.exec("client", secs + 5, &["curl", "-sS", "-g", "--max-time", &secs.to_string(), url]);
        (out.status.success(), format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.lab(90, &["down"]);
        if !out.status.success() {
            eprintln!("deploy/lab down failed for {}:\n{}", self.prefix, text(&out));
        }
    }
}

/// tcpdump on the client's LAN interface (its only way out), from before the traffic.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(lab: &Lab) -> Capture {
        let file = lab.dir.join("capture.pcap");
        let log = lab.dir.join("logs/tcpdump.log");
        let child = lab
            .netns("client")
            .command("tcpdump")
            .args(["-i", &lab.client_if(), "-nn", "-U", "-Z", "root", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("tcpdump log"))
            .spawn()
            .expect("cannot start tcpdump");
        wait_until(10, "tcpdump to listen", || {
            std::fs::read_to_string(&log).unwrap_or_default().contains("listening on")
        });
        Capture { child, file }
    }

    /// Stops the capture and returns its packets as `tcpdump -nn -r` prints them.
    fn stop(mut self) -> Vec<String> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().expect("wait tcpdump").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        let out = run(30, &["tcpdump", "-nn", "-r", self.file.to_str().expect("utf-8 path")], &[]);
        assert!(out.status.success(), "tcpdump -r failed:\n{}", text(&out));
        stdout(&out).lines().map(str::to_owned).collect()
    }
}

/// Every packet is UDP between the client and the guard's port (ARP aside: link layer, it
/// carries nothing), and there is at least one such packet.
fn assert_only_udp_to_guard(lines: &[String]) {
    let guard = format!("{GUARD}.{GUARD_PORT}");
    let client = format!("{CLIENT_V4}.");
    let mut udp = 0;
    for line in lines {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.get(1) == Some(&"ARP,") {
            continue;
        }
        let ok = t.len() >= 6 && t[1] == "IP" && t[3] == ">" && t[5] == "UDP," && {
            let (src, dst) = (t[2], t[4].trim_end_matches(':'));
            (src.starts_with(&client) && dst == guard) || (src == guard && dst.starts_with(&client))
        };
        assert!(
            ok,
            "a packet outside the tunnel on the client's link:\n  {line}\n(capture: {} packets)\n{}",
            lines.len(),
            lines.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
        );
        udp += 1;
    }
    assert!(udp > 0, "the capture saw no UDP to the guard at all: was the tunnel used? {lines:?}");
}

/// Exit codes by which a probe says the network refused it (as opposed to the tool failing).
/// curl: 6 could not resolve, 7 could not connect, 28 timed out; ping: 1 no reply, 2 send
/// error (the kill switch makes sendmsg fail with EPERM); getent: 2 not found; the Python DNS
/// probe: 3 (its own code for a timeout or a refused send).
const CURL_BLOCKED: &[i32] = &[6, 7, 28];
const PING_BLOCKED: &[i32] = &[1, 2];
const GETENT_BLOCKED: &[i32] = &[2];
const PYDNS_BLOCKED: &[i32] = &[3];

/// A DNS query straight to the internet's resolver, bypassing resolv.conf: exit 0 on an
/// answer, 3 if it cannot be sent or nothing comes back in 2 s.
const PY_DNS: &str = "import socket, sys\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.settimeout(2)\n\
q = b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x04leak\\x00\\x00\\x01\\x00\\x01'\n\
try:\n    s.sendto(q, ('172.21.0.1', 53)); s.recvfrom(512)\n\
except OSError as e:\n    print('blocked:', e); sys.exit(3)\n";

/// A probe run in the client namespace, and the exit codes that mean "blocked".
struct Probe {
    argv: Vec<&'static str>,
    blocked: &'static [i32],
}

fn probe(argv: &[&'static str], blocked: &'static [i32]) -> Probe {
    Probe { argv: argv.to_vec(), blocked }
}

/// Asserts the probe succeeded (its positive control: the tool works and the path is open).
fn assert_probe_succeeds(lab: &Lab, p: &Probe, when: &str) {
    let out = lab.exec("client", 15, &p.argv);
    assert!(
        out.status.success(),
        "{when}: {:?} failed, so its failure later would prove nothing:\n{}",
        p.argv,
        text(&out)
    );
}

/// Asserts the probe was refused by the network, not that the tool failed: an exit code of
/// `p.blocked` (never 124-127: the `timeout` wrapper fired, or the tool could not run).
fn assert_probe_blocked(lab: &Lab, p: &Probe, when: &str) {
    let out = lab.exec("client", 15, &p.argv);
    let code = out.status.code();
    assert!(!out.status.success(), "{when}: {:?} succeeded: a leak\n{}", p.argv, text(&out));
    assert!(
        code.is_some_and(|c| p.blocked.contains(&c)),
        "{when}: {:?} failed, but not as a blocked probe does (exit {code:?}, expected one of {:?}): the tool failed\n{}",
        p.argv,
        p.blocked,
        text(&out)
    );
}

fn path_nicknames(status: &Value) -> Vec<String> {
    status["path"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no path array: {status}"))
        .iter()
        .map(|h| h["nickname"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn exit_identity(status: &Value) -> String {
    status["exit"]["identity"].as_str().unwrap_or_else(|| panic!("status has no exit.identity: {status}")).to_owned()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs()
}

fn sha256(file: &Path) -> String {
    let out = run(60, &["sha256sum", file.to_str().expect("utf-8 path")], &[]);
    assert!(out.status.success(), "sha256sum: {}", text(&out));
    stdout(&out).split_whitespace().next().unwrap_or_default().to_owned()
}

/// The lab itself: `down` removes every namespace, /etc/netns entry, process and LAB_DIR.
#[test]
fn lab_down_leaves_nothing_behind() {
    let lab = Lab::up(1, &["--no-client"]);
    assert!(Path::new(&format!("/run/netns/{}", lab.ns("exit"))).exists());
    let out = lab.lab(90, &["down"]);
    assert!(out.status.success(), "deploy/lab down: {}", text(&out));
    for node in ["wan", "client", "nat", "guard", "mid1", "mid2", "exit", "inet"] {
        assert!(!Path::new(&format!("/run/netns/{}", lab.ns(node))).exists(), "namespace {} left", lab.ns(node));
        assert!(!Path::new(&format!("/etc/netns/{}", lab.ns(node))).exists(), "/etc/netns/{} left", lab.ns(node));
    }
    assert!(!lab.dir.exists(), "{} left", lab.dir.display());
    let ps = run(10, &["ps", "-eo", "args"], &[]);
    let left: Vec<String> =
        stdout(&ps).lines().filter(|l| l.contains(lab.dir.to_str().unwrap_or("?"))).map(str::to_owned).collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    // Idempotent.
    let out = lab.lab(90, &["down"]);
    assert!(out.status.success(), "second deploy/lab down: {}", text(&out));
}

/// The infrastructure without the client: the NAT works (the internet host sees the router's
/// address) and the relays answer STUN with the router's address (`meshvpn netcheck`).
#[test]
fn netcheck_sees_the_nat() {
    let lab = Lab::up(2, &["--no-client"]);
    let (ok, body) = lab.curl(&format!("http://{INET_V4}/"), 10);
    assert!(ok && body.contains(PAGE_TEXT), "no tunnel: curl through the NAT failed: {body}");
    assert!(lab.read("logs/httpd.log").contains(&format!("{NAT_WAN_V4} - - ")), "the server did not see the NAT");
    let cfg = lab.client_config();
    let out = lab.exec("client", 60, &[&lab.meshvpn(), "netcheck", "--config", cfg.to_str().unwrap_or("?"), "--json"]);
    assert!(out.status.success(), "meshvpn netcheck failed:\n{}", text(&out));
    assert!(
        stdout(&out).contains(NAT_WAN_V4),
        "netcheck did not report the reflexive address {NAT_WAN_V4}:\n{}",
        text(&out)
    );
}

/// With the client up, `meshvpn netcheck` asks it, and the probe leaves from the client's data
/// socket: the report's local port is the port of meshvpn's UDP socket, the guard (the only
/// relay the kill switch lets it ask) sees the NAT's address, and the tunnel stays up.
#[test]
fn netcheck_through_the_running_client_uses_its_data_socket() {
    let lab = Lab::up(12, &[]);
    let cfg = lab.client_config();
    let out = lab.exec("client", 30, &[&lab.meshvpn(), "netcheck", "--config", cfg.to_str().unwrap_or("?"), "--json"]);
    assert!(out.status.success(), "meshvpn netcheck failed:\n{}", text(&out));
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&out)));
    let reflexive = report["reflexive"].as_str().unwrap_or_default();
    assert!(
        reflexive.starts_with(&format!("{NAT_WAN_V4}:")),
        "reflexive address {reflexive}, not the NAT's:\n{report}"
    );
    assert_eq!(report["probes"].as_array().map(Vec::len), Some(1), "only the guard may be asked:\n{report}");
    let local = report["local"].as_str().unwrap_or_default();
    let port = local.rsplit(':').next().unwrap_or_default();
    let sockets = stdout(&lab.exec("client", 10, &["ss", "-Hunap"]));
    assert!(
        sockets.lines().any(|l| l.contains("meshvpn") && l.contains(&format!(":{port} "))),
        "netcheck's local port {port} is not meshvpn's UDP socket:\n{sockets}"
    );
    assert_eq!(lab.status()["state"], "up");
}

/// curl from the client, by name (DNS through the tunnel), reaches the internet host, which
/// sees the exit's address, for HTTP and for the DNS query.
#[test]
fn curl_through_the_tunnel_and_the_server_sees_the_exit() {
    let lab = Lab::up(3, &[]);
    let before = lab.read("logs/httpd.log").lines().count();
    let (ok, body) = lab.curl("http://internet.lab/", 20);
    assert!(
        ok && body.contains(PAGE_TEXT),
        "curl http://internet.lab/ through the tunnel failed: {body}\n{}",
        lab.logs()
    );
    let log = lab.read("logs/httpd.log");
    let new: Vec<&str> = log.lines().skip(before).collect();
    assert!(!new.is_empty(), "the HTTP server logged nothing");
    for l in &new {
        assert!(l.starts_with(&format!("{EXIT_V4} ")), "the server saw another address than the exit's {EXIT_V4}: {l}");
    }
    let dns = lab.read("logs/dnsmasq.log");
    assert!(
        dns.lines().any(|l| l.contains("internet.lab") && l.contains(&format!("from {EXIT_V4}"))),
        "the name was not resolved through the exit (dnsmasq log):\n{dns}"
    );
    let status = lab.status();
    assert_eq!(status["state"], "up", "{status}");
    assert_eq!(path_nicknames(&status).len(), 3, "{status}");
    assert!(status["bytes_received"].as_u64().unwrap_or(0) > 0, "{status}");

    // SIGHUP (systemctl reload) re-reads the configuration and directory; the tunnel stays.
    assert_eq!(lab.signal_client(nix::sys::signal::Signal::SIGHUP), 1, "one meshvpn in the client namespace");
    wait_until(10, "the client to log the reload", || {
        lab.read("client/state/meshvpn.log").contains("configuration and directory reloaded")
    });
    assert_eq!(lab.status()["state"], "up");
    let (ok, body) = lab.curl("http://internet.lab/", 20);
    assert!(ok && body.contains(PAGE_TEXT), "curl after SIGHUP failed: {body}");
}

/// IPv6 goes through the tunnel too: the server sees the exit's IPv6 address.
#[test]
fn ipv6_through_the_tunnel() {
    let lab = Lab::up(4, &[]);
    let (ok, body) = lab.curl(&format!("http://[{INET_V6}]/"), 20);
    assert!(ok && body.contains(PAGE_TEXT), "curl over IPv6 through the tunnel failed: {body}\n{}", lab.logs());
    let log = lab.read("logs/httpd.log");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.starts_with(&format!("{EXIT_V6} ")), "the server saw {last}, not the exit's {EXIT_V6}");
}

/// A capture on the client's only link while it browses by name, over IPv4 and IPv6, pings:
/// nothing but UDP to the guard (no DNS, no plain IPv4, no IPv6).
#[test]
fn capture_shows_only_udp_to_the_guard() {
    let lab = Lab::up(5, &[]);
    let cap = Capture::start(&lab);
    // Each must succeed, or a clean capture could only mean that nothing was sent.
    let (ok, body) = lab.curl("http://internet.lab/", 20);
    assert!(ok && body.contains(PAGE_TEXT), "curl through the tunnel failed: {body}");
    let (ok, body) = lab.curl(&format!("http://[{INET_V6}]/"), 20);
    assert!(ok && body.contains(PAGE_TEXT), "curl over IPv6 through the tunnel failed: {body}");
    for argv in [
        &["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", INET_V4][..],
        &["ping", "-6", "-n", "-c", "3", "-i", "0.2", "-W", "2", INET_V6],
    ] {
        let out = lab.exec("client", 15, argv);
        assert!(out.status.success(), "{argv:?} through the tunnel failed:\n{}", text(&out));
    }
    let out = lab.exec("client", 15, &["getent", "ahosts", "internet.lab"]);
    assert!(
        out.status.success() && stdout(&out).contains(INET_V4) && stdout(&out).contains(INET_V6),
        "getent ahosts internet.lab did not resolve both addresses:\n{}",
        text(&out)
    );
    let lines = cap.stop();
    assert_only_udp_to_guard(&lines);
}

/// With the exit dead, nothing leaves the client outside the tunnel (DNS, IPv4, IPv6, the LAN
/// router itself), and `meshvpn status` says the tunnel is down because of the exit. Each probe
/// first succeeds where it should (the LAN router before `up`, everything else through the
/// tunnel), so its failure afterwards is the kill switch's doing, and a failure must have a
/// "blocked" exit code, not a tool's.
#[test]
fn kill_switch_when_the_exit_dies() {
    let lab = Lab::up(6, &["--no-client"]);
    let router = probe(&["ping", "-n", "-c", "2", "-W", "1", NAT_LAN_V4], PING_BLOCKED);
    assert_probe_succeeds(&lab, &router, "before up");
    lab.client_up();
    let through_tunnel = [
        probe(&["curl", "-sS", "--max-time", "3", "http://172.21.0.1/"], CURL_BLOCKED),
        probe(&["curl", "-sS", "--max-time", "3", "http://internet.lab/"], CURL_BLOCKED),
        probe(&["curl", "-sS", "-g", "--max-time", "3", "http://[2001:db8:21::1]/"], CURL_BLOCKED),
        probe(&["ping", "-n", "-c", "2", "-W", "1", INET_V4], PING_BLOCKED),
        probe(&["ping", "-6", "-n", "-c", "2", "-W", "1", INET_V6], PING_BLOCKED),
        // One second per resolver and attempt, so that a blocked lookup ends well within the
        // wrapper's timeout (glibc's default would take 20 s).
        probe(
            &["env", "RES_OPTIONS=timeout:1 attempts:1", "getent", "ahosts", "leak-check.internet.lab"],
            GETENT_BLOCKED,
        ),
        probe(&["python3", "-c", PY_DNS], PYDNS_BLOCKED),
    ];
    for p in &through_tunnel {
        assert_probe_succeeds(&lab, p, "tunnel up");
    }
    // The LAN is outside the tunnel: the kill switch refuses it even while up.
    assert_probe_blocked(&lab, &router, "tunnel up");
    let cap = Capture::start(&lab);
    let out = lab.lab(10, &["kill", "exit"]);
    assert!(out.status.success(), "kill exitd: {}", text(&out));
    wait_until(30, "meshvpn status to leave state \"up\" after the exit died", || {
        lab.state().is_some_and(|s| s != "up")
    });
    for p in through_tunnel.iter().chain([&router]) {
        assert_probe_blocked(&lab, p, "exit dead");
    }
    let status = lab.status();
    let lines = cap.stop();
    assert_only_udp_to_guard(&lines);
    assert_ne!(status["state"], "up", "{status}");
    let reason = status["reason"].as_str().unwrap_or_else(|| panic!("status gives no reason: {status}"));
    assert!(reason.to_lowercase().contains("exit"), "status reason does not mention the exit: {reason:?}");
}

/// The middle relay dies in the middle of a 100 MiB download: the client rebuilds through the
/// other middle to the same exit, and the download completes intact.
#[test]
fn middle_dies_during_download_and_the_client_rebuilds_to_the_same_exit() {
    let lab = Lab::up(7, &[]);
    let status = lab.status();
    let path = path_nicknames(&status);
    assert_eq!(path.len(), 3, "{status}");
    let middle = path[1].clone();
    let other = match middle.as_str() {
        "mid1" => "mid2",
        "mid2" => "mid1",
        m => panic!("the middle hop is {m}, not mid1 or mid2: {status}"),
    };
    let exit = exit_identity(&status);
    let file = lab.dir.join("download.bin");
    // Rate-limited so that the transfer is surely still running when the middle dies.
    let mut curl = lab
        .netns("client")
        .command_within(Duration::from_secs(150), "curl")
        .args(["-sS", "--limit-rate", "10M"])
        .args(["--max-time", "140", "-o"])
        .arg(&file)
        .arg(format!("http://{INET_V4}/big.bin"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start curl");
    // Kill the middle once 5 MiB have arrived (half a second at the rate limit): the transfer
    // is then surely under way and, at 10 MiB/s for 100 MiB, far from its end.
    wait_until(30, "the first 5 MiB of the download", || {
        assert!(curl.try_wait().expect("curl").is_none(), "curl ended before the middle was killed: {}", lab.logs());
        std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) >= 5 << 20
    });
    let out = lab.lab(10, &["kill", &middle]);
    assert!(out.status.success(), "kill {middle}: {}", text(&out));
    let done = curl.wait_with_output().expect("curl");
    assert!(
        done.status.success(),
        "the download failed after {middle} died:\n{}\n{}",
        String::from_utf8_lossy(&done.stderr),
        lab.logs()
    );
    assert_eq!(sha256(&file), lab.read("big.sha256").trim(), "the downloaded file is damaged");
    wait_until(30, "the client to be up again", || lab.state().as_deref() == Some("up"));
    let after = lab.status();
    let new_path = path_nicknames(&after);
    assert!(new_path.iter().any(|n| n == other), "the new path {new_path:?} does not go through {other}");
    assert!(!new_path.contains(&middle), "the new path {new_path:?} still uses the dead {middle}");
    assert_eq!(exit_identity(&after), exit, "the exit changed: {after}");
    assert!(after["rebuilds"].as_u64().unwrap_or(0) >= 1, "no rebuild counted: {after}");
}

/// What `up` changes in the client namespace, as text.
fn snapshot(lab: &Lab) -> Vec<(String, String)> {
    let mut s = Vec::new();
    for argv in [
        &["ip", "-4", "route", "show", "table", "all"][..],
        &["ip", "-6", "route", "show", "table", "all"],
        &["ip", "-4", "rule"],
        &["ip", "-6", "rule"],
        &["ip", "-o", "link"],
        &["ip", "-o", "addr"],
        &["nft", "list", "ruleset"],
        &["cat", "/etc/resolv.conf"],
    ] {
        let out = lab.exec("client", 15, argv);
        assert!(out.status.success(), "{argv:?}: {}", text(&out));
        s.push((argv.join(" "), stdout(&out)));
    }
    s
}

/// `meshvpn down` leaves routes, rules, links, resolv.conf and nftables as they were.
#[test]
fn down_restores_routes_dns_and_nftables() {
    let lab = Lab::up(8, &["--no-client"]);
    let before = snapshot(&lab);
    lab.client_up();
    let during = snapshot(&lab);
    let nft = &during.iter().find(|(k, _)| k == "nft list ruleset").expect("nft").1;
    assert!(nft.contains("meshvpn_client"), "no kill switch table while up:\n{nft}");
    assert_ne!(before, during, "up changed nothing in the client namespace");
    let out = lab.exec("client", 30, &[&lab.meshvpn(), "down", "--socket", &lab.socket()]);
    assert!(out.status.success(), "meshvpn down failed:\n{}", text(&out));
    lab.wait_client_gone("the meshvpn daemon to exit");
    let after = snapshot(&lab);
    for ((what, b), (_, a)) in before.iter().zip(&after) {
        assert_eq!(b, a, "`{what}` differs after meshvpn down");
    }
}

/// Only `meshvpn down` gives the machine back. SIGTERM (what `systemctl stop` and `restart`
/// send) and `kill -9` leave the kill switch, the guard's route and resolv.conf in force, so
/// nothing leaves while no client runs; the next `up` takes them over, and `down --config`
/// with no client running removes them.
#[test]
fn only_down_removes_the_kill_switch_after_sigterm_or_a_crash() {
    use nix::sys::signal::Signal::{SIGKILL, SIGTERM};
    let lab = Lab::up(10, &["--no-client"]);
    let before = snapshot(&lab);
    let direct = probe(&["curl", "-sS", "--max-time", "3", "http://172.21.0.1/"], CURL_BLOCKED);
    assert_probe_succeeds(&lab, &direct, "before up (no tunnel, through the NAT)");
    let config = lab.client_config();
    let config = config.to_str().expect("utf-8 path");
    for (signal, cleaner) in [(SIGTERM, "down"), (SIGKILL, "down"), (SIGKILL, "up")] {
        lab.client_up();
        let tunnel_dns =
            std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", lab.ns("client"))).unwrap_or_default();
        assert_eq!(lab.signal_client(signal), 1, "one meshvpn in the client namespace");
        lab.wait_client_gone(&format!("the client to stop on {signal}"));
        let left = snapshot(&lab);
        let nft = &left.iter().find(|(k, _)| k == "nft list ruleset").expect("nft").1;
        assert!(nft.contains("meshvpn_client"), "{signal} removed the kill switch:\n{nft}");
        let resolv = &left.iter().find(|(k, _)| k == "cat /etc/resolv.conf").expect("resolv").1;
        assert!(
            resolv.contains("written by meshvpn"),
            "{signal} restored DNS (tunnel's was {tunnel_dns:?}):\n{resolv}"
        );
        assert_probe_blocked(&lab, &direct, &format!("after {signal}, no client running"));
        if cleaner == "up" {
            lab.client_up();
            let log = lab.read("client/state/meshvpn.log");
            assert!(log.contains("taking over its kill switch"), "up did not say it took over:\n{log}");
        }
        let out = lab.exec("client", 30, &[&lab.meshvpn(), "down", "--config", config]);
        assert!(out.status.success(), "meshvpn down after {signal} ({cleaner}) failed:\n{}", text(&out));
        if cleaner == "down" {
            assert!(stdout(&out).contains("was not running"), "{}", text(&out));
        }
        lab.wait_client_gone("the meshvpn daemon to exit");
        let after = snapshot(&lab);
        for ((what, b), (_, a)) in before.iter().zip(&after) {
            assert_eq!(b, a, "`{what}` differs after {signal} and `down` ({cleaner})");
        }
        assert_probe_succeeds(&lab, &direct, &format!("after down ({signal}, {cleaner})"));
    }
}

/// A damaged directory is refused before anything is touched: bad signature, expired,
/// truncated. `meshvpn up` fails with an error that says which, and leaves no TUN or nftables.
#[test]
fn bad_directory_is_refused() {
    let lab = Lab::up(9, &["--no-client"]);
    let good = std::fs::read(lab.dir.join("directory.bin")).expect("directory.bin");
    let cfg_text = std::fs::read_to_string(lab.client_config()).expect("client config");
    let dir_line = format!("directory = \"{}\"", lab.dir.join("directory.bin").display());
    assert!(cfg_text.contains(&dir_line), "unexpected client config:\n{cfg_text}");

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let relayd = lab.bin.join("relayd");
    let expired = lab.dir.join("expired.bin");
    let descs: Vec<String> = ["guard", "mid1", "mid2", "exit"]
        .iter()
        .map(|n| lab.dir.join(format!("{n}/descriptor.b64")).display().to_string())
        .collect();
    let auth = lab.dir.join("authority").display().to_string();
    let mut argv = vec![
        relayd.to_str().unwrap_or("?"),
        "authority",
        "sign",
        "--dir",
        &auth,
        "--out",
        expired.to_str().unwrap_or("?"),
    ];
    argv.extend(["--lifetime-secs", "1"]);
    argv.extend(descs.iter().map(String::as_str));
    let out = run(30, &argv, &[]);
    assert!(out.status.success(), "relayd authority sign: {}", text(&out));
    // Wait for the clock to pass the directory's expiry (its header: magic, version,
    // published and expires as big-endian u64s).
    let bytes = std::fs::read(&expired).expect("expired.bin");
    let expires = u64::from_be_bytes(bytes[10..18].try_into().expect("8 bytes"));
    wait_until(10, "the one-second directory to expire", || unix_now() >= expires);

    let cases: [(&str, Vec<u8>, &[&str]); 4] = [
        ("bad-signature", flipped, &["signature"]),
        ("expired", std::fs::read(&expired).expect("expired.bin"), &["expired"]),
        ("truncated", good[..40].to_vec(), &["truncated", "malformed"]),
        // Cut in the middle, the last 64 bytes are not the signature any more.
        ("cut", good[..good.len() / 2].to_vec(), &["signature", "truncated", "malformed"]),
    ];
    for (name, bytes, words) in cases {
        let file = lab.dir.join(format!("client/{name}.bin"));
        std::fs::write(&file, bytes).expect("write directory variant");
        let cfg = lab.dir.join(format!("client/{name}.toml"));
        std::fs::write(&cfg, cfg_text.replace(&dir_line, &format!("directory = \"{}\"", file.display())))
            .expect("write config");
        let out =
            lab.exec("client", 30, &[&lab.meshvpn(), "up", "--foreground", "--config", cfg.to_str().unwrap_or("?")]);
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{name}: meshvpn up accepted it:\n{}", text(&out));
        assert_ne!(out.status.code(), Some(124), "{name}: meshvpn up hung (killed by timeout)");
        assert!(words.iter().any(|w| err.contains(w)), "{name}: the error mentions none of {words:?}:\n{}", text(&out));
        let link = lab.exec("client", 10, &["ip", "link", "show", TUN]);
        assert!(!link.status.success(), "{name}: {TUN} left behind");
        let nft = lab.exec("client", 10, &["nft", "list", "tables"]);
        assert!(!stdout(&nft).contains("meshvpn"), "{name}: nftables left behind: {}", stdout(&nft));
    }
}

/// A child process killed and reaped when the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a forged ATTACHED would change on the client, as text: routes, addresses, links,
/// the nftables ruleset without its counters, resolv.conf.
fn live_snapshot(lab: &Lab) -> Vec<(String, String)> {
    let mut s = Vec::new();
    for argv in [
        &["ip", "-4", "route", "show", "table", "all"][..],
        &["ip", "-6", "route", "show", "table", "all"],
        &["ip", "-o", "link"],
        &["ip", "-o", "addr"],
        &["nft", "-s", "list", "ruleset"],
        &["cat", "/etc/resolv.conf"],
    ] {
        let out = lab.exec("client", 15, argv);
        assert!(out.status.success(), "{argv:?}: {}", text(&out));
        s.push((argv.join(" "), stdout(&out)));
    }
    s
}

/// A guard that relays honestly (cellproto's relay code and the lab guard's own keys, the
/// `hostile-guard` example) injects forged ATTACHED cells into a live client's circuit: first
/// addresses that pass every address check with the guard itself as DNS resolver, then an
/// IPv6 multicast address the kernel would refuse. The client refuses both (counted in
/// `status`) and nothing changes: routes, addresses, nftables, resolv.conf, inner addresses,
/// and traffic still flows.
#[test]
fn forged_attached_from_the_guard_changes_nothing() {
    let lab = Lab::up(11, &["--no-client"]);
    let out = lab.lab(10, &["kill", "guard"]);
    assert!(out.status.success(), "kill the guard's relayd: {}", text(&out));
    wait_until(10, "the guard's port to be free", || {
        stdout(&lab.exec("guard", 10, &["ss", "-Hlnu", &format!("sport = :{GUARD_PORT}")])).trim().is_empty()
    });
    let log = lab.dir.join("logs/hostile-guard.log");
    let trigger = lab.dir.join("inject");
    let hostile = lab.bin.join("examples/hostile-guard");
    let _guard = Reaped(
        lab.netns("guard")
            .command_within(Duration::from_secs(600), &hostile)
            .arg("--keys")
            .arg(lab.dir.join("guard/keys"))
            .args(["--listen", &format!("{GUARD}:{GUARD_PORT}"), "--trigger"])
            .arg(&trigger)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("hostile guard log"))
            .stderr(std::fs::File::create(lab.dir.join("logs/hostile-guard.err")).expect("hostile guard stderr"))
            .spawn()
            .expect("cannot start the hostile guard"),
    );
    wait_until(10, "the hostile guard to listen", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("listening")
    });
    lab.client_up();
    let (ok, body) = lab.curl("http://internet.lab/", 20);
    assert!(
        ok && body.contains(PAGE_TEXT),
        "no traffic through the hostile guard before the attack: {body}\n{}",
        lab.logs()
    );
    let before = live_snapshot(&lab);
    let status = lab.status();
    let session = |s: &Value| (s["inner_ipv4"].clone(), s["inner_ipv6"].clone(), s["dns"].clone());
    let refused = |s: &Value| s["control_refused"].as_u64().unwrap_or(0);
    assert_eq!(refused(&status), 0, "{status}");
    for (n, kind) in ["plausible", "multicast"].into_iter().enumerate() {
        std::fs::write(&trigger, kind).expect("trigger");
        wait_until(15, &format!("the hostile guard to inject ({kind})"), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("injected {kind} ATTACHED into 1 circuits"))
        });
        // Until the client counts the refusal, or something changes (the bug this guards against).
        wait_until(15, &format!("the client to refuse the forged ATTACHED ({kind})"), || {
            refused(&lab.status()) > n as u64 || live_snapshot(&lab) != before
        });
        for ((what, b), (_, a)) in before.iter().zip(&live_snapshot(&lab)) {
            assert_eq!(b, a, "`{what}` changed after the guard forged ATTACHED ({kind})");
        }
        let now = lab.status();
        assert_eq!(now["state"], "up", "{now}");
        assert_eq!(session(&now), session(&status), "the inner addresses or DNS changed ({kind})");
        assert_eq!(refused(&now), n as u64 + 1, "{now}");
        let (ok, body) = lab.curl("http://internet.lab/", 20);
        assert!(ok && body.contains(PAGE_TEXT), "traffic stopped after the forgery ({kind}): {body}");
    }
}
