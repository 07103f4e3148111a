//! Collapse of guest RAM into 2 MiB huge pages, measured by the kernel (smaps of the
//! guest view), on a post-copy destination, a pre-copy destination and in steady state.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use tests::peers::{
    end_run, finish, incoming_settled, migrate, run_until, scratch, start_pair, wait_until, Pair,
    RUN_BOUND,
};
use tests::{have_hugetlb, have_kvm, run};

/// Migrates a `verify` guest of `memory` by `mode` to a destination started with
/// `dst_extra`; returns the destination's run JSON. The destination is ended (vm.shutdown)
/// only once the migration has fully arrived — post-copy has every page — and its
/// collapse engine is idle: what the test measures is then over, however slowly a busy
/// host got there (`--duration` is only a bound).
fn migrate_verify(name: &str, memory: &str, mode: &str, dst_extra: &[&str]) -> serde_json::Value {
    let dir = scratch(name);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let api = dir.join("api.sock");
    let common = [
        "run",
        "--memory",
        memory,
        "--backing",
        "shmem",
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ];
    let Pair {
        mut dst,
        src,
        dst_api,
    } = start_pair(&common, &uri, &api, dst_extra, &[]);
    let (code, report, err) = migrate(&api, &uri, &["--mode", mode]);
    assert_eq!(code, 0, "{name}: migrate failed: {err}");
    assert_eq!(report["mode"], mode);
    let (scode, _, serr) = finish(src);
    assert_eq!(scode, 0, "{name}: source: {serr}");
    wait_until(
        &mut dst,
        &dst_api,
        &format!("{name}: the migration's complete arrival with the collapse engine idle"),
        incoming_settled,
    );
    end_run(&dst_api);
    let (dcode, dj, derr) = finish(dst);
    assert_eq!(dcode, 0, "{name}: destination: {derr}");
    assert_eq!(dj["integrity_errors"], 0, "{name}: {dj}");
    let _ = std::fs::remove_dir_all(dir);
    dj
}

fn pmd_fraction(j: &serde_json::Value) -> f64 {
    j["pmd_mapped_bytes"].as_u64().unwrap() as f64 / j["memory_bytes"].as_u64().unwrap() as f64
}

/// The bar: post-copy of a 1 GiB shmem guest ends ≥ 95 % PMD-mapped by the
/// kernel's count, with zero integrity errors; with --collapse off, near 0 %.
#[test]
fn postcopy_destination_ends_pmd_mapped_and_off_ends_near_zero() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    let on = migrate_verify("collapse-on", "1G", "postcopy", &[]);
    assert!(
        on["incoming"]["postcopy_ms"].as_f64().is_some(),
        "post-copy completed before the run ended: {on}"
    );
    let frac = pmd_fraction(&on);
    assert!(
        frac >= 0.95,
        "on-fill: {:.1} % PMD-mapped: {on}",
        frac * 100.0
    );
    assert!(on["collapses"].as_u64().unwrap() >= 486, "{on}");
    assert_eq!(on["collapse"]["mode"], "on-fill");
    assert!(on["collapse_ms_total"].as_f64().unwrap() > 0.0);

    let off = migrate_verify("collapse-off", "1G", "postcopy", &["--collapse", "off"]);
    let frac = pmd_fraction(&off);
    assert!(frac <= 0.05, "off: {:.1} % PMD-mapped: {off}", frac * 100.0);
    assert_eq!(off["collapses"], 0);
    assert!(off["collapse"].is_null(), "{off}");
}

/// Pre-copy completes every region before the switch: the destination collapses them all
/// when it resumes.
#[test]
fn precopy_destination_collapses_every_region_on_resume() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    let j = migrate_verify("collapse-precopy", "128M", "precopy", &[]);
    let frac = pmd_fraction(&j);
    assert!(frac >= 0.95, "{:.1} % PMD-mapped: {j}", frac * 100.0);
}

