//! NUMA region moves under a concurrent writer, without KVM: a host thread registered as
//! vCPU 0 runs a verify-like loop over the guest view (its faults go through the real
//! userfaultfd fault path) while another thread moves random 2 MiB regions between two
//! emulated nodes through the mmu notifier. No write may be lost.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::{
    BackingKind, FaultPathNeed, Gpa, GuestMemory, MemoryConfig, NodeBackendKind, NumaLayout,
    RamConfig,
};

const SIZE: u64 = 16 << 20;
const R: u64 = 2 << 20;

#[test]
fn moves_under_a_writer_lose_nothing() {
    let memory = GuestMemory::create(&MemoryConfig {
        ram: RamConfig {
            size: SIZE,
            backing: BackingKind::Shmem,
            numa: NumaLayout {
                nodes: 2,
                backend: NodeBackendKind::Emulated,
                ..Default::default()
            },
            ..Default::default()
        },
        vcpus: 1,
        fault_path: FaultPathNeed::Minor,
        ..Default::default()
    })
    .unwrap();
    memory.start().unwrap();
    let base = memory.memslot().userspace_addr;

    let stop = Arc::new(AtomicBool::new(false));
    let passes_done = Arc::new(AtomicU64::new(0));
    let (s, m, done) = (stop.clone(), memory.clone(), passes_done.clone());
    let writer = std::thread::spawn(move || {
        m.vcpu_threads().register_current(0);
        let pages = SIZE / 4096;
        let mut gen = vec![0u64; pages as usize];
        let mut errors = Vec::new();
        let mut passes = 0;
        while !s.load(Ordering::Relaxed) {
            for p in 0..pages {
                let addr = (base + p * 4096) as *mut u64;
                // SAFETY: test: addr is inside the 16 MiB guest view.
                let found = unsafe { std::ptr::read_volatile(addr) };
                if found != gen[p as usize] && errors.len() < 8 {
                    errors.push((p * 4096, gen[p as usize], found));
                }
                gen[p as usize] += 1;
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile(addr, gen[p as usize]) };
            }
            passes += 1;
            done.store(passes, Ordering::Relaxed);
        }
        (passes, errors)
    });

    let mut x = 0x1234_5678_9abc_def1u64;
    let mut moves = 0;
    // Moves for at least 3 s (the stress), and on until the writer has made its passes
    // under them however slowly a loaded host runs it, within a generous bound.
    let start = Instant::now();
    let enough = |moves: u64| {
        start.elapsed() >= Duration::from_secs(3)
            && moves > 100
            && passes_done.load(Ordering::Relaxed) > 3
    };
    while !enough(moves) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "in 300 s of moves the writer made only {} passes ({moves} moves)",
            passes_done.load(Ordering::Relaxed)
        );
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let gpa = Gpa((x % (SIZE / R)) * R);
        let to = 1 - memory.node_of(gpa);
        let r = memory.move_region(gpa, to);
        assert!(r.is_ok(), "move failed: {r:?}");
        moves += 1;
        std::thread::sleep(Duration::from_micros(500));
    }
    stop.store(true, Ordering::Relaxed);
    let (passes, errors) = writer.join().unwrap();
    let report = memory.stop();
    assert!(passes > 3 && moves > 100, "passes {passes}, moves {moves}");
    assert!(
        errors.is_empty(),
        "lost writes (gpa, expected, found): {errors:x?}; {} faults",
        report.faults.map(|f| f.uffd_faults).unwrap_or(0)
    );
    assert_eq!(
        report.host_failures, 0,
        "every zap and re-registration worked"
    );
}
