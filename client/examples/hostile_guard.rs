//! A hostile guard for the lab tests (never packaged, not a feature of relayd): it relays
//! like an honest relay, with cellproto's own relay code (the sans-IO `TestRelay` the
//! simulator drives) on a real UDP socket and the guard's real keys, and, each time a trigger
//! file appears, originates a forged ATTACHED towards every client whose circuit it carries:
//! attacker addresses and, as DNS resolver, the guard's own address.
//!
//! ```text
//! hostile-guard --keys DIR --listen ADDR --trigger FILE
//! ```
//!
//! The trigger file holds the kind of forgery: `plausible` (addresses that pass every
//! address check, with the guard's address as resolver: only the rule "only the exit may
//! answer ATTACH" stops it) or `multicast` (an IPv6 multicast address, which the kernel
//! refuses). The file is removed once the cells are sent, and a line
//! `injected KIND ATTACHED into N circuits` goes to stdout.

use anyhow::{Context, Result, bail};
use cellproto::cell::{CELL_LEN, Command};
use cellproto::command::Attached;
use cellproto::handshake::OnionSecret;
use cellproto::identity::RelayIdentity;
use cellproto::onion::payload_mut;
use cellproto::sim::TestRelay;
use rand_core::{OsRng, RngCore};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Args {
    keys: PathBuf,
    listen: SocketAddr,
    trigger: PathBuf,
}

fn args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut keys, mut listen, mut trigger) = (None, None, None);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--keys" => keys = Some(PathBuf::from(value)),
            "--listen" => listen = Some(value.parse().context("--listen ADDR:PORT")?),
            "--trigger" => trigger = Some(PathBuf::from(value)),
            _ => bail!("usage: hostile-guard --keys DIR --listen ADDR --trigger FILE"),
        }
    }
    Ok(Args {
        keys: keys.context("--keys DIR")?,
        listen: listen.context("--listen ADDR")?,
        trigger: trigger.context("--trigger FILE")?,
    })
}

/// The guard's identity and current onion key, from the key directory `relayd keygen` made
/// (`identity.key`, `onion.key`: relayd::keys' file names; the client does not depend on relayd).
fn keys(dir: &Path) -> Result<(RelayIdentity, OnionSecret)> {
    let mut seed = daemonkit::keyfile::read_key(&dir.join("identity.key"))?;
    let identity = RelayIdentity::from_seed(&seed);
    seed.fill(0);
    let mut secret = daemonkit::keyfile::read_key(&dir.join("onion.key"))?;
    let onion = OnionSecret::from_bytes(&secret);
    secret.fill(0);
    Ok((identity, onion))
}

/// The forgery of `kind`, with `me` (the guard) as the resolver where it can be.
fn forgery(kind: &str, me: IpAddr) -> Result<Attached> {
    let me4 = match me {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::new(10, 66, 0, 1),
    };
    let plausible = Attached {
        token: [0x66; 32],
        // A pool around the guard's own address, so that "DNS inside the pool" holds.
        ipv4: (Ipv4Addr::from(u32::from(me4) ^ 0x42), 12),
        ipv6: (Ipv6Addr::new(0xfd66, 0, 0, 0, 0, 0, 0, 2), 64),
        dns: (me4, Ipv6Addr::new(0xfd66, 0, 0, 0, 0, 0, 0, 1)),
    };
    match kind {
        "plausible" => Ok(plausible),
        "multicast" => Ok(Attached { ipv6: (Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 64), ..plausible }),
        other => bail!("unknown forgery {other:?} (plausible or multicast)"),
    }
}

fn main() -> Result<()> {
    let args = args()?;
    let (identity, onion) =
        keys(&args.keys).with_context(|| format!("cannot load keys from {}", args.keys.display()))?;
    let mut relay =
        TestRelay::with_keys(1, identity.public().0, onion, cellproto::crypto::local_aes_hw(), OsRng.next_u64());
    let socket = UdpSocket::bind(args.listen).with_context(|| format!("cannot bind {}", args.listen))?;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    println!("hostile guard listening on {}", args.listen);
    std::io::stdout().flush()?;
    let mut cell = [0u8; CELL_LEN];
    let mut relayed: u64 = 0;
    loop {
        if let Ok(kind) = std::fs::read_to_string(&args.trigger) {
            let attached = forgery(kind.trim(), args.listen.ip())?;
            let now = Instant::now();
            let lcids: Vec<u32> = relay.node.circuits().iter().map(|c| c.prev().lcid_in).collect();
            let mut sent = 0;
            for lcid in lcids {
                let Some(circ) = relay.node.circuits_mut().get_mut(lcid) else { continue };
                let mut out = [0u8; CELL_LEN];
                let len = attached.encode(payload_mut(&mut out))?;
                if let Ok(to) = circ.seal_backward(now, Command::Attached, len, &mut out)
                    && socket.send_to(&out, to).is_ok()
                {
                    sent += 1;
                }
            }
            std::fs::remove_file(&args.trigger)?;
            println!("injected {} ATTACHED into {sent} circuits ({relayed} cells relayed so far)", kind.trim());
            std::io::stdout().flush()?;
        }
        let Ok((n, from)) = socket.recv_from(&mut cell) else { continue };
        if n != CELL_LEN {
            continue;
        }
        for (to, out) in relay.handle(Instant::now(), from, &mut cell) {
            relayed += 1;
            let _ = socket.send_to(&out, to);
        }
    }
}
