//! A VMM-internal read of a hinted page does not fault; a vCPU access does. The "vCPU" is a
//! thread registered as vCPU 0 touching the guest view (the same host path a KVM vCPU takes:
//! a fault on the guest view, delivered by userfaultfd with the thread's id).

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use guest_mm::stage::{Change, Intent, Lookup};
use guest_mm::{BackingKind, FaultPathNeed, Gpa, GpaRange, GuestMemory, MemoryConfig, RamConfig};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn internal_reads_of_hinted_pages_do_not_fault_vcpu_accesses_do() {
    let memory = GuestMemory::create(&MemoryConfig {
        ram: RamConfig {
            size: 16 << 20,
            backing: BackingKind::Shmem,
            ..Default::default()
        },
        vcpus: 1,
        fault_path: FaultPathNeed::Minor,
        ..Default::default()
    })
    .unwrap();
    let stage = memory.stage();
    let gpa = 5 << 20;
    memory
        .staging()
        .write_obj(0x1234_5678u64, GuestAddress(gpa))
        .unwrap();
    // Map it in the guest view (a touch from this thread, before registration), then zap it.
    let p = (memory.memslot().userspace_addr + gpa) as usize;
    // SAFETY: test: an aligned u64 inside the 16 MiB guest view.
    let word = unsafe { std::ptr::read_volatile(p as *const u64) };
    assert_eq!(word, 0x1234_5678);
    memory.start().unwrap();
    stage
        .apply(Change::Zap {
            range: GpaRange::new(Gpa(gpa), Gpa(gpa + 4096)),
        })
        .unwrap();
    assert!(matches!(
        stage.lookup(Gpa(gpa), Intent::Vcpu),
        Lookup::Fault(..)
    ));

    // Internal access: the table says present, the staging view reads it, no fault.
    assert!(matches!(
        stage.lookup(Gpa(gpa), Intent::Internal),
        Lookup::Mapped(_)
    ));
    assert_eq!(
        memory.staging().read_obj::<u64>(GuestAddress(gpa)).unwrap(),
        0x1234_5678
    );
    // No waiting "long enough" for a stray fault: the staging view is not registered, so
    // a read there can never raise one; and a fault counted late would still show in the
    // exact total of one (the vCPU's) asserted at the end.
    let faults = memory.stats().faults.unwrap();
    assert_eq!(faults.uffd_faults, 0, "an internal read must not fault");
    assert_eq!(
        stage.accounting().present_bytes,
        memory.size(),
        "hinted pages count as present"
    );

    // vCPU access: faults, is resolved, reads the right data.
    let m = memory.clone();
    let v = std::thread::spawn(move || {
        m.vcpu_threads().register_current(0);
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
    let r = memory.stop().faults.unwrap();
    assert_eq!(r.uffd_faults, 1, "{r:?}");
    assert_eq!(r.minor_faults, 1, "{r:?}");
    assert_eq!(r.hint_faults, 1, "{r:?}");
    assert_eq!(
        r.per_vcpu,
        vec![1],
        "the fault carried vCPU 0's thread id: {r:?}"
    );
    assert!(matches!(
        stage.lookup(Gpa(gpa), Intent::Vcpu),
        Lookup::Mapped(_)
    ));
}
