//! The signals a daemon obeys, as flags its main loop polls: SIGTERM and SIGINT stop it,
//! SIGHUP asks it to re-read its configuration. signal-hook's flag handlers only store `true`,
//! so nothing but an atomic store runs in signal context.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// A flag that SIGTERM or SIGINT sets: the daemon stops when it sees it.
pub fn stop_flag() -> std::io::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    Ok(stop)
}

/// A flag that SIGHUP sets: the daemon re-reads its configuration and clears it.
pub fn hup_flag() -> std::io::Result<Arc<AtomicBool>> {
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
    Ok(hup)
}
