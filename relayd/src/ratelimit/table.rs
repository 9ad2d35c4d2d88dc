//! Per-source state keyed by prefix, bounded in entries and per IPv6 /48.

use super::canonical_ip;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::time::Instant;

/// The unit a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// An IPv4 address (IPv4-mapped IPv6 included).
    V4([u8; 4]),
    /// An IPv6 /64: what one IPv6 host (or one LAN) gets, so one key however many addresses
    /// of it a flooder uses.
    V6([u8; 8]),
    /// An IPv6 /48 whose quota of /64 entries is used up: its further /64s share this entry.
    V6Site([u8; 6]),
}

impl SourceKey {
    /// The key of `ip` on its own: its /32 or its /64.
    pub fn of(ip: IpAddr) -> Self {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => SourceKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut net = [0u8; 8];
                net.copy_from_slice(&v6.octets()[..8]);
                SourceKey::V6(net)
            }
        }
    }

    /// The /48 a /64 key belongs to.
    fn site(&self) -> Option<[u8; 6]> {
        match self {
            SourceKey::V6(net) => {
                let mut site = [0u8; 6];
                site.copy_from_slice(&net[..6]);
                Some(site)
            }
            _ => None,
        }
    }
}

/// Values by [`SourceKey`], at most `capacity` of them, and at most `per_site` /64 entries per
/// IPv6 /48 (the /48's further /64s are looked up under its [`SourceKey::V6Site`] entry).
#[derive(Debug)]
pub struct PrefixTable<V> {
    entries: HashMap<SourceKey, V>,
    /// /64 entries per /48.
    sites: HashMap<[u8; 6], u32>,
    capacity: usize,
    per_site: u32,
}

impl<V> PrefixTable<V> {
    /// An empty table for at most `capacity` entries and `per_site` /64 entries per /48.
    pub fn new(capacity: usize, per_site: u32) -> Self {
        Self { entries: HashMap::new(), sites: HashMap::new(), capacity: capacity.max(1), per_site: per_site.max(1) }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether no entry can be added.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Most entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The key `ip` is tracked under: its own, or its /48's shared entry once that /48 has used
    /// its quota of /64 entries (and this /64 has none).
    pub fn key(&self, ip: IpAddr) -> SourceKey {
        let key = SourceKey::of(ip);
        if let Some(site) = key.site()
            && !self.entries.contains_key(&key)
            && self.sites.get(&site).is_some_and(|&n| n >= self.per_site)
        {
            return SourceKey::V6Site(site);
        }
        key
    }

    /// The entry under `key`.
    pub fn get(&self, key: &SourceKey) -> Option<&V> {
        self.entries.get(key)
    }

    /// The entry under `key`, mutable.
    pub fn get_mut(&mut self, key: &SourceKey) -> Option<&mut V> {
        self.entries.get_mut(key)
    }

    /// The entry under `key`, made with `make` if absent and there is room; `None` when full.
    pub fn get_or_insert(&mut self, key: SourceKey, make: impl FnOnce() -> V) -> Option<&mut V> {
        let full = self.entries.len() >= self.capacity;
        match self.entries.entry(key) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(_) if full => None,
            Entry::Vacant(e) => {
                if let Some(site) = key.site() {
                    *self.sites.entry(site).or_insert(0) += 1;
                }
                Some(e.insert(make()))
            }
        }
    }

    /// Removes the entry under `key`.
    pub fn remove(&mut self, key: &SourceKey) -> Option<V> {
        let v = self.entries.remove(key)?;
        self.forget_site(key);
        Some(v)
    }

    /// Keeps the entries for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&SourceKey, &mut V) -> bool) {
        let sites = &mut self.sites;
        self.entries.retain(|key, v| {
            let kept = keep(key, v);
            if !kept {
                forget_site(sites, key);
            }
            kept
        });
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = (&SourceKey, &V)> {
        self.entries.iter()
    }

