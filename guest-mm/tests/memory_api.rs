//! GuestMemory's migration calls on this host, without KVM: pages in and out with their
//! bounds, post-copy's refusals, duplicates left alone, and stop's idempotence.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use guest_mm::{
    BackingKind, Error, FaultPathNeed, Gpa, GpaRange, GuestMemory, Installed, MemoryConfig,
    PageContent, Pager, RamConfig, SIZE_4K,
};

struct NoPager;

impl Pager for NoPager {
    fn request(&self, _gpa: Gpa) {}
}

fn memory(backing: BackingKind, fault_path: FaultPathNeed) -> Arc<GuestMemory> {
    GuestMemory::create(&MemoryConfig {
        ram: RamConfig {
            size: 16 << 20,
            backing,
            ..Default::default()
        },
        vcpus: 1,
        fault_path,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn pages_go_in_and_out_of_bounds_checked() {
    let m = memory(BackingKind::Shmem, FaultPathNeed::Derived);
    let page: Vec<u8> = (0..SIZE_4K).map(|i| i as u8).collect();
    m.write_page(Gpa(8 * SIZE_4K), PageContent::Bytes(&page))
        .unwrap();
    let mut back = vec![0u8; SIZE_4K as usize];
    m.read_page(Gpa(8 * SIZE_4K), &mut back).unwrap();
    assert_eq!(back, page);
    m.write_page(Gpa(8 * SIZE_4K), PageContent::Zero).unwrap();
    m.read_page(Gpa(8 * SIZE_4K), &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    // Outside guest RAM, unaligned, or not one backing page: refused, naming why.
    let e = m.read_page(Gpa(m.size()), &mut back).unwrap_err();
    assert!(matches!(e, Error::OutsideRam { .. }), "{e}");
    let e = m
        .write_page(Gpa(100), PageContent::Bytes(&page))
        .unwrap_err();
    assert!(matches!(e, Error::NotABackingPage { .. }), "{e}");
    let e = m
        .write_page(Gpa(0), PageContent::Bytes(&page[..100]))
        .unwrap_err();
    assert!(e.to_string().contains("0x64 bytes"), "{e}");
    assert!(m.read_page(Gpa(!0xfff), &mut back).is_err());
}

#[test]
fn postcopy_installs_once_and_leaves_duplicates_alone() {
    let m = memory(BackingKind::Shmem, FaultPathNeed::Derived);
    let absent = [GpaRange::new(Gpa(0), Gpa(4 * SIZE_4K))];
    assert_eq!(m.begin_postcopy(&absent, Arc::new(NoPager)).unwrap(), 4);
    assert!(matches!(
        m.begin_postcopy(&absent, Arc::new(NoPager)),
        Err(Error::PostcopyTwice)
    ));
    let first = vec![1u8; SIZE_4K as usize];
    let second = vec![2u8; SIZE_4K as usize];
    let installed = m.install_page(Gpa(0), PageContent::Bytes(&first)).unwrap();
    assert_eq!(installed, Installed::New);
    let again = m.install_page(Gpa(0), PageContent::Bytes(&second)).unwrap();
    assert_eq!(again, Installed::Duplicate, "the second copy is dropped");
    let mut back = vec![0u8; SIZE_4K as usize];
    m.read_page(Gpa(0), &mut back).unwrap();
    assert_eq!(back, first);
    // A page that was never absent is a duplicate too.
    let present = m.install_page(Gpa(8 * SIZE_4K), PageContent::Zero).unwrap();
    assert_eq!(present, Installed::Duplicate);
    for p in 1..4 {
        let r = m.install_page(Gpa(p * SIZE_4K), PageContent::Zero).unwrap();
        assert_eq!(r, Installed::New);
    }
    assert_eq!(m.accounting().absent_bytes, 0);
    m.end_postcopy().unwrap();
    let report = m.stop();
    assert_eq!(report.fault_path, "uffd-missing-minor (post-copy)");
    assert_eq!(report.faults.unwrap().uffd_faults, 0);
    assert_eq!(m.stop().fault_path, report.fault_path, "stop is idempotent");
}

#[test]
fn postcopy_refuses_what_cannot_work() {
    let anon = memory(BackingKind::Anon, FaultPathNeed::Derived);
    let all = [GpaRange::new(Gpa(0), Gpa(anon.size()))];
    let e = anon.begin_postcopy(&all, Arc::new(NoPager)).unwrap_err();
    assert!(e.to_string().contains("file-backed"), "{e}");
    let zapping = memory(BackingKind::Shmem, FaultPathNeed::Minor);
    let e = zapping.begin_postcopy(&all, Arc::new(NoPager)).unwrap_err();
    assert!(matches!(e, Error::PostcopyWithFaultPath), "{e}");
}

#[test]
fn the_memslot_is_the_guest_view_and_nothing_runs_before_start() {
    let m = memory(BackingKind::Shmem, FaultPathNeed::Minor);
    let slot = m.memslot();
    assert_eq!((slot.guest_phys_addr, slot.size), (Gpa(0), m.size()));
    assert_eq!(
        slot.userspace_addr % (2 << 20),
        0,
        "views are 2 MiB aligned"
    );
    assert!(m.stats().faults.is_none(), "no fault thread before start");
    m.start().unwrap();
    m.start().unwrap();
    assert_eq!(m.stats().fault_path, "uffd-minor");
    assert!(m.stats().faults.is_some());
    let report = m.stop();
    assert_eq!(report.host_failures, 0);
}
