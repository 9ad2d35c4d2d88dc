//! The client's one UDP endpoint: cells to and from the guard, and STUN to any relay, leave
//! from the same socket, so that every relay sees one address and the NAT holds one mapping
//! (a second socket would be a second mapping, which makes hole punching impossible and tells
//! nothing about the first). Tailscale's magicsock does the same, demultiplexing by first bytes.
//!
//! Every received datagram is sorted by [`classify`] (pure):
//!
//! | datagram | goes to |
//! | --- | --- |
//! | cell-sized, from a relay of the directory | the circuit ([`crate::tunnel`], which checks it is the guard's) |
//! | STUN (first byte and magic cookie) | the STUN exchange in progress ([`netcheck::Exchange`]), which matches it by transaction id |
//! | anything else, or STUN that answers nothing we asked (late answers to the last exchange excepted) | counted as stray ([`Counters::stray`]) and logged at powers of two |

use crate::netcheck::{Exchange, Outcome, ProbeResult};
use crate::relays::Relays;
use crate::udp::CellSocket;
use cellproto::cell::CELL_LEN;
use cellproto::stun::{self, Message};
use rand_core::{OsRng, RngCore};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Datagrams handled per wake-up before timers are looked at again.
pub const BATCH: usize = 64;

/// What a received datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A cell from a relay of the directory.
    Cell,
    /// A STUN message (it may still answer nothing we asked).
    Stun,
    /// Neither: the wrong size for a cell, or from an address that is no relay.
    Stray,
}

/// Sorts one datagram from `from` (sans-IO): a cell by its size and sender, a STUN message by
/// its first byte and magic cookie (RFC 7983's rule).
pub fn classify(datagram: &[u8], from: SocketAddr, relays: &HashSet<SocketAddr>) -> Kind {
    if datagram.len() == CELL_LEN && relays.contains(&from) {
        // No STUN message a relay sends is a cell long, so a cell is never taken for one.
        Kind::Cell
    } else if stun::is_stun(datagram) {
        Kind::Stun
    } else {
        Kind::Stray
    }
}

/// What the endpoint counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams that were neither a relay's cell nor an answer to our STUN requests.
    pub stray: u64,
    /// STUN answers taken by an exchange.
    pub stun_answers: u64,
}

/// A STUN exchange in progress over the endpoint's socket.
struct Probing {
    exchange: Exchange,
    /// Every transaction id it issued (to tell late answers from foreign ones).
    issued: HashSet<[u8; 12]>,
    /// Answers so far: (request index, result).
    answers: Vec<(usize, ProbeResult)>,
}

/// The socket and its demultiplexer.
pub struct Endpoint {
    socket: CellSocket,
    /// Where cells may come from: every relay of the directory.
    relays: HashSet<SocketAddr>,
    /// The STUN exchange in progress.
    probing: Option<Probing>,
    /// The transaction ids of the last exchange, so that its late answers are not stray.
    finished: HashSet<[u8; 12]>,
    counters: Counters,
}

impl Endpoint {
    /// Binds the socket (IPv4, ephemeral port; see [`CellSocket::bind`]); cells are accepted from
    /// the relays of `relays`.
    pub async fn bind(relays: &Relays) -> std::io::Result<Self> {
        let mut endpoint = Self {
            socket: CellSocket::bind().await?,
            relays: HashSet::new(),
            probing: None,
            finished: HashSet::new(),
            counters: Counters::default(),
        };
        endpoint.set_relays(relays);
        Ok(endpoint)
    }

    /// A fresh directory: cells are accepted from its relays from now on.
    pub fn set_relays(&mut self, relays: &Relays) {
        self.relays = relays.relays.iter().map(|r| r.hop.addr).collect();
    }

    /// The local address (unspecified IP, the bound port).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// What was counted (the socket's unusable datagrams count as stray).
    pub fn counters(&self) -> Counters {
        Counters { stray: self.counters.stray + self.socket.rx_errors(), ..self.counters }
    }

    /// Cells lost by failed sends (see [`CellSocket::tx_dropped`]).
    pub fn cells_lost(&self) -> u64 {
        self.socket.tx_dropped()
    }

    /// The cell socket, to send cells.
    pub fn socket(&mut self) -> &mut CellSocket {
        &mut self.socket
    }

    /// Waits until a datagram may be read.
    pub async fn readable(&self) -> std::io::Result<()> {
        self.socket.readable().await
    }

    /// Drains up to [`BATCH`] reads: each cell goes to `on_cell` (with its sender), STUN to the
    /// exchange in progress, the rest is counted as stray.
    pub fn receive(&mut self, now: Instant, mut on_cell: impl FnMut(SocketAddr, &mut [u8; CELL_LEN])) {
        for _ in 0..BATCH {
            let Ok(got) = self.socket.try_recv() else { break };
            let from = got.from;
            // A GRO run holds datagrams of one size from one sender: all cells, or all not.
            let relays = &self.relays;
            for range in got.datagrams() {
                let datagram = &mut self.socket.rx[range];
                match classify(datagram, from, relays) {
                    Kind::Cell => {
                        if let Ok(cell) = <&mut [u8; CELL_LEN]>::try_from(datagram) {
                            on_cell(from, cell);
                        }
                    }
                    Kind::Stun => {
                        let outcome = match &mut self.probing {
                            Some(p) => match p.exchange.handle(now, datagram, from, &p.issued) {
                                Outcome::Answer { probe, result } => {
                                    p.answers.push((probe, result));
                                    Outcome::Expected
                                }
                                other => other,
                            },
                            None => match stun::decode(datagram) {
                                Ok(m) if self.finished.contains(&m.transaction_id) => Outcome::Expected,
                                _ => Outcome::Ignored,
                            },
                        };
                        match outcome {
                            Outcome::Ignored => stray(&mut self.counters, from, "STUN that answers nothing asked"),
                            _ => self.counters.stun_answers += 1,
                        }
                    }
                    Kind::Stray => stray(&mut self.counters, from, "neither a relay's cell nor STUN"),
                }
            }
        }
    }

