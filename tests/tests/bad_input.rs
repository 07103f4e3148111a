//! Bad input: a one-line error naming the problem, non-zero exit, nothing left behind.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use tests::{have_kvm, hugetlb_free_pages, run};

fn assert_one_line_error(args: &[&str], needle: &str) {
    let r = run(args);
    assert_eq!(
        r.code(),
        1,
        "{args:?}: expected exit 1, got {}\nstderr:\n{}",
        r.code(),
        r.stderr()
    );
    let err = r.stderr();
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.iter().any(|l| l.contains(needle)),
        "{args:?}: stderr should mention {needle:?}:\n{err}"
    );
    let error_lines = lines
        .iter()
        .filter(|l| l.starts_with("hugevisor: error") || l.starts_with("error:"))
        .count();
    assert_eq!(error_lines, 1, "{args:?}: exactly one error line:\n{err}");
    assert!(
        r.stdout().is_empty(),
        "{args:?}: nothing on stdout: {}",
        r.stdout()
    );
}

#[test]
fn bad_sizes_and_units() {
    for (size, needle) in [
        ("12Q", "12Q"),
        ("-5M", "-5M"),
        ("0", "0"),
        ("1.5G", "1.5G"),
        ("", "size"),
        ("99999999999999999999G", "99999999999999999999G"),
    ] {
        assert_one_line_error(&["run", "--memory", size], needle);
    }
    // Well-formed but unusable: not a multiple of 2 MiB, too small, bigger than the layout allows.
    if have_kvm() {
        assert_one_line_error(&["run", "--memory", "33M", "--console", "off"], "2 MiB");
        assert_one_line_error(&["run", "--memory", "4M", "--console", "off"], "8 MiB");
        assert_one_line_error(&["run", "--memory", "128G", "--console", "off"], "64 GiB");
    }
}

#[test]
fn unknown_backing_workload_and_flags() {
    assert_one_line_error(&["run", "--backing", "tmpfs"], "tmpfs");
    assert_one_line_error(&["run", "--workload", "nope"], "nope");
    assert_one_line_error(&["run", "--vcpus", "x"], "x");
    assert_one_line_error(&["run", "--duration", "5 parsecs"], "parsecs");
    assert_one_line_error(&["run", "--duration", "1s", "--passes", "3"], "--passes");
    assert_one_line_error(&["run", "--frobnicate"], "--frobnicate");
    if have_kvm() {
        assert_one_line_error(&["run", "--vcpus", "0", "--console", "off"], "vcpus");
        assert_one_line_error(&["run", "--vcpus", "65", "--console", "off"], "vcpus");
        assert_one_line_error(
            &[
                "run",
                "--backing",
                "shmem",
                "--thp",
                "on",
                "--console",
                "off",
            ],
            "anon",
        );
    }
}

#[test]
fn hugetlb_memory_must_be_page_aligned() {
    if !have_kvm() {
        return;
    }
    assert_one_line_error(
        &[
            "run",
            "--backing",
            "hugetlb-1g",
            "--memory",
            "512M",
            "--console",
            "off",
        ],
        "1 GiB",
    );
}

#[test]
fn hugetlb_pool_too_small_names_the_fix_and_leaves_the_pool_alone() {
    if !have_kvm() {
        return;
    }
    // Heavy: it checks that the host-wide pool is untouched, so no other test may take
    // pages from it meanwhile.
    let _heavy = tests::heavy();
    let before = hugetlb_free_pages(2048);
    // 62 GiB of 2 MiB pages is far more than any test pool.
    let r = run(&[
        "run",
        "--backing",
        "hugetlb-2m",
        "--memory",
        "62G",
        "--console",
        "off",
    ]);
    assert_eq!(r.code(), 1, "stderr:\n{}", r.stderr());
    let err = r.stderr();
    assert!(
        err.contains("nr_hugepages"),
        "the error names the fix: {err}"
    );
    assert!(
        err.contains("hugepages-2048kB"),
        "the error names the pool: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_eq!(hugetlb_free_pages(2048), before, "the pool is untouched");
}

#[test]
fn missing_kvm_device_is_detected_up_front() {
    let r = run(&["run", "--kvm-device", "/nonexistent/kvm", "--memory", "64M"]);
    assert_eq!(r.code(), 1, "stderr:\n{}", r.stderr());
    let err = r.stderr();
    assert!(
        err.contains("/nonexistent/kvm") && err.contains("KVM"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    // Checked before guest RAM is created: a hugetlb request that the pool cannot
    // satisfy still reports the missing KVM device, not the pool.
    let r = run(&[
        "run",
        "--kvm-device",
        "/nonexistent/kvm",
        "--backing",
        "hugetlb-2m",
        "--memory",
        "62G",
    ]);
    assert!(r.stderr().contains("/nonexistent/kvm"), "{}", r.stderr());
}
