//! Guard selection that someone on the client's network cannot steer, after Tor's guard
//! specification (guard-spec.txt: primary guards, retry schedules, "network down" handling).
//!
//! The client keeps an ordered set of [`PRIMARY_GUARDS`] guards, chosen once by weight and kept
//! on disk (`state_dir/guards.json`). It always uses the first one it may use:
//!
//! - A guard that fails (its handshake times out) is retried with backoff ([`retry_delay`]:
//!   1 s, doubling, at most 30 s) and stays the one in use for [`FAILOVER_AFTER`]. Dropping the
//!   client's UDP for seconds, or a guard's restart, changes nothing.
//! - A guard unreachable for longer is passed over for the next primary guard, an old one: never
//!   a fresh pick. It is retried every [`RETRY_PASSED_OVER`] (Tor's primary-guard schedule) and
//!   used again as soon as it answers.
//! - A guard is replaced (a new one drawn) only when it has failed [`REPLACE_AFTER_FAILURES`]
//!   times over at least [`REPLACE_AFTER`] while another guard worked (so the network was
//!   up), or when the directory no longer lists it as a guard (the authority's decision).
//!
//! A DESTROY or a silent circuit never counts against the guard: a middle can cause both.
//! Everything here is sans-IO, in unix seconds the caller passes.

use crate::relays::{Relay, Relays};
use cellproto::identity::IdentityKey;
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// Guards kept in the set (Tor's `guard-n-primary-guards`).
pub const PRIMARY_GUARDS: usize = 3;
/// How long a failing guard stays the one in use before the next primary guard is tried.
pub const FAILOVER_AFTER: u64 = 60;
/// How often a passed-over guard is tried again (Tor: 10 minutes for primary guards).
pub const RETRY_PASSED_OVER: u64 = 600;
/// How long a guard must be unreachable, while another worked, before it is replaced.
pub const REPLACE_AFTER: u64 = 24 * 3600;
/// How many failed attempts, at least, before a guard is replaced.
pub const REPLACE_AFTER_FAILURES: u32 = 10;
/// File name of the guard set in the state directory.
pub const FILE: &str = "guards.json";
/// The file of earlier versions: one identity.
pub const LEGACY_FILE: &str = "guard";

/// Pause before the next attempt through a guard that failed `failures` times in a row.
pub fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// One guard of the set, as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// Its identity (hex).
    #[serde(with = "hex_key")]
    pub id: IdentityKey,
    /// When it joined the set.
    pub added: u64,
    /// Failed attempts since it last answered.
    pub failures: u32,
    /// When it stopped answering, if it has.
    pub unreachable_since: Option<u64>,
    /// The last attempt through it.
    pub last_tried: Option<u64>,
    /// Whether a circuit through another guard was built since it stopped answering: its
    /// failures then say something about it, not about the network.
    pub others_worked: bool,
}

impl Guard {
    /// A guard that joins the set at `now`, untried.
    pub fn new(id: IdentityKey, now: u64) -> Self {
        Self { id, added: now, failures: 0, unreachable_since: None, last_tried: None, others_worked: false }
    }
}

/// The ordered guard set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guards {
    set: Vec<Guard>,
    dirty: bool,
}

impl Guards {
    /// The set as saved in `state_dir` (`guards.json`, or the single guard of older versions);
    /// empty if there is none or it does not parse (logged by the caller as a fresh start).
    pub fn load(state_dir: &Path) -> Self {
        if let Ok(text) = std::fs::read_to_string(state_dir.join(FILE))
            && let Ok(set) = serde_json::from_str::<Vec<Guard>>(&text)
        {
            return Self { set, dirty: false };
        }
        let legacy = std::fs::read_to_string(state_dir.join(LEGACY_FILE)).ok().and_then(|t| t.trim().parse().ok());
        Self::from_ids(legacy.into_iter().collect(), 0)
    }

    /// A set of these guards, in this order.
    pub fn from_ids(ids: Vec<IdentityKey>, now: u64) -> Self {
        let set = ids.into_iter().map(|id| Guard::new(id, now)).collect();
        Self { set, dirty: true }
    }