    /// Starts a STUN exchange of `requests` (the caller's index, destination, message), over at
    /// `now + timeout` at the latest. `false` (nothing started) while another one runs, or if a
    /// request cannot be encoded.
    pub fn start_exchange(
        &mut self,
        requests: Vec<(usize, SocketAddr, Message)>,
        now: Instant,
        timeout: Duration,
    ) -> bool {
        if self.probing.is_some() {
            return false;
        }
        let issued = requests.iter().map(|(_, _, m)| m.transaction_id).collect();
        let Ok(exchange) = Exchange::new(requests, now, timeout) else { return false };
        self.probing = Some(Probing { exchange, issued, answers: Vec::new() });
        true
    }

    /// Whether a STUN exchange runs.
    pub fn exchanging(&self) -> bool {
        self.probing.is_some()
    }

    /// Sends the STUN requests due at `now`; one that cannot be sent ends with an error.
    pub async fn send_due(&mut self, now: Instant) {
        let Some(p) = self.probing.as_mut() else { return };
        while let Some((i, to, request)) = p.exchange.poll_transmit(now) {
            if let Err(e) = self.socket.send_datagram(to, request).await {
                debug!(%to, "STUN request not sent: {e}");
                let probe = p.exchange.send_failed(i);
                p.answers.push((probe, ProbeResult::Error { code: None, reason: format!("send to {to}: {e}") }));
            }
        }
    }

    /// When the exchange next needs [`Endpoint::send_due`], or is over (then `now`); `None`
    /// without one.
    pub fn exchange_timeout(&self, now: Instant) -> Option<Instant> {
        Some(self.probing.as_ref()?.exchange.poll_timeout(now).unwrap_or(now))
    }

    /// Once the exchange is over (every request answered or failed, or its time up), its
    /// results: (the caller's index, result) for each request that got one.
    pub fn take_results(&mut self, now: Instant) -> Option<Vec<(usize, ProbeResult)>> {
        if self.probing.as_ref()?.exchange.poll_timeout(now).is_some() {
            return None;
        }
        let p = self.probing.take()?;
        self.finished = p.issued;
        Some(p.answers)
    }

    /// Measures the round trip to every relay of `relays` with one STUN Binding request each
    /// (retransmitted as netcheck does), all from this socket, for at most `timeout`; relays that
    /// answer get `rtt`. Cells that arrive meanwhile go to `on_cell`.
    pub async fn measure_rtts(
        &mut self,
        relays: &mut Relays,
        timeout: Duration,
        mut on_cell: impl FnMut(SocketAddr, &mut [u8; CELL_LEN]),
    ) {
        let requests = relays.relays.iter().enumerate().map(|(i, r)| (i, r.hop.addr, binding_request())).collect();
        if !self.start_exchange(requests, Instant::now(), timeout) {
            return;
        }
        let answers = loop {
            let now = Instant::now();
            self.send_due(now).await;
            if let Some(answers) = self.take_results(now) {
                break answers;
            }
            let Some(wake) = self.exchange_timeout(now) else { return };
            tokio::select! {
                ready = self.socket.readable() => {
                    if ready.is_err() {
                        self.probing = None;
                        return;
                    }
                    self.receive(Instant::now(), &mut on_cell);
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        };
        for (i, result) in answers {
            if let (ProbeResult::Answered { rtt_ms, .. }, Some(r)) = (result, relays.relays.get_mut(i)) {
                r.rtt = Some(Duration::from_secs_f64(rtt_ms / 1e3));
            }
        }
    }
}

/// A Binding request with a fresh random transaction id (RFC 8489 §6: uniformly random, so
/// that answers cannot be forged blind).
pub fn binding_request() -> Message {
    let mut id = [0u8; 12];
    OsRng.fill_bytes(&mut id);
    Message::binding_request(id)
}

/// Counts a stray datagram and logs it at powers of two, so that a flood cannot fill the log.
fn stray(counters: &mut Counters, from: SocketAddr, what: &str) {
    counters.stray += 1;
    if counters.stray.is_power_of_two() {
        warn!(%from, stray = counters.stray, "dropped a datagram: {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_sorted_by_first_bytes_size_and_sender() {
        let relay: SocketAddr = "198.51.100.1:9001".parse().unwrap();
        let other: SocketAddr = "203.0.113.9:9001".parse().unwrap();
        let relays = HashSet::from([relay]);
        let mut stun = [0u8; 64];
        let n = Message::binding_success([3; 12], other).encode(&mut stun, true).unwrap();
        assert_eq!(classify(&stun[..n], relay, &relays), Kind::Stun);
        assert_eq!(classify(&stun[..n], other, &relays), Kind::Stun, "STUN is matched by transaction, not sender");
        let cell = [0x40u8; CELL_LEN];
        assert_eq!(classify(&cell, relay, &relays), Kind::Cell);
        assert_eq!(classify(&cell, other, &relays), Kind::Stray, "a cell from no relay");
        assert_eq!(classify(&cell[..100], relay, &relays), Kind::Stray, "not cell-sized");
        assert_eq!(classify(&[], relay, &relays), Kind::Stray);
    }
}
