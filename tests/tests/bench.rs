//! The benchmark harness's own command line (`hugevisor-bench`): the benches it offers and
//! how it finds the hugevisor binary it measures. The benches themselves are measurements,
//! not checks, and are not run here.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hugevisor-bench"))
}

#[test]
fn help_lists_the_benches_and_the_binary_option() {
    let out = bench().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["memory", "numa", "migration", "--hugevisor"] {
        assert!(text.contains(word), "{word} missing from --help:\n{text}");
    }
}

#[test]
fn a_missing_hugevisor_binary_is_one_line_naming_the_fix() {
    let out = bench()
        .args(["--hugevisor", "/nonexistent/hugevisor", "memory"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("hugevisor-bench: error:")
            && err.contains("/nonexistent/hugevisor")
            && err.contains("--hugevisor"),
        "{err}"
    );
}

#[test]
fn the_vmm_no_longer_has_a_bench_command() {
    let out = tests::hugevisor()
        .args(["bench", "memory"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bench"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
