//! The control socket: a Unix stream socket where `meshvpn status` and `meshvpn down` reach
//! the running client. One JSON request per line, one JSON answer per line; only root (the
//! socket is mode 0600) may ask. A `watch` request is answered by a stream of [`Update`]
//! lines: one at once, one whenever the state or its reason changes, and one every
//! [`WATCH_TICK`] otherwise, until either side closes the connection.
//!
//! The client side ([`request`], [`status`], [`watch`]) is blocking; the daemon's side
//! ([`serve`]) runs as one tokio task per connection and asks the driver for each status.

use crate::tunnel::State;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream as AsyncUnixStream;
use tokio::sync::{mpsc, oneshot, watch as changes};

/// Longest request line the daemon reads; whatever is longer is cut off there, and so refused
/// as malformed.
pub const MAX_REQUEST_LEN: u64 = 4096;
/// How often a watch stream sends the status when nothing changes: often enough for counters
/// and RTT to look live, rarely enough to cost nothing.
pub const WATCH_TICK: Duration = Duration::from_secs(1);
/// How long a watcher waits for the next line before it gives up on the daemon: several ticks.
const WATCH_SILENCE: Duration = Duration::from_secs(5);
/// How long the daemon waits for a request line after a connection opens.
const REQUEST_WAIT: Duration = Duration::from_secs(5);

/// What a command asks the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "cmd")]
pub enum Request {
    /// The current status.
    Status,
    /// Tear down and exit.
    Down,
    /// A stream of status updates ([`Answer::Update`]): at once, on each change of state or
    /// reason, and every [`WATCH_TICK`].
    Watch,
    /// Netcheck's first phase from the client's data socket ([`Answer::Netcheck`]): the
    /// reflexive address its cells use.
    Netcheck,
}

impl Request {
    /// Parses one request line as the daemon receives it: a JSON object (the decoder the
    /// `control` fuzz target in `client/fuzz` drives).
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// A relay of the path, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopStatus {
    /// Nickname from its descriptor.
    pub nickname: String,
    /// Identity (hex).
    pub identity: String,
    /// UDP address.
    pub address: String,
}

