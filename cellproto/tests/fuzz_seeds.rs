//! The fuzz targets' seed inputs (`cellproto/fuzz/seeds/<target>/`), made by cellproto's own
//! encoders so they are valid inputs that take the fuzzer straight past the front door: signed
//! descriptors and directories that verify, command bodies that decode, STUN messages that the
//! relay answers.
//!
//! `fuzz_seeds_are_current` fails when a committed seed no longer matches what the encoders
//! make (a format changed); regenerate them with
//!
//! ```sh
//! cargo test -p cellproto --test fuzz_seeds -- --ignored write_fuzz_seeds
//! ```
//!
//! The keys and the clock are fixed, and the fuzz targets use the same ones (see the constants
//! at the top of `fuzz/fuzz_targets/descriptor.rs` and `directory.rs`), so a seed mutated outside
//! its signed parts still verifies, and a target can re-sign what it decodes.

use std::net::SocketAddr;
use std::path::PathBuf;

use cellproto::command::{Attach, Attached, Extend, Extended};
use cellproto::descriptor::{ExitPolicySummary, FLAG_AES_HW, FLAG_EXIT, FLAG_GUARD, RelayDescriptor};
use cellproto::directory::Directory;
use cellproto::handshake::{CREATE_LEN, CREATED_LEN};
use cellproto::identity::{IdentityKey, OnionKeyCert, RelayIdentity, SignedOnionKeyCert};
use cellproto::stun::{Attribute, Message};

/// Seed of the relay identity that signs the descriptor seeds (the fuzz targets' `RELAY_SEED`).
const RELAY_SEED: [u8; 32] = [0x52; 32];
/// Seeds of the other relays in the directory seeds.
const OTHER_RELAY_SEEDS: [[u8; 32]; 2] = [[0x53; 32], [0x54; 32]];
/// Seed of the directory authority (the fuzz targets' `AUTHORITY_SEED`).
const AUTHORITY_SEED: [u8; 32] = [0x44; 32];
/// 2026-01-01T00:00:00Z: every seed is published then.
const T0: u64 = 1_767_225_600;
const DAY: u64 = 86_400;
/// The fuzz targets' clock: an hour into every seed's window.
const NOW: u64 = T0 + 3600;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn cert(id: &RelayIdentity, key: u8, valid_after: u64, expires: u64) -> OnionKeyCert {
    OnionKeyCert { identity: id.public(), onion_key: [key; 32], valid_after, expires }
}

/// The smallest valid descriptor: one key, one address, a one-letter nickname, no exit.
fn minimal(id: &RelayIdentity) -> RelayDescriptor {
    RelayDescriptor {
        identity: id.public(),
        onion_keys: vec![cert(id, 2, T0, T0 + 7 * DAY)],
        addresses: vec![addr("192.0.2.1:9001")],
        nickname: "a".into(),
        operator: String::new(),
        bandwidth: 0,
        flags: 0,
        exit_policy: None,
        protocol_versions: vec![1],
        published: T0,
        expires: T0 + 2 * DAY,
    }
}

/// An exit in the middle of a key rotation, with every optional part filled.
fn exit(id: &RelayIdentity) -> RelayDescriptor {
    RelayDescriptor {
        onion_keys: vec![cert(id, 2, T0 - DAY, T0 + 6 * DAY), cert(id, 3, T0 + DAY, T0 + 8 * DAY)],
        addresses: vec![addr("192.0.2.7:443"), addr("[2001:db8::7]:443")],
        nickname: "exit7".into(),
        operator: "ops@example.org é".into(),
        bandwidth: 125_000_000,
        flags: FLAG_EXIT | FLAG_AES_HW | FLAG_GUARD,
        exit_policy: Some(ExitPolicySummary {
            accept: true,
            ports: vec![(53, 53), (80, 80), (443, 443), (1000, 2000)],
        }),
        protocol_versions: vec![1, 2],
        ..minimal(id)
    }
}

