//! One phase of netcheck, sans-IO: which Binding request is due when (the first send at once,
//! retransmissions at 1/10, 3/10 and 7/10 of the phase's timeout, doubling intervals as RFC
//! 8489 §6.2.1 does), what a received datagram means, and when the phase is over (every
//! request answered, or the timeout reached). The caller owns the socket and the clock, so the
//! schedule is tested with made-up instants, not with sleeps.

use super::report::{ProbeResult, result_of};
use cellproto::stun::{self, Class, METHOD_BINDING, Message, StunError};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Retransmissions of a request after the first send (RFC 8489 §6.2.1 allows fewer than its
/// default of 6 when the caller knows its network; a CLI user should not wait long).
pub const RETRANSMISSIONS: u32 = 3;
/// Room for an encoded request: header, CHANGE-REQUEST and FINGERPRINT.
const MAX_REQUEST: usize = 64;

/// A request in flight, `probe` its index in the caller's probe list.
#[derive(Debug)]
struct Pending {
    probe: usize,
    to: SocketAddr,
    id: [u8; 12],
    request: Vec<u8>,
    first_sent: Option<Instant>,
    sends: u32,
    done: bool,
}

/// What a received datagram was.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The answer to probe `probe`.
    Answer {
        /// Index in the caller's probe list.
        probe: usize,
        /// What it says.
        result: ProbeResult,
    },
    /// Not an answer to anything we sent: not STUN, malformed, or an unknown transaction.
    Ignored,
    /// Expected noise: a second answer (to a retransmission), or one to an earlier phase.
    Expected,
}

/// One phase's requests.
#[derive(Debug)]
pub struct Exchange {
    start: Instant,
    deadline: Instant,
    rto: Duration,
    pending: Vec<Pending>,
}

impl Exchange {
    /// A phase sending `requests` (probe index, destination, message), starting at `start`
    /// and over at `start + timeout`.
    pub fn new(
        requests: Vec<(usize, SocketAddr, Message)>,
        start: Instant,
        timeout: Duration,
    ) -> Result<Self, StunError> {
        let mut pending = Vec::with_capacity(requests.len());
        for (probe, to, m) in requests {
            let mut buf = [0u8; MAX_REQUEST];
            let n = m.encode(&mut buf, true)?;
            pending.push(Pending {
                probe,
                to,
                id: m.transaction_id,
                request: buf[..n].to_vec(),
                first_sent: None,
                sends: 0,
                done: false,
            });
        }
        Ok(Self { start, deadline: start + timeout, rto: timeout / 10, pending })
    }

    /// When send number `sends` (0-based) of a request is due: (2^k - 1) tenths of the timeout.
    fn due(&self, sends: u32) -> Instant {
        self.start + self.rto * ((1u32 << sends) - 1)
    }

    fn wants_send(&self, p: &Pending) -> bool {
        !p.done && p.sends <= RETRANSMISSIONS
    }

