//! Prometheus metrics. Workers count in plain integers on the hot path and publish them here
//! with relaxed stores every few milliseconds: no atomic read-modify-write and no shared cache
//! line per cell. Each worker's block is cache-line aligned; only the metrics thread reads it.

use cellio::DatapathStats;
use cellproto::relay::DropReason;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Drop reasons, in metric order: cellproto's, then relayd's own.
pub const DROP_LABELS: [&str; 11] = [
    DropReason::UnknownCircuit.label(),
    DropReason::Malformed.label(),
    DropReason::BadTag.label(),
    DropReason::Replay.label(),
    DropReason::UnknownCommand.label(),
    DropReason::Protocol.label(),
    DropReason::WrongPeer.label(),
    DropReason::Limit.label(),
    "overload",
    "stun_limit",
    "cookie_limit",
];

/// Index of a drop reason in [`DROP_LABELS`].
pub const fn drop_index(r: DropReason) -> usize {
    match r {
        DropReason::UnknownCircuit => 0,
        DropReason::Malformed => 1,
        DropReason::BadTag => 2,
        DropReason::Replay => 3,
        DropReason::UnknownCommand => 4,
        DropReason::Protocol => 5,
        DropReason::WrongPeer => 6,
        DropReason::Limit => 7,
    }
}
/// [`DROP_LABELS`] index of cells dropped because the control plane's queue was full, and of
/// CREATEs under load beyond the worker's budget of CREATEs examined (`limits.cookie_check_rate`).
/// (CREATEs refused by the per-source limits are counted by the control thread, as
/// `relayd_handshakes_total{result="rate_limited"}`.)
pub const DROP_OVERLOAD: usize = 8;
/// [`DROP_LABELS`] index of STUN requests not answered: over the per-source or per-worker rate.
pub const DROP_STUN_LIMIT: usize = 9;
/// [`DROP_LABELS`] index of CREATEs without a valid cookie under load whose COOKIE answer was
/// over the per-source or per-worker rate (so they got no answer at all).
pub const DROP_COOKIE_LIMIT: usize = 10;

/// A worker's counters as plain integers (owned by the worker thread).
#[derive(Debug, Default, Clone)]
pub struct WorkerCounters {
    /// Cells received.
    pub cells_in: u64,
    /// Cells sent (relayed or originated).
    pub cells_out: u64,
    /// Drops by [`DROP_LABELS`] index.
    pub drops: [u64; DROP_LABELS.len()],
    /// STUN requests answered.
    pub stun: u64,
    /// CREATEs that arrived (before any limit or cookie check).
    pub creates: u64,
    /// COOKIE answers sent (CREATEs under load without a valid cookie).
    pub cookies_sent: u64,
    /// CREATEs under load with a valid cookie (passed on to the control thread).
    pub cookies_valid: u64,
    /// Live circuits.
    pub circuits: u64,
    /// The data path's own counters (datagrams, send batches, errors).
    pub datapath: DatapathStats,
}

/// The published copy of a worker's counters.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerStats {
    cells_in: AtomicU64,
    cells_out: AtomicU64,
    drops: [AtomicU64; DROP_LABELS.len()],
    stun: AtomicU64,
    creates: AtomicU64,
    cookies: [AtomicU64; 2],
    circuits: AtomicU64,
    datapath: [AtomicU64; 5],
}

impl WorkerStats {
    /// Publishes the worker's counters (relaxed stores: one writer).
    pub fn publish(&self, c: &WorkerCounters) {
        self.cells_in.store(c.cells_in, Ordering::Relaxed);
        self.cells_out.store(c.cells_out, Ordering::Relaxed);
        for (a, v) in self.drops.iter().zip(c.drops) {
            a.store(v, Ordering::Relaxed);
        }
        self.stun.store(c.stun, Ordering::Relaxed);
        self.creates.store(c.creates, Ordering::Relaxed);
        self.cookies[0].store(c.cookies_sent, Ordering::Relaxed);
        self.cookies[1].store(c.cookies_valid, Ordering::Relaxed);
        self.circuits.store(c.circuits, Ordering::Relaxed);
        let d = &c.datapath;
        for (a, v) in self.datapath.iter().zip([d.rx_datagrams, d.tx_datagrams, d.tx_batches, d.rx_errors, d.tx_errors])
        {
            a.store(v, Ordering::Relaxed);
        }
    }