    /// Every entry, mutable.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.values_mut()
    }

    /// Evicts up to `n` entries for which `evictable` holds, those with the oldest `last` first.
    /// One scan of the table: callers evict a share of it at once, so the cost per insertion
    /// stays constant.
    pub fn evict_oldest(&mut self, n: usize, evictable: impl Fn(&V) -> bool, last: impl Fn(&V) -> Instant) -> usize {
        let mut idle: Vec<(Instant, SourceKey)> =
            self.entries.iter().filter(|(_, v)| evictable(v)).map(|(k, v)| (last(v), *k)).collect();
        if n == 0 || idle.is_empty() {
            return 0;
        }
        if idle.len() > n {
            idle.select_nth_unstable_by_key(n - 1, |(last, _)| *last);
            idle.truncate(n);
        }
        for (_, key) in &idle {
            self.remove(key);
        }
        idle.len()
    }

    fn forget_site(&mut self, key: &SourceKey) {
        forget_site(&mut self.sites, key);
    }
}

fn forget_site(sites: &mut HashMap<[u8; 6], u32>, key: &SourceKey) {
    if let Some(site) = key.site()
        && let Entry::Occupied(mut e) = sites.entry(site)
    {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn v6(base: &str, add: u128) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(u128::from(base.parse::<Ipv6Addr>().unwrap()) + add))
    }

    #[test]
    fn one_key_per_64_and_mapped_is_ipv4() {
        let a = SourceKey::of(v6("2001:db8:1:2::", 1));
        let b = SourceKey::of(v6("2001:db8:1:2::", (1 << 64) - 1));
        assert_eq!(a, b, "one /64, one key");
        assert_ne!(a, SourceKey::of(v6("2001:db8:1:3::", 1)));
        assert_eq!(SourceKey::of("::ffff:192.0.2.1".parse().unwrap()), SourceKey::of("192.0.2.1".parse().unwrap()));
        assert_ne!(SourceKey::of("192.0.2.1".parse().unwrap()), SourceKey::of("192.0.2.2".parse().unwrap()));
    }

    #[test]
    fn a_48_gets_its_quota_of_64s_then_shares_one_entry() {
        let mut t: PrefixTable<u32> = PrefixTable::new(1000, 4);
        for i in 0..100u128 {
            let key = t.key(v6("2001:db8:7::", i << 64));
            *t.get_or_insert(key, || 0).unwrap() += 1;
        }
        assert_eq!(t.len(), 5, "4 /64 entries and the /48's shared one");
        assert_eq!(t.get_mut(&SourceKey::V6Site([0x20, 0x01, 0x0d, 0xb8, 0, 7])).copied(), Some(96));
        // Another /48 is unaffected, and a /64 that has its own entry keeps it.
        assert!(matches!(t.key(v6("2001:db8:8::", 0)), SourceKey::V6(_)));
        assert!(matches!(t.key(v6("2001:db8:7::", 1)), SourceKey::V6(_)));
        // Freeing a /64 entry gives the /48 room again.
        let first = SourceKey::of(v6("2001:db8:7::", 0));
        t.remove(&first);
        assert!(matches!(t.key(v6("2001:db8:7::", 50 << 64)), SourceKey::V6(_)));
        t.retain(|k, _| !matches!(k, SourceKey::V6(_)));
        assert_eq!(t.len(), 1);
        assert!(t.sites.is_empty(), "site counts follow removals");
    }

    #[test]
    fn capacity_is_a_hard_bound() {
        let mut t: PrefixTable<()> = PrefixTable::new(3, 256);
        for i in 0..10u8 {
            let key = t.key(IpAddr::from([192, 0, 2, i]));
            let inserted = t.get_or_insert(key, || ()).is_some();
            assert_eq!(inserted, i < 3);
        }
        assert!(t.is_full());
        assert!(
            t.get_or_insert(SourceKey::of(IpAddr::from([192, 0, 2, 1])), || ()).is_some(),
            "existing entries stay reachable"
        );
    }
}