    /// The next request due at `now` (its index, destination and bytes), counted as sent.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(usize, SocketAddr, &[u8])> {
        if now >= self.deadline {
            return None;
        }
        let i = (0..self.pending.len()).find(|&i| {
            let p = &self.pending[i];
            self.wants_send(p) && self.due(p.sends) <= now
        })?;
        let p = &mut self.pending[i];
        p.sends += 1;
        p.first_sent.get_or_insert(now);
        Some((i, p.to, &p.request))
    }

    /// Request `i` could not be sent: it is over (the caller records why). Returns its probe.
    pub fn send_failed(&mut self, i: usize) -> usize {
        self.pending[i].done = true;
        self.pending[i].probe
    }

    /// When to call again (next send due, or the deadline); `None` once the phase is over.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        if now >= self.deadline || self.pending.iter().all(|p| p.done) {
            return None;
        }
        let next_send = self.pending.iter().filter(|p| self.wants_send(p)).map(|p| self.due(p.sends));
        Some(next_send.fold(self.deadline, Instant::min))
    }

    /// A datagram received at `now` from `from`; `issued` holds every transaction id of the
    /// run, so that late answers to an earlier phase are not counted as foreign.
    pub fn handle(&mut self, now: Instant, datagram: &[u8], from: SocketAddr, issued: &HashSet<[u8; 12]>) -> Outcome {
        let message = match stun::is_stun(datagram).then(|| stun::decode(datagram)) {
            Some(Ok(m))
                if m.method == METHOD_BINDING && matches!(m.class, Class::SuccessResponse | Class::ErrorResponse) =>
            {
                m
            }
            _ => return Outcome::Ignored,
        };
        let Some(p) = self.pending.iter_mut().find(|p| p.id == message.transaction_id) else {
            return if issued.contains(&message.transaction_id) { Outcome::Expected } else { Outcome::Ignored };
        };
        if p.done {
            return Outcome::Expected;
        }
        p.done = true;
        // From the first transmission: an upper bound when a retransmission was answered
        // (which one was is unknowable, RFC 6298's Karn problem). Microsecond precision.
        let rtt = p.first_sent.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let rtt_ms = (rtt.as_secs_f64() * 1e6).round() / 1e3;
        Outcome::Answer { probe: p.probe, result: result_of(&message, from, rtt_ms) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "198.51.100.1:3478";
    const B: &str = "203.0.113.9:3478";
    const MAPPED: &str = "192.0.2.7:40000";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn answer(id: [u8; 12]) -> Vec<u8> {
        let mut out = [0u8; 128];
        let n = Message::binding_success(id, sa(MAPPED)).encode(&mut out, true).unwrap();
        out[..n].to_vec()
    }

    fn two_requests(t0: Instant) -> Exchange {
        let requests =
            vec![(0, sa(A), Message::binding_request([1; 12])), (3, sa(B), Message::binding_request([2; 12]))];
        Exchange::new(requests, t0, Duration::from_millis(1000)).unwrap()
    }

    /// Every send `ex` makes from `t0` to the deadline, polled as a driver would: (ms, index).
    fn schedule(ex: &mut Exchange, t0: Instant) -> Vec<(u64, usize)> {
        let mut sent = Vec::new();
        let mut now = t0;
        loop {
            while let Some((i, _, _)) = ex.poll_transmit(now) {
                sent.push(((now - t0).as_millis() as u64, i));
            }
            match ex.poll_timeout(now) {
                Some(next) => {
                    assert!(next > now, "poll_timeout at or before now: a driver would spin");
                    now = next;
                }
                None => return sent,
            }
        }
    }

    #[test]
    fn unanswered_requests_are_sent_at_0_1_3_and_7_tenths_then_the_phase_ends_at_the_timeout() {
        let t0 = Instant::now();
        let mut ex = two_requests(t0);
        let sent = schedule(&mut ex, t0);
        let expect: Vec<(u64, usize)> = [0, 100, 300, 700].iter().flat_map(|&ms| [(ms, 0), (ms, 1)]).collect();
        assert_eq!(sent, expect);
        assert_eq!(ex.poll_timeout(t0 + Duration::from_millis(999)), Some(t0 + Duration::from_millis(1000)));
        assert_eq!(ex.poll_timeout(t0 + Duration::from_millis(1000)), None, "over at the timeout");
    }

    #[test]
    fn an_answer_stops_its_retransmissions_and_the_phase_ends_when_all_are_answered() {
        let t0 = Instant::now();
        let mut ex = two_requests(t0);
        assert_eq!(ex.poll_transmit(t0).map(|s| s.0), Some(0));
        assert_eq!(ex.poll_transmit(t0).map(|s| s.0), Some(1));
        let issued = HashSet::from([[1; 12], [2; 12]]);
        let t = t0 + Duration::from_millis(42);
        let got = ex.handle(t, &answer([1; 12]), sa(A), &issued);
        let Outcome::Answer { probe: 0, result: ProbeResult::Answered { rtt_ms, mapped, .. } } = got else {
            panic!("{got:?}")
        };
        assert_eq!((rtt_ms, mapped), (42.0, sa(MAPPED)));
        assert_eq!(ex.handle(t, &answer([1; 12]), sa(A), &issued), Outcome::Expected, "a duplicate");
        // Only request 1 is retransmitted.
        let t100 = t0 + Duration::from_millis(100);
        assert_eq!(ex.poll_timeout(t), Some(t100));
        assert_eq!(ex.poll_transmit(t100).map(|s| s.0), Some(1));
        assert_eq!(ex.poll_transmit(t100).map(|s| s.0), None);
        let got = ex.handle(t100, &answer([2; 12]), sa(B), &issued);
        assert!(matches!(got, Outcome::Answer { probe: 3, .. }), "{got:?}");
        assert_eq!(ex.poll_timeout(t100), None, "everything answered: over before the timeout");
    }

    #[test]
    fn foreign_and_late_datagrams_are_told_apart() {
        let t0 = Instant::now();
        let mut ex = two_requests(t0);
        let earlier_phase = [9; 12];
        let issued = HashSet::from([[1; 12], [2; 12], earlier_phase]);
        assert_eq!(ex.handle(t0, b"not stun", sa(A), &issued), Outcome::Ignored);
        assert_eq!(ex.handle(t0, &[], sa(A), &issued), Outcome::Ignored);
        assert_eq!(ex.handle(t0, &answer([7; 12]), sa(A), &issued), Outcome::Ignored, "nobody asked");
        assert_eq!(ex.handle(t0, &answer(earlier_phase), sa(A), &issued), Outcome::Expected);
        let mut request = [0u8; 64];
        let n = Message::binding_request([1; 12]).encode(&mut request, true).unwrap();
        assert_eq!(ex.handle(t0, &request[..n], sa(A), &issued), Outcome::Ignored, "a request, not an answer");
    }

    #[test]
    fn a_failed_send_ends_that_request() {
        let t0 = Instant::now();
        let mut ex = two_requests(t0);
        let (i, _, _) = ex.poll_transmit(t0).unwrap();
        assert_eq!(ex.send_failed(i), 0);
        let sent = schedule(&mut ex, t0);
        assert!(sent.iter().all(|&(_, j)| j == 1), "{sent:?}");
    }
}
