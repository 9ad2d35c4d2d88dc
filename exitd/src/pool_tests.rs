//! The address pool's tests: sessions, the address → circuit table it keeps exact, and its
//! defences against churn and exhaustion, all with an injected clock.

use super::*;
use proptest::prelude::*;
use rand_core::OsRng;

const GRACE: Duration = Duration::from_secs(600);

fn limits() -> PoolLimits {
    PoolLimits { grace: GRACE, sessions_per_source: 1000, attach_rate: 1000.0, attach_burst: 1000.0 }
}

fn pool_with(v4: &str, limits: PoolLimits) -> AddressPool {
    AddressPool::new(v4.parse().unwrap(), "fd6d:6573:6800::/64".parse().unwrap(), limits)
}

fn pool(v4: &str) -> AddressPool {
    pool_with(v4, limits())
}

fn src(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))
}

/// Reports every flush due as done.
fn flush_all(p: &mut AddressPool, now: Instant) {
    for f in p.take_flushes(now, usize::MAX) {
        p.flushed(f.slot, true, now);
    }
}

/// Every address the table routes, with its circuit.
fn routes(p: &AddressPool) -> Vec<(Ipv4Addr, u32)> {
    (0..p.table.len())
        .filter_map(|n| {
            let (v4, v6) = p.table.addresses(n);
            let c = p.circuit_of(v4.into());
            assert_eq!(c, p.circuit_of(v6.into()), "both families of slot {n} route alike");
            c.map(|c| (v4, c))
        })
        .collect()
}

#[test]
fn attach_resume_release() {
    let t0 = Instant::now();
    let mut p = pool("10.8.0.0/16");
    assert_eq!(p.gateway().0, Ipv4Addr::new(10, 8, 0, 1));
    let (a, how) = p.attach(1, src(1), None, t0, &mut OsRng).unwrap();
    assert_eq!(how, Outcome::New);
    let (b, _) = p.attach(2, src(1), None, t0, &mut OsRng).unwrap();
    assert_eq!(a.v4, Ipv4Addr::new(10, 8, 0, 2));
    assert_eq!(a.v6, "fd6d:6573:6800::2".parse::<Ipv6Addr>().unwrap(), "same offset in both pools");
    assert_ne!((a.v4, a.v6), (b.v4, b.v6));
    assert_eq!(p.circuit_of(IpAddr::V4(a.v4)), Some(1));
    // Circuit 1 dies; its client comes back on circuit 7 with the token: same addresses.
    p.detach(1, t0);
    assert_eq!(p.circuit_of(IpAddr::V4(a.v4)), None, "no route to a dead circuit");
    p.expire(t0 + Duration::from_secs(60));
    let (again, how) = p.attach(7, src(2), Some(a.token), t0 + Duration::from_secs(60), &mut OsRng).unwrap();
    assert_eq!((again, how), (a, Outcome::Resumed));
    assert_eq!(p.circuit_of(IpAddr::V6(a.v6)), Some(7));
    // An unknown token starts a new session.
    let (c, how) = p.attach(8, src(2), Some([9; 32]), t0, &mut OsRng).unwrap();
    assert_ne!(c.token, [9; 32]);
    assert_eq!(how, Outcome::New);
    // After the grace period the addresses return to the pool.
    p.detach(7, t0 + Duration::from_secs(60));
    p.expire(t0 + Duration::from_secs(659));
    assert_eq!(p.sessions(), 3);
    p.expire(t0 + Duration::from_secs(660));
    assert_eq!(p.sessions(), 2);
    assert_eq!(p.lease_of(7), None);
    let (fresh, _) = p.attach(9, src(2), Some(a.token), t0 + Duration::from_secs(660), &mut OsRng).unwrap();
    assert_ne!(fresh.token, a.token);
    assert_eq!(p.stats().expired, 1);
}

