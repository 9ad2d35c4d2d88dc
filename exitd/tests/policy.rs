//! The exit policy against crafted packets through the real `exitd`, as root in namespaces
//! (see `common`): a reduced exit (`allow_ports`) must not pass a port hidden behind IPv6
//! extension headers. Each refusal is shown after a positive control on the same path: the
//! same construction to an allowed port comes back, so "nothing arrived" means "refused".

mod common;

use common::*;
use pnet_packet::Packet;
use pnet_packet::ipv6::Ipv6Packet;
use pnet_packet::udp::UdpPacket;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[test]
fn allow_ports_is_not_bypassed_behind_nine_ipv6_extension_headers() {
    let lab = Lab::new("pol");
    let hop = lab.hop();
    let config = lab.write_config(2, "[policy]\nallow_ports = [7, 53]\n");
    // The internet: an echo on port 7, and port 9, which must hear nothing.
    let stop = Arc::new(AtomicBool::new(false));
    let echo_stop = stop.clone();
    let echo = Lab::run_in(&lab.internet, move || {
        let s = UdpSocket::bind((INTERNET6, 7)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 2048];
        while !echo_stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });
    let discard = Lab::run_in(&lab.internet, || UdpSocket::bind((INTERNET6, 9)).unwrap()).join().unwrap();
    discard.set_nonblocking(true).unwrap();

    let notify = lab.notify_socket();
    let _exitd = lab.exitd(&config);
    notify.ready();
    Lab::run_in(&lab.client, move || {
        let mut c = Client::connect(hop, 0x7111_0001);
        let v6 = c.attach(None, WAIT).expect("ATTACHED").ipv6.0;
        // First the refused one, then the allowed one on the same circuit, worker and path.
        c.send(cellproto::cell::Command::Data, &udp6_behind_options(v6, INTERNET6, 9, 9, b"hidden port 9"));
        c.send(cellproto::cell::Command::Data, &udp6_behind_options(v6, INTERNET6, 9, 7, b"port 7"));
        let reply = c.recv_data(WAIT).expect("the allowed port's echo (positive control)");
        let ip = Ipv6Packet::new(&reply).unwrap();
        assert_eq!(UdpPacket::new(ip.payload()).unwrap().payload(), b"port 7");
    })
    .join()
    .expect("client");
    // The echo came back after the port-9 packet would have arrived: nothing may be there.
    let mut buf = [0u8; 64];
    let leaked = discard.recv_from(&mut buf);
    assert!(leaked.is_err(), "port 9 reached the internet behind 9 extension headers: {leaked:?}");
    wait_for("the refusal to be counted", || exit_count(&lab.metrics(), "port_not_allowed") == 1.0);
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
}
