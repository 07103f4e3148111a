//! Every built-in workload on every backing, with 1 and 2 vCPUs, on real KVM.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use tests::{have_hugetlb, have_kvm, run};

/// (backing, memory, 2 MiB pages needed, 1 GiB pages needed)
const BACKINGS: &[(&str, &str, u64, u64)] = &[
    ("shmem", "32M", 0, 0),
    ("anon", "32M", 0, 0),
    ("hugetlb-2m", "32M", 16, 0),
    ("hugetlb-1g", "1G", 0, 1),
];

fn check_ok(r: &tests::Run, what: &str) {
    assert_eq!(
        r.code(),
        0,
        "{what}: exit {}\nstderr:\n{}",
        r.code(),
        r.stderr()
    );
    let j = r.json();
    assert_eq!(j["outcome"], "ok", "{what}: {j}");
    assert_eq!(r.u64("integrity_errors"), 0, "{what}");
    assert!(r.u64("passes") >= 1, "{what}: {j}");
    assert!(r.u64("pages_touched") > 0, "{what}: {j}");
}

#[test]
fn every_workload_on_every_backing() {
    if !have_kvm() {
        return;
    }
    // Heavy: hugetlb pool pages and a 1 GiB guest.
    let _heavy = tests::heavy();
    for &(backing, memory, p2m, p1g) in BACKINGS {
        if (p2m > 0 && !have_hugetlb(2048, p2m)) || (p1g > 0 && !have_hugetlb(1048576, p1g)) {
            continue;
        }
        for workload in ["touch", "verify", "stream", "random"] {
            for vcpus in ["1", "2"] {
                let what = format!("{workload} on {backing} with {vcpus} vCPU(s)");
                let r = run(&[
                    "run",
                    "--json",
                    "--console",
                    "off",
                    "--memory",
                    memory,
                    "--backing",
                    backing,
                    "--vcpus",
                    vcpus,
                    "--workload",
                    workload,
                    "--passes",
                    "2",
                ]);
                check_ok(&r, &what);
                let j = r.json();
                assert_eq!(j["backing"], backing, "{what}");
                assert_eq!(j["workload"], workload, "{what}");
                assert_eq!(j["vcpus"].as_u64(), Some(vcpus.parse().unwrap()), "{what}");
                assert_eq!(
                    r.u64("passes"),
                    2 * vcpus.parse::<u64>().unwrap(),
                    "{what}: {j}"
                );
                // All data pages above 4 MiB, split among the vCPUs.
                let mem = r.u64("memory_bytes");
                assert_eq!(
                    r.u64("pages_touched"),
                    (mem - (4 << 20)) / 4096,
                    "{what}: {j}"
                );
                assert!(j["bytes_per_sec"].as_f64().unwrap() > 0.0, "{what}: {j}");
                assert!(j["max_pass_ms"].as_f64().unwrap() > 0.0, "{what}: {j}");
                assert!(
                    r.u64("guest_exits") >= vcpus.parse().unwrap(),
                    "{what}: {j}"
                );
            }
        }
    }
}

#[test]
fn duration_mode_stops_on_time_and_reports_json_fields() {
    if !have_kvm() {
        return;
    }
    let r = run(&[
        "run",
        "--json",
        "--console",
        "off",
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--duration",
        "500ms",
    ]);
    check_ok(&r, "verify for 500ms");
    let j = r.json();
    for key in [
        "workload",
        "vcpus",
        "memory_bytes",
        "backing",
        "elapsed_ms",
        "passes",
        "pages_touched",
        "integrity_errors",
        "guest_exits",
        "bytes_per_sec",
        "max_pass_ms",
    ] {
        assert!(!j[key].is_null(), "{key} missing in {j}");
    }
    let elapsed = j["elapsed_ms"].as_f64().unwrap();
    assert!(
        (400.0..10_000.0).contains(&elapsed),
        "elapsed {elapsed} ms for a 500 ms run"
    );
    // Every vCPU finished at least one pass (the first, with its 4 KiB first touches, can
    // take most of 500 ms on a loaded 2-core host).
    assert!(r.u64("passes") >= 2, "{j}");
    assert!(
        j["startup"]["to_first_insn_ms"].as_f64().unwrap() > 0.0,
        "{j}"
    );
}

