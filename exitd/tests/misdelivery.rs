//! An exit never delivers one user's packets to another, with a real 2-queue TUN device.
//!
//! The attack: a circuit ATTACHes again and again. Each ATTACH used to lease a new address and
//! leave the old address → circuit entry in its worker's table; once an old address went back
//! to the pool and was leased to another user on another worker, the packets for that user
//! which the kernel queued on the attacker's worker (the multi-queue TUN spreads new flows over
//! its queues by hash) were sealed to the attacker.
//!
//! Here the attacker ATTACHes 5 times into a 5-address pool with a 1 s grace period, waits for
//! its old sessions to expire, and a victim ATTACHes on the other worker. Then the exit host
//! sends 64 datagrams (64 flows) to the victim's address and 64 to the attacker's: the victim
//! must receive all of its own and the attacker none of them (the attacker receiving its 64 is
//! the positive control that its circuit works and both queues were used).

mod common;

use cellproto::cell::Command;
use common::*;
use pnet_packet::Packet;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::udp::UdpPacket;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const FLOWS: u16 = 64;

fn sessions(m: &std::collections::HashMap<String, f64>) -> f64 {
    m.iter().filter(|(k, _)| *k == "exitd_sessions" || k.starts_with("exitd_sessions{")).map(|(_, v)| v).sum()
}

/// (destination, UDP payload) of an IPv4/UDP packet.
fn udp_to(packet: &[u8]) -> Option<(Ipv4Addr, Vec<u8>)> {
    let ip = Ipv4Packet::new(packet)?;
    let udp = UdpPacket::new(ip.payload())?;
    Some((ip.get_destination(), udp.payload().to_vec()))
}

#[test]
fn reattach_then_reuse_never_sends_a_victims_packets_to_the_attacker() {
    let lab = Lab::new("mis");
    let hop = lab.hop();
    let config = lab.write_config(2, "pool_v4 = \"10.9.0.0/29\"\nsession_grace_secs = 1\n");
    let notify = lab.notify_socket();
    let _exitd = lab.exitd(&config);
    notify.ready();

    // The exit host sends to inner addresses on request: new flows, which the kernel spreads
    // over the TUN's queues by flow hash.
    let (to_sender, requests) = mpsc::channel::<(Ipv4Addr, &'static str)>();
    let sender = Lab::run_in(&lab.exit, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for (addr, tag) in requests {
            for port in 0..FLOWS {
                socket.send_to(format!("{tag} {port}").as_bytes(), (addr, 5000 + port)).unwrap();
            }
        }
    });

    let outcome = Lab::run_in(&lab.client, move || {
        // The attacker: one circuit (the first CREATE: worker 0), five ATTACHes.
        let mut attacker = Client::connect(hop, 0x6111_0001);
        let mut leased = Vec::new();
        for _ in 0..5 {
            if let Some(a) = attacker.attach(None, Duration::from_millis(500)) {
                leased.push(a.ipv4.0);
            }
        }
        let attacker_addr = *leased.last().expect("the attacker's first ATTACH is answered");
        // Its earlier sessions (if it got any) expire after the grace period.
        wait_for("sessions to expire", || sessions(&metrics(METRICS_ADDR)) <= 1.0);

        // The victim, on the other worker (CREATEs are spread over the workers; a PADDING cell
        // shows which LCID, so which worker, the exit gave a circuit).
        let worker = |c: &mut Client| {
            c.send(Command::Padding, &[]);
            c.exit_lcid.unwrap() % 2
        };
        let attacker_worker = worker(&mut attacker);
        let mut victims = Vec::new();
        let mut victim = loop {
            let mut c = Client::connect(hop, 0x6111_0002 + victims.len() as u32);
            if worker(&mut c) != attacker_worker {
                break c;
            }
            assert!(victims.len() < 8, "no circuit landed on the other worker");
            victims.push(c);
        };
        let victim_addr = victim.attach(None, WAIT).expect("the victim's ATTACH is answered").ipv4.0;
        assert_ne!(victim_addr, attacker_addr);

        to_sender.send((victim_addr, "victim")).unwrap();
        to_sender.send((attacker_addr, "attacker")).unwrap();
        drop(to_sender);
        let (mut victim_got, mut attacker_own, mut stolen) = (0u16, 0u16, 0u16);
        let deadline = Instant::now() + WAIT;
        while (victim_got + stolen < FLOWS || attacker_own < FLOWS) && Instant::now() < deadline {
            if let Some((dst, body)) = victim.recv_data(Duration::from_millis(10)).as_deref().and_then(udp_to) {
                assert_eq!(dst, victim_addr, "{body:?}");
                victim_got += 1;
            }
            if let Some((dst, body)) = attacker.recv_data(Duration::from_millis(10)).as_deref().and_then(udp_to) {
                if dst == attacker_addr && body.starts_with(b"attacker") {
                    attacker_own += 1;
                } else {
                    stolen += 1;
                }
            }
        }
        (leased, victim_addr, victim_got, attacker_own, stolen)
    })
    .join()
    .expect("client");
    sender.join().unwrap();
    let (leased, victim_addr, victim_got, attacker_own, stolen) = outcome;
    eprintln!("attacker leased {leased:?}; victim {victim_addr}: victim got {victim_got}, attacker stole {stolen}");
    assert_eq!(stolen, 0, "{stolen} of {FLOWS} packets for the victim {victim_addr} were sealed to the attacker");
    assert_eq!(attacker_own, FLOWS, "the attacker's own packets (positive control)");
    assert_eq!(victim_got, FLOWS, "the victim received {victim_got} of its {FLOWS} packets");
}