/// The attack of issue 10 §2 at the pool: a circuit ATTACHes again and again. It keeps one
/// session, and no address other than that session's routes to it.
#[test]
fn reattach_keeps_one_session_and_routes_nothing_else_to_the_circuit() {
    let t0 = Instant::now();
    let mut p = pool("10.9.0.0/29");
    let (first, _) = p.attach(1, src(1), None, t0, &mut OsRng).unwrap();
    for _ in 1..4 {
        assert_eq!(p.attach(1, src(1), None, t0, &mut OsRng), Ok((first, Outcome::Same)));
    }
    assert_eq!(p.attach(1, src(1), None, t0, &mut OsRng), Err(AttachError::CircuitRate));
    assert_eq!(p.sessions(), 1);
    assert_eq!(routes(&p), vec![(first.v4, 1)]);
    // Long after any grace period, another user gets another address, routed only to them.
    p.expire(t0 + GRACE * 2);
    let (victim, _) = p.attach(2, src(2), None, t0 + GRACE * 2, &mut OsRng).unwrap();
    assert_ne!(victim.v4, first.v4);
    assert_eq!(routes(&p), vec![(first.v4, 1), (victim.v4, 2)]);
}

#[test]
fn switching_sessions_on_a_circuit_unroutes_the_old_one() {
    let t0 = Instant::now();
    let mut p = pool("10.9.0.0/29");
    let (old, _) = p.attach(1, src(1), None, t0, &mut OsRng).unwrap();
    p.detach(1, t0);
    let (other, _) = p.attach(2, src(1), None, t0, &mut OsRng).unwrap();
    // Circuit 2 now resumes the first session: its own fresh one is detached and unrouted.
    assert_eq!(p.attach(2, src(1), Some(old.token), t0, &mut OsRng), Ok((old, Outcome::Resumed)));
    assert_eq!(routes(&p), vec![(old.v4, 2)]);
    assert_eq!(p.detached_sessions(), 1);
    // Resuming with its own token again is the same session.
    assert_eq!(p.attach(2, src(1), Some(old.token), t0, &mut OsRng), Ok((old, Outcome::Same)));
    // After the grace period and its flush, the other session's address goes to someone else,
    // routed to them.
    p.expire(t0 + GRACE);
    flush_all(&mut p, t0 + GRACE);
    for c in 3..=6 {
        p.attach(c, src(3), None, t0 + GRACE, &mut OsRng).unwrap();
    }
    assert_eq!(p.circuit_of(other.v4.into()).map(|c| (3..=6).contains(&c)), Some(true), "re-leased");
    let routed = routes(&p);
    assert_eq!(routed.len(), 5);
    assert!(routed.iter().all(|&(addr, c)| (addr == old.v4) == (c == 2)), "{routed:?}");
}

#[test]
fn a_resume_moves_the_route_and_the_old_circuit_cannot_take_it_back() {
    let t0 = Instant::now();
    let mut p = pool("10.8.0.0/16");
    let (a, _) = p.attach(1, src(1), None, t0, &mut OsRng).unwrap();
    // The path broke without the exit noticing; the client resumes on circuit 2.
    p.attach(2, src(2), Some(a.token), t0, &mut OsRng).unwrap();
    assert_eq!(routes(&p), vec![(a.v4, 2)]);
    // The old circuit ends later: the session stays with circuit 2.
    p.detach(1, t0);
    assert_eq!(routes(&p), vec![(a.v4, 2)]);
    assert_eq!(p.detached_sessions(), 0);
    // The old circuit ATTACHing again (without the token) gets nothing of the session's.
    p.attach(3, src(1), None, t0, &mut OsRng).unwrap();
    assert_eq!(routes(&p).iter().filter(|(addr, _)| *addr == a.v4).count(), 1);
    assert_eq!(p.sessions_of(src(2)), 1, "the session is counted against the source it resumed from");
    assert_eq!(p.sessions_of(src(1)), 1);
}

