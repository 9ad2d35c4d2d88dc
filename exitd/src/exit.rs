//! The exit's [`Terminal`]: one per relay worker, owning that worker's TUN queue.
//!
//! Forward (DATA from a circuit): inspect → anti-spoofing (the source must be an address the
//! [`AddressTable`] gives to this circuit) → exit policy → per-circuit and per-exit rate
//! limits → TUN. Backward: packets read from the TUN queue are sealed as DATA on the circuit
//! the table gives their destination to; a packet for another worker's circuit is handed to
//! that worker (the kernel picks a TUN queue by flow hash, not by circuit), which looks the
//! table up again before sealing. The table is the only map from address to circuit: no
//! worker keeps a copy that could go stale. ATTACH goes to the shared pool (a mutex taken once
//! per ATTACH, never per packet), which rate-limits it and updates the table.

use crate::bucket::RateLimits;
use crate::counts::{Counts, DropLog, slot};
use crate::filter::{Filter, Verdict};
use crate::packet::{destination, inspect};
use crate::policy::ExitPolicy;
use crate::pool::{AddressPool, Outcome};
use crate::table::AddressTable;
use cellio::Outbox;
use cellproto::cell::{Command, payload_capacity};
use cellproto::command::{Attach, Attached};
use cellproto::node::{Node, Transmit, originate};
use cellproto::relay::HopCircuit;
use crossbeam_channel::{Receiver, Sender};
use ipnet::{Ipv4Net, Ipv6Net};
use nix::sys::eventfd::EventFd;
use rand_core::OsRng;
use relayd::terminal::Terminal;
use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::{debug, info};
use tundev::gro::Gro;
use tundev::tso;
use tundev::{TunQueue, VNET_HDR_LEN};

/// Packets read from the TUN queue per worker loop: bounds how long TUN traffic can delay cells.
const TUN_BATCH: usize = 64;

/// Settings every worker's terminal shares.
#[derive(Debug)]
pub struct ExitShared {
    /// The inner-address pools and sessions.
    pub pool: Mutex<AddressPool>,
    /// Inner address → circuit: the pool's table, read by every worker on every packet.
    pub table: Arc<AddressTable>,
    /// The exit policy.
    pub policy: ExitPolicy,
    /// The pools (for prefix lengths in ATTACHED) and the gateway/resolver addresses.
    pub pools: (Ipv4Net, Ipv6Net),
    /// Per-circuit limit: bytes per second and burst.
    pub circuit_limit: (u64, u64),
    /// Per-exit limit, split evenly across workers (no counter shared per packet).
    pub exit_limit: (u64, u64),
    /// The resolver addresses inside the tunnel: DNS to them (port 53) is let through the
    /// policy, and nftables translates it to the upstream resolvers.
    pub dns: (std::net::Ipv4Addr, std::net::Ipv6Addr),
    /// Where to hand packets for another worker's circuits, by worker index.
    pub handoff: Vec<Sender<Vec<u8>>>,
    /// Per worker: signalled after a handoff, so that the (watched) worker wakes to take it.
    pub handoff_ready: Vec<EventFd>,
    /// Each worker's counters, published every 100 ms.
    pub stats: Vec<Mutex<Counts>>,
    /// Conntrack entries deleted so far (released addresses, and the pools at start).
    pub conntrack_deleted: std::sync::atomic::AtomicU64,
}

/// One worker's exit state.
pub struct ExitTerminal {
    index: usize,
    shared: Arc<ExitShared>,
    tun: TunQueue,
    inbox: Receiver<Vec<u8>>,
    /// DNS, the policy and fragments (per worker: both ends of a datagram's fragments are here).
    filter: Filter,
    /// This worker's circuits that ATTACHed (to tell "not attached" from "spoofed").
    attached: HashSet<u32>,
    /// Per-circuit buckets and this worker's share of the exit's limit.
    limits: RateLimits,
    counts: Counts,
    drop_log: DropLog,
    last_publish: Instant,
    /// Packets to the TUN device, TCP runs joined into GSO super-packets (written at `flush`).
    gro: Gro,
    /// One frame read from the TUN device: a virtio header and up to 64 KiB (a TSO super-packet).
    rx: Box<[u8]>,
    /// Where `tso::segment` builds each packet.
    scratch: Vec<u8>,
}