/// Everything `meshvpn status` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Connecting, up or rebuilding.
    pub state: State,
    /// Why it is not up, or the last problem.
    pub reason: Option<String>,
    /// Guard first, exit last.
    pub path: Vec<HopStatus>,
    /// The session's exit.
    pub exit: Option<HopStatus>,
    /// Inner IPv4 address from the exit.
    pub inner_ipv4: Option<String>,
    /// Inner IPv6 address from the exit.
    pub inner_ipv6: Option<String>,
    /// Resolvers inside the tunnel.
    pub dns: Vec<String>,
    /// IP bytes sent into the tunnel.
    pub bytes_sent: u64,
    /// IP bytes received from it.
    pub bytes_received: u64,
    /// Packets sent.
    pub packets_sent: u64,
    /// Packets received.
    pub packets_received: u64,
    /// Packets dropped because no circuit was up (kept inside by the kill switch).
    pub packets_dropped: u64,
    /// Received datagrams that were not valid cells of the current circuit.
    pub cells_rejected: u64,
    /// Received datagrams that were neither a relay's cell nor an answer to a STUN request of
    /// ours (counted, logged at powers of two).
    #[serde(default)] // absent from an older daemon's answer
    pub stray_datagrams: u64,
    /// Authentic cells refused: a control answer from a hop that may not send it or that
    /// answers nothing asked, or an exit's unusable ATTACHED (a hostile or broken relay).
    #[serde(default)] // absent from an older daemon's answer
    pub control_refused: u64,
    /// Cells the kernel refused to send (lost).
    pub send_errors: u64,
    /// Packets the TUN device refused (lost).
    pub tun_write_errors: u64,
    /// Reads from the TUN device that failed or were malformed (lost).
    pub tun_read_errors: u64,
    /// Last PING/PONG round trip to the exit.
    pub rtt_ms: Option<f64>,
    /// Cipher suite per hop.
    pub suites: Vec<String>,
    /// Seconds since `up`.
    pub uptime_secs: u64,
    /// Seconds since the current circuit came up.
    pub circuit_age_secs: Option<u64>,
    /// Time the current circuit took to build.
    pub circuit_build_ms: Option<f64>,
    /// Circuits built to replace a failed one.
    pub rebuilds: u64,
    /// Times the exit (and so the inner addresses) changed.
    pub exit_changes: u64,
    /// Times the exit answered a resume with a new session (new inner addresses).
    #[serde(default)] // absent from an older daemon's answer
    pub session_changes: u64,
    /// Circuits closed because their cells showed tampering on the path.
    #[serde(default)] // absent from an older daemon's answer
    pub tampered: u64,
    /// When the directory in use expires (unix seconds).
    #[serde(default)] // absent from an older daemon's answer
    pub directory_expires: u64,
    /// Whether it has: no new circuit is built until a fresh one is loaded.
    #[serde(default)] // absent from an older daemon's answer
    pub directory_expired: bool,
    /// The kept guards, preferred first (identities, hex).
    #[serde(default)] // absent from an older daemon's answer
    pub guards: Vec<String>,
    /// Whether the kill switch is installed.
    pub kill_switch: bool,
    /// Packets the kill switch dropped.
    pub kill_switch_drops: Option<u64>,
    /// The TUN device.
    pub tun: Option<String>,
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Up => "up",
            State::Connecting => "connecting",
            State::Rebuilding => "rebuilding",
        };
        writeln!(f, "state:        {state}")?;
        if let Some(r) = &self.reason {
            writeln!(f, "reason:       {r}")?;
        }
        let path: Vec<String> = self.path.iter().map(|h| format!("{} ({})", h.nickname, h.address)).collect();
        writeln!(f, "path:         {}", path.join(" -> "))?;
        if let Some(e) = &self.exit {
            writeln!(f, "exit:         {} {}", e.nickname, e.identity)?;
        }
        let inner: Vec<&str> = self.inner_ipv4.iter().chain(&self.inner_ipv6).map(String::as_str).collect();
        writeln!(f, "inner:        {}", inner.join(", "))?;
        writeln!(f, "dns:          {}", self.dns.join(", "))?;
        writeln!(
            f,
            "traffic:      sent {} ({} packets), received {} ({} packets)",
            human_bytes(self.bytes_sent),
            self.packets_sent,
            human_bytes(self.bytes_received),
            self.packets_received,
        )?;
        writeln!(
            f,
            "dropped:      {} while down, {} bad cells, {} stray datagrams, {} refused, {} send errors, {} TUN write and {} read errors",
            self.packets_dropped,
            self.cells_rejected,
            self.stray_datagrams,
            self.control_refused,
            self.send_errors,
            self.tun_write_errors,
            self.tun_read_errors
        )?;
        match self.rtt_ms {
            Some(r) => writeln!(f, "rtt:          {r:.2} ms")?,
            None => writeln!(f, "rtt:          -")?,
        }
        writeln!(f, "suites:       {}", self.suites.join(", "))?;
        if let Some(b) = self.circuit_build_ms {
            writeln!(f, "circuit:      built in {b:.1} ms, {} rebuilds, {} tampered", self.rebuilds, self.tampered)?;
        }
        let guards: Vec<String> = self.guards.iter().map(|g| g.chars().take(16).collect()).collect();
        writeln!(f, "guards:       {}", if guards.is_empty() { "-".into() } else { guards.join(", ") })?;
        writeln!(f, "uptime:       {} s", self.uptime_secs)?;
        if self.directory_expired {
            writeln!(
                f,
                "directory:    EXPIRED (at {}): no new circuit until a fresh one is loaded (SIGHUP)",
                self.directory_expires
            )?;
        } else {
            writeln!(f, "directory:    valid until {} (unix time)", self.directory_expires)?;
        }
        let ks = match (self.kill_switch, self.kill_switch_drops) {
            (true, Some(n)) => format!("on ({n} packets stopped)"),
            (true, None) => "on".into(),
            (false, _) => "off".into(),
        };
        writeln!(f, "kill switch:  {ks}")
    }
}

/// Answer to a request: a status, an acknowledgement of `down`, or one line of a watch stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "answer")]
pub enum Answer {
    /// The status.
    Status(Box<Status>),
    /// `down` accepted: the daemon is stopping.
    Stopping,
    /// One update of a watch stream.
    Update(Box<Update>),
    /// What `netcheck` found.
    Netcheck(Box<crate::netcheck::Report>),
    /// The request could not be served, and why.
    Error {
        /// Why.
        error: String,
    },
}

/// Why a watch stream sent an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The first update, at once.
    Start,
    /// The state or its reason changed.
    Change,
    /// [`WATCH_TICK`] passed without a change.
    Tick,
}

/// One update of a watch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// Why it was sent.
    pub trigger: Trigger,
    /// The status at that moment.
    pub status: Status,
}

