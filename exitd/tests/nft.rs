//! exitd's nftables table against a real kernel and the real `nft`.
//!
//! Isolation: every test makes its own network namespaces (`netns::NetNs`: `mv-nft-<pid>-<n>`,
//! deleted by a drop guard even when the test fails) and calls the
//! module on a thread that joined one with `setns(CLONE_NEWNET)`. `setns` moves only the calling
//! thread, and a child process starts in the namespaces of the thread that spawned it, so the
//! `nft` processes the module runs act on the test's namespace. Before every body, [`NetNs::run`]
//! checks this with a child (`readlink /proc/self/ns/net`) and stops if it does not hold: the
//! host's ruleset is never touched, and the tests can run in parallel with the same table name.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns), iproute2 and nftables, as in CI;
//! without root they fail with a message saying so (CI runs as root). Every wait is bounded.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{RouterLab as Lab, cmd, ruleset, static_neighbours};
use exitd::nft::{self, Deny, NatConfig, NftError};
use netns::NetNs;
use nix::sys::socket::{getsockopt, sockopt};

const TABLE: &str = nft::DEFAULT_TABLE;
const WAIT: Duration = Duration::from_secs(5);

/// wan0 and tun0: veth pairs (the `dummy` driver is not in every kernel; the rules only match
/// the names).
fn interfaces(ns: &NetNs) {
    ns.ip(&["link", "add", "wan0", "type", "veth", "peer", "name", "wan0-peer"]).unwrap();
    ns.ip(&["link", "add", "tun0", "type", "veth", "peer", "name", "tun0-peer"]).unwrap();
}

fn config() -> NatConfig {
    let mut cfg = NatConfig::new("wan0", "tun0", "10.8.0.0/16".parse().unwrap(), "fd00:8::/64".parse().unwrap());
    cfg.deny =
        ["10.0.0.0/8", "169.254.169.254/32", "fc00::/7"].map(|n| Deny::all(n.parse::<ipnet::IpNet>().unwrap())).into();
    cfg.deny_ports = vec![25];
    cfg
}

/// The comments of every rule in `table`, with how often each appears, and the table count.
fn rules_by_comment(ruleset: &serde_json::Value, table: &str) -> (usize, HashMap<String, usize>) {
    let objects = ruleset["nftables"].as_array().expect("nftables array");
    let tables = objects.iter().filter(|o| o["table"]["name"] == table && o["table"]["family"] == "inet").count();
    let mut comments = HashMap::new();
    for rule in objects.iter().filter_map(|o| o.get("rule")).filter(|r| r["table"] == table) {
        let comment = rule["comment"].as_str().unwrap_or("(none)").to_owned();
        *comments.entry(comment).or_insert(0) += 1;
    }
    (tables, comments)
}

// ---------------------------------------------------------------------------------------------
// The ruleset