/// Writes one packet (virtio header first) into the TUN queue; a refusal loses it, counted.
fn write_tun(tun: &mut TunQueue, counts: &mut Counts, packet: &[u8]) {
    if tun.write(packet).is_err() {
        counts.drop("tun_write_error");
    }
}

impl ExitTerminal {
    /// Worker `index`'s terminal with its TUN queue and handoff inbox.
    pub fn new(index: usize, shared: Arc<ExitShared>, tun: TunQueue, inbox: Receiver<Vec<u8>>, now: Instant) -> Self {
        let workers = shared.handoff.len().max(1) as u64;
        let share = (shared.exit_limit.0 / workers, shared.exit_limit.1 / workers);
        let limits = RateLimits::new(shared.circuit_limit, share, now);
        let filter = Filter::new(shared.dns);
        Self {
            index,
            shared,
            tun,
            inbox,
            filter,
            attached: HashSet::new(),
            limits,
            counts: Counts::default(),
            drop_log: DropLog::default(),
            last_publish: now,
            gro: Gro::default(),
            rx: vec![0u8; VNET_HDR_LEN + 65_536].into_boxed_slice(),
            scratch: Vec::with_capacity(tundev::PACKET_BUF_LEN),
        }
    }

    /// Counts a refusal (or another rare outcome) by its label.
    fn count(&mut self, what: &'static str) {
        self.counts.drop(what);
    }

    fn forward(&mut self, now: Instant, lcid: u32, packet: &[u8]) {
        let info = match inspect(packet) {
            Ok(i) => i,
            Err(e) => return self.count(e.label()),
        };
        if self.shared.table.circuit_of(info.src) != Some(lcid) {
            return self.count(if self.attached.contains(&lcid) { "spoofed_source" } else { "not_attached" });
        }
        match self.filter.check(&self.shared.policy, &info, now) {
            Verdict::Forward => {}
            Verdict::Dns => self.counts.add(slot::DNS, 1),
            Verdict::Deny(rule) => return self.count(rule),
        }
        if !self.limits.admit(lcid, packet.len(), now) {
            self.counts.add(slot::RATE_LIMITED_BYTES, packet.len() as u64);
            return self.count("rate_limited");
        }
        self.counts.add(slot::TO_TUN, 1);
        let (tun, counts) = (&mut self.tun, &mut self.counts);
        self.gro.push(packet, &mut |p| write_tun(tun, counts, p));
    }

    fn attach(&mut self, now: Instant, lcid: u32, circ: &mut HopCircuit, body: &[u8], out: &mut dyn Transmit) {
        let Ok(request) = Attach::decode(body) else { return self.count("bad_attach") };
        let source = circ.prev().peer.ip();
        let attached = self
            .shared
            .pool
            .lock()
            .ok()
            .map(|mut pool| (pool.attach(lcid, source, request.resume, now, &mut OsRng), pool.gateway()));
        let Some((result, gateway)) = attached else { return self.count("pool_poisoned") };
        let lease = match result {
            Ok((lease, outcome)) => {
                if outcome == Outcome::Resumed {
                    info!(worker = self.index, "session resumed on a new circuit");
                }
                lease
            }
            // Also counted by the pool (exitd_attach_total by reason). No answer: the client
            // times out and rebuilds elsewhere.
            Err(e) => {
                debug!(worker = self.index, refused = e.label(), "ATTACH refused");
                return self.count("attach_refused");
            }
        };
        self.attached.insert(lcid);
        let (v4net, v6net) = self.shared.pools;
        let reply = Attached {
            token: lease.token,
            ipv4: (lease.v4, v4net.prefix_len()),
            ipv6: (lease.v6, v6net.prefix_len()),
            dns: gateway,
        };
        originate(now, circ, Command::Attached, out, |p| reply.encode(p).ok());
    }