/// One source (one client, or one middle relay) cannot take the whole pool: it is held to
/// `sessions_per_source`, however many circuits it opens, and others still get addresses.
#[test]
fn one_source_cannot_exhaust_the_pool() {
    let t0 = Instant::now();
    let mut p = pool_with("10.8.0.0/24", PoolLimits { sessions_per_source: 16, attach_burst: 1e6, ..limits() });
    let mut circuit = 0;
    let mut leased = 0;
    // Circuits opened, ATTACHed and closed, ATTACHed and kept: both hold sessions.
    while circuit < 1000 {
        circuit += 1;
        match p.attach(circuit, "2001:db8::1".parse().unwrap(), None, t0, &mut OsRng) {
            Ok(_) => leased += 1,
            Err(e) => assert_eq!(e, AttachError::SourceCap),
        }
        if circuit % 2 == 0 {
            p.detach(circuit, t0);
        }
    }
    assert_eq!(leased, 16);
    // The same /64 is the same source.
    let same_64 = p.attach(5000, "2001:db8::2:1".parse().unwrap(), None, t0, &mut OsRng);
    assert_eq!(same_64, Err(AttachError::SourceCap));
    assert!(p.attach(5001, src(9), None, t0, &mut OsRng).is_ok(), "another source is served");
    assert_eq!(p.stats().refused[AttachError::SourceCap as usize], 1000 - 16 + 1);
    // Expired sessions count no more.
    p.expire(t0 + GRACE);
    assert_eq!(p.sessions_of("2001:db8::1".parse().unwrap()), 8);
}

#[test]
fn a_source_is_held_to_its_attach_rate() {
    let t0 = Instant::now();
    let mut p = pool_with("10.8.0.0/16", PoolLimits { attach_rate: 1.0, attach_burst: 5.0, ..limits() });
    let served = (0..50).filter(|&c| p.attach(c, src(1), None, t0, &mut OsRng).is_ok()).count();
    assert_eq!(served, 5);
    assert_eq!(p.stats().refused[AttachError::SourceRate as usize], 45);
    assert!(p.attach(100, src(1), None, t0 + Duration::from_secs(1), &mut OsRng).is_ok());
    assert!(p.attach(101, src(2), None, t0, &mut OsRng).is_ok());
}

#[test]
fn a_full_pool_reclaims_the_oldest_detached_session_never_an_attached_one() {
    let t0 = Instant::now();
    let mut p = pool("10.9.0.0/29"); // hosts .2 ..= .6
    let leases: Vec<Lease> = (0..5).map(|c| p.attach(c, src(c as u8), None, t0, &mut OsRng).unwrap().0).collect();
    assert!(leases.iter().all(|l| (2..=6).contains(&l.v4.octets()[3])));
    assert_eq!(p.attach(99, src(99), None, t0, &mut OsRng), Err(AttachError::Exhausted));
    p.detach(3, t0 + Duration::from_secs(2));
    p.detach(1, t0 + Duration::from_secs(1));
    // The session detached first gives its address up first, but only once it is flushed.
    let t3 = t0 + Duration::from_secs(3);
    assert_eq!(p.attach(99, src(99), None, t3, &mut OsRng), Err(AttachError::Flushing));
    assert_eq!(p.stats().reclaimed, 1);
    flush_all(&mut p, t3);
    let (got, _) = p.attach(99, src(99), None, t3, &mut OsRng).unwrap();
    assert_eq!(got.v4, leases[1].v4);
    assert_eq!(routes(&p).iter().filter(|(_, c)| *c == 1).count(), 0);
    // Its old token resumes nothing; the other detached session gives its address up next.
    assert_eq!(p.attach(7, src(7), Some(leases[1].token), t3, &mut OsRng), Err(AttachError::Flushing));
    flush_all(&mut p, t3);
    assert_eq!(p.attach(7, src(7), Some(leases[1].token), t3, &mut OsRng).unwrap().0.v4, leases[3].v4);
    assert_eq!(p.attach(8, src(8), None, t3, &mut OsRng), Err(AttachError::Exhausted));
    assert_eq!(p.stats().reclaimed, 2);
}

