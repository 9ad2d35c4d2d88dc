//! Cookies under load, in the workers: they see a CREATE flood first, so they check the cookie
//! MAC before anything is queued for the control thread, and answer cookie-less CREATEs with a
//! COOKIE themselves (rate-limited: a spoofed source could aim those at someone else).
//!
//! The control thread owns the relay's one [`CookieJar`], rotates it every
//! [`COOKIE_ROTATION`](cellproto::relay::cookie::COOKIE_ROTATION) and sends every worker a
//! copy, so a cookie one worker issued is valid at every other.

use crate::ratelimit::{Bucket, LoadState, LocalTrigger, ReplyLimiter, ReplyLimits};
use cellio::{Outbox, Outgoing};
use cellproto::cell::CELL_LEN;
use cellproto::relay::cookie::CookieJar;
use ipnet::IpNet;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::net::SocketAddr;
use std::time::Instant;

/// A worker's limits under load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CookieLimits {
    /// COOKIE answers: per source, and per worker in all.
    pub replies: ReplyLimits,
    /// CREATEs a worker examines (cookie MAC, and COOKIE answer) per second under load; beyond
    /// it they are dropped before any cryptography, so a flood's CPU cost is bounded.
    pub checks: f64,
}

/// What became of a CREATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateCheck {
    /// Not under load: on to the control thread.
    Forward,
    /// Under load, with a valid cookie MAC: on to the control thread.
    ForwardWithCookie,
    /// Under load without a valid cookie: a COOKIE was queued.
    CookieSent,
    /// Under load without a valid cookie, and the COOKIE answer was rate-limited.
    Limited,
    /// Under load, but not a CREATE that can be answered (malformed).
    Malformed,
    /// Under load before the first seed arrived (only at start): dropped.
    NoSecret,
    /// Under load, over the worker's budget of CREATEs examined: dropped unexamined.
    Shed,
}

/// A tenth of a second's worth of checks.
fn check_burst(rate: f64) -> f64 {
    (rate / 10.0).max(1.0)
}

/// A worker's cookie state.
pub struct CreateGuard {
    jar: Option<CookieJar>,
    trigger: LocalTrigger,
    replies: ReplyLimiter,
    checks: Bucket,
    check_rate: f64,
    exempt: Vec<IpNet>,
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for CreateGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateGuard").field("has_secret", &self.jar.is_some()).finish_non_exhaustive()
    }
}

impl CreateGuard {
    /// Examines CREATEs and answers COOKIEs within `limits` (per source, except `exempt`
    /// sources, and in all).
    pub fn new(now: Instant, limits: CookieLimits, exempt: Vec<IpNet>) -> Self {
        Self {
            jar: None,
            trigger: LocalTrigger::new(now),
            replies: ReplyLimiter::new(limits.replies, now),
            checks: Bucket::full(check_burst(limits.checks), now),
            check_rate: limits.checks,
            exempt,
            rng: ChaCha20Rng::from_entropy(),
        }
    }

    /// Takes the control thread's cookie jar (at start, then after each rotation).
    pub fn set_jar(&mut self, jar: CookieJar) {
        self.jar = Some(jar);
    }

    /// New limits and exempt sources (SIGHUP).
    pub fn reconfigure(&mut self, limits: CookieLimits, exempt: Vec<IpNet>) {
        self.replies.reconfigure(limits.replies);
        self.check_rate = limits.checks;
        self.exempt = exempt;
    }

    /// Forgets idle sources of the answer limiter.
    pub fn prune(&mut self, now: Instant) {
        self.replies.prune(now);
    }

