//! Dependencies point down (ARCHITECTURE.md, "Layers"): each meshvpn crate may depend only on
//! crates of a lower layer, so the client never pulls in a relay daemon, tundev and daemonkit
//! stay free of the protocol, and no fuzz crate drags in another crate's I/O. Read from
//! `cargo metadata`, so a new `path` dependency that breaks the layering fails here, whatever
//! file it was added in.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// A crate's layer: it may depend (normally, or to build) only on crates of lower layers.
/// Crates not listed here are outside the workspace's layering and make the test fail.
fn layer(name: &str) -> Option<u8> {
    Some(match name {
        "cellproto" | "daemonkit" | "tundev" | "netns" => 0,
        "cellio" => 1,
        "relayd" | "meshvpn" => 2,
        "exitd" => 3,
        "perf" => 4,
        _ => return None,
    })
}

/// `(package, dependency, kind)` for every dependency on a local path, from `cargo metadata`
/// of the manifest `manifest` (relative to the workspace root).
fn path_dependencies(manifest: &str) -> Vec<(String, String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--manifest-path"])
        .arg(root.join(manifest))
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let mut deps = Vec::new();
    for package in meta["packages"].as_array().unwrap() {
        for dep in package["dependencies"].as_array().unwrap() {
            if dep.get("path").and_then(Value::as_str).is_some() {
                deps.push((
                    package["name"].as_str().unwrap().to_string(),
                    dep["name"].as_str().unwrap().to_string(),
                    dep["kind"].as_str().unwrap_or("normal").to_string(),
                ));
            }
        }
    }
    deps
}

#[test]
fn workspace_dependencies_point_down() {
    let deps = path_dependencies("Cargo.toml");
    assert!(deps.iter().any(|(p, d, _)| p == "exitd" && d == "relayd"), "metadata read: {deps:?}");
    let mut wrong = Vec::new();
    for (package, dep, kind) in &deps {
        let (Some(from), Some(to)) = (layer(package), layer(dep)) else {
            wrong.push(format!("{package} -> {dep}: a crate outside the layering"));
            continue;
        };
        // Tests may use the test namespaces, and a crate its own features (cellproto's sim).
        let test_support = kind == "dev" && (dep == "netns" || dep == package);
        if to >= from && !test_support {
            wrong.push(format!("{package} (layer {from}) -> {dep} (layer {to}, {kind})"));
        }
    }
    assert!(wrong.is_empty(), "dependencies that do not point down: {wrong:#?}");
}

#[test]
fn the_client_depends_on_no_daemon() {
    // Named on its own because it is the rule that matters most to a user: the client pulls in
    // no relay or exit code, not even for its tests.
    for (package, dep, kind) in path_dependencies("Cargo.toml") {
        if package == "meshvpn" {
            assert!(dep != "relayd" && dep != "exitd", "meshvpn depends on {dep} ({kind})");
        }
    }
}

#[test]
fn each_fuzz_crate_depends_only_on_its_own_crate() {
    for (krate, allowed) in [
        ("cellproto", &["cellproto"][..]),
        ("client", &["meshvpn"][..]),
        ("exitd", &["exitd"][..]),
        ("tundev", &["tundev"][..]),
    ] {
        let deps = path_dependencies(&format!("{krate}/fuzz/Cargo.toml"));
        assert!(!deps.is_empty(), "{krate}/fuzz has no path dependency at all: metadata not read?");
        for (package, dep, _) in deps {
            assert!(allowed.contains(&dep.as_str()), "{package} ({krate}/fuzz) depends on {dep}");
        }
    }
}