#[test]
fn install_list_counters_remove() {
    let ns = NetNs::new("nft").unwrap();
    interfaces(&ns);
    ns.run(|| {
        let mut full = config();
        full.deny.push(Deny {
            net: "172.16.0.0/12".parse().unwrap(),
            except: vec!["172.20.0.0/16".parse().unwrap(), "172.21.0.0/16".parse().unwrap()],
        });
        full.allow_ports = vec![443, 80, 443];
        full.protocols_v4 = vec![1, 6, 17];
        full.protocols_v6 = vec![58, 6, 17];
        full.dns = vec![nft::DnsRedirect { gateway: "10.8.0.1".parse().unwrap(), upstream: "9.9.9.9".parse().unwrap() }];
        nft::install(&full).expect("install");
        let text = nft::list(TABLE).expect("list");
        for expected in [
            "table inet meshvpn_exit",
            "type nat hook postrouting priority srcnat; policy accept;",
            r#"oifname "wan0" ip saddr 10.8.0.0/16 masquerade"#,
            r#"oifname "wan0" ip6 saddr fd00:8::/64 masquerade"#,
            "chain forward",
            "type filter hook forward priority filter; policy accept;",
            r#"iifname "tun0" ct state invalid,untracked counter packets 0 bytes 0 drop comment "deny invalid""#,
            r#"oifname "tun0" ct state invalid,new,untracked counter packets 0 bytes 0 drop comment "deny new inbound""#,
            r#"iifname "tun0" meta nfproto ipv4 meta l4proto != { icmp, tcp, udp } counter packets 0 bytes 0 drop comment "deny protocol ipv4""#,
            r#"iifname "tun0" meta nfproto ipv6 meta l4proto != { tcp, udp, ipv6-icmp } counter packets 0 bytes 0 drop comment "deny protocol ipv6""#,
            r#"iifname "tun0" ip daddr 10.0.0.0/8 counter packets 0 bytes 0 drop comment "deny 10.0.0.0/8""#,
            r#"ip daddr 169.254.169.254 counter packets 0 bytes 0 drop comment "deny 169.254.169.254/32""#,
            r#"ip6 daddr fc00::/7 counter packets 0 bytes 0 drop comment "deny fc00::/7""#,
            r#"iifname "tun0" ip daddr 172.16.0.0/12 ip daddr != { 172.20.0.0/15 } counter packets 0 bytes 0 drop comment "deny 172.16.0.0/12""#,
            r#"iifname "tun0" meta l4proto { tcp, udp, dccp, sctp, udplite } th dport 25 counter packets 0 bytes 0 drop comment "deny port 25""#,
            r#"iifname "tun0" meta l4proto { tcp, udp, dccp, sctp, udplite } th dport != { 80, 443 } counter packets 0 bytes 0 drop comment "deny ports outside allow_ports""#,
            r#"iifname "tun0" meta nfproto ipv4 tcp flags syn tcp option maxseg size set 1264 tcp option maxseg size set rt mtu"#,
            r#"oifname "tun0" meta nfproto ipv4 tcp flags syn tcp option maxseg size set 1264"#,
            r#"iifname "tun0" meta nfproto ipv6 tcp flags syn tcp option maxseg size set 1244 tcp option maxseg size set rt mtu"#,
            r#"oifname "tun0" meta nfproto ipv6 tcp flags syn tcp option maxseg size set 1244"#,
            "chain input",
            "type filter hook input priority filter; policy accept;",
            r#"iifname "tun0" ct status dnat meta l4proto { tcp, udp } th dport 53 accept"#,
            r#"iifname "tun0" counter packets 0 bytes 0 drop comment "deny exit host""#,
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }

        let counters = nft::counters(TABLE).expect("counters");
        let names: Vec<&str> = counters.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "deny invalid",
                "deny new inbound",
                "deny protocol ipv4",
                "deny protocol ipv6",
                "deny 10.0.0.0/8",
                "deny 169.254.169.254/32",
                "deny fc00::/7",
                "deny 172.16.0.0/12",
                "deny port 25",
                "deny ports outside allow_ports",
                "deny exit host",
            ]
        );
        assert!(counters.iter().all(|(_, packets)| *packets == 0), "{counters:?}");

        nft::remove(TABLE).expect("remove");
        assert!(matches!(nft::list(TABLE), Err(NftError::NoSuchTable(_))));
        assert!(matches!(nft::counters(TABLE), Err(NftError::NoSuchTable(_))));
        let tables = cmd("nft", &["list", "tables"]);
        assert!(!String::from_utf8_lossy(&tables.stdout).contains(TABLE));
        nft::remove(TABLE).expect("removing a missing table is fine");
    }).unwrap();
}

#[test]
fn reinstall_replaces_never_duplicates() {
    let ns = NetNs::new("nft").unwrap();
    interfaces(&ns);
    ns.run(|| nft::install(&config()).expect("first install")).unwrap();
    let (tables, first) = rules_by_comment(&ruleset(&ns), TABLE);
    assert_eq!(tables, 1);
    // 2 masquerade, 2 conntrack state, 3 prefixes, 1 port, 4 MSS clamps, 1 input
    assert_eq!(first.len(), 13, "{first:?}");
    assert!(first.values().all(|&n| n == 1), "{first:?}");

    // A restart after kill -9: the table is still there.
    ns.run(|| nft::install(&config()).expect("second install")).unwrap();
    let (tables, second) = rules_by_comment(&ruleset(&ns), TABLE);
    assert_eq!(tables, 1);
    assert_eq!(second, first);

    // A stale table from another version: a chain with other hook settings (which `add chain`
    // cannot change), an extra chain and a rule without a comment. All of it goes.
    ns.run(|| {
        nft::remove(TABLE).unwrap();
        let stale = "table inet meshvpn_exit {
            chain forward {
                type filter hook forward priority 10; policy drop;
                counter
            }
            chain old {
                counter
            }
        }
        ";
        let mut child =
            Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().expect("run nft");
        child.stdin.take().unwrap().write_all(stale.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "stale table");
        nft::install(&config()).expect("install over a stale table");
    })
    .unwrap();
    let full = ruleset(&ns);
    let (tables, third) = rules_by_comment(&full, TABLE);
    assert_eq!(tables, 1);
    assert_eq!(third, first);
    let chains: Vec<&str> = full["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("chain"))
        .filter(|c| c["table"] == TABLE)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(chains, ["postrouting", "forward", "input"]);
    let forward = full["nftables"].as_array().unwrap().iter().find(|o| o["chain"]["name"] == "forward").unwrap();
    assert_eq!(forward["chain"]["prio"], 0);
    assert_eq!(forward["chain"]["policy"], "accept");

    ns.run(|| {
        nft::remove(TABLE).expect("remove");
        nft::remove(TABLE).expect("remove again");
    })
    .unwrap();
    assert_eq!(rules_by_comment(&ruleset(&ns), TABLE).0, 0);
}