    /// Checks a CREATE from `from` (canonical); under load without a valid cookie, queues the
    /// COOKIE answer in `out` if the limits allow.
    pub fn check(
        &mut self,
        load: &LoadState,
        now: Instant,
        from: SocketAddr,
        cell: &[u8; CELL_LEN],
        out: &mut Outbox,
    ) -> CreateCheck {
        if !self.trigger.create(load, now) {
            return CreateCheck::Forward;
        }
        if !self.checks.take(self.check_rate, check_burst(self.check_rate), now) {
            return CreateCheck::Shed;
        }
        let Some(jar) = &self.jar else { return CreateCheck::NoSecret };
        if jar.check(from, cell) {
            return CreateCheck::ForwardWithCookie;
        }
        let ip = crate::ratelimit::canonical_ip(from.ip());
        let allowed = if self.exempt.iter().any(|net| net.contains(&ip)) {
            self.replies.allow_global(now)
        } else {
            self.replies.allow(ip, now)
        };
        if allowed.is_err() {
            return CreateCheck::Limited;
        }
        let mut answer = [0u8; CELL_LEN];
        match jar.reply(from, cell, &mut answer, &mut self.rng) {
            Ok(()) => {
                out.push(Outgoing::cell(from, &answer));
                CreateCheck::CookieSent
            }
            Err(_) => CreateCheck::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellproto::handshake::{ClientHandshake, ClientRequest, OnionSecret, RelayKeys};
    use cellproto::link::{decode_cookie_reply, encode_create};
    use rand_core::OsRng;

    fn create(
        keys: &RelayKeys,
        cookie: Option<&[u8; 16]>,
        message: Option<[u8; cellproto::handshake::CREATE_LEN]>,
    ) -> ([u8; CELL_LEN], [u8; cellproto::handshake::CREATE_LEN]) {
        let message = message.unwrap_or_else(|| {
            let req = ClientRequest { hop: 1, offer_aes: true, link_secret: None };
            let hs = ClientHandshake::start(keys, &req, &mut OsRng).unwrap();
            *hs.message()
        });
        let mut cell = [0u8; CELL_LEN];
        encode_create(&mut cell, 0x4000_0001, &message, None, cookie, &mut OsRng);
        (cell, message)
    }

    fn limits() -> CookieLimits {
        CookieLimits { replies: ReplyLimits { rate: 3.0, burst: 5, global_rate: 1e6 }, checks: 1e6 }
    }

    #[test]
    fn under_load_only_a_create_with_the_cookie_passes_at_any_worker() {
        let keys = RelayKeys { identity: [1; 32], onion_key: *OnionSecret::generate(&mut OsRng).public() };
        let now = Instant::now();
        let load = LoadState::new(0.0);
        let mut jar = CookieJar::new(now, &mut OsRng);
        let mut a = CreateGuard::new(now, limits(), Vec::new());
        let mut b = CreateGuard::new(now, limits(), Vec::new());
        a.set_jar(jar.clone());
        b.set_jar(jar.clone());
        let from: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let (cell, message) = create(&keys, None, None);
        let mut out = cellio::Outbox::new();
        assert_eq!(a.check(&load, now, from, &cell, &mut out), CreateCheck::CookieSent);
        let reply: [u8; CELL_LEN] = out.datagrams()[0].data().try_into().unwrap();
        assert_eq!(out.datagrams()[0].to, from);
        let cookie = decode_cookie_reply(&reply, &message).unwrap();
        let (with_cookie, _) = create(&keys, Some(&cookie), Some(message));
        assert_eq!(b.check(&load, now, from, &with_cookie, &mut out), CreateCheck::ForwardWithCookie, "worker b");
        // Bound to the source: the same cell from another address (or port) gets a COOKIE.
        let other: SocketAddr = "192.0.2.1:4001".parse().unwrap();
        assert_eq!(b.check(&load, now, other, &with_cookie, &mut out), CreateCheck::CookieSent);
        // The IPv4-mapped form of the address is the same source.
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:4000".parse().unwrap();
        assert_eq!(b.check(&load, now, mapped, &with_cookie, &mut out), CreateCheck::ForwardWithCookie);
        // Still valid after one rotation, not after two.
        let rotation = cellproto::relay::cookie::COOKIE_ROTATION;
        jar.rotate_if_due(now + rotation, &mut OsRng);
        a.set_jar(jar.clone());
        assert_eq!(a.check(&load, now, from, &with_cookie, &mut out), CreateCheck::ForwardWithCookie);
        jar.rotate_if_due(now + 2 * rotation, &mut OsRng);
        a.set_jar(jar.clone());
        assert_eq!(a.check(&load, now, from, &with_cookie, &mut out), CreateCheck::CookieSent);
    }

    #[test]
    fn cookie_answers_are_rate_limited_per_source_except_exempt() {
        let keys = RelayKeys { identity: [1; 32], onion_key: *OnionSecret::generate(&mut OsRng).public() };
        let now = Instant::now();
        let load = LoadState::new(0.0);
        let mut g = CreateGuard::new(now, limits(), vec!["203.0.113.0/24".parse().unwrap()]);
        let mut out = cellio::Outbox::new();
        let (cell, _) = create(&keys, None, None);
        assert_eq!(g.check(&load, now, "192.0.2.1:1".parse().unwrap(), &cell, &mut out), CreateCheck::NoSecret);
        g.set_jar(CookieJar::new(now, &mut OsRng));
        let spoofed: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let sent =
            (0..100).filter(|_| g.check(&load, now, spoofed, &cell, &mut out) == CreateCheck::CookieSent).count();
        assert_eq!(sent, 5, "the burst, then nothing");
        assert_eq!(g.check(&load, now, spoofed, &cell, &mut out), CreateCheck::Limited);
        let relay: SocketAddr = "203.0.113.7:9001".parse().unwrap();
        assert!((0..100).all(|_| g.check(&load, now, relay, &cell, &mut out) == CreateCheck::CookieSent));
        // Not under load: everything goes on, no cookie involved.
        let calm = LoadState::new(1e9);
        assert_eq!(g.check(&calm, now, spoofed, &cell, &mut out), CreateCheck::Forward);
    }

    /// The attack: a flood far above what COOKIE answers allow still makes the worker compute
    /// the cookie MAC of each CREATE. Beyond `checks` per second they are dropped unexamined.
    #[test]
    fn a_flood_beyond_the_check_budget_is_dropped_unexamined() {
        let keys = RelayKeys { identity: [1; 32], onion_key: *OnionSecret::generate(&mut OsRng).public() };
        let now = Instant::now();
        let load = LoadState::new(0.0);
        let limits = CookieLimits { replies: ReplyLimits { rate: 1e6, burst: 1000, global_rate: 1e6 }, checks: 1000.0 };
        let mut g = CreateGuard::new(now, limits, Vec::new());
        g.set_jar(CookieJar::new(now, &mut OsRng));
        let (cell, _) = create(&keys, None, None);
        let mut out = cellio::Outbox::new();
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let results: Vec<_> = (0..1000).map(|_| g.check(&load, now, from, &cell, &mut out)).collect();
        assert_eq!(
            results.iter().filter(|r| **r == CreateCheck::CookieSent).count(),
            100,
            "a tenth of a second's worth"
        );
        assert_eq!(results.iter().filter(|r| **r == CreateCheck::Shed).count(), 900);
        let later = now + std::time::Duration::from_secs(1);
        let sent =
            (0..2000).filter(|_| g.check(&load, later, from, &cell, &mut out) == CreateCheck::CookieSent).count();
        assert_eq!(sent, 100, "the budget refills at its rate, up to its burst");
    }
}
