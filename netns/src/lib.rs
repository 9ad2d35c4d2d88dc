//! Network namespaces of a test's own: made, entered, joined by veths, given addresses, and
//! deleted (with every process still inside) when dropped, also when the test fails.
//!
//! meshvpn's namespace tests (exitd, tundev, the client's kill switch and lab) and `perf exit`
//! all build small networks this way; this crate is the one copy of that scaffolding. It
//! depends on no meshvpn crate.
//!
//! - **Names** are `mv-<tag>-<pid>-<n>`: the creating process and a per-process counter, so
//!   tests in one binary (threads), different binaries (processes) and other checkouts on the
//!   same machine never share one, and [`remove_stale`] can tell what a killed run left.
//! - **Entering**: `setns` moves only the calling thread, and a child process starts in the
//!   namespaces of the thread that spawned it. [`NetNs::run`] and [`NetNs::thread`] run code on
//!   a new thread that entered the namespace, and check before the body that both the thread
//!   and a child it starts (`readlink /proc/self/ns/net`) are in it: a tool such as `nft` run
//!   from there can never act on the host.
//! - **Commands** from any thread go through `ip -n NAME` ([`NetNs::ip`]) or `ip netns exec
//!   NAME` ([`NetNs::command`], [`NetNs::exec`], [`NetNs::spawn`]); `/usr/sbin` and `/sbin` are
//!   added to their `PATH`, where iproute2 and nftables live.
//! - **Dropping** kills the children [`NetNs::spawn`] started, then (for a namespace this
//!   handle made) every process left inside it, then deletes it.
//!
//! Everything here needs root (CAP_NET_ADMIN, and CAP_SYS_ADMIN for `setns`) and iproute2.
//! Failures are [`Error`]s naming the command and what it printed; every wait is bounded.

#![forbid(unsafe_code)]

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where `ip netns` keeps its namespaces (bind mounts of the namespace files).
const RUN_NETNS: &str = "/run/netns";
/// How long [`Drop`] waits for killed processes to leave a namespace before deleting it (a
/// SIGKILLed process is gone within milliseconds; the bound only keeps a drop from hanging).
const DRAIN: Duration = Duration::from_secs(2);
/// [`NetNs::command_within`]: SIGKILL this long after the SIGTERM (`timeout -k`).
const KILL_AFTER: &str = "5";

/// What went wrong, with the command or file and what the system said.
pub struct Error(String);

