//! Operating-system helpers: CPU time and socket drops from `/proc`, socket buffers, UDP GRO
//! receives, child processes that are always reaped, readiness and metrics probes, a run's
//! temporary directory.

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::socket::{self as sock, ControlMessageOwned, MsgFlags, SockaddrStorage, sockopt};
use std::collections::BTreeMap;
use std::io::{BufRead, IoSliceMut, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A directory of this run's files (keys, configurations, logs), removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/<name>-<pid>`, first removing what a killed run of this pid left there.
    pub(crate) fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Clock ticks per second of `/proc/*/stat` times.
fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// utime + stime in seconds from the text of a `/proc/.../stat` file, and the command name.
fn parse_stat(text: &str) -> Option<(String, f64)> {
    let (name, user, system) = parse_stat_split(text)?;
    Some((name, user + system))
}

/// The command name, utime and stime in seconds, from the text of a `/proc/.../stat` file.
fn parse_stat_split(text: &str) -> Option<(String, f64, f64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_string();
    // Fields after the name: state (3rd field of the file), ..., utime (14th), stime (15th).
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime as f64 / clock_ticks(), stime as f64 / clock_ticks()))
}

/// CPU seconds (user + system) a process has used so far, all threads included.
pub fn process_cpu(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_stat(&text).map(|(_, s)| s).ok_or_else(|| anyhow!("cannot parse {path}"))
}

/// CPU seconds (user, system) a process has used so far, all threads included.
pub fn process_cpu_split(pid: u32) -> Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_stat_split(&text).map(|(_, u, s)| (u, s)).ok_or_else(|| anyhow!("cannot parse {path}"))
}

/// CPU seconds all cores of the machine spent so far: busy (everything but idle and iowait in
/// `/proc/stat`, steal included), and of that, in soft interrupts (where the kernel accounts
/// them apart from any process: loopback's receive path, mostly).
pub fn machine_cpu() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else { return (0.0, 0.0) };
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest times are inside user).
    let busy: u64 = f.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    let softirq = f.get(6).copied().unwrap_or(0);
    (busy as f64 / clock_ticks(), softirq as f64 / clock_ticks())
}

/// CPU seconds per thread name (threads of one name are added up).
pub fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for entry in dir.flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some((name, secs)) = parse_stat(&text)
        {
            *out.entry(name).or_insert(0.0) += secs;
        }
    }
    out
}

/// Datagrams the kernel dropped on the UDP sockets bound to `port` (all of a reuseport group),
/// from the last column of `/proc/net/udp`: receive buffer full, mostly.
pub fn udp_socket_drops(port: u16) -> u64 {
    udp_socket_drops_at("/proc/net/udp", port)
}

/// [`udp_socket_drops`] from another `/proc/.../net/udp`: `/proc/PID/net/udp` for a process's
/// network namespace, `/proc/thread-self/net/udp` for the calling thread's.
pub fn udp_socket_drops_at(path: &str, port: u16) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else { return 0 };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port).then(|| f.last()?.parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// Raises a socket's buffers to `bytes` (forced beyond `rmem_max` where the process may).
pub fn deep_buffers(socket: &impl AsFd, bytes: usize) {
    if sock::setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = sock::setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
    if sock::setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = sock::setsockopt(socket, sockopt::SndBuf, &bytes);
    }
}

/// A free loopback UDP port (bound and released: another process could take it in between,
/// which the relay's bind would then report).
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free loopback TCP port (bound and released).
pub fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Sets `stop` when stdin reaches end of file: a child's way of noticing that its parent is
/// gone or done with it.
pub fn stop_on_stdin_eof(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        stop.store(true, Ordering::Relaxed);
    });
}

/// Environment variable naming the orchestrator's pid, for [`die_with_parent`].
const PARENT_ENV: &str = "MESHVPN_PERF_PARENT";

/// Called first by every child subcommand: asks the kernel to kill this process when the
/// orchestrator dies (`PR_SET_PDEATHSIG`), and exits if it already has, so a killed `perf relay`
/// leaves nothing running.
pub fn die_with_parent() {
    let Some(parent) = std::env::var(PARENT_ENV).ok().and_then(|p| p.parse::<i32>().ok()) else { return };
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() != parent {
        std::process::exit(1);
    }
}

/// A child process that is killed and reaped when dropped, and killed by the kernel if this
/// process dies first (the child calls [`die_with_parent`]).
pub struct ChildGuard {
    pub child: Child,
    pub name: &'static str,
}

