//! The one map from inner address to circuit: who may receive packets for an address (the
//! backward path, TUN → circuit) and send from it (anti-spoofing on the forward path).
//!
//! Every worker reads it on every packet and only the address pool writes it (under the pool's
//! mutex, on ATTACH and when a circuit ends), so it is a plain array of atomic words indexed by
//! the address's offset in the pool: a lookup is one atomic load, with no lock and no
//! read-modify-write on the per-packet path. There is no per-worker copy that could go stale:
//! once an address leaves a circuit, no worker routes it there again.
//!
//! Slot `n` stands for both the `n`-th IPv4 address of the IPv4 pool and the `n`-th IPv6
//! address of the IPv6 pool: a session's two addresses share one slot.

use cellproto::cell::HANDSHAKE_LCID;
use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

/// A slot with no circuit. `HANDSHAKE_LCID` is never a circuit's LCID.
const NONE: u32 = HANDSHAKE_LCID;

/// The shortest IPv4 pool prefix, i.e. the largest pool: a /12 (2^20 slots, 4 MiB of table).
pub const MIN_POOL_V4_PREFIX: u8 = 12;

/// Inner address → circuit, shared by every worker.
#[derive(Debug)]
pub struct AddressTable {
    v4: Ipv4Net,
    v6: Ipv6Net,
    slots: Box<[AtomicU32]>,
}

impl AddressTable {
    /// A table for pools `v4` and `v6` with no circuit in it. The IPv4 pool is at most a /12
    /// ([`MIN_POOL_V4_PREFIX`]; a larger one is treated as a /12) and the IPv6 pool at least as
    /// large as the IPv4 pool.
    pub fn new(v4: Ipv4Net, v6: Ipv6Net) -> Self {
        let bits = 32 - u32::from(v4.prefix_len().max(MIN_POOL_V4_PREFIX));
        let bits = bits.min(128 - u32::from(v6.prefix_len()));
        let slots = (0..1usize << bits).map(|_| AtomicU32::new(NONE)).collect();
        Self { v4: v4.trunc(), v6: v6.trunc(), slots }
    }

    /// Number of slots (addresses per pool, network and gateway included).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table has no slots (never: a pool has at least one address).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slot of an inner address, if it is in a pool.
    pub fn slot_of(&self, addr: IpAddr) -> Option<usize> {
        let offset = match addr {
            IpAddr::V4(a) if self.v4.contains(&a) => u128::from(u32::from(a) - u32::from(self.v4.network())),
            IpAddr::V6(a) if self.v6.contains(&a) => u128::from(a) - u128::from(self.v6.network()),
            _ => return None,
        };
        usize::try_from(offset).ok().filter(|&n| n < self.slots.len())
    }

    /// The addresses of slot `n` (IPv4, IPv6).
    pub fn addresses(&self, n: usize) -> (Ipv4Addr, Ipv6Addr) {
        (
            Ipv4Addr::from(u32::from(self.v4.network()).wrapping_add(n as u32)),
            Ipv6Addr::from(u128::from(self.v6.network()).wrapping_add(n as u128)),
        )
    }

    /// The circuit that owns `addr` now.
    pub fn circuit_of(&self, addr: IpAddr) -> Option<u32> {
        let slot = self.slots.get(self.slot_of(addr)?)?;
        // Acquire pairs with `set`'s Release: a worker that sees a circuit also sees what the
        // pool did before handing it the address.
        Some(slot.load(Ordering::Acquire)).filter(|&c| c != NONE)
    }

    /// Gives slot `n` to `circuit`, or to nobody. Only the address pool calls this.
    pub(crate) fn set(&self, n: usize, circuit: Option<u32>) {
        if let Some(slot) = self.slots.get(n) {
            slot.store(circuit.filter(|&c| c != NONE).unwrap_or(NONE), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(v4: &str) -> AddressTable {
        AddressTable::new(v4.parse().unwrap(), "fd6d:6573:6800::/64".parse().unwrap())
    }

    #[test]
    fn slots_map_both_families_and_nothing_else() {
        let t = table("10.9.0.0/29");
        assert_eq!(t.len(), 8);
        let (v4, v6) = t.addresses(3);
        assert_eq!((v4, v6), (Ipv4Addr::new(10, 9, 0, 3), "fd6d:6573:6800::3".parse().unwrap()));
        assert_eq!((t.slot_of(v4.into()), t.slot_of(v6.into())), (Some(3), Some(3)));
        for outside in ["10.9.0.8", "10.8.0.3", "fd6d:6573:6800::8", "fd6d:6573:6800:0:1::3", "fd6d:6573:6801::3"] {
            assert_eq!(t.slot_of(outside.parse().unwrap()), None, "{outside}");
        }
    }

    #[test]
    fn one_owner_per_address_and_release() {
        let t = table("10.9.0.0/29");
        let (v4, v6) = t.addresses(2);
        assert_eq!(t.circuit_of(v4.into()), None);
        t.set(2, Some(7));
        assert_eq!((t.circuit_of(v4.into()), t.circuit_of(v6.into())), (Some(7), Some(7)));
        t.set(2, Some(9));
        assert_eq!(t.circuit_of(v4.into()), Some(9), "a new owner replaces the old one everywhere");
        t.set(2, None);
        assert_eq!((t.circuit_of(v4.into()), t.circuit_of(v6.into())), (None, None));
        t.set(2, Some(HANDSHAKE_LCID));
        assert_eq!(t.circuit_of(v4.into()), None, "the handshake LCID is never an owner");
        t.set(99, Some(1)); // out of range: ignored, no panic
    }

    #[test]
    fn large_pools_are_bounded() {
        let t = AddressTable::new("10.0.0.0/8".parse().unwrap(), "fd00::/64".parse().unwrap());
        assert_eq!(t.len(), 1 << 20);
        assert_eq!(t.slot_of("10.16.0.0".parse().unwrap()), None, "beyond the /12 the table covers");
    }
}