impl Error {
    fn new(what: impl Into<String>) -> Self {
        Error(what.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

// The message itself, so that a test's `unwrap()` prints it as it is.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// This crate's results.
pub type Result<T> = std::result::Result<T, Error>;

/// A network namespace; see the crate documentation.
pub struct NetNs {
    name: String,
    /// Made by this handle (deleted on drop), or someone else's ([`NetNs::existing`]).
    owned: bool,
    /// Pids of the children [`NetNs::spawn`] started, killed on drop.
    children: Mutex<Vec<u32>>,
}

impl NetNs {
    /// A fresh namespace `mv-<tag>-<pid>-<n>` with `lo` up (root only).
    pub fn new(tag: &str) -> Result<NetNs> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::new(
                "network namespaces need root (CAP_NET_ADMIN, and CAP_SYS_ADMIN to enter one): run as root, as CI does",
            ));
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("mv-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        // From here on, a failure drops (deletes) it.
        let ns = NetNs { name, owned: true, children: Mutex::new(Vec::new()) };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace made by someone else (`deploy/lab`), by its `ip netns` name: commands and
    /// threads in it as in one's own, but dropping the handle only kills the children spawned
    /// through it; the namespace stays.
    pub fn existing(name: &str) -> Result<NetNs> {
        let ns = NetNs { name: name.to_owned(), owned: false, children: Mutex::new(Vec::new()) };
        if !ns.path().exists() {
            return Err(Error::new(format!("no network namespace {name} ({} is missing)", ns.path().display())));
        }
        Ok(ns)
    }

    /// Its `ip netns` name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(RUN_NETNS).join(&self.name)
    }

    /// `ip -n NAME ARGS`, which must succeed; its output.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A veth pair: `dev` here, `peer_dev` in `peer`, both still down.
    pub fn veth(&self, dev: &str, peer: &NetNs, peer_dev: &str) -> Result<()> {
        self.ip(&["link", "add", dev, "type", "veth", "peer", "name", peer_dev, "netns", &peer.name]).map(drop)
    }

    /// Adds `addrs` (`ADDRESS/PREFIX`; IPv6 without duplicate address detection, so usable at
    /// once) to `dev`, then sets it up.
    pub fn addr(&self, dev: &str, addrs: &[&str]) -> Result<()> {
        for a in addrs {
            if a.contains(':') {
                self.ip(&["-6", "addr", "add", a, "dev", dev, "nodad"])?;
            } else {
                self.ip(&["addr", "add", a, "dev", dev])?;
            }
        }
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// `sysctl -w KEY=VALUE` for this namespace (`net.*` settings are per namespace), written
    /// to `/proc/sys` by a thread inside it (a file there belongs to the opener's namespace).
    pub fn sysctl(&self, setting: &str) -> Result<()> {
        let (key, value) =
            setting.split_once('=').ok_or_else(|| Error::new(format!("sysctl {setting:?}: not KEY=VALUE")))?;
        let path = Path::new("/proc/sys").join(key.trim().replace('.', "/"));
        let value = value.trim().to_owned();
        self.run(move || std::fs::write(&path, value).map_err(|e| Error::new(format!("sysctl {setting}: {e}"))))?
    }

    /// The MAC address of `dev`.
    pub fn mac(&self, dev: &str) -> Result<String> {
        let out = self.exec(&["cat", &format!("/sys/class/net/{dev}/address")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `ip netns exec NAME PROGRAM`, stdin from /dev/null, for the caller to add arguments and
    /// run. `ip netns exec` execs the program: a spawned child's pid is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program).stdin(Stdio::null());
        with_sbin(&mut cmd);
        cmd
    }

    /// [`NetNs::command`] under `timeout -k 5 SECS`: SIGTERM after `limit`, SIGKILL 5 s later,
    /// and then exit status 124 (137 after the SIGKILL), so a hung tool fails its test instead
    /// of hanging it.
    pub fn command_within(&self, limit: Duration, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("timeout");
        let secs = limit.as_secs().max(1).to_string();
        cmd.args(["-k", KILL_AFTER, &secs, "ip", "netns", "exec", &self.name]).arg(program).stdin(Stdio::null());
        with_sbin(&mut cmd);
        cmd
    }

    /// Runs `argv` in the namespace; it must succeed. Its output.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().ok_or_else(|| Error::new("exec: empty command"))?;
        checked(self.command(program).args(args))
    }

    /// Spawns `cmd` (made with [`NetNs::command`] or [`NetNs::command_within`]) and records its
    /// pid: dropping this handle kills it if it still runs.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let child = cmd.spawn().map_err(|e| Error::new(format!("cannot start {cmd:?}: {e}")))?;
        self.children.lock().unwrap_or_else(|e| e.into_inner()).push(child.id());
        Ok(child)
    }

    /// Runs `body` on a new thread inside the namespace and waits for it; a panic in `body`
    /// goes on in the caller.
    pub fn run<T: Send>(&self, body: impl FnOnce() -> T + Send) -> Result<T> {
        let file = self.open()?;
        let name = self.name.as_str();
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || -> Result<T> {
                enter(&file, name)?;
                Ok(body())
            });
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `body` on a new thread named `thread_name` inside the namespace (its sockets live
    /// there) and returns once the thread is in.
    pub fn thread<T: Send + 'static>(
        &self,
        thread_name: &str,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<T>> {
        let file = self.open()?;
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                let entered = enter(&file, &name);
                let failed = entered.is_err();
                let _ = tx.send(entered);
                if failed {
                    // Not in the namespace: the caller has the error; end without a panic message.
                    std::panic::resume_unwind(Box::new("not in the namespace"));
                }
                body()
            })
            .map_err(|e| Error::new(format!("cannot start a thread: {e}")))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(format!("the thread entering {} ended", self.name))),
        }
    }

