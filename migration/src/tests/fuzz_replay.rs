//! The fuzz harnesses (`crate::fuzzing`) over their seeds and over every input that once
//! failed (`fuzz-regressions/<target>/`, one file per input, as `cargo fuzz` wrote it).

use std::path::Path;

use crate::fuzzing;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-regressions")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".keep"))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn the_seeds_migrate_through_the_destination_harness() {
    for (name, seed) in fuzzing::seeds() {
        assert!(fuzzing::destination(&seed), "seed {name} failed");
        fuzzing::wire(&seed);
    }
}

#[test]
fn every_input_that_once_failed_is_replayed() {
    for (name, input) in inputs("wire") {
        eprintln!("wire: {name}");
        fuzzing::wire(&input);
    }
    for (name, input) in inputs("destination") {
        eprintln!("destination: {name}");
        fuzzing::destination(&input);
    }
}

/// Writes the destination target's seeds where `cargo fuzz` finds its corpus:
/// `cargo test -p migration write_fuzz_seeds -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/destination");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, seed) in fuzzing::seeds() {
        std::fs::write(dir.join(format!("seed-{name}")), seed).unwrap();
    }
}