#[test]
fn prefault_and_thp_options_run() {
    if !have_kvm() {
        return;
    }
    for args in [
        ["--backing", "shmem", "--prefault", "--thp", "off"],
        ["--backing", "anon", "--prefault", "--thp", "on"],
    ] {
        let mut a = vec![
            "run",
            "--json",
            "--console",
            "off",
            "--memory",
            "32M",
            "--passes",
            "1",
        ];
        a.extend(args);
        let r = run(&a);
        check_ok(&r, &args.join(" "));
        assert_eq!(r.json()["prefault"], true);
    }
}

/// `verify` is the project's witness: it must be able to fail.
#[test]
fn verify_reports_a_page_corrupted_by_the_vmm() {
    if !have_kvm() {
        return;
    }
    // Heavy: hugetlb pool pages.
    let _heavy = tests::heavy();
    let mut backings = vec!["shmem", "anon"];
    if have_hugetlb(2048, 32) {
        backings.push("hugetlb-2m");
    }
    for backing in backings {
        let r = run(&[
            "run",
            "--json",
            "--console",
            "off",
            "--memory",
            "64M",
            "--backing",
            backing,
            "--vcpus",
            "2",
            "--workload",
            "verify",
            "--duration",
            "1500ms",
            "--inject-corruption",
        ]);
        assert_eq!(
            r.code(),
            2,
            "{backing}: integrity errors must exit 2; stderr:\n{}",
            r.stderr()
        );
        let j = r.json();
        assert_eq!(j["outcome"], "integrity_errors", "{j}");
        assert_eq!(
            r.u64("integrity_errors"),
            1,
            "{backing}: exactly the one corrupted page: {j}"
        );
        let corrupted = r.u64("corrupted_gpa");
        let reported = j["first_error"]["gpa"].as_u64().unwrap();
        assert_eq!(
            reported & !0xfff,
            corrupted,
            "{backing}: reported GPA {reported:#x} vs corrupted {corrupted:#x}"
        );
        assert_eq!(j["first_error"]["vcpu"], 0);
        assert!(
            r.stderr().contains(&format!("GPA {reported:#x}")),
            "{backing}: the error message names the GPA:\n{}",
            r.stderr()
        );
    }
}

#[test]
fn guest_exception_is_reported_clearly() {
    if !have_kvm() {
        return;
    }
    for vcpus in ["1", "2"] {
        let r = run(&[
            "run",
            "--json",
            "--console",
            "off",
            "--memory",
            "32M",
            "--vcpus",
            vcpus,
            "--workload",
            "fault",
        ]);
        assert_eq!(
            r.code(),
            3,
            "guest exception exits 3; stderr:\n{}",
            r.stderr()
        );
        let j = r.json();
        assert_eq!(j["outcome"], "guest_exception", "{j}");
        let x = &j["exception"];
        assert_eq!(x["vector"], 14, "{j}");
        assert_eq!(x["name"], "#PF");
        assert_eq!(x["cr2"].as_u64(), Some(0x7000_0000_0000), "{j}");
        // Write from user mode to a non-present page: U/S | W/R, not P.
        assert_eq!(x["error_code"].as_u64().unwrap() & 0x7, 0x6, "{j}");
        assert!(x["rip"].as_u64().unwrap() > 0x100000, "{j}");
        let err = r.stderr();
        assert!(
            err.contains("guest exception on vCPU")
                && err.contains("#PF")
                && err.contains("CR2 0x700000000000"),
            "{err}"
        );
    }
}