    /// Pids of the processes inside the namespace (those whose network namespace it is).
    pub fn pids(&self) -> Vec<u32> {
        let Ok(ns) = std::fs::metadata(self.path()) else { return Vec::new() };
        let Ok(proc) = std::fs::read_dir("/proc") else { return Vec::new() };
        proc.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|m| (m.dev(), m.ino()) == (ns.dev(), ns.ino()))
            })
            .collect()
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).map_err(|e| Error::new(format!("cannot open {}: {e}", self.path().display())))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let me = std::process::id();
        for &pid in self.children.get_mut().unwrap_or_else(|e| e.into_inner()).iter() {
            // Only a child of ours that still runs: a reaped pid may belong to anyone by now.
            if parent_if_running(pid) == Some(me) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        if !self.owned {
            return;
        }
        // Whatever else is inside (grandchildren, daemons): nothing else can be, it is ours.
        let deadline = Instant::now() + DRAIN;
        loop {
            let left = self.pids();
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Deletes the namespaces `mv-<tag>…-<pid>-<n>` whose creating process is gone (or a zombie):
/// what a killed run left behind. Returns the pids of those runs, for their other leftovers.
pub fn remove_stale(tag: &str) -> Vec<u32> {
    let mut gone = Vec::new();
    let Ok(dir) = std::fs::read_dir(RUN_NETNS) else { return gone };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("mv-").and_then(|r| r.strip_prefix(tag)) else { continue };
        let mut fields = rest.rsplitn(3, '-');
        let (Some(n), Some(pid), Some(_)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let (Ok(_), Ok(pid)) = (n.parse::<u64>(), pid.parse::<u32>()) else { continue };
        if parent_if_running(pid).is_none() {
            let _ = ip(&["netns", "del", &name]);
            if !gone.contains(&pid) {
                gone.push(pid);
            }
        }
    }
    gone
}

/// `ip ARGS` (host side), which must succeed; its output.
pub fn ip(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("ip");
    cmd.args(args).stdin(Stdio::null());
    with_sbin(&mut cmd);
    checked(&mut cmd)
}

/// Runs `cmd` to its end; it must succeed. Its output, or an error with its stderr.
fn checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().map_err(|e| Error::new(format!("cannot run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// iproute2, nftables and sysctl live in /usr/sbin, which a non-login PATH may lack.
fn with_sbin(cmd: &mut Command) {
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{path}:/usr/sbin:/sbin"));
}

/// The parent pid of `pid` if it runs (exists and is not a zombie).
fn parent_if_running(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state (field 3), ppid (field 4).
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    (state != "Z").then(|| fields.next()?.parse().ok()).flatten()
}

/// Moves the calling thread into the namespace `file` (named `name`), then checks that the
/// thread and a child process it starts are in it.
fn enter(file: &File, name: &str) -> Result<()> {
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| Error::new(format!("cannot enter {name}: setns: {e}")))?;
    let want = file.metadata().map_err(|e| Error::new(format!("{name}: {e}")))?;
    let own = std::fs::metadata("/proc/thread-self/ns/net").map_err(|e| Error::new(format!("ns/net: {e}")))?;
    if (own.dev(), own.ino()) != (want.dev(), want.ino()) {
        return Err(Error::new(format!("setns left the thread outside {name}")));
    }
    let own = std::fs::read_link("/proc/thread-self/ns/net").map_err(|e| Error::new(format!("ns/net: {e}")))?;
    let child = checked(Command::new("readlink").arg("/proc/self/ns/net").stdin(Stdio::null()))?;
    let child = String::from_utf8_lossy(&child.stdout);
    if child.trim() != own.to_string_lossy() {
        return Err(Error::new(format!(
            "a child of a thread in {name} is in {}, not {}: stopping before anything runs there",
            child.trim(),
            own.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_entered_joined_and_deleted_with_its_processes() {
        let a = NetNs::new("nstest").unwrap();
        let b = NetNs::new("nstest").unwrap();
        assert_ne!(a.name(), b.name());
        assert!(a.name().starts_with(&format!("mv-nstest-{}-", std::process::id())), "{}", a.name());
        a.veth("va", &b, "vb").unwrap();
        a.addr("va", &["10.99.0.1/24", "fd99::1/64"]).unwrap();
        b.addr("vb", &["10.99.0.2/24", "fd99::2/64"]).unwrap();
        a.sysctl("net.ipv4.ip_forward=1").unwrap();
        assert_eq!(a.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).unwrap().stdout, b"1\n");
        assert_eq!(b.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).unwrap().stdout, b"0\n");
        assert_eq!(a.mac("va").unwrap().len(), 17);
        // A socket of a thread inside reaches the other namespace over the veth.
        let server = b.run(|| std::net::UdpSocket::bind("10.99.0.2:7777").unwrap()).unwrap();
        let client = a
            .thread("nstest", || {
                let s = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
                s.send_to(b"hello", "10.99.0.2:7777").unwrap();
            })
            .unwrap();
        client.join().unwrap();
        let mut buf = [0u8; 16];
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.ip().to_string().as_str()), (&b"hello"[..], "10.99.0.1"));
        // A spawned child (and its own child) die with the namespace, which is deleted.
        let mut sleeper = a.spawn(a.command("sh").args(["-c", "sleep 600 & sleep 600"])).unwrap();
        let path = a.path();
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.pids().len() < 2 {
            assert!(Instant::now() < deadline, "the children did not start: {:?}", a.pids());
            std::thread::sleep(Duration::from_millis(10));
        }
        let inside = a.pids();
        drop(a);
        assert!(sleeper.wait().is_ok());
        assert!(!path.exists(), "{} left", path.display());
        for pid in inside {
            assert_eq!(parent_if_running(pid), None, "{pid} still runs");
        }
        // The peer end of the veth goes with it (the kernel cleans a namespace up a little later).
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.ip(&["link", "show", "vb"]).is_ok() {
            assert!(Instant::now() < deadline, "the veth outlived its namespace");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn errors_name_the_command_and_existing_is_not_deleted() {
        let ns = NetNs::new("nstest").unwrap();
        let e = ns.ip(&["link", "show", "no-such-device"]).unwrap_err().to_string();
        assert!(e.contains("no-such-device") && e.contains("failed"), "{e}");
        assert!(NetNs::existing("mv-nstest-no-such-namespace").is_err());
        let other = NetNs::existing(ns.name()).unwrap();
        drop(other);
        assert!(ns.path().exists(), "dropping a handle of an existing namespace deleted it");
        assert!(ns.command_within(Duration::from_secs(5), "true").status().unwrap().success());
    }

    #[test]
    fn stale_namespaces_of_dead_runs_are_removed() {
        // A pid that runs no process: beyond pid_max, which is at most 2^22.
        let dead = 1u32 << 23;
        let stale = format!("mv-nsstale-x-{dead}-0");
        ip(&["netns", "add", &stale]).unwrap();
        let live = NetNs::new("nsstale-y").unwrap();
        assert_eq!(remove_stale("nsstale"), vec![dead]);
        assert!(!Path::new(RUN_NETNS).join(&stale).exists());
        assert!(live.path().exists(), "a live run's namespace was removed");
    }
}
