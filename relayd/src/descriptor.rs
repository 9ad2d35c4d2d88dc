//! The relay's signed descriptor, as `relayd descriptor` prints it for the directory.

use crate::config::Config;
use crate::keys::RelayKeys;
use anyhow::{Context, Result, bail};
use cellproto::descriptor::{ExitPolicySummary, FLAG_AES_HW, FLAG_EXIT, FLAG_GUARD, RelayDescriptor};
use cellproto::identity::OnionKeyCert;

/// Slack before `now` in validity windows, so a directory made on a machine whose clock is a
/// little behind still accepts the descriptor.
const CLOCK_SKEW_SECS: u64 = 3600;

/// Builds and signs the descriptor for `config` and `keys` at unix time `now`; an exit passes
/// its policy summary (which also sets the EXIT flag).
pub fn signed(config: &Config, keys: &RelayKeys, now: u64, exit_policy: Option<ExitPolicySummary>) -> Result<Vec<u8>> {
    if let Some(a) = config.published_addresses().iter().find(|a| a.ip().is_unspecified()) {
        bail!(
            "cannot publish {a}: listen is a wildcard address; set public_addresses to the address clients and relays reach (e.g. [\"203.0.113.7:{}\"])",
            a.port()
        );
    }
    let expires = now + config.descriptor_lifetime_secs;
    let identity = keys.identity.public();
    let onion_keys = keys
        .onion
        .iter()
        .take(1)
        .map(|k| OnionKeyCert { identity, onion_key: *k.public(), valid_after: now - CLOCK_SKEW_SECS, expires })
        .collect();
    let mut flags = if exit_policy.is_some() { FLAG_EXIT } else { 0 };
    if cellproto::crypto::local_aes_hw() {
        flags |= FLAG_AES_HW;
    }
    if config.guard {
        flags |= FLAG_GUARD;
    }
    let desc = RelayDescriptor {
        identity,
        onion_keys,
        addresses: config.published_addresses(),
        nickname: config.nickname.clone(),
        operator: config.operator.clone(),
        bandwidth: config.bandwidth,
        flags,
        exit_policy,
        protocol_versions: vec![cellproto::handshake::HANDSHAKE_VERSION],
        published: now,
        expires,
    };
    desc.sign(&keys.identity).context("cannot sign the descriptor (check nickname, operator and addresses)")
}
