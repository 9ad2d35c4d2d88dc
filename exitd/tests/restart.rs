//! exitd across a crash, as root in namespaces (see `common`): kill -9 leaves the nftables
//! table behind (nothing can clean up after SIGKILL), a stale rule and chain are added to it
//! (as an older or crashed exitd might leave), and the next exitd, once it says READY=1, has
//! replaced it: the same rules as the first run, each exactly once, the stale ones gone; the
//! conntrack entries of the first run's users (their NAT state, which would map late replies
//! to whoever gets their addresses next) are deleted before it serves; and packets go through
//! the restarted exit both ways.

mod common;

use cellproto::cell::Command;
use common::*;
use pnet_packet::Packet;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::udp::UdpPacket;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The table's chains, and its rules as (chain, comment), sorted: duplicates show as repeats.
fn table(lab: &Lab) -> (Vec<String>, Vec<(String, String)>) {
    let json: serde_json::Value =
        serde_json::from_str(&lab.nft(&["-j", "list", "table", "inet", "meshvpn_exit"])).expect("nft -j prints JSON");
    let objects = json["nftables"].as_array().expect("nftables array").clone();
    let mut chains: Vec<String> =
        objects.iter().filter_map(|o| o.get("chain")).map(|c| c["name"].as_str().unwrap().to_owned()).collect();
    let mut rules: Vec<(String, String)> = objects
        .iter()
        .filter_map(|o| o.get("rule"))
        .map(|r| (r["chain"].as_str().unwrap().to_owned(), r["comment"].as_str().unwrap_or("(none)").to_owned()))
        .collect();
    chains.sort();
    rules.sort();
    (chains, rules)
}

/// Conntrack entries in the exit namespace whose original source is in the default pools.
fn pool_entries(lab: &Lab) -> usize {
    Lab::run_in(&lab.exit, || {
        let pools = ["10.8.0.0/16".parse().unwrap(), "fd6d:6573:6800::/64".parse().unwrap()];
        exitd::conntrack::Conntrack::open().unwrap().count_prefixes(&pools).unwrap()
    })
    .join()
    .unwrap()
}

/// A new circuit, ATTACHed, sends a datagram to the internet's echo and gets it back.
fn echo_through(lab: &Lab, lcid: u32, what: &'static [u8]) {
    let hop = lab.hop();
    Lab::run_in(&lab.client, move || {
        let mut c = Client::connect(hop, lcid);
        let v4 = c.attach(None, WAIT).expect("ATTACHED").ipv4.0;
        c.send(Command::Data, &udp4(v4, INTERNET4, 7, what));
        let reply = c.recv_data(WAIT).expect("the echo through the exit");
        assert_eq!(UdpPacket::new(Ipv4Packet::new(&reply).unwrap().payload()).unwrap().payload(), what);
    })
    .join()
    .expect("client");
}

#[test]
fn restart_after_kill_replaces_stale_rules_and_forwards() {
    let lab = Lab::new("rst");
    let config = lab.write_config(2, "");
    let stop = Arc::new(AtomicBool::new(false));
    let echo_stop = stop.clone();
    let echo = Lab::run_in(&lab.internet, move || {
        let s = UdpSocket::bind((INTERNET4, 7)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 2048];
        while !echo_stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });

    let notify = lab.notify_socket();
    let mut first = lab.exitd(&config);
    notify.ready();
    let (chains, rules) = table(&lab);
    assert_eq!(chains, ["forward", "input", "postrouting", "prerouting"]);
    for (chain, comment) in [("forward", "deny invalid"), ("input", "deny exit host"), ("forward", "deny port 25")] {
        assert!(rules.contains(&(chain.into(), comment.into())), "{chain}: {comment} missing in {rules:?}");
    }
    echo_through(&lab, 0x7211_0001, b"before the crash");

    first.0.kill().unwrap();
    let _ = first.0.wait();
    assert!(pool_entries(&lab) >= 1, "kill -9 leaves the first user's NAT state in conntrack");
    assert_eq!(table(&lab), (chains.clone(), rules.clone()), "kill -9 cannot clean up: the table stays as it was");
    lab.nft(&["add", "rule", "inet", "meshvpn_exit", "forward", "counter", "comment", "\"stale\""]);
    lab.nft(&["add", "chain", "inet", "meshvpn_exit", "old"]);
    let (_, stale) = table(&lab);
    assert!(stale.contains(&("forward".into(), "stale".into())), "the stale rule is in place: {stale:?}");

    let _second = lab.exitd(&config);
    let ready = notify.ready();
    assert!(ready.contains("out of wan0"), "{ready}");
    assert_eq!(table(&lab), (chains, rules), "after the restart: the same rules, each once, nothing stale");
    assert_eq!(pool_entries(&lab), 0, "the first run's conntrack entries are deleted before READY=1");
    echo_through(&lab, 0x7211_0002, b"after the restart");
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
}