    /// Writes the set to `state_dir/guards.json` (atomically).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(&self.set).map_err(std::io::Error::other)?;
        let tmp = state_dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, state_dir.join(FILE))
    }

    /// The guards, first preferred.
    pub fn entries(&self) -> &[Guard] {
        &self.set
    }

    /// Whether the set changed since the last call (the caller then saves it).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Drops guards the directory no longer lists as usable guards and those due for
    /// replacement, then draws new ones by weight until the set is full. Returns the
    /// identities dropped.
    pub fn refresh(&mut self, relays: &Relays, now: u64, rng: &mut impl RngCore) -> Vec<IdentityKey> {
        let listed = |id: &IdentityKey| relays.relays.iter().any(|r| r.id() == *id && r.desc.is_guard());
        let mut dropped = Vec::new();
        self.set.retain(|g| {
            let gone = !listed(&g.id);
            let dead = g.others_worked
                && g.failures >= REPLACE_AFTER_FAILURES
                && g.unreachable_since.is_some_and(|t| now.saturating_sub(t) >= REPLACE_AFTER);
            if gone || dead {
                dropped.push(g.id);
            }
            !(gone || dead)
        });
        while self.set.len() < PRIMARY_GUARDS {
            let taken: Vec<IdentityKey> = self.set.iter().map(|g| g.id).chain(dropped.iter().copied()).collect();
            let fits = |r: &Relay| r.desc.is_guard() && !taken.contains(&r.id());
            let Some(new) = relays.pick(fits, rng) else { break };
            self.set.push(Guard::new(new.id(), now));
        }
        if !dropped.is_empty() || self.set.iter().any(|g| g.added == now && g.last_tried.is_none()) {
            self.dirty = true;
        }
        dropped
    }

    /// The guards to try now, best first: the first guard that has not been unreachable for
    /// [`FAILOVER_AFTER`], or whose retry is due, then the others in order (the caller takes
    /// the first that gives a usable path).
    pub fn candidates(&self, now: u64) -> Vec<IdentityKey> {
        let usable = |g: &Guard| match g.unreachable_since {
            None => true,
            Some(since) if now.saturating_sub(since) < FAILOVER_AFTER => true,
            Some(_) => g.last_tried.is_none_or(|t| now.saturating_sub(t) >= RETRY_PASSED_OVER),
        };
        let mut order: Vec<&Guard> = self.set.iter().filter(|g| usable(g)).collect();
        // Every guard passed over (the network is probably down): keep trying them all, the
        // least recently tried first. Still never a new one.
        let mut rest: Vec<&Guard> = self.set.iter().filter(|g| !usable(g)).collect();
        rest.sort_by_key(|g| g.last_tried);
        order.extend(rest);
        order.into_iter().map(|g| g.id).collect()
    }

    /// Failures in a row of `id` (0 if it is not in the set).
    pub fn failures(&self, id: &IdentityKey) -> u32 {
        self.set.iter().find(|g| g.id == *id).map_or(0, |g| g.failures)
    }

    /// A circuit through `id` is being built.
    pub fn tried(&mut self, id: &IdentityKey, now: u64) {
        if let Some(g) = self.set.iter_mut().find(|g| g.id == *id) {
            g.last_tried = Some(now);
        }
    }

    /// `id` did not answer its handshake.
    pub fn failed(&mut self, id: &IdentityKey, now: u64) {
        if let Some(g) = self.set.iter_mut().find(|g| g.id == *id) {
            g.failures = g.failures.saturating_add(1);
            g.unreachable_since.get_or_insert(now);
            g.last_tried = Some(now);
            self.dirty = true;
        }
    }

    /// A circuit through `id` was built: it is reachable, and the guards that are not have
    /// now failed while the network worked.
    pub fn succeeded(&mut self, id: &IdentityKey, now: u64) {
        for g in &mut self.set {
            if g.id == *id {
                self.dirty |= g.failures != 0 || g.unreachable_since.is_some();
                g.failures = 0;
                g.unreachable_since = None;
                g.last_tried = Some(now);
            } else if g.unreachable_since.is_some() && !g.others_worked {
                g.others_worked = true;
                self.dirty = true;
            }
        }
    }
}

