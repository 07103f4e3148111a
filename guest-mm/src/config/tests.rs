//! Tests of configuration checks: shapes, host resources on a fake /proc + /sys tree,
//! and the combinations that cannot work.

use super::*;
use crate::ram::GuestRam;
use crate::Recurring;

fn cfg(size: u64, backing: BackingKind) -> RamConfig {
    RamConfig {
        size,
        backing,
        ..Default::default()
    }
}

#[test]
fn shape_errors() {
    assert!(matches!(
        cfg(4 << 20, BackingKind::Shmem).check_shape(),
        Err(Error::TooSmall { .. })
    ));
    assert!(matches!(
        cfg(128 << 30, BackingKind::Shmem).check_shape(),
        Err(Error::TooLarge { .. })
    ));
    let e = cfg(512 << 20, BackingKind::Hugetlb1G)
        .check_shape()
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 GiB"), "{e}");
    let e = cfg((16 << 20) + 4096, BackingKind::Hugetlb2M)
        .check_shape()
        .unwrap_err()
        .to_string();
    assert!(e.contains("16 MiB") && e.contains("18 MiB"), "{e}");
    assert_eq!(
        "hugetlb-2m".parse::<BackingKind>().unwrap(),
        BackingKind::Hugetlb2M
    );
    assert!("tmpfs"
        .parse::<BackingKind>()
        .unwrap_err()
        .to_string()
        .contains("shmem"));
}

/// A fake /proc + /sys tree in a fresh temporary directory, removed on drop.
struct FakeHost {
    root: std::path::PathBuf,
    paths: HostPaths,
}

impl FakeHost {
    fn new() -> FakeHost {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("guest-mm-fake-host-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::create_dir_all(root.join("sys/kernel/mm/hugepages")).unwrap();
        let paths = HostPaths {
            proc_root: root.join("proc"),
            sys_root: root.join("sys"),
        };
        FakeHost { root, paths }
    }

    fn pool(self, kib: u64, nr: u64, free: u64, resv: u64) -> FakeHost {
        let dir = self
            .paths
            .sys_root
            .join(format!("kernel/mm/hugepages/hugepages-{kib}kB"));
        std::fs::create_dir_all(&dir).unwrap();
        for (f, v) in [
            ("nr_hugepages", nr),
            ("free_hugepages", free),
            ("resv_hugepages", resv),
            ("surplus_hugepages", 0),
        ] {
            std::fs::write(dir.join(f), format!("{v}\n")).unwrap();
        }
        self
    }

    fn mem_available_kib(self, kib: u64) -> FakeHost {
        std::fs::write(
            self.paths.proc_root.join("meminfo"),
            format!("MemTotal:       25165824 kB\nMemFree: 1 kB\nMemAvailable:   {kib} kB\n"),
        )
        .unwrap();
        self
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn pool_too_small_names_the_fix() {
    let fake = FakeHost::new()
        .pool(2048, 10, 10, 0)
        .mem_available_kib(1 << 30);
    let c = RamConfig {
        size: 64 << 20,
        backing: BackingKind::Hugetlb2M,
        host: fake.paths.clone(),
        ..Default::default()
    };
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("echo 32 > ") && e.contains("hugepages-2048kB/nr_hugepages"),
        "{e}"
    );
    assert!(e.contains("10 free") && e.contains("32 are needed"), "{e}");
    // Nothing is created when validation fails.
    assert!(matches!(
        GuestRam::create(&c),
        Err(Error::HugetlbPoolTooSmall { .. })
    ));
    let c1g = RamConfig {
        backing: BackingKind::Hugetlb1G,
        size: 1 << 30,
        ..c
    };
    let e = c1g.validate().unwrap_err().to_string();
    assert!(
        e.contains("no 1 GiB hugetlb pool") && e.contains("hugepagesz=1G"),
        "{e}"
    );
}

#[test]
fn reserved_hugetlb_pages_are_not_available() {
    // 40 free but 20 of them promised to existing mappings: 20 usable, 12 short.
    let fake = FakeHost::new().pool(2048, 50, 40, 20);
    let c = RamConfig {
        size: 64 << 20,
        backing: BackingKind::Hugetlb2M,
        host: fake.paths.clone(),
        ..Default::default()
    };
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("echo 62 > ") && e.contains("20 free"), "{e}");
    let ok = RamConfig {
        size: 40 << 20,
        ..c
    };
    ok.validate().unwrap();
}

#[test]
fn more_than_mem_available_is_refused() {
    let fake = FakeHost::new().mem_available_kib(100 << 10);
    let c = RamConfig {
        size: 1 << 30,
        backing: BackingKind::Shmem,
        host: fake.paths.clone(),
        ..Default::default()
    };
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("MemAvailable") && e.contains("100 MiB"), "{e}");
    assert!(matches!(
        GuestRam::create(&c),
        Err(Error::NotEnoughMemory { .. })
    ));
    let anon = RamConfig {
        backing: BackingKind::Anon,
        ..c.clone()
    };
    assert!(matches!(
        anon.validate(),
        Err(Error::NotEnoughMemory { .. })
    ));
    let fits = RamConfig {
        size: 64 << 20,
        ..c
    };
    fits.validate().unwrap();
}

