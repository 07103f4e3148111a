//! Snapshots and restores with the real binary: a 2-vCPU `verify` guest snapshotted
//! mid-run (`hugevisor snapshot` through its API) and restored `copy` and `lazy` on
//! shmem, hugetlb-2m and hugetlb-1g, continuing with no integrity error (a copy restore
//! also checks the memory hash before the guest starts; a lazy one checks every page's
//! checksum before the guest sees it); a 1 GiB lazy shmem restore that ends PMD-mapped;
//! and every kind of bad snapshot refused in one line.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use tests::peers::{
    finish, incoming_settled, run_until, scratch, spawn, wait_for, wait_for_passes, RUN_BOUND,
};
use tests::{have_hugetlb, have_kvm, heavy, hugevisor, run};

/// The guest a case snapshots and restores.
struct Guest<'a> {
    memory: &'a str,
    backing: &'a str,
    /// How the snapshotted run boots its guest (beyond the built-in image's fast path).
    boot: Vec<String>,
}

impl Guest<'_> {
    fn args(&self) -> Vec<String> {
        [
            "run",
            "--memory",
            self.memory,
            "--backing",
            self.backing,
            "--vcpus",
            "2",
            "--console",
            "off",
            "--json",
        ]
        .map(String::from)
        .to_vec()
    }
}

