//! Tests of guest RAM on this host: views, emulated NUMA moves, prefault, memfd names.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use super::*;
use crate::config::ThpMode;
use crate::host::HostPaths;
use vm_memory::Bytes;

fn env_is_1(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Whether the host's hugetlb pool of `page` bytes has `pages` pages a new mapping
/// can reserve. With HUGEVISOR_TEST_RESERVE=1 a short pool is grown (and left grown);
/// otherwise the caller skips, which panics under HUGEVISOR_REQUIRE_HOST=1.
fn pool_ok(page: u64, pages: u64) -> bool {
    let host = HostPaths::default();
    let available = |h: &HostPaths| h.hugetlb_pool(page).map(|p| p.available());
    if available(&host).is_some_and(|a| a >= pages) {
        return true;
    }
    if env_is_1("HUGEVISOR_TEST_RESERVE") {
        if let Some(pool) = host.hugetlb_pool(page) {
            let want = pool.nr + (pages - pool.available());
            let file = host.hugetlb_dir(page).join("nr_hugepages");
            if let Err(e) = std::fs::write(&file, format!("{want}\n")) {
                eprintln!("could not write {want} to {}: {e}", file.display());
            }
            if available(&host).is_some_and(|a| a >= pages) {
                eprintln!(
                    "reserved: {} hugetlb pool grown to {want} pages",
                    format_size(page)
                );
                return true;
            }
        }
    }
    let have = match available(&host) {
        Some(a) => format!("has {a} pages available, {pages} needed"),
        None => "does not exist on this host".to_string(),
    };
    let why = format!(
        "the {} hugetlb pool {have} (set HUGEVISOR_TEST_RESERVE=1 to let the test reserve them)",
        format_size(page)
    );
    assert!(
        !env_is_1("HUGEVISOR_REQUIRE_HOST"),
        "HUGEVISOR_REQUIRE_HOST=1: {why}"
    );
    eprintln!("SKIP: {why}");
    false
}

fn region(gpa: u64) -> GpaRange {
    GpaRange::new(Gpa(gpa), Gpa(gpa + SIZE_2M))
}

fn cfg(size: u64, backing: BackingKind) -> RamConfig {
    RamConfig {
        size,
        backing,
        ..Default::default()
    }
}

#[test]
fn staging_writes_are_seen_through_the_guest_view() {
    for (backing, size) in [
        (BackingKind::Shmem, 16 << 20),
        (BackingKind::Anon, 16 << 20),
        (BackingKind::Hugetlb2M, 16 << 20),
        (BackingKind::Hugetlb1G, 1 << 30),
    ] {
        if let Some(page) = backing.hugetlb_page() {
            if !pool_ok(page, size / page) {
                continue;
            }
        }
        let ram = GuestRam::create(&cfg(size, backing)).unwrap();
        assert_eq!(ram.size(), size);
        ram.staging()
            .write_obj(0xfeed_u64, GuestAddress(size - 8))
            .unwrap();
        // SAFETY: test: the guest view maps `size` bytes; reading the last u64.
        let v =
            unsafe { std::ptr::read_volatile((ram.guest_view_addr() + size - 8) as *const u64) };
        assert_eq!(v, 0xfeed, "{backing}");
        assert_eq!(
            ram.view_layout() == ViewLayout::SingleView,
            backing == BackingKind::Anon
        );
        assert_eq!(ram.memfd().is_some(), backing != BackingKind::Anon);
    }
}

#[test]
fn emulated_numa_move_keeps_content_and_frees_the_old_copy() {
    let c = RamConfig {
        size: 16 << 20,
        backing: BackingKind::Shmem,
        numa: NumaLayout {
            nodes: 2,
            backend: NodeBackendKind::Emulated,
            ..Default::default()
        },
        ..Default::default()
    };
    let ram = GuestRam::create(&c).unwrap();
    let gpa = 4 << 20;
    ram.staging()
        .write_obj(0xbeef_u64, GuestAddress(gpa + 4096))
        .unwrap();
    assert_eq!(ram.node_of(Gpa(gpa)), 0);
    ram.move_region(region(gpa), 1, MovedCache::Pages).unwrap();
    assert_eq!(ram.node_of(Gpa(gpa)), 1);
    assert_eq!(ram.node_of(Gpa(gpa + (2 << 20))), 0);
    assert_eq!(
        ram.staging()
            .read_obj::<u64>(GuestAddress(gpa + 4096))
            .unwrap(),
        0xbeef
    );
    // SAFETY: test: reading inside the 16 MiB guest view.
    let v = unsafe { std::ptr::read_volatile((ram.guest_view_addr() + gpa + 4096) as *const u64) };
    assert_eq!(v, 0xbeef, "the guest view follows the move");
    // The data now lives in node 1's memfd; node 0's copy is a hole.
    let node1 = ram.zone_fd(1).unwrap();
    let mut buf = [0u8; 8];
    // SAFETY: test: pread into a local buffer from our memfd.
    let n = unsafe {
        libc::pread(
            node1.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            8,
            (gpa + 4096) as i64,
        )
    };
    assert_eq!(n, 8);
    assert_eq!(u64::from_le_bytes(buf), 0xbeef);
    let node0 = ram.zone_fd(0).unwrap();
    // SAFETY: test: lseek on our memfd.
    let data = unsafe { libc::lseek(node0.as_raw_fd(), gpa as i64, libc::SEEK_DATA) };
    assert!(
        data < 0 || data as u64 >= gpa + (2 << 20),
        "old copy punched out"
    );
    // Writes through the staging view land on the new node too, and a move back works.
    ram.staging()
        .write_obj(0xcafe_u64, GuestAddress(gpa))
        .unwrap();
    ram.move_region(region(gpa), 0, MovedCache::Pages).unwrap();
    assert_eq!(
        ram.staging().read_obj::<u64>(GuestAddress(gpa)).unwrap(),
        0xcafe
    );
    assert_eq!(
        ram.staging()
            .read_obj::<u64>(GuestAddress(gpa + 4096))
            .unwrap(),
        0xbeef
    );
    assert!(ram
        .move_region(region(gpa), 2, MovedCache::Pages)
        .unwrap_err()
        .to_string()
        .contains("node 2"));
    assert!(ram
        .move_region(region(gpa + 4096), 1, MovedCache::Pages)
        .is_err());
    // Emulated nodes need shmem; host nodes must exist.
    let bad = RamConfig {
        backing: BackingKind::Anon,
        ..c.clone()
    };
    assert!(bad.check_shape().unwrap_err().to_string().contains("shmem"));
    let host = RamConfig {
        numa: NumaLayout {
            nodes: 2,
            backend: NodeBackendKind::Host,
            ..Default::default()
        },
        ..c
    };
    let e = host.validate().unwrap_err().to_string();
    assert!(
        e.contains("guest node 1 has no host node") && e.contains("backend=emulated"),
        "{e}"
    );
}

#[test]
fn prefault_and_thp() {
    let mut c = cfg(16 << 20, BackingKind::Anon);
    c.thp = ThpMode::Madvise;
    c.prefault = Prefault::Populate;
    let ram = GuestRam::create(&c).unwrap();
    assert_eq!(ram.staging().read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
    c.backing = BackingKind::Shmem;
    assert!(matches!(c.validate(), Err(Error::ThpNotApplicable { .. })));
}

#[test]
fn guest_ram_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<GuestRam>();
}

#[test]
fn memfd_is_named() {
    let ram = GuestRam::create(&cfg(8 << 20, BackingKind::Shmem)).unwrap();
    let fd = ram.memfd().unwrap().as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    assert!(
        link.to_string_lossy().contains("memfd:hugevisor-guest-ram"),
        "{link:?}"
    );
    assert!(GuestRam::create(&cfg(8 << 20, BackingKind::Anon))
        .unwrap()
        .memfd()
        .is_none());
}

/// The staging view writes the memfd without mapping anything into the guest view;
/// populate maps the whole guest view.
#[test]
fn staging_writes_do_not_map_the_guest_view_and_populate_maps_it() {
    let mut cases = vec![
        (BackingKind::Shmem, 16 << 20),
        (BackingKind::Anon, 16 << 20),
    ];
    if pool_ok(2 << 20, 8) {
        cases.push((BackingKind::Hugetlb2M, 16 << 20));
    }
    for (backing, size) in cases {
        let mut c = cfg(size, backing);
        let ram = GuestRam::create(&c).unwrap();
        assert_eq!(ram.guest_view_rss_bytes().unwrap(), 0, "{backing}");
        ram.staging()
            .write_obj(1_u64, GuestAddress(size / 2))
            .unwrap();
        let rss = ram.guest_view_rss_bytes().unwrap();
        match ram.view_layout() {
            ViewLayout::GuestAndStaging => assert_eq!(rss, 0, "{backing}"),
            ViewLayout::SingleView => assert_eq!(rss, 4096, "{backing}"),
        }
        drop(ram);
        c.prefault = Prefault::Populate;
        let ram = GuestRam::create(&c).unwrap();
        assert_eq!(ram.guest_view_rss_bytes().unwrap(), size, "{backing}");
    }
}

#[test]
fn an_incoming_vm_populates_its_ram_and_keeps_what_arrived() {
    use crate::config::MemoryConfig;
    use crate::memory::GuestMemory;
    use crate::ram::populate::PopulateEnd;
    use crate::PageContent;
    let size = 16 << 20;
    let shmem = GuestMemory::create(&MemoryConfig {
        ram: cfg(size, BackingKind::Shmem),
        vcpus: 1,
        ..Default::default()
    })
    .unwrap();
    let page = vec![0x5a_u8; SIZE_2M as usize];
    let mut back = vec![0u8; SIZE_2M as usize];
    shmem
        .write_page(Gpa(4 << 20), PageContent::Bytes(&page[..4096]))
        .unwrap();
    assert!(shmem.prepare_incoming().unwrap());
    let end = shmem.wait_populated();
    assert!(matches!(end, Some(PopulateEnd::Complete)), "{end:?}");
    assert!(shmem.wait_populated().is_none(), "waited for once");
    shmem.read_page(Gpa(4 << 20), &mut back[..4096]).unwrap();
    assert!(
        back[..4096] == page[..4096],
        "populating changed a page that was there"
    );
    shmem.read_page(Gpa(8 << 20), &mut back[..4096]).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(shmem.huge_mapped_bytes(View::Guest).unwrap(), 0);
    // Pages arriving now are copied through the populated staging view, into the memfd
    // the guest view maps.
    assert_eq!(shmem.ram.staging_populated.load(Ordering::Acquire), size);
    shmem.write_pages(Gpa(8 << 20), &page[..8192]).unwrap();
    let mut file = vec![0u8; 8192];
    let fd = shmem.ram.memfd().unwrap();
    // SAFETY: reads into a live buffer of its length from our own memfd.
    let n = unsafe { libc::pread(fd.as_raw_fd(), file.as_mut_ptr().cast(), 8192, 8 << 20) };
    assert_eq!(n, 8192);
    assert!(
        file == page[..8192],
        "the copy through the staging view reached the memfd"
    );
    let report = shmem.stop().populate.unwrap();
    assert_eq!((report.end, report.bytes), ("complete", Some(size)));
    // Anonymous RAM has no page cache to fill ahead.
    let anon = GuestMemory::create(&MemoryConfig {
        ram: cfg(size, BackingKind::Anon),
        vcpus: 1,
        ..Default::default()
    })
    .unwrap();
    assert!(!anon.prepare_incoming().unwrap());
    if !pool_ok(SIZE_2M, size / SIZE_2M) {
        return;
    }
    let mem = GuestMemory::create(&MemoryConfig {
        ram: cfg(size, BackingKind::Hugetlb2M),
        vcpus: 1,
        ..Default::default()
    })
    .unwrap();
    // A page that arrived before (or while) RAM is populated keeps its content.
    mem.write_page(Gpa(4 << 20), PageContent::Bytes(&page))
        .unwrap();
    assert!(mem.prepare_incoming().unwrap());
    assert!(!mem.prepare_incoming().unwrap(), "one population at a time");
    let end = mem.wait_populated();
    assert!(matches!(end, Some(PopulateEnd::Complete)), "{end:?}");
    mem.read_page(Gpa(4 << 20), &mut back).unwrap();
    assert!(back == page, "populating changed a page that was there");
    // Every page is allocated, through the staging view only: the guest view stays
    // unmapped (post-copy needs its faults).
    assert_eq!(mem.huge_mapped_bytes(View::Staging).unwrap(), size);
    assert_eq!(mem.huge_mapped_bytes(View::Guest).unwrap(), 0);
    mem.read_page(Gpa(8 << 20), &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn a_shmem_population_allocates_the_memfd_without_mapping_it() {
    use std::os::unix::fs::MetadataExt;
    let size = 16 << 20;
    let ram = std::sync::Arc::new(GuestRam::create(&cfg(size, BackingKind::Shmem)).unwrap());
    let allocated = |ram: &GuestRam| {
        let fd = ram.zones.single_memfd().unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        std::fs::metadata(path).unwrap().blocks() * 512
    };
    assert_eq!(allocated(&ram), 0);
    let end = crate::ram::populate::Populator::start(ram.clone())
        .unwrap()
        .wait();
    assert!(
        matches!(end, crate::ram::populate::PopulateEnd::Complete),
        "{end:?}"
    );
    assert_eq!(allocated(&ram), size);
    assert_eq!(ram.guest_view_rss_bytes().unwrap(), 0);
}

#[test]
fn a_population_stops_when_asked() {
    if !pool_ok(SIZE_2M, 8) {
        return;
    }
    let ram =
        std::sync::Arc::new(GuestRam::create(&cfg(16 << 20, BackingKind::Hugetlb2M)).unwrap());
    let p = crate::ram::populate::Populator::start(ram.clone()).unwrap();
    // Stopped at once or after some chunks, or complete: never an error, never hung.
    let end = p.stop();
    assert!(
        matches!(
            end,
            crate::ram::populate::PopulateEnd::Complete
                | crate::ram::populate::PopulateEnd::Stopped { .. }
        ),
        "{end:?}"
    );
    assert_eq!(ram.guest_view_rss_bytes().unwrap(), 0);
}