    /// Reads the last published counters.
    pub fn snapshot(&self) -> WorkerCounters {
        let mut drops = [0u64; DROP_LABELS.len()];
        for (d, a) in drops.iter_mut().zip(&self.drops) {
            *d = a.load(Ordering::Relaxed);
        }
        WorkerCounters {
            cells_in: self.cells_in.load(Ordering::Relaxed),
            cells_out: self.cells_out.load(Ordering::Relaxed),
            drops,
            stun: self.stun.load(Ordering::Relaxed),
            creates: self.creates.load(Ordering::Relaxed),
            cookies_sent: self.cookies[0].load(Ordering::Relaxed),
            cookies_valid: self.cookies[1].load(Ordering::Relaxed),
            circuits: self.circuits.load(Ordering::Relaxed),
            datapath: {
                let [rx_datagrams, tx_datagrams, tx_batches, rx_errors, tx_errors] =
                    self.datapath.each_ref().map(|a| a.load(Ordering::Relaxed));
                DatapathStats { rx_datagrams, tx_datagrams, tx_batches, rx_errors, tx_errors }
            },
        }
    }

    /// CREATEs this worker has counted so far (last published).
    pub fn creates(&self) -> u64 {
        self.creates.load(Ordering::Relaxed)
    }
}

/// Control-plane counters (one writer: the control thread).
#[derive(Debug, Default)]
pub struct ControlStats {
    /// Handshakes answered (new circuits).
    pub handshakes_ok: AtomicU64,
    /// Handshakes that failed (no matching onion key, bad extensions, malformed).
    pub handshakes_failed: AtomicU64,
    /// CREATEs refused by the per-source limits.
    pub rate_limited: AtomicU64,
    /// CREATEs refused, by [`REFUSAL_LABELS`] index.
    pub refused: [AtomicU64; REFUSAL_LABELS.len()],
    /// Live circuits created by CREATE (what `limits.max_circuits` caps).
    pub circuits: AtomicU64,
    /// `limits.max_circuits`.
    pub circuit_limit: AtomicU64,
    /// EXTENDs carried out.
    pub extends: AtomicU64,
    /// EXTENDs refused or unanswered.
    pub extends_failed: AtomicU64,
    /// EXTENDs waiting for the next hop's CREATED (gauge).
    pub pending_extends: AtomicU64,
    /// Answered CREATEs remembered for retransmissions (gauge).
    pub answered_creates: AtomicU64,
    /// LCIDs allocated, for circuits and pending EXTENDs (gauge).
    pub lcids_in_use: AtomicU64,
}

/// Why the control thread refused a CREATE, in metric order: the per-source limits
/// ([`crate::ratelimit::Refusal`]), then the global circuit cap.
pub const REFUSAL_LABELS: [&str; 4] = [
    crate::ratelimit::Refusal::Rate.label(),
    crate::ratelimit::Refusal::SourceCircuits.label(),
    crate::ratelimit::Refusal::Table.label(),
    "circuit_cap",
];
/// [`REFUSAL_LABELS`] index of the global circuit cap.
pub const REFUSED_CIRCUIT_CAP: usize = 3;

/// [`REFUSAL_LABELS`] index of a per-source refusal.
pub const fn refusal_index(r: crate::ratelimit::Refusal) -> usize {
    match r {
        crate::ratelimit::Refusal::Rate => 0,
        crate::ratelimit::Refusal::SourceCircuits => 1,
        crate::ratelimit::Refusal::Table => 2,
    }
}

