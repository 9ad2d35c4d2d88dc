//! Network namespaces of the test's own for nftables tests: made, entered by a thread (and
//! the processes it starts), and deleted by a drop guard even when the test fails.
//!
//! `setns` moves only the calling thread, and a child process starts in the namespaces of the
//! thread that spawned it, so the `nft` processes exitd's `nft` module runs act on the test's
//! namespace. Before every body, [`NetNs::run`] checks this with a child (`readlink
//! /proc/self/ns/net`) and stops if it does not hold: the host's ruleset is never touched.

use nix::sched::{CloneFlags, setns};
use std::fs::File;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

/// A network namespace of our own, deleted on drop.
pub struct NetNs {
    /// Its name (`ip netns`).
    pub name: String,
}

impl NetNs {
    /// A fresh namespace (root only).
    pub fn new() -> NetNs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the nftables tests need root (CAP_NET_ADMIN, and CAP_SYS_ADMIN for setns): run them as root, as CI does"
        );
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("meshvpn-nft-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        cmd("ip", &["netns", "add", &name]);
        NetNs { name }
    }

    /// `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        cmd("ip", &all);
    }

    /// `sysctl -w SETTING` inside the namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, setting: &str) {
        cmd("ip", &["netns", "exec", &self.name, "sysctl", "-q", "-w", setting]);
    }

    /// Runs `body` on a thread that has entered the namespace, propagating its panic. Refuses to
    /// run it unless both that thread and the processes it starts are in the namespace.
    pub fn run<T: Send>(&self, body: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(format!("/run/netns/{}", self.name)).expect("open the namespace");
        thread::scope(|scope| {
            let thread = scope.spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns(CLONE_NEWNET)");
                let own = std::fs::read_link("/proc/thread-self/ns/net").expect("readlink ns/net");
                let child = cmd("readlink", &["/proc/self/ns/net"]);
                let host = std::fs::read_link("/proc/1/ns/net").ok();
                assert_eq!(
                    String::from_utf8_lossy(&child.stdout).trim(),
                    own.to_string_lossy(),
                    "a child of the thread is not in the test's namespace: stopping before nft runs"
                );
                assert_ne!(Some(own), host, "setns left the thread in the host's namespace");
                body()
            });
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The namespace's whole ruleset as `nft -j list ruleset` prints it.
    pub fn ruleset(&self) -> serde_json::Value {
        let out = self.run(|| cmd("nft", &["-j", "list", "ruleset"]));
        serde_json::from_slice(&out.stdout).expect("nft -j prints JSON")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Runs a command, which must succeed.
pub fn cmd(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

impl NetNs {
    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> String {
        let out = cmd("ip", &["netns", "exec", &self.name, "cat", &format!("/sys/class/net/{dev}/address")]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Static IPv6 neighbour entries both ways between `a`'s `a_dev` (addresses `a_addrs`) and
/// `b`'s `b_dev` (addresses `b_addrs`): exitd's input chain drops everything from its TUN
/// device, neighbour discovery included (a real TUN device has none), so a test whose "TUN" is
/// a veth resolves neighbours statically.
pub fn static_neighbours(a: &NetNs, a_dev: &str, a_addrs: &[&str], b: &NetNs, b_dev: &str, b_addrs: &[&str]) {
    let (a_mac, b_mac) = (a.mac(a_dev), b.mac(b_dev));
    for addr in b_addrs {
        a.ip(&["neigh", "replace", addr, "lladdr", &b_mac, "dev", a_dev, "nud", "permanent"]);
    }
    for addr in a_addrs {
        b.ip(&["neigh", "replace", addr, "lladdr", &a_mac, "dev", b_dev, "nud", "permanent"]);
    }
}