impl Answer {
    /// Parses one answer line as `meshvpn status` and `down` receive it.
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// Sends `request` to the daemon at `socket` and waits (bounded) for its answer.
pub fn request(socket: &Path, request: Request) -> Result<Answer> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).context("no answer from meshvpn")?;
    if answer.is_empty() {
        bail!("meshvpn closed the control connection without answering");
    }
    Answer::parse(&answer).context("malformed answer from meshvpn")
}

/// The daemon's status, from `socket`.
pub fn status(socket: &Path) -> Result<Status> {
    match request(socket, Request::Status)? {
        Answer::Status(s) => Ok(*s),
        Answer::Stopping => bail!("meshvpn is stopping"),
        other => bail!("meshvpn answered a status request with {other:?}"),
    }
}

/// Watches the daemon at `socket`: `each` gets every update until it returns `false`, or the
/// daemon closes the stream (it stopped), which returns `Ok`.
pub fn watch(socket: &Path, mut each: impl FnMut(Update) -> Result<bool>) -> Result<()> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(WATCH_SILENCE))?;
    let mut line = serde_json::to_string(&Request::Watch)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut answer = String::new();
        let n = reader
            .read_line(&mut answer)
            .with_context(|| format!("no update from meshvpn for {} s", WATCH_SILENCE.as_secs()))?;
        if n == 0 {
            return Ok(());
        }
        match Answer::parse(&answer).context("malformed update from meshvpn")? {
            Answer::Update(u) => {
                if !each(*u)? {
                    return Ok(());
                }
            }
            Answer::Stopping => return Ok(()),
            Answer::Error { error } => bail!("meshvpn refused: {error}"),
            other => bail!("meshvpn answered a watch request with {other:?}"),
        }
    }
}

/// A request for the driver, and where its answer goes.
pub type ToDriver = mpsc::Sender<(Request, oneshot::Sender<Answer>)>;

/// What a watch stream follows: the state and its reason. The driver publishes it (only when
/// it changed) after each wake-up.
pub type Changes = changes::Receiver<(State, Option<String>)>;

/// Serves one control connection: reads one request line (at most [`MAX_REQUEST_LEN`] bytes,
/// within 5 s), asks the driver, writes the answer; for `watch`, keeps writing updates until
/// the other side goes away or the driver stops.
pub async fn serve(stream: AsyncUnixStream, to_driver: ToDriver, mut changes: Changes) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST_LEN));
    let read = tokio::time::timeout(REQUEST_WAIT, reader.read_line(&mut line)).await;
    let Ok(Ok(_)) = read else { return };
    let Ok(request) = Request::parse(&line) else {
        let _ = write.write_all(b"{\"error\":\"bad request\"}\n").await;
        return;
    };
    match request {
        Request::Down => {
            // Answer first: once the driver has the request it stops, and this task with it.
            let _ = write_answer(&mut write, &Answer::Stopping).await;
            let (tx, _) = oneshot::channel();
            let _ = to_driver.send((request, tx)).await;
        }
        Request::Netcheck => {
            let (tx, rx) = oneshot::channel();
            if to_driver.send((request, tx)).await.is_ok()
                && let Ok(answer) = rx.await
            {
                let _ = write_answer(&mut write, &answer).await;
            }
        }
        Request::Status => {
            if let Some(status) = ask_status(&to_driver).await {
                let _ = write_answer(&mut write, &Answer::Status(status)).await;
            }
        }
        Request::Watch => {
            changes.mark_unchanged();
            let mut trigger = Trigger::Start;
            while let Some(status) = ask_status(&to_driver).await {
                let update = Answer::Update(Box::new(Update { trigger, status: *status }));
                if write_answer(&mut write, &update).await.is_err() {
                    return;
                }
                trigger = tokio::select! {
                    changed = changes.changed() => match changed {
                        Ok(()) => Trigger::Change,
                        Err(_) => return, // the driver is gone
                    },
                    _ = tokio::time::sleep(WATCH_TICK) => Trigger::Tick,
                };
            }
        }
    }
}

/// The driver's status now, or `None` if it stopped.
async fn ask_status(to_driver: &ToDriver) -> Option<Box<Status>> {
    let (tx, rx) = oneshot::channel();
    to_driver.send((Request::Status, tx)).await.ok()?;
    match rx.await.ok()? {
        Answer::Status(s) => Some(s),
        _ => None,
    }
}

async fn write_answer(write: &mut tokio::net::unix::OwnedWriteHalf, answer: &Answer) -> std::io::Result<()> {
    let mut text = serde_json::to_string(answer).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.flush().await
}
