//! The fault path end to end: zap → vCPU touch → userfaultfd MINOR fault → resolve
//! against the second-stage table → UFFDIO_CONTINUE, under the `verify` workload.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tests::peers::{run_until, RUN_BOUND};
use tests::{have_hugetlb, have_kvm, run};

#[test]
fn verify_survives_random_zaps_of_the_guest_view() {
    if !have_kvm() {
        return;
    }
    // Heavy: hugetlb pool pages.
    let _heavy = tests::heavy();
    let mut cases = vec![("shmem", "64M")];
    if have_hugetlb(2048, 32) {
        cases.push(("hugetlb-2m", "64M"));
    }
    for (backing, memory) in cases {
        // The zapper's counts follow time (one zap per 2 ms): it gets its 2 s, as before,
        // and the run goes on until the guest has made its passes under it.
        let start = Instant::now();
        let r = run_until(
            &[
                "run",
                "--json",
                "--console",
                "off",
                "--memory",
                memory,
                "--backing",
                backing,
                "--vcpus",
                "2",
                "--workload",
                "verify",
                "--duration",
                RUN_BOUND,
                "--stress-zap",
                "2ms",
            ],
            "4 passes under 2 s of random zaps",
            |info| {
                start.elapsed() >= Duration::from_secs(2)
                    && info["per_vcpu_passes"]
                        .as_array()
                        .is_some_and(|p| p.iter().all(|n| n.as_u64() >= Some(2)))
            },
        );
        assert_eq!(r.code(), 0, "{backing}: stderr:\n{}", r.stderr());
        let j = r.json();
        assert_eq!(j["fault_path"], "uffd-minor", "{j}");
        assert_eq!(r.u64("integrity_errors"), 0, "{backing}: {j}");
        let zaps = r.u64("zaps");
        let faults = r.u64("uffd_faults");
        assert!(zaps > 100, "{backing}: the zapper ran: {j}");
        assert!(faults > 100, "{backing}: zaps came back as faults: {j}");
        // Faults carry the vCPU's thread id: both vCPUs took some.
        let per_vcpu: Vec<u64> = j["faults"]["per_vcpu"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(
            per_vcpu.iter().all(|&n| n > 0),
            "{backing}: per-vCPU faults {per_vcpu:?}"
        );
        assert!(j["fault_us_p50"].as_f64().unwrap() > 0.0, "{j}");
        assert!(
            j["fault_us_p99"].as_f64().unwrap() >= j["fault_us_p50"].as_f64().unwrap(),
            "{j}"
        );
        // The guest kept working across the zaps: both vCPUs finished passes.
        assert!(r.u64("passes") >= 4, "{backing}: {j}");
    }
}

#[test]
fn memmap_lists_the_second_stage_table() {
    if !have_kvm() {
        return;
    }
    let r = run(&[
        "run",
        "--json",
        "--console",
        "off",
        "--memory",
        "32M",
        "--workload",
        "touch",
        "--memmap",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let j = r.json();
    let a = &j["memmap"]["accounting"];
    assert_eq!(a["present_bytes"].as_u64(), Some(32 << 20), "{j}");
    assert_eq!(a["leaves_4k"].as_u64(), Some(8192), "{j}");
    assert_eq!(a["logical_mappings"].as_u64(), Some(8192), "{j}");
    let runs = j["memmap"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{j}");
    assert_eq!(runs[0]["state"], "present");
    // Human form: a table.
    let r = run(&[
        "run",
        "--console",
        "off",
        "--memory",
        "32M",
        "--workload",
        "touch",
        "--memmap",
    ]);
    assert_eq!(r.code(), 0);
    assert!(
        r.stdout().contains("second-stage table") && r.stdout().contains("present"),
        "{}",
        r.stdout()
    );
}

#[test]
fn stress_zap_on_anon_is_refused() {
    if !have_kvm() {
        return;
    }
    let r = run(&[
        "run",
        "--console",
        "off",
        "--memory",
        "32M",
        "--backing",
        "anon",
        "--stress-zap",
        "1ms",
    ]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("anon") && r.stderr().lines().count() == 1,
        "{}",
        r.stderr()
    );
}
