//! Honest circuit builds while a phase runs: 1-hop circuits to the relay from a few loopback
//! sources, one started every `1 / rate` seconds (round-robin over the sources, so each source
//! stays well inside the per-source CREATE limit). Each build resends its CREATE as clients do
//! (every 500 ms, doubling, 6 sends; a COOKIE answer is resent at once with its MAC, by
//! cellproto's `Circuit`) and counts as built if it is established within [`BUILD_DEADLINE`].
//! Built circuits are closed at once (DESTROY), so the relay's state stays flat.

use anyhow::{Context, Result, anyhow};
use cellproto::cell::{CELL_LEN, is_valid_lcid, lcid};
use cellproto::client::{Circuit, CircuitConfig, Event, PathHop};
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A build not established within this long failed.
pub const BUILD_DEADLINE: Duration = Duration::from_secs(5);
/// The builder gives up on everything after this long (a bound on the whole phase).
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// What the honest builds of one phase found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HonestStats {
    /// Builds started.
    pub tried: u64,
    /// Builds established within the deadline.
    pub built: u64,
    /// `built / tried` (0 when nothing was tried).
    pub success: f64,
    /// Median time to establish, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// Builds that got a COOKIE answer before their CREATED (the relay was under load).
    pub with_cookie: u64,
    /// Every build time, ms (for merging phases).
    #[serde(skip)]
    pub times_ms: Vec<f64>,
}

impl HonestStats {
    /// The builds of several phases together.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a HonestStats>) -> HonestStats {
        let mut all = HonestStats::default();
        for p in parts {
            all.tried += p.tried;
            all.built += p.built;
            all.with_cookie += p.with_cookie;
            all.times_ms.extend_from_slice(&p.times_ms);
        }
        all.finish();
        all
    }

    /// Computes `success` and the percentiles from the counts and times.
    fn finish(&mut self) {
        self.success = if self.tried > 0 { self.built as f64 / self.tried as f64 } else { 0.0 };
        self.times_ms.sort_by(f64::total_cmp);
        let t = &self.times_ms;
        let pct =
            |p: f64| if t.is_empty() { 0.0 } else { t[((t.len() as f64 * p).ceil() as usize).clamp(1, t.len()) - 1] };
        self.p50_ms = pct(0.5);
        self.p95_ms = pct(0.95);
    }
}

struct Build {
    circuit: Circuit,
    socket: usize,
    started: Instant,
}

/// The builder thread of one phase.
pub struct Honest {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<HonestStats>>,
}

impl Honest {
    /// Starts building through `relay` from `sources`, `rate` builds per second.
    pub fn start(relay: PathHop, sources: &[Ipv4Addr], rate: f64) -> Result<Self> {
        let sockets = sources
            .iter()
            .map(|ip| {
                let s = UdpSocket::bind((*ip, 0)).with_context(|| format!("cannot bind an honest source on {ip}"))?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("honest".into())
            .spawn(move || run(relay, sockets, rate, &flag))
            .context("cannot start the honest builder")?;
        Ok(Self { stop, thread })
    }

    /// Stops starting builds, lets those in flight finish (at most [`BUILD_DEADLINE`]), and
    /// returns what was found.
    pub fn finish(self) -> Result<HonestStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow!("the honest builder panicked"))?
    }
}

fn run(relay: PathHop, sockets: Vec<UdpSocket>, rate: f64, stop: &AtomicBool) -> Result<HonestStats> {
    let config = CircuitConfig {
        handshake_timeout: Duration::from_millis(500),
        handshake_attempts: 6,
        ..CircuitConfig::default()
    };
    let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let begin = Instant::now();
    let mut next_start = begin;
    let mut builds: HashMap<u32, Build> = HashMap::new();
    let mut stats = HonestStats::default();
    let mut times = Vec::new();
    let mut cookies = std::collections::HashSet::new();
    let mut cell = [0u8; CELL_LEN];
    let mut buf = [0u8; 2048];
    let mut k = 0usize;
    loop {
        let now = Instant::now();
        let stopping = stop.load(Ordering::Relaxed) || now.duration_since(begin) > RUN_LIMIT;
        if stopping && builds.is_empty() {
            break;
        }
        let mut busy = false;
        if !stopping && now >= next_start {
            next_start += every;
            let id = loop {
                let id = 0x4000_0000 | (OsRng.next_u32() & 0x3FFF_FFFF);
                if is_valid_lcid(id) && !builds.contains_key(&id) {
                    break id;
                }
            };
            let circuit = Circuit::new(vec![relay], id, config, now, &mut OsRng)?;
            builds.insert(id, Build { circuit, socket: k % sockets.len(), started: now });
            stats.tried += 1;
            k += 1;
        }
        let mut done = Vec::new();
        for (&id, b) in builds.iter_mut() {
            while let Some(to) = b.circuit.poll_transmit(now, &mut cell, &mut OsRng) {
                let _ = sockets[b.socket].send_to(&cell, to);
                busy = true;
            }
            if matches!(b.circuit.handle_timeout(now), Some(Event::Closed(_)))
                || now.duration_since(b.started) > BUILD_DEADLINE
            {
                done.push(id);
            }
        }
        for socket in &sockets {
            while let Ok((n, _)) = socket.recv_from(&mut buf) {
                busy = true;
                let Ok(c) = <&mut [u8; CELL_LEN]>::try_from(&mut buf[..n]) else { continue };
                let id = lcid(c);
                let Some(b) = builds.get_mut(&id) else { continue };
                match b.circuit.handle_cell(Instant::now(), c, &mut OsRng) {
                    Ok(Some(Event::Established)) => {
                        stats.built += 1;
                        times.push(b.started.elapsed().as_secs_f64() * 1e3);
                        if let Some(to) = b.circuit.close(&mut cell, &mut OsRng) {
                            let _ = sockets[b.socket].send_to(&cell, to);
                        }
                        done.push(id);
                    }
                    // A COOKIE answer: the circuit queued its CREATE again, with the MAC.
                    Ok(None) if !b.circuit.is_open() => {
                        cookies.insert(id);
                    }
                    _ => {}
                }
            }
        }
        for id in done {
            builds.remove(&id);
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stats.with_cookie = cookies.len() as u64;
    stats.times_ms = times;
    stats.finish();
    Ok(stats)
}
