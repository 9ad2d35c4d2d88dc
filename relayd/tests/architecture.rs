//! One behaviour, one place: a relay's reactions to cells live in `cellproto::node`, which
//! relayd's workers drive and the simulator runs. This test reads the sources and fails if a
//! decision about a command creeps back into the daemon's data plane, or if the simulator
//! stops running the node (and tests a copy again).

use std::path::Path;

fn source(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The data-plane files: relayd's worker and every backend of the cell I/O layer (`cellio`).
fn data_plane() -> Vec<(String, String)> {
    let mut files = vec![("src/worker.rs".to_string(), source("src/worker.rs"))];
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../cellio/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    files
}

#[test]
fn no_command_is_decided_in_the_worker_or_the_data_path() {
    // Matching on a command, decoding one, or sealing a relay's own answer: all the node's.
    let forbidden = [
        "Command::Ping",
        "Command::Pong",
        "Command::Destroy",
        "Command::Extend",
        "Command::Extended",
        "Command::Attach",
        "Command::Data",
        "Command::Padding",
        "LinkControl::Destroy",
        "decode_ping",
        "seal_backward",
        "seal_destroy",
        "handle_forward",
        "handle_backward",
        "process_batch",
        "Verdict::Deliver",
        "remove_where",
    ];
    for (file, text) in data_plane() {
        for word in forbidden {
            assert!(!text.contains(word), "{file} contains `{word}`: that decision belongs in cellproto::node");
        }
    }
    let worker = source("src/worker.rs");
    assert!(worker.contains("node.handle("), "the worker no longer hands its batches to the node");
    assert!(worker.contains("handle_timeout("), "the worker no longer runs the node's timers");
    assert!(worker.contains("shutdown("), "the worker no longer shuts the node down");
}

#[test]
fn the_simulator_runs_the_node_not_a_copy() {
    let sim = source("../cellproto/src/sim.rs");
    assert!(sim.contains("SoloRelay"), "cellproto::sim no longer runs node::SoloRelay");
    for word in ["decode_ping", "handle_forward", "accept_backward", "seal_destroy", "Command::Ping", "Command::Extend"]
    {
        assert!(!sim.contains(word), "cellproto/src/sim.rs contains `{word}`: a copy of the node's logic");
    }
    let solo = source("../cellproto/src/node/solo.rs");
    assert!(solo.contains("node: Node"), "SoloRelay no longer wraps node::Node");
    assert!(solo.contains("handle_one("), "SoloRelay no longer hands cells to the node");
}

#[test]
fn the_exit_plugs_into_the_node() {
    let exit = source("../exitd/src/exit.rs");
    assert!(exit.contains("impl cellproto::node::Terminal for ExitTerminal"));
}