#[test]
fn other_tables_are_left_alone() {
    let ns = NetNs::new("nft").unwrap();
    ns.run(|| {
        cmd("nft", &["add", "table", "inet", "someone_else"]);
        cmd("nft", &["add", "chain", "inet", "someone_else", "c"]);
        let mut cfg = config();
        cfg.table = "meshvpn_exit_b".into();
        nft::install(&cfg).expect("install");
        nft::remove(&cfg.table).expect("remove");
        let left = cmd("nft", &["list", "ruleset"]);
        let left = String::from_utf8_lossy(&left.stdout);
        assert!(left.contains("table inet someone_else") && left.contains("chain c"), "{left}");
        assert!(!left.contains("meshvpn_exit_b"), "{left}");
    })
    .unwrap();
}

#[test]
fn bad_input_is_an_error_not_a_change() {
    let ns = NetNs::new("nft").unwrap();
    ns.run(|| {
        for table in ["", "bad name", "x;flush ruleset", "t\"", "9lives"] {
            let mut cfg = config();
            cfg.table = table.into();
            assert!(matches!(nft::install(&cfg), Err(NftError::InvalidConfig(_))), "{table:?}");
            assert!(matches!(nft::remove(table), Err(NftError::InvalidConfig(_))), "{table:?}");
            assert!(matches!(nft::list(table), Err(NftError::InvalidConfig(_))), "{table:?}");
            assert!(matches!(nft::counters(table), Err(NftError::InvalidConfig(_))), "{table:?}");
        }
        for wan in ["", "a/b", "has space", "sixteen-bytes-xx"] {
            let mut cfg = config();
            cfg.wan = wan.into();
            let err = nft::install(&cfg).unwrap_err();
            assert!(matches!(err, NftError::InvalidConfig(_)), "{wan:?}: {err}");
            assert!(err.to_string().contains("wan interface"), "{err}");
        }
        let ruleset = cmd("nft", &["list", "ruleset"]);
        assert!(ruleset.stdout.is_empty(), "{}", String::from_utf8_lossy(&ruleset.stdout));
    })
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Packets through a router namespace

/// Addresses of one IP family in the three-namespace network.
struct Net {
    /// The client's pool address (on c0, in the client namespace).
    client: IpAddr,
    /// The router's tun0 (pool gateway) and wan0 addresses, with prefix lengths.
    gateway: &'static str,
    wan: &'static str,
    /// The host behind wan0: one address allowed, one denied (both on i0).
    allowed: IpAddr,
    denied: IpAddr,
    prefix_len: &'static str,
    wan_addr: IpAddr,
    mss: u16,
}

fn lab(nets: &[Net]) -> Lab {
    let lab = Lab::new("nft");
    for net in nets {
        let client = format!("{}/{}", net.client, if net.client.is_ipv4() { 16 } else { 64 });
        lab.client.ip(&["addr", "add", &client, "dev", "c0", "nodad"]).unwrap();
        lab.router.ip(&["addr", "add", net.gateway, "dev", "tun0", "nodad"]).unwrap();
        lab.router.ip(&["addr", "add", net.wan, "dev", "wan0", "nodad"]).unwrap();
        for addr in [net.allowed, net.denied] {
            lab.internet.ip(&["addr", "add", &format!("{addr}/{}", net.prefix_len), "dev", "i0", "nodad"]).unwrap();
        }
    }
    for (ns, dev) in [(&lab.client, "c0"), (&lab.router, "tun0"), (&lab.router, "wan0"), (&lab.internet, "i0")] {
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    for net in nets {
        let via = net.gateway.split('/').next().unwrap();
        lab.client.ip(&["route", "add", "default", "via", via, "dev", "c0"]).unwrap();
        if net.client.is_ipv6() {
            let client = net.client.to_string();
            static_neighbours(&lab.client, "c0", &[&client], &lab.router, "tun0", &[via]);
        }
    }
    // Forwarding inside the router namespace only; the internet host has no route back to the
    // pools, so only masquerading lets replies through.
    lab.router.sysctl("net.ipv4.ip_forward=1").unwrap();
    lab.router.sysctl("net.ipv6.conf.all.forwarding=1").unwrap();
    lab
}

fn nets() -> [Net; 2] {
    [
        Net {
            client: "10.8.0.2".parse().unwrap(),
            gateway: "10.8.0.1/16",
            wan: "198.51.100.1/24",
            allowed: "198.51.100.2".parse().unwrap(),
            denied: "198.51.100.3".parse().unwrap(),
            prefix_len: "24",
            wan_addr: "198.51.100.1".parse().unwrap(),
            mss: nft::MSS_V4,
        },
        Net {
            client: "fd00:8::2".parse().unwrap(),
            gateway: "fd00:8::1/64",
            wan: "2001:db8:1::1/64",
            allowed: "2001:db8:1::2".parse().unwrap(),
            denied: "2001:db8:1::3".parse().unwrap(),
            prefix_len: "64",
            wan_addr: "2001:db8:1::1".parse().unwrap(),
            mss: nft::MSS_V6,
        },
    ]
}

fn lab_config(nets: &[Net]) -> NatConfig {
    let mut cfg = config();
    for net in nets {
        match net.denied {
            IpAddr::V4(a) => cfg.deny.push(Deny::all(ipnet::Ipv4Net::new(a, 32).unwrap())),
            IpAddr::V6(a) => cfg.deny.push(Deny::all(ipnet::Ipv6Net::new(a, 128).unwrap())),
        }
    }
    cfg
}

/// Receives on `socket` until `want` arrives or `WAIT` passes; returns its sender.
fn receive(socket: &UdpSocket, want: &[u8], resend: impl Fn()) -> Option<SocketAddr> {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 64];
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if &buf[..n] == want => return Some(from),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => resend(),
            Err(e) => panic!("recv: {e}"),
        }
    }
    None
}