/// Without a migration, the background scanner collapses populated regions of a running
/// guest, within its budget, and chooses PMD order for full regions.
#[test]
fn background_scan_collapses_a_running_guest() {
    if !have_kvm() {
        return;
    }
    // The guest runs until the scan has covered every region after the guest populated
    // it: once each vCPU finished its first pass (all its pages touched), two more sweeps
    // (the one under way may have passed some regions already), and no retry pending.
    let mut populated_at_sweep = None;
    let r = run_until(
        &[
            "run",
            "--json",
            "--console",
            "off",
            "--memory",
            "128M",
            "--backing",
            "shmem",
            "--vcpus",
            "2",
            "--workload",
            "verify",
            "--duration",
            RUN_BOUND,
            "--collapse",
            "background",
            "--collapse-scan",
            "pages=8192,period=50,rate=100,max-ptes-none=64",
        ],
        "two background-scan sweeps over every region after the first pass, the engine idle",
        |info| {
            let sweeps = info["collapse"]["scan_sweeps"].as_u64().unwrap_or(0);
            let first_pass_done = info["per_vcpu_passes"]
                .as_array()
                .is_some_and(|p| !p.is_empty() && p.iter().all(|n| n.as_u64() >= Some(1)));
            if first_pass_done && populated_at_sweep.is_none() {
                populated_at_sweep = Some(sweeps);
            }
            populated_at_sweep.is_some_and(|s0| sweeps >= s0 + 2)
                && info["collapse"]["idle"] == true
        },
    );
    let j = r.json();
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(j["integrity_errors"], 0, "{j}");
    let frac = pmd_fraction(j);
    assert!(frac >= 0.9, "{:.1} % PMD-mapped: {j}", frac * 100.0);
    assert_eq!(j["collapse"]["mode"], "background");
    assert!(
        j["collapse"]["orders_chosen"]["9"].as_u64().unwrap() >= 58,
        "{j}"
    );
    assert!(j["collapse"]["regions_scanned"].as_u64().unwrap() > 0);

    // The default (on-fill) leaves a guest that never migrated alone.
    let r = run(&[
        "run",
        "--json",
        "--console",
        "off",
        "--memory",
        "64M",
        "--backing",
        "shmem",
        "--workload",
        "verify",
        "--duration",
        "1s",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.json()["pmd_mapped_bytes"], 0);
}

/// hugetlb is huge by construction: `pmd_mapped_bytes` counts its mapped hugetlb pages
/// (smaps' Shared_Hugetlb/Private_Hugetlb; the PMD fields are 0 for hugetlb). A `touch`
/// guest writes every data page, so at least the data area is mapped huge.
#[test]
fn hugetlb_2m_guest_ram_counts_as_huge_mapped() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    if !have_hugetlb(2048, 16) {
        return;
    }
    let r = run(&[
        "run",
        "--json",
        "--console",
        "off",
        "--memory",
        "32M",
        "--backing",
        "hugetlb-2m",
        "--workload",
        "touch",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let j = r.json();
    let huge = r.u64("pmd_mapped_bytes");
    let memory = r.u64("memory_bytes");
    assert!(huge > 0, "hugetlb is huge-mapped: {j}");
    assert!(
        huge >= memory - (4 << 20) && huge <= memory,
        "every touched data page is in a mapped 2 MiB hugetlb page: {j}"
    );
    assert!(
        j["collapse"].is_null(),
        "nothing to collapse on hugetlb: {j}"
    );
}

#[test]
fn collapse_flags_are_checked() {
    let r = run(&["run", "--collapse", "sometimes"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("off, on-fill, background"),
        "{}",
        r.stderr()
    );
    let r = run(&["run", "--collapse-scan", "max-ptes-none=600"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("max-ptes-none must be 0..=511"),
        "{}",
        r.stderr()
    );
    if !have_kvm() {
        return;
    }
    let r = run(&[
        "run",
        "--backing",
        "anon",
        "--thp",
        "off",
        "--collapse",
        "background",
        "--memory",
        "64M",
    ]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("--thp on or --backing shmem"),
        "{}",
        r.stderr()
    );
}
