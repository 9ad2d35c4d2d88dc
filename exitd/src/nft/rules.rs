//! Building exitd's table as one `nft -j` batch: the chains and rules the module docs show.

use super::{
    DnsRedirect, FORWARD, INPUT, NatConfig, NftError, POSTROUTING, PREROUTING, PRIO_DSTNAT, PRIO_FILTER, PRIO_SRCNAT,
    check_ifname, check_table_name, table_obj,
};
use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, RT, RTKey, SetItem, TcpOption,
};
use nftables::schema::{Chain, NfListObject, Rule};
use nftables::stmt::{Counter, Mangle, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

/// Transport protocols whose destination port is at bytes 2–3 (TCP, UDP, DCCP, SCTP,
/// UDP-Lite): the port rules match them all with `th dport`.
pub const PORT_PROTOCOLS: [u8; 5] = [6, 17, 33, 132, 136];

pub(super) fn build(cfg: &NatConfig) -> Result<Batch<'static>, NftError> {
    check_table_name(&cfg.table)?;
    check_ifname("wan", &cfg.wan)?;
    check_ifname("tun", &cfg.tun)?;
    if cfg.wan == cfg.tun {
        return Err(NftError::InvalidConfig(format!("wan and tun are the same interface {:?}", cfg.wan)));
    }
    if cfg.mss_v4 == 0 || cfg.mss_v6 == 0 {
        return Err(NftError::InvalidConfig("an MSS clamp of 0 would stop all TCP".to_owned()));
    }

    let t = cfg.table.as_str();
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table_obj(t)));
    batch.delete(NfListObject::Table(table_obj(t)));
    batch.add(NfListObject::Table(table_obj(t)));
    batch.add(chain(t, POSTROUTING, NfChainType::NAT, NfHook::Postrouting, PRIO_SRCNAT));
    batch.add(chain(t, FORWARD, NfChainType::Filter, NfHook::Forward, PRIO_FILTER));
    batch.add(chain(t, INPUT, NfChainType::Filter, NfHook::Input, PRIO_FILTER));
    if !cfg.dns.is_empty() {
        batch.add(chain(t, PREROUTING, NfChainType::NAT, NfHook::Prerouting, PRIO_DSTNAT));
    }
    for d in &cfg.dns {
        dns(&mut batch, cfg, d)?;
    }

    // NAT: only the pools' traffic, only out of the WAN; anything else the host routes keeps
    // its addresses.
    let pool_v4 = cfg.pool_v4.trunc();
    let pool_v6 = cfg.pool_v6.trunc();
    let masq = |proto: &'static str, addr: String, len: u8, comment: String| {
        rule(
            t,
            POSTROUTING,
            vec![
                is(meta(MetaKey::Oifname), string(&cfg.wan)),
                is(payload(proto, "saddr"), prefix(addr, len)),
                Statement::Masquerade(None),
            ],
            comment,
        )
    };
    batch.add(masq("ip", pool_v4.addr().to_string(), pool_v4.prefix_len(), format!("masquerade {pool_v4}")));
    batch.add(masq("ip6", pool_v6.addr().to_string(), pool_v6.prefix_len(), format!("masquerade {pool_v6}")));

    forward(&mut batch, cfg);
    input(&mut batch, cfg);
    Ok(batch)
}

fn dns(batch: &mut Batch<'static>, cfg: &NatConfig, d: &DnsRedirect) -> Result<(), NftError> {
    let (proto, family) = match (d.gateway, d.upstream) {
        (IpAddr::V4(_), IpAddr::V4(_)) => ("ip", nftables::stmt::NATFamily::IP),
        (IpAddr::V6(_), IpAddr::V6(_)) => ("ip6", nftables::stmt::NATFamily::IP6),
        _ => {
            return Err(NftError::InvalidConfig(format!(
                "DNS gateway {} and upstream {} differ in family",
                d.gateway, d.upstream
            )));
        }
    };
    for l4 in ["udp", "tcp"] {
        batch.add(rule(
            &cfg.table,
            PREROUTING,
            vec![
                is(meta(MetaKey::Iifname), string(&cfg.tun)),
                is(payload(proto, "daddr"), Expression::String(owned(&d.gateway.to_string()))),
                is(payload(l4, "dport"), Expression::Number(53)),
                Statement::DNAT(Some(nftables::stmt::NAT {
                    addr: Some(Expression::String(owned(&d.upstream.to_string()))),
                    family: Some(family),
                    port: Some(Expression::Number(53)),
                    flags: None,
                })),
            ],
            format!("dns {l4} {} to {}", d.gateway, d.upstream),
        ));
    }
    Ok(())
}