/// Nothing is queued on `socket`. Called after a packet sent later on the same FIFO path has
/// arrived, so anything sent before it would be here already: no waiting decides this.
fn silent(socket: &UdpSocket) -> bool {
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    matches!(socket.recv_from(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn packets_are_filtered_masqueraded_and_clamped() {
    let nets = nets();
    let lab = lab(&nets);
    let cfg = lab_config(&nets);
    lab.router.run(|| nft::install(&cfg).expect("install")).unwrap();

    for net in &nets {
        // Sockets keep the namespace they were made in, whichever thread uses them later.
        let bind = |ns: &NetNs, addr: IpAddr, port: u16| {
            ns.run(|| UdpSocket::bind(SocketAddr::new(addr, port)).expect("bind")).unwrap()
        };
        let tx = bind(&lab.client, net.client, 0);
        let rx_allowed = bind(&lab.internet, net.allowed, 9999);
        let rx_port = bind(&lab.internet, net.allowed, 25);
        let rx_prefix = bind(&lab.internet, net.denied, 9999);

        // Denied packets first: on this single path they would arrive before the allowed one.
        for _ in 0..3 {
            tx.send_to(b"denied prefix", (net.denied, 9999)).unwrap();
            tx.send_to(b"denied port", (net.allowed, 25)).unwrap();
        }
        let send_allowed = || {
            tx.send_to(b"allowed", (net.allowed, 9999)).unwrap();
        };
        send_allowed();
        let from = receive(&rx_allowed, b"allowed", send_allowed).expect("the allowed packet arrives");
        assert_eq!(from.ip(), net.wan_addr, "masqueraded to the WAN address");
        assert!(silent(&rx_port), "a packet to a denied port got through");
        assert!(silent(&rx_prefix), "a packet to a denied prefix got through");

        // TCP through the NAT: both ends see an MSS no larger than the clamp (veths have
        // MTU 1500, so without the clamp they would use 1460 / 1440).
        let listener =
            lab.internet.run(|| TcpListener::bind(SocketAddr::new(net.allowed, 8080)).expect("listen")).unwrap();
        let client = lab
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::new(net.allowed, 8080), WAIT).expect("connect"))
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + WAIT;
        let (mut server, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert_eq!(peer.ip(), net.wan_addr);
        server.set_nonblocking(false).unwrap();
        server.set_read_timeout(Some(WAIT)).unwrap();
        (&client).write_all(b"hi").unwrap();
        let mut two = [0u8; 2];
        server.read_exact(&mut two).unwrap();
        for (side, socket) in [("client", &client), ("server", &server)] {
            let mss = getsockopt(socket, sockopt::TcpMaxSeg).expect("TCP_MAXSEG");
            assert!(mss <= u32::from(net.mss), "{side} {}: mss {mss} > clamp {}", net.client, net.mss);
        }
    }

    let counters: HashMap<String, u64> =
        lab.router.run(|| nft::counters(TABLE).expect("counters")).unwrap().into_iter().collect();
    for net in &nets {
        let prefix = if net.denied.is_ipv4() { 32 } else { 128 };
        assert_eq!(counters[&format!("deny {}/{prefix}", net.denied)], 3, "{counters:?}");
    }
    assert_eq!(counters["deny port 25"], 6, "{counters:?}");
    assert_eq!(counters["deny 10.0.0.0/8"], 0, "{counters:?}");
    lab.router.run(|| nft::remove(TABLE).expect("remove")).unwrap();
}
