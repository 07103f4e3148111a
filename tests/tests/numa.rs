//! Guest NUMA on emulated nodes (these hosts have one node): hint faults through the
//! fault path, placement by the balancer, and page moves that lose no write.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use tests::peers::{run_until, RUN_BOUND};
use tests::{have_kvm, run};

const COMMON: [&str; 8] = [
    "run",
    "--json",
    "--console",
    "off",
    "--memory",
    "64M",
    "--vcpus",
    "2",
];

/// Runs a 2-vCPU 64 MiB guest with `extra` until `done` holds for its `vm.info` (`numa`
/// there is the NUMA report as far as it goes), then ends it.
fn numa_run_until(
    extra: &[&str],
    what: &str,
    done: impl FnMut(&serde_json::Value) -> bool,
) -> tests::Run {
    let mut args = COMMON.to_vec();
    args.extend(["--duration", RUN_BOUND]);
    args.extend(extra);
    let r = run_until(&args, what, done);
    assert_eq!(r.code(), 0, "{extra:?}: stderr:\n{}", r.stderr());
    r
}

fn numa_run(extra: &[&str]) -> tests::Run {
    let mut args = COMMON.to_vec();
    args.extend(extra);
    let r = run(&args);
    assert_eq!(r.code(), 0, "{extra:?}: stderr:\n{}", r.stderr());
    r
}

#[test]
fn numa02_placed_wrong_converges_to_local() {
    if !have_kvm() {
        return;
    }
    let r = numa_run_until(
        &[
            "--workload",
            "numa02",
            "--numa",
            "nodes=2",
            "--numa-scan",
            "window=64M,period=20ms",
        ],
        "numa02 converging to 95 % locality",
        |info| {
            let n = &info["numa"];
            n["time_to_95_ms"].is_number() && n["locality_pct"].as_f64() >= Some(95.0)
        },
    );
    let j = r.json();
    let n = &j["numa"];
    assert_eq!(n["backend"], "emulated", "{j}");
    assert!(
        n["note"].as_str().unwrap().contains("emulated"),
        "the emulated backend is said: {j}"
    );
    assert_eq!(n["vcpu_nodes"], serde_json::json!([0, 1]));
    // The guest learned its nodes (it reports them in its mailbox slots).
    let guest_nodes: Vec<u64> = j["per_vcpu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["node"].as_u64().unwrap())
        .collect();
    assert_eq!(guest_nodes, vec![0, 1], "{j}");
    // Everything starts on the wrong node.
    let series = n["locality_over_time"].as_array().unwrap();
    assert!(
        series[0][1].as_f64().unwrap() < 5.0,
        "starts remote: {series:?}"
    );
    let locality = j["locality_pct"].as_f64().unwrap();
    assert!(
        locality >= 95.0,
        "numa02 converges to >= 95% locality, got {locality}: {j}"
    );
    assert!(n["time_to_95_ms"].as_f64().is_some(), "{j}");
    assert!(
        r.u64("numa_hint_faults") > 0 && r.u64("numa_pages_migrated") > 0,
        "{j}"
    );
    assert!(r.u64("numa_hint_faults_local") <= r.u64("numa_hint_faults"));
    assert_eq!(r.u64("integrity_errors"), 0);
}

#[test]
fn numa01_shared_buffer_does_not_ping_pong() {
    if !have_kvm() {
        return;
    }
    let r = numa_run_until(
        &[
            "--workload",
            "numa01",
            "--numa",
            "nodes=2",
            "--numa-scan",
            "window=64M,period=20ms",
        ],
        "more than 20 NUMA scans",
        |info| info["numa"]["scans"].as_u64() > Some(20),
    );
    let j = r.json();
    // 32 regions of 2 MiB in all; a shared region may move at most once before both
    // nodes' faults mark it shared, so migrations stay well below one per region per scan.
    let regions_moved = r.u64("numa_pages_migrated") / 512;
    let scans = j["numa"]["scans"].as_u64().unwrap();
    assert!(scans > 20, "the scanner ran: {j}");
    assert!(
        regions_moved <= 64,
        "bounded migrations, got {regions_moved} region moves over {scans} scans: {j}"
    );
    assert!(r.u64("numa_hint_faults") > 0, "{j}");
}

#[test]
fn verify_with_balancing_and_forced_moves_loses_nothing() {
    if !have_kvm() {
        return;
    }
    for extra in [["--numa-balancing", "on"], ["--numa-balancing", "off"]] {
        let mut a = vec![
            "--workload",
            "verify",
            "--numa",
            "nodes=2",
            "--numa-scan",
            "window=64M,period=10ms",
            "--numa-force-move",
            "2ms",
        ];
        a.extend(extra);
        let r = numa_run_until(&a, "over 100 region moves and 2 passes", |info| {
            info["numa"]["numa_pages_migrated"].as_u64().unwrap_or(0) / 512 > 100
                && info["passes"].as_u64() >= Some(2)
        });
        let j = r.json();
        assert_eq!(r.u64("integrity_errors"), 0, "{j}");
        assert!(
            r.u64("numa_pages_migrated") / 512 > 100,
            "many moves happened: {j}"
        );
        assert_eq!(r.u64("numa_migrate_failures"), 0, "{j}");
        assert!(r.u64("passes") >= 2, "{j}");
    }
}

#[test]
fn numa01_thread_alloc_starts_interleaved() {
    if !have_kvm() {
        return;
    }
    let r = numa_run(&[
        "--workload",
        "numa01_thread_alloc",
        "--passes",
        "1",
        "--numa",
        "nodes=2",
        "--numa-balancing",
        "off",
    ]);
    let j = r.json();
    let series = j["numa"]["locality_over_time"].as_array().unwrap();
    let first = series[0][1].as_f64().unwrap();
    assert!(
        (40.0..=60.0).contains(&first),
        "interleaved: about half local at start, got {first}: {j}"
    );
    assert_eq!(
        r.u64("numa_pages_migrated"),
        0,
        "balancing off: nothing moves after placement: {j}"
    );
}

#[test]
fn numa_options_are_checked() {
    if !have_kvm() {
        return;
    }
    // The host backend on a one-node host: node 0 works, node 1 is a clear error.
    let r = numa_run(&["--workload", "touch", "--numa", "nodes=1,backend=host"]);
    assert_eq!(r.json()["numa"]["backend"], "host");
    for (args, needle) in [
        (vec!["--numa", "nodes=2,backend=host"], "no host node"),
        (vec!["--numa", "nodes=2", "--backing", "anon"], "shmem"),
        (
            vec!["--numa", "nodes=1", "--backing", "anon"],
            "file-backed",
        ),
        (
            vec!["--numa", "nodes=2", "--backing", "hugetlb-2m"],
            "shmem",
        ),
        (vec!["--numa", "nodes=2,cpus=0:0"], "two nodes"),
        (vec!["--numa", "nodes=0"], "nodes"),
        (vec!["--numa-scan", "speed=3"], "speed"),
    ] {
        let mut a = vec!["run", "--console", "off", "--memory", "64M", "--vcpus", "2"];
        a.extend(args.iter().copied());
        let r = run(&a);
        assert_eq!(r.code(), 1, "{args:?}: {}", r.stderr());
        assert!(
            r.stderr().contains(needle) && r.stderr().lines().count() == 1,
            "{args:?}: {}",
            r.stderr()
        );
    }
}
