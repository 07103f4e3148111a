//! The binary's own smoke tests (the end-to-end suite is the `tests` crate). Having an
//! integration test here also makes `cargo test --workspace` build `hugevisor`.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn hugevisor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hugevisor"))
}

#[test]
fn help_lists_the_commands() {
    let out = hugevisor().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // `bench` left the VMM: it is `hugevisor-bench` in the tests crate (tests/tests/bench.rs).
    for cmd in ["run", "guest-image", "caps", "migrate"] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
}

#[test]
fn clap_errors_are_one_line() {
    let out = hugevisor().args(["run", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("hugevisor: error:") && err.contains("--bogus"),
        "{err}"
    );
}

#[test]
fn guest_image_writes_a_pvh_elf() {
    let dir = std::env::temp_dir().join(format!("hv-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_file = dir.join("g.elf");
    let out = hugevisor()
        .args([
            "guest-image",
            "--workload",
            "stream",
            "--passes",
            "7",
            "--out",
        ])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elf = std::fs::read(&out_file).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let info = guest_image_info(&elf);
    assert!(info.starts_with(b"workload=stream passes=7\0"));
    // An unwritable destination is a one-line error.
    let out = hugevisor()
        .args(["guest-image", "--out", "/nonexistent/dir/g.elf"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir/g.elf"));
    std::fs::remove_dir_all(dir).unwrap();
}

fn guest_image_info(elf: &[u8]) -> Vec<u8> {
    guest_image::image_info(elf)
        .unwrap()
        .default_cmdline
        .to_vec()
}

#[test]
fn bad_dirty_log_values_are_one_line_errors() {
    for (value, says) in [
        ("ring=1000", "power of two"),
        ("ring=128", "between 256"),
        ("ring=131072", "65536"),
        ("ring=lots", "number of entries"),
        ("journal", "choose bitmap, ring or ring=ENTRIES"),
    ] {
        let out = hugevisor()
            .args(["run", "--dirty-log", value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{value}: {err}");
        assert!(
            err.starts_with("hugevisor: error:") && err.contains(says),
            "{value}: {err}"
        );
    }
}