/// The forward chain: conntrack state, protocols, denied destinations, ports, MSS clamping.
fn forward(batch: &mut Batch<'static>, cfg: &NatConfig) {
    let t = cfg.table.as_str();
    let from_tun = || is(meta(MetaKey::Iifname), string(&cfg.tun));
    let drop_rule = |mut stmts: Vec<Statement<'static>>, comment: String| {
        stmts.push(Statement::Counter(Counter::Anonymous(None)));
        stmts.push(Statement::Drop(None));
        rule(t, FORWARD, stmts, comment)
    };
    // Conntrack cannot NAT what it does not track: such a packet would leave with a client's
    // inner address. And nothing new goes into the tunnel: only replies and related errors.
    batch.add(drop_rule(vec![from_tun(), ct_state(&["invalid", "untracked"])], "deny invalid".into()));
    batch.add(drop_rule(
        vec![is(meta(MetaKey::Oifname), string(&cfg.tun)), ct_state(&["new", "invalid", "untracked"])],
        "deny new inbound".into(),
    ));
    // Protocols the policy cannot police (the kernel walks IPv6 extension headers to find
    // `meta l4proto`; an unknown one ends its walk, and is refused here).
    for (nfproto, protocols) in [("ipv4", &cfg.protocols_v4), ("ipv6", &cfg.protocols_v6)] {
        if protocols.is_empty() {
            continue;
        }
        batch.add(drop_rule(
            vec![
                from_tun(),
                is(meta(MetaKey::Nfproto), Expression::String(nfproto.into())),
                not_in(meta(MetaKey::L4proto), numbers(protocols.iter().map(|&p| u32::from(p)))),
            ],
            format!("deny protocol {nfproto}"),
        ));
    }

    // Denied destinations, then ports, each its own rule so that its counter and comment name
    // one policy rule. Duplicates are dropped so each rule appears once.
    let mut seen = HashSet::new();
    for deny in cfg.deny.iter().filter(|d| seen.insert(d.net.trunc())) {
        let net = deny.net.trunc();
        let proto = if net.addr().is_ipv4() { "ip" } else { "ip6" };
        let mut stmts = vec![from_tun(), is(payload(proto, "daddr"), prefix(net.addr().to_string(), net.prefix_len()))];
        let except: Vec<IpNet> = deny.except.iter().map(IpNet::trunc).filter(|e| net.contains(e)).collect();
        if !except.is_empty() {
            let set = except.iter().map(|e| prefix(e.addr().to_string(), e.prefix_len()));
            stmts.push(not_in(payload(proto, "daddr"), Expression::Named(NamedExpression::Set(elements(set)))));
        }
        batch.add(drop_rule(stmts, format!("deny {net}")));
    }
    let port_protocols = || is(meta(MetaKey::L4proto), numbers(PORT_PROTOCOLS.iter().map(|&p| u32::from(p))));
    for port in dedup(cfg.deny_ports.iter().copied()) {
        batch.add(drop_rule(
            vec![from_tun(), port_protocols(), is(payload("th", "dport"), Expression::Number(port.into()))],
            format!("deny port {port}"),
        ));
    }
    let allowed = dedup(cfg.allow_ports.iter().copied());
    if !allowed.is_empty() {
        batch.add(drop_rule(
            vec![
                from_tun(),
                port_protocols(),
                not_in(payload("th", "dport"), numbers(allowed.iter().map(|&p| u32::from(p)))),
            ],
            "deny ports outside allow_ports".into(),
        ));
    }

    // MSS clamping on SYN and SYN-ACK in both directions, so neither end sends segments that
    // do not fit the tunnel. The kernel only ever lowers an MSS (raising one can stall a
    // connection), so two `set`s in a row give the lowest of the peer's value, the clamp and,
    // for SYNs leaving through the WAN, the route's MTU (e.g. a PPPoE uplink).
    for (nfproto, mss) in [("ipv4", cfg.mss_v4), ("ipv6", cfg.mss_v6)] {
        for (dir, key) in [("from", MetaKey::Iifname), ("to", MetaKey::Oifname)] {
            let mut stmts = vec![
                is(meta(key), string(&cfg.tun)),
                is(meta(MetaKey::Nfproto), Expression::String(nfproto.into())),
                Statement::Match(Match {
                    left: payload("tcp", "flags"),
                    right: Expression::String("syn".into()),
                    op: Operator::IN,
                }),
                set_mss(Expression::Number(mss.into())),
            ];
            if dir == "from" {
                stmts.push(set_mss(Expression::Named(NamedExpression::RT(RT { key: RTKey::MTU, family: None }))));
            }
            batch.add(rule(t, FORWARD, stmts, format!("clamp mss {nfproto} {dir} tun")));
        }
    }
}