/// The conntrack attack at the pool: an address whose session ended (expired or reclaimed) is
/// leased to nobody until its flush is reported done, and a failed flush keeps it out (tried
/// again after FLUSH_RETRY, never lost).
#[test]
fn a_released_address_is_never_leased_before_its_conntrack_entries_are_deleted() {
    let t0 = Instant::now();
    let mut p = pool("10.9.0.0/29");
    let leases: Vec<Lease> = (0..5).map(|c| p.attach(c, src(1), None, t0, &mut OsRng).unwrap().0).collect();
    p.detach(0, t0);
    let t1 = t0 + GRACE;
    p.expire(t1);
    assert_eq!((p.sessions(), p.flushing()), (4, 1));
    assert_eq!(p.attach(10, src(2), None, t1, &mut OsRng), Err(AttachError::Flushing), "not before its flush");
    let batch = p.take_flushes(t1, 8);
    let (v4, v6) = (leases[0].v4, leases[0].v6);
    assert_eq!(batch, vec![Flush { slot: 2, v4, v6 }]);
    assert_eq!(p.take_flushes(t1, 8), vec![], "handed out once until reported");
    assert_eq!(p.attach(11, src(2), None, t1, &mut OsRng), Err(AttachError::Flushing), "nor while it runs");
    // It fails: still out, and not tried again before FLUSH_RETRY.
    p.flushed(2, false, t1);
    assert_eq!((p.flushing(), p.stats().flush_failed), (1, 1));
    assert_eq!(p.attach(12, src(2), None, t1, &mut OsRng), Err(AttachError::Flushing));
    assert_eq!(p.take_flushes(t1 + FLUSH_RETRY - Duration::from_millis(1), 8), vec![]);
    let retry = p.take_flushes(t1 + FLUSH_RETRY, 8);
    assert_eq!(retry.len(), 1);
    assert_eq!(p.attach(13, src(2), None, t1 + FLUSH_RETRY, &mut OsRng), Err(AttachError::Flushing));
    // Done: the address is free and leased (to a circuit that has not used its ATTACHes).
    p.flushed(2, true, t1 + FLUSH_RETRY);
    assert_eq!((p.flushing(), p.stats().flushed), (0, 1));
    let (got, _) = p.attach(14, src(2), None, t1 + FLUSH_RETRY, &mut OsRng).unwrap();
    assert_eq!((got.v4, got.v6), (v4, v6));
    // A report for a slot that is not waiting changes nothing.
    p.flushed(2, true, t1);
    p.flushed(3, false, t1);
    assert_eq!(p.circuit_of(v4.into()), Some(14));
    assert_eq!(p.flushing(), 0);
}

