//! A VMM-internal read of a hinted page does not fault; a vCPU access does. The "vCPU" is a
//! thread registered as vCPU 0 touching the guest view (the same host path a KVM vCPU takes:
//! a fault on the guest view, delivered by userfaultfd with the thread's id).

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::notifier::GpaRange;
use guest_mm::stage::{Change, SecondStage};
use guest_mm::table::{Intent, Lookup};
use guest_mm::{BackingKind, GuestRam, RamConfig};
use vm_memory::{Bytes, GuestAddress};
use vmm::fault::{FaultPath, GuestViewZapper, VcpuThreads};

#[test]
fn internal_reads_of_hinted_pages_do_not_fault_vcpu_accesses_do() {
    let ram = GuestRam::create(&RamConfig {
        size: 16 << 20,
        backing: BackingKind::Shmem,
        ..Default::default()
    })
    .unwrap();
    let stage = Arc::new(SecondStage::all_present(ram.size(), ram.page_size()).unwrap());
    let base = ram.guest_view_addr() as u64;
    stage
        .notifier()
        .subscribe(Arc::new(GuestViewZapper::new(base, ram.size(), None)));
    let gpa = 5 << 20;
    ram.staging()
        .write_obj(0x1234_5678u64, GuestAddress(gpa))
        .unwrap();
    // Map it in the guest view (a touch from this thread, before registration), then zap it.
    // SAFETY: test: gpa is inside the 16 MiB guest view.
    let p = unsafe { ram.guest_view_addr().add(gpa as usize) } as usize;
    // SAFETY: as above: an aligned u64 inside the mapped guest view.
    let word = unsafe { std::ptr::read_volatile(p as *const u64) };
    assert_eq!(word, 0x1234_5678);
    let threads = Arc::new(VcpuThreads::new(1));
    let fp = FaultPath::start(stage.clone(), threads.clone(), base, ram.size(), None).unwrap();
    stage
        .apply(Change::Zap {
            range: GpaRange::new(gpa, gpa + 4096),
        })
        .unwrap();
    assert!(matches!(stage.lookup(gpa, Intent::Vcpu), Lookup::Fault(..)));

    // Internal access: the table says present, the staging view reads it, no fault.
    assert!(matches!(
        stage.lookup(gpa, Intent::Internal),
        Lookup::Mapped(_)
    ));
    assert_eq!(
        ram.staging().read_obj::<u64>(GuestAddress(gpa)).unwrap(),
        0x1234_5678
    );
    // No waiting "long enough" for a stray fault: the staging view is not registered, so
    // a read there can never raise one; and a fault counted late would still show in the
    // exact total of one (the vCPU's) asserted at the end.
    assert_eq!(
        fp.stats.faults.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "an internal read must not fault"
    );
    assert_eq!(
        stage.accounting().present_bytes,
        ram.size(),
        "hinted pages count as present"
    );

    // vCPU access: faults, is resolved, reads the right data.
    let t = threads.clone();
    let v = std::thread::spawn(move || {
        t.register_current(0);
        // SAFETY: test: reading a u64 inside the guest view.
        unsafe { std::ptr::read_volatile(p as *const u64) }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while !v.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the vCPU's fault was never resolved"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(v.join().unwrap(), 0x1234_5678);
    let stats = fp.stop();
    let r = stats.report();
    assert_eq!(r.uffd_faults, 1, "{r:?}");
    assert_eq!(r.hint_faults, 1, "{r:?}");
    assert_eq!(
        r.per_vcpu,
        vec![1],
        "the fault carried vCPU 0's thread id: {r:?}"
    );
    assert!(matches!(stage.lookup(gpa, Intent::Vcpu), Lookup::Mapped(_)));
}
