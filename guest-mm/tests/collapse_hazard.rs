//! The collapse hazard (host-facts, seed 000): collapsing a 2 MiB region of a MINOR
//! post-copy range before every page has arrived maps the missing pages, and the guest
//! reads wrong data. The collapse policy must never collapse such a region; once the
//! missing page arrives, the region collapses and every page reads what was sent.
//!
//! The "guest" is a host thread reading the guest view, which is the path a KVM vCPU's
//! access takes here (a fault on the guest view, delivered by userfaultfd).

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_mm::collapse::CollapseFailure;
use guest_mm::{
    BackingKind, Gpa, GpaRange, GuestMemory, Installed, MemoryConfig, PageContent, Pager,
    RamConfig, View, SIZE_2M,
};

const PAGE: u64 = 4096;

/// What the "source" sent for a page: its GPA in every word.
fn content(gpa: u64) -> Vec<u8> {
    (0..PAGE / 8).flat_map(|_| gpa.to_le_bytes()).collect()
}

/// The "source": every demand request goes to the test, which answers it.
struct ChannelPager(Mutex<mpsc::Sender<Gpa>>);

impl Pager for ChannelPager {
    fn request(&self, gpa: Gpa) {
        let _ = self.0.lock().unwrap().send(gpa);
    }
}

/// Installs the page at `gpa` as a post-copy receiver does.
fn fill(memory: &GuestMemory, gpa: u64) {
    let page = content(gpa);
    let installed = memory
        .install_page(Gpa(gpa), PageContent::Bytes(&page))
        .unwrap();
    assert_eq!(installed, Installed::New);
}

/// 8 MiB of shmem guest RAM, all absent in post-copy, its demand requests on a channel;
/// the number of absent pages.
fn postcopy_of_8m() -> (Arc<GuestMemory>, mpsc::Receiver<Gpa>, u64) {
    let memory = GuestMemory::create(&MemoryConfig {
        ram: RamConfig {
            size: 8 << 20,
            backing: BackingKind::Shmem,
            ..Default::default()
        },
        vcpus: 1,
        ..Default::default()
    })
    .unwrap();
    let (tx, requests) = mpsc::channel();
    let all = GpaRange::new(Gpa(0), Gpa(memory.size()));
    let absent = memory
        .begin_postcopy(&[all], Arc::new(ChannelPager(Mutex::new(tx))))
        .unwrap();
    (memory, requests, absent)
}

#[test]
fn a_region_with_one_missing_page_is_never_collapsed_and_reads_right_after() {
    let (memory, requests, absent) = postcopy_of_8m();
    assert_eq!(absent, memory.size() / PAGE);
    let base = memory.memslot().userspace_addr;

    let region = SIZE_2M;
    let missing = region + 100 * PAGE;
    for i in 0..512 {
        let gpa = region + i * PAGE;
        if gpa != missing {
            fill(&memory, gpa);
        }
    }
    assert_eq!(memory.stage().occupancy_2m(Gpa(region)), 511);

    // The policy refuses: the region is not complete, and no host step ran (neither
    // view was collapsed).
    let r = memory.collapse_now(Gpa(region));
    assert_eq!(r, Err(CollapseFailure::NotComplete));
    assert_eq!(
        memory.huge_mapped_bytes(View::Staging).unwrap(),
        0,
        "no host step may run for an incomplete region"
    );
    assert_eq!(
        memory.pmd_mapped_bytes().unwrap(),
        0,
        "nothing is PMD-mapped"
    );

    // The guest reads the missing page: a MISSING fault, which the "destination" answers
    // with the page the source sends.
    let reader = std::thread::spawn(move || {
        let p = (base + missing) as *const u64;
        // SAFETY: `missing` lies inside the live guest view; the read blocks in the
        // kernel until userfaultfd resolves it.
        unsafe { std::ptr::read_volatile(p.add(7)) }
    });
    let asked = requests
        .recv_timeout(Duration::from_secs(10))
        .expect("the read never faulted");
    assert_eq!(asked, Gpa(missing));
    fill(&memory, missing);
    assert_eq!(
        reader.join().unwrap(),
        missing,
        "the guest reads what was sent"
    );
    let faults = memory.stats().faults.unwrap();
    assert_eq!(faults.missing_faults, 1, "a MISSING fault: {faults:?}");

    // Now complete: it collapses, the kernel maps it with a PMD, every page is right.
    let took = memory.collapse_now(Gpa(region));
    assert!(took.is_ok(), "{took:?}");
    assert_eq!(memory.pmd_mapped_bytes().unwrap(), SIZE_2M);
    assert_eq!(
        memory.huge_mapped_bytes(View::Staging).unwrap(),
        SIZE_2M,
        "step 1 collapsed the staging view (so the check above can see it)"
    );
    for i in 0..512 {
        let gpa = region + i * PAGE;
        let p = (base + gpa) as *const u64;
        // SAFETY: inside the live guest view, now mapped.
        let w = unsafe { std::ptr::read_volatile(p.add(i as usize % 512)) };
        assert_eq!(w, gpa, "page {i} of the collapsed region");
    }
    // Other regions were never touched: still absent, still not huge.
    assert_eq!(memory.stage().occupancy_2m(Gpa(0)), 0);
    memory.end_postcopy().unwrap();
}

#[test]
fn an_abandoned_postcopy_releases_a_reader_blocked_on_an_absent_page() {
    let (memory, requests, absent) = postcopy_of_8m();
    assert_eq!(absent, memory.size() / PAGE);
    let base = memory.memslot().userspace_addr;
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let p = (base + 3 * PAGE) as *const u64;
        // SAFETY: inside the live guest view (the test keeps `memory` until the read
        // returned or failed); the read blocks until userfaultfd lets it go.
        let v = unsafe { std::ptr::read_volatile(p) };
        let _ = done_tx.send(v);
    });
    assert_eq!(
        requests.recv_timeout(Duration::from_secs(30)),
        Ok(Gpa(3 * PAGE)),
        "the read never faulted"
    );
    // No page will come: without the release the reader waits forever.
    memory.abandon_postcopy().unwrap();
    assert_eq!(
        done.recv_timeout(Duration::from_secs(30)),
        Ok(0),
        "the blocked reader was released (and read the hole's zeros)"
    );
}