/// A reject-list exit (everything but port 25).
fn reject_exit(id: &RelayIdentity) -> RelayDescriptor {
    RelayDescriptor {
        nickname: "rejector".into(),
        flags: FLAG_EXIT,
        exit_policy: Some(ExitPolicySummary { accept: false, ports: vec![(25, 25)] }),
        ..minimal(id)
    }
}

/// Every seed: (target, file name, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let relay = RelayIdentity::from_seed(&RELAY_SEED);
    let others: Vec<RelayIdentity> = OTHER_RELAY_SEEDS.iter().map(RelayIdentity::from_seed).collect();
    let authority = RelayIdentity::from_seed(&AUTHORITY_SEED);
    let mut out = Vec::new();

    // descriptor: signed descriptors by RELAY_SEED, and a lone onion-key certificate.
    let min = minimal(&relay).sign(&relay).unwrap();
    let ex = exit(&relay).sign(&relay).unwrap();
    let rej = reject_exit(&relay).sign(&relay).unwrap();
    out.push(("descriptor", "minimal", min.clone()));
    out.push(("descriptor", "exit-rotating", ex.clone()));
    out.push(("descriptor", "exit-reject", rej));
    out.push(("descriptor", "onion-cert", cert(&relay, 2, T0, T0 + 7 * DAY).sign(&relay).encode()));

    // directory: signed by AUTHORITY_SEED; relays by RELAY_SEED and OTHER_RELAY_SEEDS.
    let o1 = minimal(&others[0]).sign(&others[0]).unwrap();
    let o2 = RelayDescriptor { nickname: "b".into(), ..exit(&others[1]) }.sign(&others[1]).unwrap();
    let dir = |relays: &[Vec<u8>]| Directory::sign(relays, T0, T0 + DAY, &authority).unwrap();
    out.push(("directory", "empty", dir(&[])));
    out.push(("directory", "one-relay", dir(std::slice::from_ref(&min))));
    out.push(("directory", "three-relays", dir(&[ex, o1, o2])));

    // commands: every command body, as its encoder writes it.
    let body = |encode: &dyn Fn(&mut [u8]) -> usize| {
        let mut buf = [0u8; 512];
        let n = encode(&mut buf);
        buf[..n].to_vec()
    };
    let extend = |target: &str| Extend {
        target: addr(target),
        link_secret: [0x11; 32],
        handshake: std::array::from_fn(|i| i as u8),
    };
    let (e4, e6) = (extend("192.0.2.2:9001"), extend("[2001:db8::2]:9001"));
    out.push(("commands", "extend-v4", body(&|b| e4.encode(b).unwrap())));
    out.push(("commands", "extend-v6", body(&|b| e6.encode(b).unwrap())));
    let extended = Extended { handshake: [0x22; CREATED_LEN] };
    out.push(("commands", "extended", body(&|b| extended.encode(b).unwrap())));
    out.push(("commands", "attach-new", body(&|b| Attach { resume: None }.encode(b).unwrap())));
    out.push(("commands", "attach-resume", body(&|b| Attach { resume: Some([0x33; 32]) }.encode(b).unwrap())));
    let attached = Attached {
        token: [0x44; 32],
        ipv4: ("10.64.0.2".parse().unwrap(), 10),
        ipv6: ("fd00:64::2".parse().unwrap(), 64),
        dns: ("10.64.0.1".parse().unwrap(), "fd00:64::1".parse().unwrap()),
    };
    out.push(("commands", "attached", body(&|b| attached.encode(b).unwrap())));
    out.push(("commands", "destroy", vec![cellproto::command::reason::TIMEOUT]));
    out.push(("commands", "ping", 0x0102_0304_0506_0708u64.to_be_bytes().to_vec()));

    // stun: what clients send and what relays answer (the RFC 5769 samples are committed too).
    let stun = |m: Message, fingerprint: bool| {
        let mut b = [0u8; 256];
        let n = m.encode(&mut b, fingerprint).unwrap();
        b[..n].to_vec()
    };
    let tid = [7u8; 12];
    out.push(("stun", "binding-request", stun(Message::binding_request(tid), false)));
    out.push((
        "stun",
        "change-request",
        stun(
            Message::binding_request(tid).with(Attribute::ChangeRequest { change_ip: false, change_port: true }),
            true,
        ),
    ));
    out.push((
        "stun",
        "binding-success-rfc5780",
        stun(
            Message::binding_success(tid, addr("198.51.100.9:40000"))
                .with(Attribute::ResponseOrigin(addr("192.0.2.1:3478")))
                .with(Attribute::OtherAddress(addr("192.0.2.1:3479")))
                .with(Attribute::Software("meshvpn".into())),
            true,
        ),
    ));
    out.push(("stun", "binding-success-v6", stun(Message::binding_success(tid, addr("[2001:db8::9]:40000")), true)));
    out.push((
        "stun",
        "binding-error-420",
        stun(
            Message::binding_error(tid, 420, "Unknown Attribute").with(Attribute::UnknownAttributes(vec![0x0029])),
            true,
        ),
    ));
    out
}

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

