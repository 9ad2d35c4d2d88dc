//! The exit hook: a relay started with a `Terminal` per worker gets DATA in place and can
//! answer on the circuit; `closed` is called when the circuit ends.

mod common;

use cellio::Outbox;
use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::Event;
use cellproto::node::{Node, Transmit, originate};
use cellproto::relay::HopCircuit;
use common::*;
use rand_core::OsRng;
use relayd::terminal::Terminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Echoes DATA reversed; counts closed circuits.
struct Echo {
    closed: Arc<AtomicUsize>,
}

impl cellproto::node::Terminal for Echo {
    fn deliver(
        &mut self,
        now: Instant,
        _: u32,
        circ: &mut HopCircuit,
        cmd: Command,
        payload: &[u8],
        out: &mut dyn Transmit,
    ) -> bool {
        if cmd != Command::Data {
            return false;
        }
        originate(now, circ, Command::Data, out, |p| {
            for (d, s) in p.iter_mut().zip(payload.iter().rev()) {
                *d = *s;
            }
            Some(payload.len())
        });
        true
    }

    fn closed(&mut self, _: u32) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Terminal for Echo {
    fn poll(&mut self, _: Instant, _: &mut Node, _: &mut Outbox) -> bool {
        false
    }
}

#[test]
fn terminal_gets_data_and_answers() {
    let dir = tmpdir("terminal");
    let keys = relayd::keys::keygen(&dir).unwrap();
    let hop_keys =
        cellproto::handshake::RelayKeys { identity: keys.identity.public().0, onion_key: *keys.onion[0].public() };
    let text = format!(
        "listen = \"127.0.0.1:9\"\nkey_dir = \"{}\"\nnickname = \"t\"\nworkers = 2\npin_workers = false\n",
        dir.display()
    );
    let mut config = relayd::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let handle = relayd::relay::start_with(&config, keys, |_| {
        Some(Box::new(Echo { closed: closed.clone() }) as Box<dyn Terminal>)
    })
    .unwrap();
    let hop = cellproto::client::PathHop { keys: hop_keys, addr: handle.local_addr };
    let mut client = UdpClient::new("127.0.0.1:0", vec![hop]);
    client.build(Duration::from_secs(5));
    for i in 0..50u8 {
        let data = vec![i; 1 + usize::from(i) * 20];
        client.send(1, Command::Data, &data);
        let (ev, body) = client.recv_event(Duration::from_secs(2)).expect("no echo");
        assert!(matches!(ev, Event::Delivered { cmd: Command::Data, hop: 1, .. }), "{ev:?}");
        assert_eq!(body, data.iter().rev().copied().collect::<Vec<u8>>());
    }
    let mut cell = [0u8; CELL_LEN];
    let to = client.circuit.close(&mut cell, &mut OsRng).unwrap();
    client.socket.send_to(&cell, to).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while closed.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(closed.load(Ordering::Relaxed), 1, "closed() not called");
    handle.shutdown();
}
