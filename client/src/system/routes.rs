//! Routes: the guard outside the tunnel, everything else into it (split default routes, as
//! `wg-quick` and OpenVPN's `def1` do: two halves beat the existing default route by length
//! without replacing it, so nothing needs restoring).

use super::run;
use anyhow::{Context, Result};
use std::net::IpAddr;
use tracing::warn;

/// A host route for the guard via the gateway the system uses for it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    /// `a.b.c.d/32` or `x::y/128`.
    pub prefix: String,
    /// `via GW dev DEV` (or `dev DEV` on link), as `ip route get` said.
    pub via: Vec<String>,
}

/// Reads the system's current route to `ip`.
pub fn host_route(ip: IpAddr) -> Result<HostRoute> {
    let fam = if ip.is_ipv4() { "-4" } else { "-6" };
    let out = run("ip", &[fam, "route", "get", &ip.to_string()], None)
        .with_context(|| format!("no route to the guard {ip}: is the network up?"))?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let mut via = Vec::new();
    for key in ["via", "dev"] {
        if let Some(i) = words.iter().position(|w| *w == key)
            && let Some(v) = words.get(i + 1)
        {
            via.extend([key.to_string(), v.to_string()]);
        }
    }
    if !via.iter().any(|w| w == "dev") {
        anyhow::bail!("cannot parse `ip route get {ip}`: {}", out.trim());
    }
    let len = if ip.is_ipv4() { 32 } else { 128 };
    Ok(HostRoute { prefix: format!("{ip}/{len}"), via })
}

/// Adds (or replaces) the guard's host route.
pub fn add_host_route(route: &HostRoute) -> Result<()> {
    let mut args = vec!["route", "replace", route.prefix.as_str()];
    args.extend(route.via.iter().map(String::as_str));
    run("ip", &args, None).map(drop)
}

/// Removes a host route; a missing one is fine (already gone with its device).
pub fn del_host_route(prefix: &str) {
    if let Err(e) = run("ip", &["route", "del", prefix], None)
        && !e.to_string().contains("No such process")
    {
        warn!("cannot remove route {prefix}: {e:#}");
    }
}

/// The split default routes through `tun`, IPv4 and IPv6: IPv6 is tunnelled, never leaked.
pub fn route_all_through(tun: &str) -> Result<()> {
    for prefix in ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"] {
        run("ip", &["route", "replace", prefix, "dev", tun], None)?;
    }
    Ok(())
}
