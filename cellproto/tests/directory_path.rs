//! From a signed directory to an open circuit: descriptors verified, path hops taken from
//! them, handshakes authenticated against the onion keys they certify; a relay that is not the
//! one the descriptor names cannot complete the handshake.

use cellproto::client::PathHop;
use cellproto::descriptor::{ExitPolicySummary, FLAG_AES_HW, FLAG_EXIT, RelayDescriptor};
use cellproto::directory::Directory;
use cellproto::handshake::OnionSecret;
use cellproto::identity::{OnionKeyCert, RelayIdentity};
use cellproto::sim::{Net, TestRelay, addr, rng};

const NOW: u64 = 1_800_000_000;

fn relay(i: usize) -> (RelayIdentity, OnionSecret, Vec<u8>) {
    let mut r = rng(i as u64);
    let id = RelayIdentity::generate(&mut r);
    let onion = OnionSecret::generate(&mut r);
    let exit = i == 3;
    let desc = RelayDescriptor {
        identity: id.public(),
        onion_keys: vec![OnionKeyCert {
            identity: id.public(),
            onion_key: *onion.public(),
            valid_after: NOW - 10,
            expires: NOW + 86_400,
        }],
        addresses: vec![addr(i)],
        nickname: format!("relay{i}"),
        operator: format!("op{i}"),
        bandwidth: 10_000_000,
        flags: FLAG_AES_HW | if exit { FLAG_EXIT } else { 0 },
        exit_policy: exit.then(|| ExitPolicySummary { accept: true, ports: vec![(1, 24), (26, 65535)] }),
        protocol_versions: vec![1],
        published: NOW - 10,
        expires: NOW + 3600,
    };
    let signed = desc.sign(&id).unwrap();
    (id, onion, signed)
}

#[test]
fn circuit_from_signed_directory() {
    let authority = RelayIdentity::generate(&mut rng(99));
    let relays: Vec<_> = (1..=3).map(relay).collect();
    let mut signed: Vec<Vec<u8>> = relays.iter().map(|r| r.2.clone()).collect();
    // Directories list descriptors sorted by identity.
    signed.sort_by_key(|d| RelayDescriptor::decode_and_verify(d, NOW).unwrap().identity);
    let doc = Directory::sign(&signed, NOW - 5, NOW + 3600, &authority).unwrap();

    let dir = Directory::decode_and_verify(&doc, &authority.public(), NOW).unwrap();
    let path: Vec<PathHop> = relays
        .iter()
        .map(|(id, _, _)| PathHop::from_descriptor(dir.relay(&id.public()).unwrap(), NOW, false).unwrap())
        .collect();
    assert!(dir.relay(&relays[2].0.public()).unwrap().is_exit());

    let sims = relays
        .into_iter()
        .enumerate()
        .map(|(i, (id, onion, _))| TestRelay::with_keys(i + 1, id.public().0, onion, true, i as u64))
        .collect();
    let mut net = Net::with_path(sims, path, 7);
    net.build();
    net.send(b"through the directory");
    assert_eq!(net.relays[2].terminal.delivered[0].1, b"through the directory");
}

#[test]
fn impostor_relay_cannot_complete_the_handshake() {
    let (id, _real_onion, signed) = relay(1);
    let desc = RelayDescriptor::decode_and_verify(&signed, NOW).unwrap();
    let path = vec![PathHop::from_descriptor(&desc, NOW, false).unwrap()];
    // Same identity and address, but not the onion key the descriptor certifies.
    let impostor = TestRelay::with_keys(1, id.public().0, OnionSecret::generate(&mut rng(1234)), true, 1);
    let mut net = Net::with_path(vec![impostor], path, 8);
    net.run(vec![], &mut |_, _, _| true);
    assert!(!net.circuit.is_open());
    assert!(net.relays[0].node.circuits().is_empty(), "the impostor created a circuit");
}