/// The input chain: circuits reach no service on the exit host, whatever its address (the
/// pool gateway, the WAN, any other), except DNS that the prerouting chain translated to a
/// resolver on the exit host itself.
fn input(batch: &mut Batch<'static>, cfg: &NatConfig) {
    let t = cfg.table.as_str();
    let from_tun = || is(meta(MetaKey::Iifname), string(&cfg.tun));
    if !cfg.dns.is_empty() {
        batch.add(rule(
            t,
            INPUT,
            vec![
                from_tun(),
                Statement::Match(Match {
                    left: ct("status"),
                    right: Expression::String("dnat".into()),
                    op: Operator::IN,
                }),
                is(meta(MetaKey::L4proto), numbers([6, 17])),
                is(payload("th", "dport"), Expression::Number(53)),
                Statement::Accept(None),
            ],
            "dns to a resolver on the exit host".into(),
        ));
    }
    batch.add(rule(
        t,
        INPUT,
        vec![from_tun(), Statement::Counter(Counter::Anonymous(None)), Statement::Drop(None)],
        "deny exit host".into(),
    ));
}

fn chain(table: &str, name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: owned(table),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })
}

fn rule(table: &str, chain: &'static str, expr: Vec<Statement<'static>>, comment: String) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: owned(table),
        chain: chain.into(),
        expr: expr.into(),
        comment: Some(comment.into()),
        ..Rule::default()
    })
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op: Operator::EQ })
}

fn not_in(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op: Operator::NEQ })
}

/// `ct state` is one of `states` (a bitmask match).
fn ct_state(states: &[&'static str]) -> Statement<'static> {
    let right = Expression::List(states.iter().map(|s| Expression::String(Cow::Borrowed(*s))).collect());
    Statement::Match(Match { left: ct("state"), right, op: Operator::IN })
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT { key: key.into(), family: None, dir: None }))
}

/// An anonymous set of numbers.
fn numbers(values: impl IntoIterator<Item = u32>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(elements(values.into_iter().map(Expression::Number))))
}

fn elements(items: impl Iterator<Item = Expression<'static>>) -> Vec<SetItem<'static>> {
    items.map(SetItem::Element).collect()
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn prefix(addr: String, len: u8) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(addr.into())),
        len: len.into(),
    }))
}

fn string(s: &str) -> Expression<'static> {
    Expression::String(owned(s))
}

fn set_mss(value: Expression<'static>) -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: Expression::Named(NamedExpression::TcpOption(TcpOption {
            name: "maxseg".into(),
            field: Some("size".into()),
        })),
        value,
    })
}

fn owned(s: &str) -> Cow<'static, str> {
    Cow::Owned(s.to_owned())
}

/// The items in first-seen order without repeats.
fn dedup<T: Copy + Eq + std::hash::Hash>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items.filter(|x| seen.insert(*x)).collect()
}
