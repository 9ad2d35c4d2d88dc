//! Prometheus metrics. Workers count in plain integers on the hot path and publish them here
//! with relaxed stores every few milliseconds: no atomic read-modify-write and no shared cache
//! line per cell. Each worker's block is cache-line aligned; only the metrics thread reads it.

use crate::datapath::DatapathStats;
use cellproto::relay::DropReason;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Drop reasons, in metric order: cellproto's, then relayd's own.
pub const DROP_LABELS: [&str; 9] = [
    DropReason::UnknownCircuit.label(),
    DropReason::Malformed.label(),
    DropReason::BadTag.label(),
    DropReason::Replay.label(),
    DropReason::UnknownCommand.label(),
    DropReason::Protocol.label(),
    DropReason::WrongPeer.label(),
    DropReason::Limit.label(),
    "overload",
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
/// [`DROP_LABELS`] index of cells dropped because the control plane's queue was full.
/// (CREATEs refused by the per-source limits are counted by the control thread, as
/// `relayd_handshakes_total{result="rate_limited"}`.)
pub const DROP_OVERLOAD: usize = 8;

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
            circuits: self.circuits.load(Ordering::Relaxed),
            datapath: {
                let [rx_datagrams, tx_datagrams, tx_batches, rx_errors, tx_errors] =
                    self.datapath.each_ref().map(|a| a.load(Ordering::Relaxed));
                DatapathStats { rx_datagrams, tx_datagrams, tx_batches, rx_errors, tx_errors }
            },
        }
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
    /// More series appended by what embeds the engine (exitd's), set once after start.
    pub extra: std::sync::OnceLock<Box<dyn Fn() -> String + Send + Sync>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("workers", &self.workers.len()).field("datapath", &self.datapath).finish()
    }
}

impl Registry {
    /// A registry for `workers` workers.
    pub fn new(workers: usize, datapath: &'static str) -> Self {
        Self {
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
        let per_worker: [PerWorker; 4] = [
            ("relayd_cells_in_total", "counter", "Cells received.", |c| c.cells_in),
            ("relayd_cells_out_total", "counter", "Cells sent.", |c| c.cells_out),
            ("relayd_stun_requests_total", "counter", "STUN Binding requests answered.", |c| c.stun),
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
        if let Some(extra) = self.extra.get() {
            out.push_str(&extra());
        }
        out
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