impl ChildGuard {
    /// Spawns `cmd` under a guard.
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        cmd.env(PARENT_ENV, std::process::id().to_string());
        let child = cmd.spawn().with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(Self { child, name })
    }

    /// Spawns `cmd` (made by `ns.command`) under a guard, recorded by `ns` too: if this
    /// process unwinds past both, dropping the namespace kills the child.
    pub fn spawn_in(name: &'static str, ns: &netns::NetNs, cmd: &mut Command) -> Result<Self> {
        cmd.env(PARENT_ENV, std::process::id().to_string());
        let child = ns.spawn(cmd).with_context(|| format!("cannot start {name}"))?;
        Ok(Self { child, name })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the child has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// SIGTERM, up to 5 s to exit, then SIGKILL; always reaps.
    pub fn stop(&mut self) {
        drop(self.child.stdin.take());
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until a STUN Binding request to `addr` is answered (the relay's data path is up),
/// checking that `child` is still running; at most `wait`.
pub fn wait_for_stun(addr: SocketAddr, child: &mut ChildGuard, wait: Duration) -> Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut req = [0u8; 64];
    let n = cellproto::stun::Message::binding_request(*b"perf-ready!!")
        .encode(&mut req, true)
        .map_err(|e| anyhow!("cannot encode STUN request: {e}"))?;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        child.check_alive()?;
        socket.send_to(&req[..n], addr)?;
        if let Ok((len, _)) = socket.recv_from(&mut buf)
            && cellproto::stun::is_stun(&buf[..len])
        {
            return Ok(());
        }
    }
    bail!("{} did not answer STUN on {addr} within {wait:?}", child.name)
}

/// Reads a Prometheus text endpoint into (series with labels → value).
pub fn scrape(addr: SocketAddr) -> Result<BTreeMap<String, f64>> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: perf\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    std::io::BufReader::new(conn).read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
        .collect())
}

/// Sum of the series of metric `name` (any labels).
pub fn metric_sum(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter().filter(|(k, _)| k.split('{').next() == Some(name)).map(|(_, v)| v).sum()
}

/// Reads one line from a child's stdout through a channel, with a bound on the wait.
pub struct LineReader {
    rx: std::sync::mpsc::Receiver<String>,
}

impl LineReader {
    /// Starts a thread that forwards the lines of `from`.
    pub fn new(from: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { rx }
    }

    /// The next line, or an error after `wait` or at end of file.
    pub fn next(&self, wait: Duration) -> Result<String> {
        self.rx.recv_timeout(wait).map_err(|e| anyhow!("no line from the load generator ({e})"))
    }
}

/// One `recvmsg` into `buf` on a socket with UDP GRO on: the bytes received, the IPv4 sender,
/// and the size of the datagrams they hold (all but the last have it; the bytes themselves
/// when the kernel coalesced nothing). `None` when nothing was received (timeout, signal).
pub fn recv_gro(fd: RawFd, buf: &mut [u8], cmsg: &mut [u8]) -> Option<(usize, Option<SocketAddr>, usize)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = sock::recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty()).ok()?;
    let segment = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|c| match c {
            ControlMessageOwned::UdpGroSegments(s) => usize::try_from(s).ok(),
            _ => None,
        })
    });
    let from = msg.address.and_then(|a| a.as_sockaddr_in().map(|s| SocketAddr::V4(SocketAddrV4::from(*s))));
    let len = msg.bytes;
    Some((len, from, segment.filter(|&s| s > 0).unwrap_or(len.max(1))))
}

/// Waits until `received` reaches `sent` or stops moving for `quiet` (bounded: a counter that
/// keeps moving reaches `sent`, one that stops ends the wait after `quiet`).
pub fn wait_quiet(received: &std::sync::atomic::AtomicU64, sent: u64, quiet: Duration) {
    let mut last = received.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        let now = received.load(Ordering::Relaxed);
        if now >= sent {
            return;
        }
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let t = "1234 (worker-0 x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        let (name, secs) = parse_stat(t).unwrap();
        assert_eq!(name, "worker-0 x");
        assert!((secs - 300.0 / clock_ticks()).abs() < 1e-9);
        assert!(process_cpu(std::process::id()).is_ok());
    }

    #[test]
    fn metric_sums() {
        let mut m = BTreeMap::new();
        m.insert("relayd_drops_total{worker=\"0\",reason=\"a\"}".to_string(), 2.0);
        m.insert("relayd_drops_total{worker=\"1\",reason=\"a\"}".to_string(), 3.0);
        m.insert("relayd_drops_totalx".to_string(), 7.0);
        assert_eq!(metric_sum(&m, "relayd_drops_total"), 5.0);
    }
}