impl ControlStats {
    /// Adds one to a counter. The control plane is not on the per-cell path.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A per-worker series: name, type, help, and how to read it.
type PerWorker = (&'static str, &'static str, &'static str, fn(&WorkerCounters) -> u64);

/// Everything the metrics endpoint shows.
pub struct Registry {
    /// One block per worker.
    pub workers: Vec<WorkerStats>,
    /// The control plane's.
    pub control: ControlStats,
    /// Which data path runs ("io_uring" or "recvmmsg").
    pub datapath: &'static str,
    /// Configuration reloads (SIGHUP): applied, refused (the old configuration kept).
    pub reloads_ok: AtomicU64,
    /// See `reloads_ok`.
    pub reloads_failed: AtomicU64,
    /// Whether the relay is under load (CREATEs need a cookie), shared with the workers.
    pub load: crate::ratelimit::LoadState,
    /// STUN requests on the alternate port not answered (over the rate limits).
    pub stun_alternate_limited: AtomicU64,
    /// More series appended by what embeds the engine (exitd's), set once after start.
    pub extra: std::sync::OnceLock<Box<dyn Fn() -> String + Send + Sync>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("workers", &self.workers.len()).field("datapath", &self.datapath).finish()
    }
}

impl Registry {
    /// A registry for `workers` workers; the relay is under load above `load_create_rate`
    /// CREATEs per second (`limits.load_create_rate`, 0: always).
    pub fn new(workers: usize, datapath: &'static str, load_create_rate: f64) -> Self {
        Self {
            load: crate::ratelimit::LoadState::new(load_create_rate),
            stun_alternate_limited: AtomicU64::new(0),
            workers: (0..workers).map(|_| WorkerStats::default()).collect(),
            control: ControlStats::default(),
            datapath,
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            extra: std::sync::OnceLock::new(),
        }
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let snaps: Vec<WorkerCounters> = self.workers.iter().map(WorkerStats::snapshot).collect();
        let _ = writeln!(out, "# HELP relayd_info Build and data path.\n# TYPE relayd_info gauge");
        let _ =
            writeln!(out, "relayd_info{{version=\"{}\",datapath=\"{}\"}} 1", env!("CARGO_PKG_VERSION"), self.datapath);
        let per_worker: [PerWorker; 5] = [
            ("relayd_cells_in_total", "counter", "Cells received.", |c| c.cells_in),
            ("relayd_cells_out_total", "counter", "Cells sent.", |c| c.cells_out),
            ("relayd_stun_requests_total", "counter", "STUN Binding requests answered.", |c| c.stun),
            ("relayd_creates_total", "counter", "CREATEs that arrived, before any limit.", |c| c.creates),
            ("relayd_circuits", "gauge", "Live circuits.", |c| c.circuits),
        ];
        for (name, kind, help, get) in per_worker {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, c) in snaps.iter().enumerate() {
                let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", get(c));
            }
        }
        // The data path's own counters: one group per family, as the text format requires.
        type Sample = (&'static str, fn(&DatapathStats) -> u64);
        let families: [(&str, &str, [Option<Sample>; 2]); 3] = [
            (
                "relayd_datapath_datagrams_total",
                "Datagrams through the data path, by direction.",
                [Some(("dir=\"rx\",", |d| d.rx_datagrams)), Some(("dir=\"tx\",", |d| d.tx_datagrams))],
            ),
            (
                "relayd_datapath_send_batches_total",
                "Send system calls or io_uring submissions.",
                [Some(("", |d| d.tx_batches)), None],
            ),
            (
                "relayd_datapath_errors_total",
                "Failed or truncated receives, failed sends (datagrams lost).",
                [Some(("dir=\"rx\",", |d| d.rx_errors)), Some(("dir=\"tx\",", |d| d.tx_errors))],
            ),
        ];
        for (name, help, samples) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (label, get) in samples.into_iter().flatten() {
                for (i, c) in snaps.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{{label}worker=\"{i}\"}} {}", get(&c.datapath));
                }
            }
        }
        let _ =
            writeln!(out, "# HELP relayd_drops_total Datagrams dropped, by reason.\n# TYPE relayd_drops_total counter");
        for (i, c) in snaps.iter().enumerate() {
            for (label, v) in DROP_LABELS.iter().zip(c.drops) {
                let _ = writeln!(out, "relayd_drops_total{{worker=\"{i}\",reason=\"{label}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP relayd_cookies_total CREATEs under load: COOKIE answered (sent), or carrying a valid cookie (valid).\n# TYPE relayd_cookies_total counter"
        );
        for (i, c) in snaps.iter().enumerate() {
            let _ = writeln!(out, "relayd_cookies_total{{worker=\"{i}\",result=\"sent\"}} {}", c.cookies_sent);
            let _ = writeln!(out, "relayd_cookies_total{{worker=\"{i}\",result=\"valid\"}} {}", c.cookies_valid);
        }
        self.render_load(&mut out);
        let c = &self.control;
        let _ =
            writeln!(out, "# HELP relayd_handshakes_total CREATE handshakes.\n# TYPE relayd_handshakes_total counter");
        let _ = writeln!(out, "relayd_handshakes_total{{result=\"ok\"}} {}", c.handshakes_ok.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "relayd_handshakes_total{{result=\"failed\"}} {}",
            c.handshakes_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "relayd_handshakes_total{{result=\"rate_limited\"}} {}",
            c.rate_limited.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP relayd_extends_total EXTEND requests.\n# TYPE relayd_extends_total counter");
        let _ = writeln!(out, "relayd_extends_total{{result=\"ok\"}} {}", c.extends.load(Ordering::Relaxed));
        let _ = writeln!(out, "relayd_extends_total{{result=\"failed\"}} {}", c.extends_failed.load(Ordering::Relaxed));
        let gauges: [(&str, &str, &AtomicU64); 3] = [
            ("relayd_pending_extends", "EXTENDs waiting for the next hop's answer.", &c.pending_extends),
            ("relayd_answered_creates", "Answered CREATEs kept for retransmissions.", &c.answered_creates),
            ("relayd_lcids_in_use", "Link circuit ids allocated (circuits and pending EXTENDs).", &c.lcids_in_use),
        ];
        for (name, help, value) in gauges {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", value.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP relayd_config_reloads_total Configuration reloads (SIGHUP): ok, or failed (old configuration kept).\n# TYPE relayd_config_reloads_total counter"
        );
        let _ =
            writeln!(out, "relayd_config_reloads_total{{result=\"ok\"}} {}", self.reloads_ok.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "relayd_config_reloads_total{{result=\"failed\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP relayd_stun_alternate_limited_total STUN requests on the alternate port not answered (rate limits).\n# TYPE relayd_stun_alternate_limited_total counter"
        );
        let _ = writeln!(
            out,
            "relayd_stun_alternate_limited_total {}",
            self.stun_alternate_limited.load(Ordering::Relaxed)
        );
        if let Some(extra) = self.extra.get() {
            out.push_str(&extra());
        }
        out
    }
}

impl Registry {
    /// The load state and the control thread's CREATE refusals and circuit cap.
    fn render_load(&self, out: &mut String) {
        let c = &self.control;
        let _ = writeln!(
            out,
            "# HELP relayd_under_load 1 while CREATEs need a cookie.\n# TYPE relayd_under_load gauge\nrelayd_under_load {}",
            u8::from(self.load.under_load())
        );
        let _ = writeln!(
            out,
            "# HELP relayd_under_load_entered_total Times the relay went under load.\n# TYPE relayd_under_load_entered_total counter\nrelayd_under_load_entered_total {}",
            self.load.times_entered()
        );
        let _ = writeln!(
            out,
            "# HELP relayd_creates_refused_total CREATEs refused by the control thread, by reason.\n# TYPE relayd_creates_refused_total counter"
        );
        for (label, v) in REFUSAL_LABELS.iter().zip(&c.refused) {
            let _ = writeln!(out, "relayd_creates_refused_total{{reason=\"{label}\"}} {}", v.load(Ordering::Relaxed));
        }
        // Not named relayd_circuits_*: that prefix is the per-worker live-circuit gauge.
        let _ = writeln!(
            out,
            "# HELP relayd_circuit_cap Live circuits made by CREATE (used) against limits.max_circuits (limit).\n# TYPE relayd_circuit_cap gauge\nrelayd_circuit_cap{{what=\"used\"}} {}\nrelayd_circuit_cap{{what=\"limit\"}} {}",
            c.circuits.load(Ordering::Relaxed),
            c.circuit_limit.load(Ordering::Relaxed)
        );
    }
}

/// Serves `GET /metrics` on `addr` until `stop` is set. Returns the bound address.
pub fn serve(addr: SocketAddr, registry: Arc<Registry>, stop: Arc<AtomicBool>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut req = [0u8; 1024];
                    let n = conn.read(&mut req).unwrap_or(0);
                    let (status, body) = if req[..n].starts_with(b"GET /metrics") {
                        ("200 OK", registry.render())
                    } else {
                        ("404 Not Found", "try /metrics\n".to_string())
                    };
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })?;
    Ok(local)
}
