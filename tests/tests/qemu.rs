//! The same guest image under another VMM: QEMU's microvm boots it through PVH, on one
//! vCPU and on two (the image starts its APs from the MADT of microvm's ACPI tables).

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::{have_kvm, host_has, hugevisor};

fn have_qemu() -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    host_has(
        found,
        "qemu-system-x86_64 (Debian package qemu-system-x86; .ci/run installs it)",
    )
}

/// Boots `image` under QEMU and returns the guest's console lines up to its "done" line.
fn boot_under_qemu(image: &std::path::Path, memory: &str, append: Option<&str>) -> Vec<String> {
    boot_under_qemu_smp(image, memory, append, 1)
}

/// As [`boot_under_qemu`] on `smp` vCPUs: up to every vCPU's "done" line.
fn boot_under_qemu_smp(
    image: &std::path::Path,
    memory: &str,
    append: Option<&str>,
    smp: usize,
) -> Vec<String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "kvm",
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-cpu",
        "max,-arch-capabilities",
    ])
    .args(["-smp", &smp.to_string()])
    .args(["-m", memory, "-nographic", "-no-reboot", "-kernel"])
    .arg(image);
    if let Some(a) = append {
        cmd.args(["-append", a]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning QEMU");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let failed = line.contains("exception") || line.contains("bad parameters");
                lines.push(line);
                let done = lines.iter().filter(|l| l.contains(" done passes=")).count();
                if failed || done >= smp {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

#[test]
fn guest_image_boots_under_qemu_microvm() {
    if !have_kvm() || !have_qemu() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("hugevisor-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("verify.elf");
    let out = hugevisor()
        .args([
            "guest-image",
            "--workload",
            "verify",
            "--passes",
            "3",
            "--out",
        ])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Default command line from the image header.
    let lines = boot_under_qemu(&image, "64M", None);
    let done = lines
        .iter()
        .find(|l| l.contains("hvguest: vcpu 0 done"))
        .unwrap_or_else(|| {
            panic!(
                "no completion line from the guest under QEMU; console:\n{}",
                lines.join("\n")
            )
        });
    assert!(done.contains("passes=3"), "{done}");
    assert!(done.contains("integrity_errors=0"), "{done}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("cmdline=\"workload=verify passes=3\"")),
        "{lines:?}"
    );

    // Parameters from the PVH start-info command line (-append) override the default.
    let lines = boot_under_qemu(&image, "64M", Some("workload=random passes=2"));
    let done = lines
        .iter()
        .find(|l| l.contains("hvguest: vcpu 0 done"))
        .unwrap_or_else(|| {
            panic!(
                "no completion line with -append; console:\n{}",
                lines.join("\n")
            )
        });
    assert!(
        done.contains("passes=2") && done.contains("integrity_errors=0"),
        "{done}"
    );

    // The exception path works under the PVH entry too.
    let lines = boot_under_qemu(&image, "64M", Some("workload=fault"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("#PF page fault") && l.contains("cr2=0x700000000000")),
        "fault workload under QEMU:\n{}",
        lines.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_image_runs_on_two_vcpus_under_qemu_microvm() {
    if !have_kvm() || !have_qemu() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("hugevisor-qemu-smp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("verify.elf");
    let out = hugevisor()
        .args([
            "guest-image",
            "--workload",
            "verify",
            "--passes",
            "3",
            "--out",
        ])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No vcpus= on the command line: the image runs on every CPU it started.
    let lines = boot_under_qemu_smp(&image, "64M", None, 2);
    for cpu in 0..2 {
        let done = lines
            .iter()
            .find(|l| l.contains(&format!("hvguest: vcpu {cpu} done")))
            .unwrap_or_else(|| {
                panic!(
                    "vCPU {cpu} never finished under QEMU -smp 2:\n{}",
                    lines.join("\n")
                )
            });
        assert!(
            done.contains("passes=3") && done.contains("integrity_errors=0"),
            "{done}"
        );
    }
    assert!(lines.iter().any(|l| l.contains("vcpus=2")), "{lines:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