#[test]
fn flushes_are_handed_out_in_batches() {
    let t0 = Instant::now();
    let mut p = pool("10.9.0.0/28");
    for c in 0..10 {
        p.attach(c, src(1), None, t0, &mut OsRng).unwrap();
        p.detach(c, t0);
    }
    p.expire(t0 + GRACE);
    assert_eq!(p.flushing(), 10);
    let first = p.take_flushes(t0 + GRACE, 4);
    let rest = p.take_flushes(t0 + GRACE, 100);
    assert_eq!((first.len(), rest.len()), (4, 6));
    assert!(first.iter().all(|f| !rest.contains(f)));
    for f in first.iter().chain(&rest) {
        assert_eq!(p.table.addresses(f.slot), (f.v4, f.v6));
        p.flushed(f.slot, true, t0 + GRACE);
    }
    assert_eq!(p.flushing(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Attach { circuit: u32, source: u8, resume: Option<usize> },
    Detach { circuit: u32 },
    Tick { secs: u64 },
    Flush { ok: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..12, 0u8..4, proptest::option::of(0usize..8))
            .prop_map(|(circuit, source, resume)| Op::Attach { circuit, source, resume }),
        2 => (0u32..12).prop_map(|circuit| Op::Detach { circuit }),
        1 => (0u64..40).prop_map(|secs| Op::Tick { secs }),
        1 => any::<bool>().prop_map(|ok| Op::Flush { ok }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever circuits do, the table routes each address to the circuit holding its
    /// session and to nothing else, no circuit holds two sessions, the counts add up, and no
    /// address is leased again between the end of its session and a successful flush.
    #[test]
    fn the_table_is_exactly_the_sessions(ops in proptest::collection::vec(op(), 1..80)) {
        let mut now = Instant::now();
        let mut p = pool_with("10.9.0.0/28", PoolLimits {
            grace: Duration::from_secs(30), sessions_per_source: 6, attach_rate: 1000.0, attach_burst: 1000.0,
        });
        let mut tokens: Vec<Token> = Vec::new();
        // Addresses whose session ended and whose flush has not succeeded (the model).
        let mut unflushed: std::collections::HashSet<Ipv4Addr> = Default::default();
        for op in ops {
            let before: Vec<(Token, Ipv4Addr)> = p.sessions.iter().map(|(t, s)| (*t, s.lease.v4)).collect();
            match op {
                Op::Attach { circuit, source, resume } => {
                    let resume = resume.and_then(|i| tokens.get(i).copied());
                    if let Ok((lease, how)) = p.attach(circuit, src(source), resume, now, &mut OsRng) {
                        prop_assert_eq!(p.lease_of(circuit), Some(lease));
                        if how == Outcome::New {
                            prop_assert!(!unflushed.contains(&lease.v4), "{} leased before its flush", lease.v4);
                        }
                        if !tokens.contains(&lease.token) {
                            tokens.push(lease.token);
                        }
                    }
                }
                Op::Detach { circuit } => p.detach(circuit, now),
                Op::Tick { secs } => {
                    now += Duration::from_secs(secs);
                    p.expire(now);
                }
                Op::Flush { ok } => {
                    for f in p.take_flushes(now, usize::MAX) {
                        prop_assert!(unflushed.contains(&f.v4), "{} flushed but never released", f.v4);
                        p.flushed(f.slot, ok, now);
                        if ok {
                            unflushed.remove(&f.v4);
                        }
                    }
                }
            }
            for (token, v4) in before {
                if !p.sessions.contains_key(&token) {
                    unflushed.insert(v4);
                }
            }
            prop_assert_eq!(unflushed.len(), p.flushing());
            let routed = routes(&p);
            for &(addr, circuit) in &routed {
                let lease = p.lease_of(circuit);
                prop_assert_eq!(lease.map(|l| l.v4), Some(addr), "{} routes to {} which holds {:?}", addr, circuit, lease);
            }
            let mut circuits: Vec<u32> = routed.iter().map(|&(_, c)| c).collect();
            circuits.sort_unstable();
            circuits.dedup();
            prop_assert_eq!(circuits.len(), routed.len(), "a circuit routed from two addresses");
            for (circuit, token) in &p.by_circuit {
                prop_assert_eq!(p.sessions[token].circuit, Some(*circuit));
            }
            prop_assert_eq!(p.sessions.len(), p.holder.iter().filter(|s| matches!(s, Slot::Held(_))).count());
            prop_assert_eq!(p.dirty.len(), p.holder.iter().filter(|s| **s == Slot::Dirty).count());
            for addr in &unflushed {
                prop_assert_eq!(p.circuit_of((*addr).into()), None, "{} routed before its flush", addr);
            }
            prop_assert_eq!(p.sessions.len(), p.per_source.values().sum::<usize>());
            prop_assert_eq!(p.detached.len(), p.sessions.values().filter(|s| s.circuit.is_none()).count());
            prop_assert_eq!(p.by_circuit.len() + p.detached.len(), p.sessions.len());
        }
    }
}
