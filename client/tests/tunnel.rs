//! The sans-IO tunnel against cellproto's in-memory relays (no sockets, no root): it comes
//! up, carries packets, rebuilds around a dead middle to the same exit with the same inner
//! addresses, switches exits only when the exit is dead, and says why when it cannot.

use cellproto::cell::CELL_LEN;
use cellproto::descriptor::{ExitPolicySummary, FLAG_EXIT, FLAG_GUARD, RelayDescriptor};
use cellproto::identity::IdentityKey;
use cellproto::onion::{payload, payload_mut};
use cellproto::sim::{TestRelay, rng};
use meshvpn::config::Timers;
use meshvpn::relays::{PathRequest, Relay, Relays};
use meshvpn::tunnel::{State, Tunnel, TunnelEvent};
use rand_chacha::ChaCha20Rng;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 1, 2)), 40000);

struct Lab {
    relays: Vec<TestRelay>,
    dead: HashSet<usize>,
    tunnel: Tunnel,
    now: Instant,
    rng: ChaCha20Rng,
    events: Vec<TunnelEvent>,
    to_tun: Vec<Vec<u8>>,
}

/// Relay `i` (1-based) at 10.i.0.1:9001, so every relay is in its own /16.
fn relay_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, i as u8, 0, 1], 9001))
}

impl Lab {
    /// `roles[i]`: the flags of relay i + 1 (GUARD, EXIT or 0 for a middle).
    fn new(roles: &[u32]) -> Self {
        let now = Instant::now();
        let mut relays = Vec::new();
        let mut listed = Vec::new();
        for (i, &flags) in roles.iter().enumerate() {
            let mut relay = TestRelay::new(i + 1, true, 100 + i as u64);
            relay.addr = relay_addr(i + 1);
            let desc = RelayDescriptor {
                identity: IdentityKey(relay.keys.identity),
                onion_keys: vec![],
                addresses: vec![relay.addr],
                nickname: format!("r{}", i + 1),
                operator: format!("op{}", i + 1),
                bandwidth: 1_000_000,
                flags,
                exit_policy: (flags & FLAG_EXIT != 0)
                    .then(|| ExitPolicySummary { accept: false, ports: vec![(25, 25)] }),
                protocol_versions: vec![1],
                published: 0,
                expires: 1,
            };
            listed.push(Relay { desc, hop: relay.path_hop(), rtt: None });
            relays.push(relay);
        }
        let timers =
            Timers { keepalive_ms: 500, dead_after_ms: 2000, handshake_timeout_ms: 300, handshake_attempts: 3 };
        let request = PathRequest { hops: 3, exit_ports: vec![80, 443], ..Default::default() };
        let tunnel = Tunnel::new(Relays { relays: listed }, request, timers, now);
        Self { relays, dead: HashSet::new(), tunnel, now, rng: rng(1), events: Vec::new(), to_tun: Vec::new() }
    }

    /// Delivers every datagram until the network is quiet.
    fn pump(&mut self) {
        let mut queue: VecDeque<(SocketAddr, SocketAddr, [u8; CELL_LEN])> = VecDeque::new();
        for _ in 0..10_000 {
            while let Some(e) = self.tunnel.poll_event() {
                self.events.push(e);
            }
            let mut cell = [0u8; CELL_LEN];
            while let Some(to) = self.tunnel.poll_transmit(self.now, &mut cell, &mut self.rng) {
                queue.push_back((CLIENT, to, cell));
            }
            let Some((from, to, mut cell)) = queue.pop_front() else { return };
            if to == CLIENT {
                if let Some(len) = self.tunnel.handle_cell(self.now, from, &mut cell, &mut self.rng) {
                    self.to_tun.push(payload(&cell, len).to_vec());
                }
                continue;
            }
            let Some(i) = self.relays.iter().position(|r| r.addr == to) else { continue };
            if self.dead.contains(&i) {
                continue;
            }
            let addr = self.relays[i].addr;
            for (next, out) in self.relays[i].handle(self.now, from, &mut cell) {
                queue.push_back((addr, next, out));
            }
        }
        panic!("the network never went quiet");
    }

    /// Lets `d` pass in 10 ms steps, running timers and delivering everything.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(10);
            if self.now >= self.tunnel.poll_timeout() {
                self.tunnel.handle_timeout(self.now, &mut self.rng);
            }
            self.pump();
        }
    }

    /// Lets `d` pass jumping from timer to timer, as the driver sleeps; returns how many
    /// timers ran (a spinning driver would run millions).
    fn advance_by_timers(&mut self, d: Duration) -> usize {
        let end = self.now + d;
        let mut runs = 0;
        while self.now < end {
            let next = self.tunnel.poll_timeout();
            assert!(next > self.now || runs == 0, "poll_timeout in the past: the driver would spin");
            self.now = next.min(end);
            self.tunnel.handle_timeout(self.now, &mut self.rng);
            self.pump();
            runs += 1;
        }
        runs
    }

    fn send(&mut self, data: &[u8]) -> bool {
        let mut cell = [0u8; CELL_LEN];
        payload_mut(&mut cell)[..data.len()].copy_from_slice(data);
        let Some(to) = self.tunnel.seal_packet(data.len(), &mut cell) else { return false };
        assert_eq!(Some(to), self.tunnel.guard());
        let guard = self.relays.iter().position(|r| r.addr == to).unwrap();
        let addr = self.relays[guard].addr;
        let mut queue: VecDeque<_> =
            self.relays[guard].handle(self.now, CLIENT, &mut cell).into_iter().map(|(t, c)| (addr, t, c)).collect();
        while let Some((from, to, mut cell)) = queue.pop_front() {
            if to == CLIENT {
                if let Some(len) = self.tunnel.handle_cell(self.now, from, &mut cell, &mut self.rng) {
                    self.to_tun.push(payload(&cell, len).to_vec());
                }
                continue;
            }
            let i = self.relays.iter().position(|r| r.addr == to).unwrap();
            if self.dead.contains(&i) {
                continue;
            }
            let a = self.relays[i].addr;
            queue.extend(self.relays[i].handle(self.now, from, &mut cell).into_iter().map(|(t, c)| (a, t, c)));
        }
        true
    }

    fn path_ids(&self) -> Vec<IdentityKey> {
        self.tunnel.path().iter().map(Relay::id).collect()
    }

    fn index_of(&self, id: IdentityKey) -> usize {
        self.relays.iter().position(|r| IdentityKey(r.keys.identity) == id).unwrap()
    }
}