mod hex_key {
    use cellproto::identity::IdentityKey;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &IdentityKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&k.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IdentityKey, D::Error> {
        String::deserialize(d)?.parse().map_err(|_| serde::de::Error::custom("expected 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> IdentityKey {
        IdentityKey([n; 32])
    }

    #[test]
    fn retry_delay_backs_off_to_thirty_seconds() {
        let d: Vec<u64> = (1..=8).map(|f| retry_delay(f).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_failing_guard_stays_first_until_failover_then_is_retried_on_schedule() {
        let mut g = Guards::from_ids(vec![id(1), id(2), id(3)], 0);
        g.failed(&id(1), 1000);
        assert_eq!(g.candidates(1000 + FAILOVER_AFTER - 1)[0], id(1));
        g.failed(&id(1), 1000 + FAILOVER_AFTER);
        assert_eq!(g.candidates(1000 + FAILOVER_AFTER)[..2], [id(2), id(3)]);
        assert_eq!(g.candidates(1000 + FAILOVER_AFTER + RETRY_PASSED_OVER)[0], id(1), "retry due");
        // Everything fails (the network is down): the kept guards are cycled, none is added.
        let t = 5000;
        for i in 1..=3 {
            g.failed(&id(i), t - FAILOVER_AFTER);
            g.failed(&id(i), t);
        }
        let c = g.candidates(t + 1);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|k| [id(1), id(2), id(3)].contains(k)));
    }

    /// A directory of `n` guard-flagged relays with identities 1..=n.
    fn directory(n: u8) -> Relays {
        use cellproto::client::PathHop;
        use cellproto::descriptor::{FLAG_GUARD, RelayDescriptor};
        use cellproto::handshake::RelayKeys;
        let relays = (1..=n)
            .map(|i| {
                let addr = std::net::SocketAddr::from(([10, i, 0, 1], 9001));
                let desc = RelayDescriptor {
                    identity: id(i),
                    onion_keys: vec![],
                    addresses: vec![addr],
                    nickname: format!("g{i}"),
                    operator: String::new(),
                    bandwidth: 1000,
                    flags: FLAG_GUARD,
                    exit_policy: None,
                    protocol_versions: vec![1],
                    published: 0,
                    expires: 1,
                };
                let hop = PathHop { keys: RelayKeys { identity: [i; 32], onion_key: [i; 32] }, addr };
                Relay { desc, hop, rtt: None }
            })
            .collect();
        Relays { relays, published: 0, expires: u64::MAX }
    }

    #[test]
    fn a_guard_is_replaced_only_after_a_day_of_failures_while_another_worked() {
        let relays = directory(4);
        let mut rng = rand_core::OsRng;
        let mut g = Guards::from_ids(vec![id(1), id(2), id(3)], 0);
        // Guard 1 fails often for more than a day, but nothing else works either: the
        // network is down, and the set stays.
        for i in 0..=REPLACE_AFTER_FAILURES as u64 {
            g.failed(&id(1), i * 3 * 3600);
        }
        let later = REPLACE_AFTER + 3 * 3600;
        assert!(g.refresh(&relays, later, &mut rng).is_empty());
        // Another guard works meanwhile: now guard 1 is what fails, and it is replaced by the
        // only other listed guard.
        g.succeeded(&id(2), later);
        assert_eq!(g.refresh(&relays, later, &mut rng), vec![id(1)]);
        let ids: Vec<IdentityKey> = g.entries().iter().map(|e| e.id).collect();
        assert_eq!(ids, [id(2), id(3), id(4)]);
        assert!(g.take_dirty());
        // Fewer failures, or a shorter time, are not enough.
        let mut g = Guards::from_ids(vec![id(1), id(2), id(3)], 0);
        for i in 0..u64::from(REPLACE_AFTER_FAILURES - 1) {
            g.failed(&id(1), i * 4 * 3600);
        }
        g.succeeded(&id(2), REPLACE_AFTER * 2);
        assert!(g.refresh(&relays, REPLACE_AFTER * 2, &mut rng).is_empty());
        let mut g = Guards::from_ids(vec![id(1), id(2), id(3)], 0);
        for i in 0..u64::from(REPLACE_AFTER_FAILURES) * 2 {
            g.failed(&id(1), i);
        }
        g.succeeded(&id(2), 3600);
        assert!(g.refresh(&relays, 3600, &mut rng).is_empty());
    }

    #[test]
    fn unlisted_guards_leave_and_the_set_is_filled_by_weight() {
        let mut rng = rand_core::OsRng;
        let mut g = Guards::from_ids(vec![id(9), id(1)], 0);
        assert_eq!(g.refresh(&directory(4), 10, &mut rng), vec![id(9)]);
        assert_eq!(g.entries().len(), PRIMARY_GUARDS);
        assert_eq!(g.entries()[0].id, id(1), "the kept guard stays first");
        let mut small = Guards::default();
        small.refresh(&directory(2), 10, &mut rng);
        assert_eq!(small.entries().len(), 2, "no more guards than the directory has");
    }

    #[test]
    fn saved_and_loaded_and_the_old_single_guard_file_is_read() {
        let dir = std::env::temp_dir().join(format!("meshvpn-guards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(LEGACY_FILE), format!("{}\n", id(7))).unwrap();
        let legacy = Guards::load(&dir);
        assert_eq!(legacy.candidates(0), vec![id(7)]);
        let mut g = Guards::from_ids(vec![id(1), id(2)], 5);
        g.failed(&id(1), 6);
        g.save(&dir).unwrap();
        let back = Guards::load(&dir);
        assert_eq!(back.entries(), g.entries());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
