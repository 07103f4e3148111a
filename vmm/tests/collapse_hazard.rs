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

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::collapse::{collapse_region, CollapseFailure};
use guest_mm::notifier::GpaRange;
use guest_mm::stage::{Change, SecondStage};
use guest_mm::table::SIZE_2M;
use guest_mm::{BackingKind, GuestRam, RamConfig};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;

/// What the "source" sent for a page: its GPA in every word.
fn content(gpa: u64) -> Vec<u8> {
    (0..PAGE / 8).flat_map(|_| gpa.to_le_bytes()).collect()
}

fn pmd_mapped(ram: &GuestRam) -> u64 {
    ram.guest_view_pmd_mapped_bytes().unwrap()
}

/// Installs the page at `gpa` as a post-copy receiver does.
fn fill(ram: &GuestRam, stage: &SecondStage, uffd: &uffd::Uffd, gpa: u64) {
    let base = ram.guest_view_addr() as u64;
    let installed = stage
        .fill(gpa, || {
            ram.staging()
                .write_slice(&content(gpa), GuestAddress(gpa))
                .map_err(|e| e.to_string())?;
            match uffd.continue_range(base + gpa, PAGE, uffd::Wake::Yes) {
                Ok(()) | Err(uffd::Error::AlreadyMapped { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        })
        .unwrap();
    assert!(installed);
}

#[test]
fn a_region_with_one_missing_page_is_never_collapsed_and_reads_right_after() {
    let ram = Arc::new(
        GuestRam::create(&RamConfig {
            size: 8 << 20,
            backing: BackingKind::Shmem,
            ..Default::default()
        })
        .unwrap(),
    );
    let stage = Arc::new(SecondStage::all_present(ram.size(), ram.page_size()).unwrap());
    stage
        .apply(Change::MarkAbsent {
            range: GpaRange::new(0, ram.size()),
        })
        .unwrap();
    let u = Arc::new(
        uffd::Uffd::open(uffd::Features::MINOR_SHMEM | uffd::Features::MISSING_SHMEM).unwrap(),
    );
    let base = ram.guest_view_addr() as u64;
    u.register(
        base,
        ram.size(),
        uffd::RegisterMode::MISSING | uffd::RegisterMode::MINOR,
    )
    .unwrap();

    let region = SIZE_2M;
    let missing = region + 100 * PAGE;
    for i in 0..512 {
        let gpa = region + i * PAGE;
        if gpa != missing {
            fill(&ram, &stage, &u, gpa);
        }
    }
    assert_eq!(stage.occupancy_2m(region), 511);

    // The policy refuses: the region is not complete.
    let continued = std::cell::Cell::new(false);
    let r = collapse_region(&ram, &stage, region, |_| {
        continued.set(true);
        Ok(())
    });
    assert_eq!(r, Err(CollapseFailure::NotComplete));
    assert!(
        !continued.get(),
        "no host step may run for an incomplete region"
    );
    assert_eq!(pmd_mapped(&ram), 0, "nothing is PMD-mapped");

    // The guest reads the missing page: a MISSING fault, which the "destination" answers
    // with the page the source sends.
    let reader = {
        let ram = ram.clone();
        std::thread::spawn(move || {
            let p = (ram.guest_view_addr() as u64 + missing) as *const u64;
            // SAFETY: `missing` lies inside the live guest view; the read blocks in the
            // kernel until userfaultfd resolves it.
            unsafe { std::ptr::read_volatile(p.add(7)) }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let fault = loop {
        match u.read_event().unwrap() {
            Some(uffd::Event::Pagefault { address, kind, .. }) => break (address, kind),
            Some(_) => {}
            None => {
                assert!(Instant::now() < deadline, "the read never faulted");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    assert_eq!(fault.0 & !(PAGE - 1), base + missing);
    assert_eq!(fault.1, uffd::FaultKind::Missing);
    fill(&ram, &stage, &u, missing);
    assert_eq!(
        reader.join().unwrap(),
        missing,
        "the guest reads what was sent"
    );

    // Now complete: it collapses, the kernel maps it with a PMD, every page is right.
    let took = collapse_region(&ram, &stage, region, |start| {
        match u.continue_range(base + start, SIZE_2M, uffd::Wake::Yes) {
            Ok(()) | Err(uffd::Error::AlreadyMapped { .. }) => Ok(()),
            Err(e) => panic!("CONTINUE of the region: {e}"),
        }
    });
    assert!(took.is_ok(), "{took:?}");
    assert_eq!(pmd_mapped(&ram), SIZE_2M);
    for i in 0..512 {
        let gpa = region + i * PAGE;
        let p = (base + gpa) as *const u64;
        // SAFETY: inside the live guest view, now mapped.
        let w = unsafe { std::ptr::read_volatile(p.add(i as usize % 512)) };
        assert_eq!(w, gpa, "page {i} of the collapsed region");
    }
    // Other regions were never touched: still absent, still not huge.
    assert_eq!(stage.occupancy_2m(0), 0);
    let _ = u.unregister(base, ram.size());
}