const MIDDLE: u32 = 0;

#[test]
fn comes_up_after_guard_set_up_and_carries_packets() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    assert!(matches!(lab.events.first(), Some(TunnelEvent::Guard(g)) if *g == relay_addr(1)), "{:?}", lab.events);
    assert!(matches!(lab.events.get(1), Some(TunnelEvent::Up(_))), "{:?}", lab.events);
    assert_eq!(lab.tunnel.state(), State::Up);
    assert_eq!(lab.tunnel.path().len(), 3);
    assert!(lab.send(b"hello exit"));
    assert_eq!(lab.to_tun, vec![b"tixe olleh".to_vec()]);
    let c = lab.tunnel.counters();
    assert_eq!((c.packets_sent, c.packets_received), (1, 1));
}

#[test]
fn dead_middle_is_replaced_and_the_session_resumed_at_the_same_exit() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let Some(TunnelEvent::Up(first)) = lab.events.get(1).cloned() else { panic!("{:?}", lab.events) };
    let before = lab.path_ids();
    let middle = lab.index_of(before[1]);
    lab.dead.insert(middle);
    // Keepalive keeps the quiet circuit checked; silence for dead_after (2 s) rebuilds it.
    lab.advance(Duration::from_secs(5));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    let after = lab.path_ids();
    assert_eq!((after[0], after[2]), (before[0], before[2]), "same guard and exit");
    assert_ne!(after[1], before[1], "through the other middle");
    let Some(TunnelEvent::Up(again)) = lab.events.last().cloned() else { panic!("{:?}", lab.events) };
    assert_eq!((again.ipv4, again.ipv6, again.token), (first.ipv4, first.ipv6, first.token));
    assert!(lab.events.contains(&TunnelEvent::Down));
    assert_eq!(lab.tunnel.counters().rebuilds, 1);
    assert_eq!(lab.tunnel.counters().exit_changes, 0);
    assert!(lab.send(b"still here"));
    assert_eq!(lab.to_tun.last().unwrap(), b"ereh llits");
}

#[test]
fn dead_exit_makes_the_client_switch_exits() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let exit = lab.path_ids()[2];
    lab.dead.insert(lab.index_of(exit));
    lab.advance(Duration::from_secs(15));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    assert_ne!(lab.path_ids()[2], exit);
    assert_eq!(lab.tunnel.counters().exit_changes, 1);
}

#[test]
fn dead_only_exit_is_named_in_the_reason_and_packets_are_held() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    lab.dead.insert(3);
    lab.advance(Duration::from_secs(12));
    assert_eq!(lab.tunnel.state(), State::Rebuilding);
    let reason = lab.tunnel.reason().unwrap_or_default().to_owned();
    assert!(reason.contains("exit r4") && reason.contains("does not answer"), "{reason}");
    assert!(!lab.send(b"dropped"));
    assert!(lab.tunnel.counters().dropped_no_circuit >= 1);
    // It comes back: the client finds it again by itself.
    lab.dead.clear();
    lab.advance(Duration::from_secs(12));
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
}

#[test]
fn old_circuits_are_replaced_in_time_and_timers_never_spin() {
    let mut lab = Lab::new(&[FLAG_GUARD, MIDDLE, MIDDLE, FLAG_EXIT]);
    lab.advance(Duration::from_millis(50));
    let Some(TunnelEvent::Up(first)) = lab.events.get(1).cloned() else { panic!("{:?}", lab.events) };
    // A circuit may live an hour; the client replaces it 5 minutes before, same session.
    let runs = lab.advance_by_timers(Duration::from_secs(3400));
    assert!(runs < 20_000, "{runs} timer runs for 3400 s of keepalive");
    assert_eq!(lab.tunnel.state(), State::Up, "{:?}", lab.tunnel.reason());
    assert_eq!(lab.tunnel.counters().rebuilds, 1);
    let Some(TunnelEvent::Up(again)) = lab.events.last().cloned() else { panic!("{:?}", lab.events) };
    assert_eq!((again.ipv4, again.token), (first.ipv4, first.token));
    // With the only exit dead, the client retries without spinning.
    lab.dead.insert(3);
    let runs = lab.advance_by_timers(Duration::from_secs(60));
    assert!(runs < 1_000, "{runs} timer runs in 60 s while the exit is dead");
    assert_eq!(lab.tunnel.state(), State::Rebuilding);
}
