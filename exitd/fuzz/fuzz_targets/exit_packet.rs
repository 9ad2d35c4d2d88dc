//! Fuzzes what the exit reads from circuits: IP packets through `packet::inspect` (the whole
//! IPv6 extension header chain), the exit policy and the per-worker filter (DNS, fragments).
//!
//! Input: packets as a u16 length and that many bytes, to the end of the input (a bare packet
//! shorter than its length prefix counts as one packet). Each packet is inspected, judged by a
//! default and a reduced policy, and passed through one filter (time advances a second per
//! packet), and must keep these promises:
//! - nothing panics;
//! - `destination` agrees with `inspect`;
//! - a protocol with ports always has one unless the packet is a later fragment; no other
//!   protocol has one;
//! - the reduced policy (allow_ports 53, 443) never lets a port outside its list through;
//! - the filter lets a later fragment through only after its datagram's first fragment passed
//!   within the fragment timeout (checked against a model).
#![no_main]
use exitd::filter::{FRAGMENT_TIMEOUT, Filter, Verdict};
use exitd::packet::{Fragment, destination, inspect, port_header_len};
use exitd::policy::{Decision, ExitPolicy, PolicyConfig};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let default = ExitPolicy::new(&PolicyConfig::default());
    let reduced = ExitPolicy::new(&PolicyConfig { allow_ports: vec![53, 443], ..PolicyConfig::default() });
    let dns: (Ipv4Addr, Ipv6Addr) = (Ipv4Addr::new(10, 8, 0, 1), Ipv6Addr::new(0xfd6d, 0x6573, 0x6800, 0, 0, 0, 0, 1));
    let mut filter = Filter::new(dns);
    // The model: (source, destination, identification) → when a first fragment last passed.
    let mut passed: HashMap<(IpAddr, IpAddr, u32), Instant> = HashMap::new();
    let t0 = Instant::now();

    let mut packets = Vec::new();
    let mut rest = data;
    while let [a, b, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*a, *b])).min(tail.len());
        packets.push(&tail[..n]);
        rest = &tail[n..];
    }
    if packets.is_empty() {
        packets.push(data);
    }

    for (i, packet) in packets.iter().enumerate() {
        let now = t0 + Duration::from_secs(i as u64);
        let dst = destination(packet);
        let Ok(info) = inspect(packet) else { continue };
        assert_eq!(dst, Some(info.dst), "destination() and inspect() disagree");
        match (info.fragment, port_header_len(info.protocol)) {
            (Fragment::Later(_), _) | (_, None) => assert_eq!(info.dst_port, None),
            (_, Some(_)) => assert!(info.dst_port.is_some(), "a port protocol without a port"),
        }
        let _ = default.check(&info);
        if let (Decision::Allow, Some(port)) = (reduced.check(&info), info.dst_port) {
            assert!(port == 53 || port == 443, "port {port} passed allow_ports");
        }
        let verdict = filter.check(&reduced, &info, now);
        match info.fragment {
            Fragment::Whole => {}
            Fragment::First(id) => {
                let key = (info.src, info.dst, id);
                if matches!(verdict, Verdict::Deny(_)) {
                    passed.remove(&key);
                } else {
                    passed.insert(key, now);
                }
            }
            Fragment::Later(id) => {
                let allowed = passed.get(&(info.src, info.dst, id)).is_some_and(|&t| now < t + FRAGMENT_TIMEOUT);
                assert_eq!(verdict == Verdict::Forward, allowed, "a later fragment judged against the model");
            }
        }
    }
});
