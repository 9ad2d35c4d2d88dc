//! The io_uring fallback for real: with io_uring disabled by the kernel
//! (`kernel.io_uring_disabled=2`), a relay with `datapath = "auto"` logs the fallback, runs on
//! recvmmsg/sendmmsg and forwards as usual, while `datapath = "uring"` refuses to start with a
//! clear error. Its own test binary (cargo runs test binaries one after another), so flipping
//! the sysctl cannot disturb other tests; the old value is restored even if an assertion fails.
//! Needs root, as CI has.

mod common;

use common::*;
use std::time::Duration;

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

#[test]
fn relay_falls_back_to_recvmmsg_when_io_uring_is_disabled() {
    let old = std::fs::read_to_string(SYSCTL).expect("kernel.io_uring_disabled missing (kernel older than 6.6?)");
    std::fs::write(SYSCTL, "2").expect("setting kernel.io_uring_disabled needs root");
    let _restore = Restore(old);

    assert!(cellio::uring_available().is_err());
    let r = start_relay("fallback", 2, "auto", "[metrics]\nlisten = \"127.0.0.1:1\"\n");
    let mut client = UdpClient::new("127.0.0.1:0", vec![r.hop]);
    client.build(Duration::from_secs(5));
    assert!(client.ping(1, 42));
    let on_recvmmsg = |m: &std::collections::HashMap<String, f64>| {
        m.keys().any(|k| k.starts_with("relayd_info") && k.contains("datapath=\"recvmmsg\""))
    };
    let m = metrics_when(r.handle.metrics_addr.unwrap(), on_recvmmsg);
    assert!(on_recvmmsg(&m), "{m:?}");
    r.handle.shutdown();

    let dir = tmpdir("fallback-uring");
    let keys = relayd::keys::keygen(&dir).unwrap();
    let text =
        format!("listen = \"127.0.0.1:9\"\nkey_dir = \"{}\"\nnickname = \"u\"\ndatapath = \"uring\"\n", dir.display());
    let mut config = relayd::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    let err = relayd::relay::start(&config, keys).err().expect("uring must refuse when disabled");
    assert!(format!("{err:#}").contains("io_uring"), "{err:#}");
}