/// Runs a `verify` guest until it has made some passes, snapshots it into `dir` through
/// `hugevisor snapshot`, and stops it. Returns the snapshot report and the guest's
/// passes at its end.
fn snapshot_mid_run(g: &Guest, dir: &Path, scratch_dir: &Path) -> (Value, u64) {
    let api = scratch_dir.join("src.sock");
    let mut args = g.args();
    args.extend(g.boot.iter().cloned());
    args.extend(
        [
            "--workload",
            "verify",
            "--duration",
            RUN_BOUND,
            "--api-socket",
        ]
        .map(String::from),
    );
    args.push(api.display().to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn(&argv);
    wait_for(&api);
    // Two passes each: the guest writes its steady state when the snapshot is taken.
    wait_for_passes(&api, 4);
    let out = hugevisor()
        .args(["snapshot", "--api-socket"])
        .arg(&api)
        .arg("--to")
        .arg(dir)
        .args(["--then", "stop", "--hot-set-ms", "100", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "snapshot: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (code, sj, serr) = finish(child);
    assert_eq!(code, 0, "snapshotted run: {serr}");
    assert_eq!(sj["outcome"], "ok", "{sj}");
    assert_eq!(sj["integrity_errors"], 0, "{sj}");
    assert!(report["data_pages"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["hot_pages"].as_u64().unwrap() > 0,
        "a writing guest has a hot set: {report}"
    );
    assert!(dir.join("state").exists() && dir.join("memory").exists());
    (report, sj["passes"].as_u64().unwrap())
}

/// Restores `dir` with `mode` and runs until every page is in and the guest made more
/// passes; returns the run report.
fn restore(g: &Guest, dir: &Path, mode: &str, passes_before: u64) -> Value {
    let mut args = g.args();
    args.extend(["--duration", RUN_BOUND, "--restore-mode", mode, "--restore"].map(String::from));
    args.push(dir.display().to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_until(
        &argv,
        "the restored guest's passes after every page",
        |info| incoming_settled(info) && info["passes"].as_u64().unwrap_or(0) > passes_before + 4,
    );
    let what = format!("{mode} restore on {}", g.backing);
    assert_eq!(r.code(), 0, "{what}: {}", r.stderr());
    let j = r.json().clone();
    assert_eq!(j["outcome"], "ok", "{what}: {j}");
    assert_eq!(j["integrity_errors"], 0, "{what}: {j}");
    assert_eq!(j["workload"], "verify", "{what}");
    assert_eq!(j["incoming"]["mode"], mode, "{what}: {j}");
    assert!(
        j["entry"]
            .as_str()
            .unwrap()
            .contains("restored from a snapshot"),
        "{what}: {j}"
    );
    // The guest's own counters continued from the snapshot.
    assert!(j["passes"].as_u64().unwrap() > passes_before, "{what}: {j}");
    j
}

fn snapshot_and_restore(backing: &str, memory: &str) -> (Value, Value, Value) {
    let dir = scratch(&format!("snap-{backing}-{memory}"));
    let snap = dir.join("snap");
    let g = Guest {
        memory,
        backing,
        boot: Vec::new(),
    };
    let (report, passes) = snapshot_mid_run(&g, &snap, &dir);
    let copy = restore(&g, &snap, "copy", passes);
    let lazy = restore(&g, &snap, "lazy", passes);
    let pages = report["memory_bytes"].as_u64().unwrap() / report["page_size"].as_u64().unwrap();
    let inc = &lazy["incoming"];
    // Every page came in once, on demand or from the filler.
    assert_eq!(
        inc["pages_demand"].as_u64().unwrap() + inc["pages_pushed"].as_u64().unwrap(),
        pages,
        "{backing}: {inc}"
    );
    assert_eq!(
        copy["incoming"]["pages"], report["data_pages"],
        "{backing}: {copy}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    (report, copy, lazy)
}

#[test]
fn shmem_snapshot_restores_copy_and_lazy() {
    if !have_kvm() {
        return;
    }
    let _heavy = heavy();
    let (report, copy, lazy) = snapshot_and_restore("shmem", "64M");
    assert_eq!(report["page_size"], 4096);
    // Zero pages are holes: a 64 MiB guest holds fewer data pages than pages.
    assert!(report["data_pages"].as_u64().unwrap() < 16384, "{report}");
    assert!(copy["incoming"]["postcopy_ms"].is_null(), "{copy}");
    assert!(lazy["incoming"]["postcopy_ms"].as_f64().is_some(), "{lazy}");
}

#[test]
fn hugetlb_2m_snapshot_restores_copy_and_lazy() {
    if !have_kvm() || !have_hugetlb(2048, 32) {
        return;
    }
    let _heavy = heavy();
    let (report, _, _) = snapshot_and_restore("hugetlb-2m", "64M");
    assert_eq!(report["page_size"], 2 << 20);
}

#[test]
fn hugetlb_1g_snapshot_restores_copy_and_lazy() {
    if !have_kvm() || !have_hugetlb(1 << 20, 1) {
        return;
    }
    let _heavy = heavy();
    let (report, _, lazy) = snapshot_and_restore("hugetlb-1g", "1G");
    assert_eq!(report["page_size"], 1 << 30);
    // One backing page: the guest's first touch brought it in whole.
    assert_eq!(
        lazy["incoming"]["pages_demand"].as_u64().unwrap()
            + lazy["incoming"]["pages_pushed"].as_u64().unwrap(),
        1
    );
}

#[test]
fn lazy_shmem_restore_of_1g_ends_pmd_mapped() {
    if !have_kvm() {
        return;
    }
    let _heavy = heavy();
    let dir = scratch("snap-1g-pmd");
    let snap = dir.join("snap");
    let g = Guest {
        memory: "1G",
        backing: "shmem",
        boot: Vec::new(),
    };
    let (_, passes) = snapshot_mid_run(&g, &snap, &dir);
    let api = dir.join("dst.sock");
    let mut args = g.args();
    args.extend(
        [
            "--duration",
            RUN_BOUND,
            "--restore-mode",
            "lazy",
            "--api-socket",
        ]
        .map(String::from),
    );
    args.push(api.display().to_string());
    args.extend(["--restore".to_string(), snap.display().to_string()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = spawn(&argv);
    // While pages are still absent, a snapshot would read them from the page cache: refused.
    tests::peers::wait_until(&mut child, &api, "the lazy restore running", |i| {
        i["incoming"]["phase"] == "postcopy" && i["run_state"] == "running"
    });
    let body = serde_json::json!({ "destination_url": dir.join("again").display().to_string() });
    let a = tests::api::call(
        &api,
        tests::api::Method::Put,
        "/api/v1/vm.snapshot",
        Some(&body),
    )
    .unwrap();
    assert_eq!(a.status, 409, "{:?}", a.body);
    assert!(
        a.body["error"].as_str().unwrap().contains("still arriving"),
        "{:?}",
        a.body
    );
    // So would a live migration of it.
    let body =
        serde_json::json!({ "destination_url": format!("unix:{}", dir.join("m.sock").display()) });
    let a = tests::api::call(
        &api,
        tests::api::Method::Put,
        "/api/v1/vm.send-migration",
        Some(&body),
    )
    .unwrap();
    assert_eq!(a.status, 409, "{:?}", a.body);
    assert!(
        a.body["error"].as_str().unwrap().contains("still arriving"),
        "{:?}",
        a.body
    );
    tests::peers::wait_until(&mut child, &api, "every page in and more passes", |i| {
        incoming_settled(i) && i["passes"].as_u64().unwrap_or(0) > passes + 4
    });
    tests::peers::end_run(&api);
    let (code, lazy, err) = finish(child);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lazy["outcome"], "ok", "{lazy}");
    assert_eq!(lazy["integrity_errors"], 0, "{lazy}");
    let pmd = lazy["pmd_mapped_bytes"].as_u64().unwrap();
    assert!(
        pmd * 100 >= 95 * (1u64 << 30),
        "a lazy shmem restore collapses regions as they fill: {pmd} of 1 GiB PMD-mapped; {lazy}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_booted_by_pvh_snapshots_and_restores() {
    if !have_kvm() {
        return;
    }
    let _heavy = heavy();
    let dir = scratch("snap-pvh");
    let image = dir.join("image.elf");
    let r = run(&["guest-image", "--out", image.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let g = Guest {
        memory: "64M",
        backing: "shmem",
        boot: vec!["--kernel".into(), image.display().to_string()],
    };
    let snap = dir.join("snap");
    let (_, passes) = snapshot_mid_run(&g, &snap, &dir);
    for mode in ["copy", "lazy"] {
        let j = restore(&g, &snap, mode, passes);
        assert_eq!(j["entry"], "pvh (restored from a snapshot)", "{j}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small snapshot for the bad-input cases, taken by `--snapshot-at` (the run stops
/// right after it, whenever it lands).
fn small_snapshot(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(&format!("snap-bad-{name}"));
    let snap = dir.join("snap");
    let r = run(&[
        "run",
        "--memory",
        "32M",
        "--vcpus",
        "1",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
        "--snapshot-at",
        "200ms",
        "--to",
        snap.to_str().unwrap(),
        "--snapshot-then",
        "stop",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    (dir, snap)
}

/// Restores `snap` into a guest of `memory`/`backing`/`vcpus`; returns (exit, stderr).
fn restore_into(
    snap: &Path,
    memory: &str,
    backing: &str,
    vcpus: &str,
    mode: &str,
) -> (i32, String) {
    let r = run(&[
        "run",
        "--memory",
        memory,
        "--backing",
        backing,
        "--vcpus",
        vcpus,
        "--duration",
        "1s",
        "--console",
        "off",
        "--json",
        "--restore",
        snap.to_str().unwrap(),
        "--restore-mode",
        mode,
    ]);
    (r.code(), r.stderr())
}

fn refused(snap: &Path, memory: &str, backing: &str, vcpus: &str, mode: &str, says: &[&str]) {
    let (code, err) = restore_into(snap, memory, backing, vcpus, mode);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for s in says {
        assert!(err.contains(s), "{s:?} not in: {err}");
    }
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["state", "memory"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn bad_snapshots_are_refused_in_one_line_before_the_guest_runs() {
    if !have_kvm() {
        return;
    }
    let (dir, snap) = small_snapshot("state");
    refused(
        &dir.join("none"),
        "32M",
        "shmem",
        "1",
        "copy",
        &["no such file"],
    );
    // The state file: truncated, corrupted, another format version.
    let t = dir.join("truncated");
    copy_snapshot(&snap, &t);
    let state = t.join("state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    refused(&t, "32M", "shmem", "1", "copy", &["truncated"]);
    let c = dir.join("corrupted");
    copy_snapshot(&snap, &c);
    flip_byte(&c.join("state"), len / 2);
    refused(
        &c,
        "32M",
        "shmem",
        "1",
        "lazy",
        &["checksum mismatch", "corrupted"],
    );
    let v = dir.join("version");
    copy_snapshot(&snap, &v);
    flip_byte(&v.join("state"), 9);
    refused(
        &v,
        "32M",
        "shmem",
        "1",
        "copy",
        &["format version", "reads version 1"],
    );
    // Another guest: memory size, backing, vCPUs (refused before any pool is touched).
    refused(
        &snap,
        "64M",
        "shmem",
        "1",
        "copy",
        &["memory 33554432 bytes", "--memory"],
    );
    refused(&snap, "32M", "hugetlb-2m", "1", "lazy", &["backing shmem"]);
    refused(&snap, "32M", "shmem", "2", "copy", &["1 vCPUs"]);
    // Lazy restores fill pages through a second view: anon RAM has none.
    refused(
        &snap,
        "32M",
        "anon",
        "1",
        "lazy",
        &["needs file-backed RAM", "copy"],
    );
    // The memory file cut short.
    let m = dir.join("memory-truncated");
    copy_snapshot(&snap, &m);
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("memory"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    refused(
        &m,
        "32M",
        "shmem",
        "1",
        "copy",
        &["memory file is 16777216 bytes"],
    );
    // A good snapshot still restores after all that.
    let (code, err) = restore_into(&snap, "32M", "shmem", "1", "copy");
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_memory_file_changed_under_a_restore_stops_it_naming_the_page() {
    if !have_kvm() {
        return;
    }
    let (dir, snap) = small_snapshot("memory");
    // A page of the data area (from 4 MiB) that the verify guest wrote.
    let changed = 8u64 << 20;
    flip_byte(&snap.join("memory"), changed);
    for mode in ["copy", "lazy"] {
        let (code, err) = restore_into(&snap, "32M", "shmem", "1", mode);
        assert_eq!(code, 1, "{mode}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{mode}: one line: {err}");
        assert!(
            err.contains("GPA 0x800000") && err.contains("memory file changed"),
            "{mode}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_paused_guest_is_snapshotted_at_once_and_stays_paused() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("snap-paused");
    let (api, snap) = (dir.join("api.sock"), dir.join("snap"));
    let child = spawn(&[
        "run",
        "--memory",
        "32M",
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    wait_for(&api);
    wait_for_passes(&api, 4);
    // Cloud Hypervisor's order: pause, snapshot, resume.
    tests::api::pause(&api).unwrap();
    let out = hugevisor()
        .args([
            "snapshot",
            "--json",
            "--api-socket",
            api.to_str().unwrap(),
            "--to",
        ])
        .arg(&snap)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["hot_pages"], 0,
        "a paused guest writes nothing: {report}"
    );
    assert_eq!(tests::peers::vm_info(&api)["run_state"], "paused");
    tests::api::resume(&api).unwrap();
    tests::peers::end_run(&api);
    let (code, j, err) = finish(child);
    assert_eq!((code, &j["outcome"]), (0, &Value::from("ok")), "{err} {j}");
    let (code, err) = restore_into(&snap, "32M", "shmem", "2", "lazy");
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
