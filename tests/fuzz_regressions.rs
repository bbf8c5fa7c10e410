//! Every input of fuzz/corpus and fuzz/regressions, replayed through the
//! fuzz targets' entry points on stable: CI guards what the fuzzer found
//! without nightly or libFuzzer (scripts/fuzz.sh runs the fuzzer itself).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use tidepool::fuzzing;

/// Runs `target` on every file of its corpus and regressions, naming the
/// first file that fails.
fn replay(target: &str, run: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                panic!("fails on {}", path.display());
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no corpus for {target}");
}

#[test]
fn frontend_messages() {
    replay("frontend_messages", fuzzing::frontend_messages);
}

#[test]
fn startup_packet() {
    replay("startup_packet", fuzzing::startup_packet);
}

#[test]
fn scram_exchange() {
    replay("scram_exchange", fuzzing::scram_exchange);
}

#[test]
fn classify() {
    replay("classify", fuzzing::classify);
}