#[test]
fn thp_applies_to_anon_only() {
    for backing in [
        BackingKind::Shmem,
        BackingKind::Hugetlb2M,
        BackingKind::Hugetlb1G,
    ] {
        let c = RamConfig {
            size: 1 << 30,
            backing,
            thp: ThpMode::Madvise,
            ..Default::default()
        };
        let e = c.check_shape().unwrap_err().to_string();
        assert!(e.contains("--thp applies to the anon backing only"), "{e}");
    }
}

#[test]
fn zero_and_unaligned_sizes() {
    let e = cfg(0, BackingKind::Anon)
        .check_shape()
        .unwrap_err()
        .to_string();
    assert!(e.contains("too small") && e.contains("8 MiB"), "{e}");
    let e = cfg(512 << 20, BackingKind::Hugetlb1G)
        .check_shape()
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("use 1 GiB"), "{e}");
    let e = cfg((16 << 20) + 1, BackingKind::Shmem)
        .check_shape()
        .unwrap_err()
        .to_string();
    assert!(e.contains("use 16 MiB or 16388 KiB"), "{e}");
    let e = cfg(64 << 30, BackingKind::Hugetlb1G).check_shape();
    assert!(e.is_ok(), "64 GiB is the largest size and allowed");
}

#[test]
fn combinations_that_cannot_work_are_refused_before_anything_exists() {
    let shmem = MemoryConfig {
        ram: cfg(64 << 20, BackingKind::Shmem),
        vcpus: 2,
        ..Default::default()
    };
    shmem.check().unwrap();
    let anon = MemoryConfig {
        ram: cfg(64 << 20, BackingKind::Anon),
        ..shmem.clone()
    };
    let background = CollapseConfig {
        mode: CollapseMode::Background,
        ..Default::default()
    };
    let e = MemoryConfig {
        collapse: background,
        ..anon.clone()
    }
    .check()
    .unwrap_err()
    .to_string();
    assert!(e.contains("--thp on or --backing shmem"), "{e}");
    let numa = NumaConfig {
        balancing: Balancing::On,
        vcpu_nodes: vec![0, 0],
        working_sets: vec![GpaRange::default(); 2],
        ..Default::default()
    };
    let e = MemoryConfig {
        collapse: background,
        numa: Some(numa.clone()),
        ..shmem.clone()
    }
    .check()
    .unwrap_err()
    .to_string();
    assert!(e.contains("--collapse on-fill"), "{e}");
    // Balancing off, nothing moves while the guest runs: background collapse is fine.
    let still = NumaConfig {
        balancing: Balancing::Off,
        ..numa.clone()
    };
    MemoryConfig {
        collapse: background,
        numa: Some(still),
        ..shmem.clone()
    }
    .check()
    .unwrap();
    let e = MemoryConfig {
        numa: Some(numa.clone()),
        ..anon.clone()
    }
    .check()
    .unwrap_err()
    .to_string();
    assert!(e.contains("file-backed"), "{e}");
    let e = MemoryConfig {
        stress_zap: Some(Recurring {
            period: Duration::from_millis(1),
            seed: 1,
        }),
        ..anon
    }
    .check()
    .unwrap_err()
    .to_string();
    assert!(e.contains("anon"), "{e}");
    let e = MemoryConfig {
        numa: Some(NumaConfig {
            vcpu_nodes: vec![0],
            ..numa
        }),
        ..shmem.clone()
    }
    .check()
    .unwrap_err()
    .to_string();
    assert!(e.contains("1 entries for 2 vCPUs"), "{e}");
}

#[test]
fn what_needs_faults_and_collapse() {
    let mut c = MemoryConfig {
        ram: cfg(64 << 20, BackingKind::Shmem),
        vcpus: 1,
        ..Default::default()
    };
    assert!(!c.needs_minor_faults());
    assert!(!c.collapse_has_work(), "on-fill needs a migration");
    c.origin = GuestOrigin::MigrationDestination;
    assert!(c.collapse_has_work());
    c.ram.backing = BackingKind::Hugetlb2M;
    assert!(!c.collapse_has_work(), "hugetlb is huge already");
    c.fault_path = FaultPathNeed::Minor;
    assert!(c.needs_minor_faults());
}
