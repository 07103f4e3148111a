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

use guest_mm::notifier::GpaRange;
use guest_mm::numa::{NodeBackendKind, NumaLayout};
use guest_mm::stage::{Change, SecondStage};
use guest_mm::{BackingKind, GuestRam, RamConfig};
use vmm::fault::{FaultPath, GuestViewZapper, VcpuThreads};

const SIZE: u64 = 16 << 20;
const R: u64 = 2 << 20;

#[test]
fn moves_under_a_writer_lose_nothing() {
    let ram = Arc::new(
        GuestRam::create(&RamConfig {
            size: SIZE,
            backing: BackingKind::Shmem,
            numa: NumaLayout {
                nodes: 2,
                backend: NodeBackendKind::Emulated,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap(),
    );
    let stage = Arc::new(SecondStage::all_present(ram.size(), ram.page_size()).unwrap());
    let base = ram.guest_view_addr() as u64;
    let threads = Arc::new(VcpuThreads::new(1));
    let fp = FaultPath::start(stage.clone(), threads.clone(), base, SIZE, None).unwrap();
    stage
        .notifier()
        .subscribe(Arc::new(GuestViewZapper::new(base, SIZE, Some(fp.uffd()))));

    let stop = Arc::new(AtomicBool::new(false));
    let passes_done = Arc::new(AtomicU64::new(0));
    let (s, t, done) = (stop.clone(), threads.clone(), passes_done.clone());
    let writer = std::thread::spawn(move || {
        t.register_current(0);
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
        let gpa = (x % (SIZE / R)) * R;
        let to = 1 - ram.node_of(gpa);
        let r = stage.apply_with(
            Change::Migrate {
                range: GpaRange::new(gpa, gpa + R),
                node: to,
            },
            |w| ram.move_region(w.start, w.len(), to),
        );
        assert!(r.is_ok(), "move failed");
        moves += 1;
        std::thread::sleep(Duration::from_micros(500));
    }
    stop.store(true, Ordering::Relaxed);
    let (passes, errors) = writer.join().unwrap();
    let stats = fp.stop();
    assert!(passes > 3 && moves > 100, "passes {passes}, moves {moves}");
    assert!(
        errors.is_empty(),
        "lost writes (gpa, expected, found): {errors:x?}; {} faults",
        stats.report().uffd_faults
    );
}
