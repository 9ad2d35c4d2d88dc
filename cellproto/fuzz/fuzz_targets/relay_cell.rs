//! Fuzzes the hot path: cells arriving at relays (forward and backward) and at the client on a
//! real, fully built 2-hop circuit of the in-memory network (`cellproto::sim`: the relays' own
//! control plane and circuits). The input is fed as a raw cell to every receiver, XORed into
//! genuine cells (sealed by the client, or by the exit) so that it reaches past the LCID, the
//! counter and the tags, and XORed by a hostile guard into what it relays after its own checks
//! (so the client's inner layers and evidence counting see it). Nothing may panic, and nothing
//! the input can do may deliver a payload that does not fit its cell.
#![no_main]

use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::Event;
use cellproto::onion::{payload, payload_mut};
use cellproto::sim::{CLIENT, Cell, Net, addr};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;

fn as_cell(data: &[u8]) -> Cell {
    let mut cell = [0u8; CELL_LEN];
    let n = data.len().min(CELL_LEN);
    cell[..n].copy_from_slice(&data[..n]);
    cell
}

fn xor_into(cell: &mut Cell, data: &[u8]) {
    for (c, d) in cell.iter_mut().zip(data) {
        *c ^= d;
    }
}

/// Hands a cell to the client as its driver would (by LCID) and checks what it delivers.
fn to_client(net: &mut Net, cell: &mut Cell) {
    if cellproto::cell::lcid(cell) != net.circuit.lcid_in() {
        return;
    }
    if let Ok(Some(Event::Delivered { len, .. })) = net.circuit.handle_cell(net.now, cell, &mut net.client_rng) {
        assert_eq!(payload(cell, len).len(), len);
    }
}

/// Delivers what a relay sent on through the network, to the client or the next relay.
fn carry(net: &mut Net, from: SocketAddr, out: Vec<(SocketAddr, Cell)>) {
    for (to, mut cell) in out {
        if to == addr(CLIENT) {
            to_client(net, &mut cell);
        } else if let Some(i) = net.relay_index(to) {
            let further = net.relays[i].handle(net.now, from, &mut cell);
            for (to2, mut cell2) in further {
                if to2 == addr(CLIENT) {
                    to_client(net, &mut cell2);
                }
            }
        }
    }
}

const COMMANDS: [Command; 10] = [
    Command::Data,
    Command::Padding,
    Command::Ping,
    Command::Extend,
    Command::Destroy,
    Command::Attach,
    Command::Relay,
    Command::Pong,
    Command::Extended,
    Command::Attached,
];

fuzz_target!(|data: &[u8]| {
    let sel = |i: usize| data.get(i).copied().unwrap_or(0);
    let aes = sel(0) & 0x80 != 0;
    let mut net = Net::new(2, 7, |_| aes);
    net.build();
    for relay in &mut net.relays {
        relay.terminal.echo = false;
    }
    let (c0, a1, a2) = (addr(CLIENT), addr(1), addr(2));

    // 1. The input as a raw cell, at every receiver, from every neighbour.
    let raw = as_cell(data);
    for (relay, from) in [(0, c0), (0, a2), (1, a1)] {
        let mut cell = raw;
        let out = net.relays[relay].handle(net.now, from, &mut cell);
        let me = net.relays[relay].addr;
        carry(&mut net, me, out);
    }
    let mut cell = raw;
    to_client(&mut net, &mut cell);

    // 2. A genuine forward cell (command, target hop and length picked by the input), with the
    //    input XORed in, through hop 1 and on to hop 2.
    let target = 1 + usize::from(sel(0) & 1);
    let cmd = COMMANDS[usize::from((sel(0) >> 1) & 0x3F) % COMMANDS.len()];
    let len = usize::from(u16::from_be_bytes([sel(1), sel(2)]) % 1400);
    let mut cell = [0u8; CELL_LEN];
    for (i, b) in payload_mut(&mut cell).iter_mut().take(len).enumerate() {
        *b = i as u8;
    }
    if net.circuit.seal(target, cmd, len, &mut cell).is_ok() {
        xor_into(&mut cell, data.get(3..).unwrap_or_default());
        let out = net.relays[0].handle(net.now, c0, &mut cell);
        carry(&mut net, a1, out);
    }

    // 3. A genuine backward cell from the exit with the input XORed in, through hop 1; then one
    //    that hop 1 alters after its checks (a hostile guard), to the client.
    for hostile in [false, true] {
        let mut cell = [0u8; CELL_LEN];
        for (i, b) in payload_mut(&mut cell).iter_mut().take(len).enumerate() {
            *b = !(i as u8);
        }
        let lcid = net.relays[1].node.circuits().iter().next().map(|c| c.prev().lcid_in);
        let Some(circ) = lcid.and_then(|id| net.relays[1].node.circuits_mut().get_mut(id)) else { break };
        if circ.seal_backward(net.now, cmd, len, &mut cell).is_err() {
            break;
        }
        if hostile {
            let meddle = data.get(3..).unwrap_or_default().to_vec();
            net.relays[0].hostile = Some(Box::new(move |c: &mut Cell| xor_into(c, &meddle)));
        } else {
            xor_into(&mut cell, data.get(3..).unwrap_or_default());
        }
        let out = net.relays[0].handle(net.now, a2, &mut cell);
        carry(&mut net, a1, out);
    }
});
