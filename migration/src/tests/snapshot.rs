//! Snapshots against fake VMs: a save and both restores give back the same bytes, the
//! hot set goes first in a lazy restore, zero pages are holes, and every kind of damage
//! is refused — a damaged page never reaches guest memory.

use std::path::PathBuf;

use super::fakes::{FakeDestination, FakeRam};
use super::MIB;
use crate::host::VmState;
use crate::snapshot::{self, HotSet, RestoreMode, Snapshot, SnapshotError};
use crate::PageBitmap;
use guest_mm::SIZE_4K;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hv-snap-unit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Saves a patterned 2 MiB guest (every other page zero) with pages 100..104 hot.
fn saved(name: &str) -> (PathBuf, Vec<u8>) {
    let ram = FakeRam::new(2 * MIB, SIZE_4K, "shmem");
    ram.fill_pattern(7);
    let mut hot = PageBitmap::empty(512);
    for p in 100..104 {
        hot.set(p);
    }
    let d = dir(name);
    let state = VmState(serde_json::json!({"vcpus": ["a"]}));
    let r = snapshot::save(
        &d,
        &ram,
        1,
        state,
        HotSet {
            pages: hot,
            period_ms: 5,
        },
    )
    .unwrap();
    assert_eq!(r.data_pages, 256, "zero pages are not written");
    assert_eq!(r.hot_pages, 4);
    (d, ram.snapshot())
}

#[test]
fn copy_and_lazy_restores_give_back_the_bytes_saved() {
    let (d, bytes) = saved("roundtrip");
    let snap = Snapshot::open(&d).unwrap();
    assert_eq!(snap.state.hot_set, vec![(100, 104)]);
    assert!(
        snap.memory.is_hole(1) && !snap.memory.is_hole(0),
        "zero pages are holes"
    );
    for mode in [RestoreMode::Copy, RestoreMode::Lazy] {
        let vm = FakeDestination::new(2 * MIB, SIZE_4K, "shmem");
        let report = snapshot::restore(&snap, mode, &vm).unwrap();
        assert_eq!(vm.ram.snapshot(), bytes, "{mode:?}");
        assert_eq!(report.mode, mode.name());
        assert_eq!(
            vm.restored.lock().unwrap().clone().unwrap().0["vcpus"][0],
            "a"
        );
        if mode == RestoreMode::Lazy {
            // The hot set first, then every other page once.
            let installs = vm.ram.installs.lock().unwrap().clone();
            assert_eq!(&installs[..4], &[100, 101, 102, 103]);
            assert_eq!(installs.len(), 512);
            assert_eq!(report.pages_pushed, 512);
            assert_eq!(
                vm.calls(),
                [
                    "restore",
                    "begin_postcopy",
                    "start",
                    "resumed_after_migration",
                    "end_postcopy"
                ]
            );
        } else {
            assert_eq!(vm.calls(), ["restore", "start", "resumed_after_migration"]);
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_changed_page_is_never_installed() {
    let (d, _) = saved("changed");
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory"))
        .unwrap();
    // Page 10 was data; page 11 was a hole and now holds a byte.
    f.write_all_at(&[0xee], 10 * SIZE_4K + 5).unwrap();
    f.write_all_at(&[0xee], 11 * SIZE_4K).unwrap();
    let snap = Snapshot::open(&d).unwrap();
    let vm = FakeDestination::new(2 * MIB, SIZE_4K, "shmem");
    let e = snapshot::restore(&snap, RestoreMode::Copy, &vm).unwrap_err();
    assert!(
        matches!(e, SnapshotError::PageChecksum { gpa, .. } if gpa.0 == 10 * SIZE_4K),
        "{e}"
    );
    assert!(vm.calls().is_empty(), "nothing restored: {:?}", vm.calls());
    let vm = FakeDestination::new(2 * MIB, SIZE_4K, "shmem");
    let e = snapshot::restore(&snap, RestoreMode::Lazy, &vm).unwrap_err();
    let SnapshotError::AfterStart { source } = &e else {
        panic!("{e}")
    };
    assert!(
        matches!(**source, SnapshotError::PageChecksum { .. }),
        "{e}"
    );
    assert!(
        !vm.ram.installs.lock().unwrap().contains(&10),
        "the changed page stayed absent"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn damaged_or_foreign_snapshots_are_refused_naming_the_problem() {
    let (d, _) = saved("damaged");
    let state = d.join("state");
    let good = std::fs::read(&state).unwrap();
    let refused = |bytes: &[u8]| {
        std::fs::write(&state, bytes).unwrap();
        Snapshot::open(&d).err().unwrap().to_string()
    };
    let mut v = good.clone();
    v[8] = 9;
    assert!(refused(&v).contains("format version 9"));
    let mut c = good.clone();
    let last = c.len() - 1;
    c[last] ^= 1;
    assert!(refused(&c).contains("checksum mismatch"));
    assert!(refused(&good[..good.len() / 2]).contains("truncated"));
    assert!(refused(&good[..10]).contains("truncated"));
    assert!(refused(b"not a snapshot at all, really").contains("bad magic"));
    std::fs::write(&state, &good).unwrap();
    let snap = Snapshot::open(&d).unwrap();
    let target = |memory_bytes, backing, vcpus| snapshot::Target {
        memory_bytes,
        page_size: SIZE_4K,
        backing,
        vcpus,
    };
    assert!(snap.check_target(&target(2 * MIB, "shmem", 1)).is_ok());
    let e = snap
        .check_target(&target(4 * MIB, "anon", 2))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("memory 2097152") && e.contains("backing shmem") && e.contains("1 vCPUs"),
        "{e}"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let e = Snapshot::open(&d).err().unwrap().to_string();
    assert!(e.contains("memory file is 1048576 bytes"), "{e}");
    let e = Snapshot::open(&dir("absent")).err().unwrap().to_string();
    assert!(e.contains("no such file"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
