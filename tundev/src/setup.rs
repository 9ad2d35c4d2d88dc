//! Interface configuration: MTU, the exit's own addresses, link up. Done by running `ip`
//! (iproute2) in the calling thread's network namespace: one-time setup at start, as `wg-quick`
//! does, which spares exitd a netlink implementation. Every exit status is checked and `ip`'s
//! stderr is part of the error.

use std::io;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};

use super::{MAX_MTU, MIN_MTU, context, validate_name};

/// Sets the device's MTU, gives it the exit's own addresses in the pools (`v4`, e.g.
/// `10.8.0.1/16`, and `v6`, e.g. `fd00:8::1/64`: their prefixes become routes into the device)
/// and brings it up, by running `ip` (iproute2). Re-running it is harmless: addresses are
/// `replace`d, not added twice. IPv6 duplicate address detection is skipped (`nodad`; a TUN has
/// no neighbours to collide with). It returns once the kernel routes both addresses locally
/// (IPv6 may lag the link by up to a second; bounded at 5 s, then `ErrorKind::TimedOut`), so
/// packets written into the device right after are delivered.
///
/// `ip` runs in the calling thread's network namespace (a child inherits its creator's), so
/// call it where the device was created. `mtu` must be between [`MIN_MTU`] and [`MAX_MTU`];
/// exitd and the client pass the largest packet a cell carries (`cellproto::cell::TUN_MTU`).
pub fn configure(name: &str, mtu: u32, v4: Ipv4Net, v6: Ipv6Net) -> io::Result<()> {
    validate_name(name, false)?;
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("MTU {mtu} is outside {MIN_MTU}..={MAX_MTU} (IPv6 needs at least {MIN_MTU})"),
        ));
    }
    let (v4_addr, v6_addr) = (v4.addr().to_string(), v6.addr().to_string());
    let mtu = mtu.to_string();
    let v4 = v4.to_string();
    let v6 = v6.to_string();
    run_ip(&["link", "set", "dev", name, "mtu", &mtu])?;
    run_ip(&["-4", "address", "replace", &v4, "dev", name])?;
    run_ip(&["-6", "address", "replace", &v6, "dev", name, "nodad"])?;
    run_ip(&["link", "set", "dev", name, "up"])?;
    wait_until_local(&v4_addr)?;
    wait_until_local(&v6_addr)?;
    Ok(())
}

/// How long [`configure`] waits for the kernel to route the device's own addresses.
const READY_WAIT: Duration = Duration::from_secs(5);

/// Waits until the kernel routes `addr` locally (`ip route get` says `local`). IPv6 keeps the
/// routes of a device that comes up unusable until the link watcher has reported the device's
/// operational state, which it may defer by up to a second; until then packets to the device's
/// own IPv6 address, or through its prefix, are dropped.
fn wait_until_local(addr: &str) -> io::Result<()> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        let output = ip(&["route", "get", addr])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if output.status.success() && stdout.starts_with("local ") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let said = format!("{} {}", stdout.trim(), stderr.trim());
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the kernel still does not route {addr} locally after {READY_WAIT:?}: `ip route get {addr}` says {:?}",
                    said.trim()
                ),
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `ip ARGS…`, failing with its stderr if it does not exit 0.
fn run_ip(args: &[&str]) -> io::Result<()> {
    let output = ip(args)?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(io::Error::other(format!("`ip {}` failed ({}): {}", args.join(" "), output.status, stderr.trim())))
}

/// Runs `ip ARGS…` to completion and returns what it did, whatever its exit status.
fn ip(args: &[&str]) -> io::Result<Output> {
    Command::new("ip")
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| context(e, format_args!("running `ip {}` (is iproute2 installed?)", args.join(" "))))
}