/// The seeds are what they claim to be: descriptors and directories verify at the targets' clock.
#[test]
fn fuzz_seeds_are_valid_inputs() {
    let authority = RelayIdentity::from_seed(&AUTHORITY_SEED).public();
    for (target, name, bytes) in seeds() {
        match (target, name) {
            ("descriptor", "onion-cert") => drop(SignedOnionKeyCert::decode_and_verify(&bytes, NOW).unwrap()),
            ("descriptor", _) => {
                let d = RelayDescriptor::decode_and_verify(&bytes, NOW).unwrap();
                assert_eq!(d.identity, RelayIdentity::from_seed(&RELAY_SEED).public(), "{name}");
            }
            ("directory", _) => drop(Directory::decode_and_verify(&bytes, &authority, NOW).unwrap()),
            ("commands", "extend-v4" | "extend-v6") => {
                assert_eq!(Extend::decode(&bytes).unwrap().handshake.len(), CREATE_LEN)
            }
            ("commands", "extended") => drop(Extended::decode(&bytes).unwrap()),
            ("commands", "attach-new" | "attach-resume") => drop(Attach::decode(&bytes).unwrap()),
            ("commands", "attached") => drop(Attached::decode(&bytes).unwrap()),
            ("commands", "destroy") => drop(cellproto::command::decode_destroy(&bytes).unwrap()),
            ("commands", "ping") => drop(cellproto::command::decode_ping(&bytes).unwrap()),
            ("stun", _) => drop(cellproto::stun::decode(&bytes).unwrap()),
            _ => panic!("no check for seed {target}/{name}"),
        }
    }
    // The directory seeds name real, distinct relays.
    let three = seeds().into_iter().find(|s| s.1 == "three-relays").unwrap().2;
    let ids: Vec<IdentityKey> =
        Directory::decode_and_verify(&three, &authority, NOW).unwrap().relays.iter().map(|d| d.identity).collect();
    assert_eq!(ids.len(), 3);
}

/// The committed seeds are the encoders' output today (see the module docs to regenerate).
#[test]
fn fuzz_seeds_are_current() {
    let dir = seed_dir();
    for (target, name, bytes) in seeds() {
        let path = dir.join(target).join(name);
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} is stale or missing: run `cargo test -p cellproto --test fuzz_seeds -- --ignored write_fuzz_seeds`",
            path.display()
        );
    }
}

/// Writes the seeds into `cellproto/fuzz/seeds/` (run on purpose: `--ignored`).
#[test]
#[ignore = "writes into the source tree; run to regenerate the committed fuzz seeds"]
fn write_fuzz_seeds() {
    let dir = seed_dir();
    for (target, name, bytes) in seeds() {
        std::fs::create_dir_all(dir.join(target)).unwrap();
        std::fs::write(dir.join(target).join(name), bytes).unwrap();
    }
}