    /// A packet from the internet for one of our inner addresses (`handed`: another worker
    /// read it and handed it over).
    fn backward(&mut self, now: Instant, node: &mut Node, packet: &[u8], out: &mut Outbox, handed: bool) {
        let Some(dst) = destination(packet) else { return self.count("bad_tun_packet") };
        // The one source of truth, read now, on the thread that owns the circuit it names.
        let Some(lcid) = self.shared.table.circuit_of(dst) else { return self.count("no_circuit") };
        let workers = self.shared.handoff.len().max(1);
        let owner = lcid as usize % workers;
        if owner != self.index {
            if handed {
                // The address moved between the two lookups; never bounce packets around.
                return self.count("no_circuit");
            }
            if self.shared.handoff[owner].try_send(packet.to_vec()).is_err() {
                return self.count("handoff_full");
            }
            if let Some(ready) = self.shared.handoff_ready.get(owner) {
                let _ = ready.write(1);
            }
            return self.counts.add(slot::HANDED_OFF, 1);
        }
        let Some(circ) = node.circuit_mut(lcid) else { return self.count("no_circuit") };
        if packet.len() > payload_capacity(circ.hop()) {
            return self.count("too_big");
        }
        // Sealed in a slot of the worker's outbox: no allocation per packet.
        let sealed = originate(now, circ, Command::Data, out, |p| {
            p[..packet.len()].copy_from_slice(packet);
            Some(packet.len())
        });
        if sealed {
            self.counts.add(slot::FROM_TUN, 1);
        } else {
            self.count("seal_failed");
        }
    }
}

impl cellproto::node::Terminal for ExitTerminal {
    fn deliver(
        &mut self,
        now: Instant,
        lcid: u32,
        circ: &mut HopCircuit,
        cmd: Command,
        payload: &[u8],
        out: &mut dyn Transmit,
    ) -> bool {
        match cmd {
            Command::Data => self.forward(now, lcid, payload),
            Command::Attach => self.attach(now, lcid, circ, payload, out),
            _ => return false,
        }
        true
    }

    fn closed(&mut self, lcid: u32) {
        self.attached.remove(&lcid);
        self.limits.forget(lcid);
        // Before the relay frees the LCID: once it can be reused, no address routes to it.
        if let Ok(mut pool) = self.shared.pool.lock() {
            pool.detach(lcid, Instant::now());
        }
    }
}

impl Terminal for ExitTerminal {
    fn poll(&mut self, now: Instant, node: &mut Node, out: &mut Outbox) -> bool {
        // Reset before draining: a handoff after this point signals again.
        if let Some(ready) = self.shared.handoff_ready.get(self.index) {
            let _ = ready.read();
        }
        while let Ok(packet) = self.inbox.try_recv() {
            self.backward(now, node, &packet, out, true);
        }
        // Taken out of `self` while `backward` (which needs `self`) runs on each segment.
        let mut rx = std::mem::take(&mut self.rx);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut more = true;
        for _ in 0..TUN_BATCH {
            match self.tun.read(&mut rx) {
                Ok(n) => {
                    let segmented =
                        tso::segment(&rx[..n], &mut scratch, &mut |p| self.backward(now, node, p, out, false));
                    if segmented.is_err() {
                        self.count("bad_tun_packet");
                    }
                }
                Err(_) => {
                    more = false;
                    break;
                }
            }
        }
        self.rx = rx;
        self.scratch = scratch;
        if now.duration_since(self.last_publish).as_millis() >= 100 {
            self.last_publish = now;
            if let Some(slot) = self.shared.stats.get(self.index)
                && let Ok(mut s) = slot.lock()
            {
                *s = self.counts;
            }
            self.drop_log.log(self.index, &self.counts, now);
        }
        more
    }

    fn wake_fds(&self) -> Vec<std::os::fd::OwnedFd> {
        let handoff = self.shared.handoff_ready.get(self.index).map(|r| r.as_fd());
        [Some(self.tun.fd()), handoff].into_iter().flatten().filter_map(|fd| fd.try_clone_to_owned().ok()).collect()
    }

    fn flush(&mut self) {
        let (tun, counts) = (&mut self.tun, &mut self.counts);
        self.gro.flush(&mut |p| write_tun(tun, counts, p));
    }
}
