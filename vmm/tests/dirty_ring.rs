//! The KVM dirty ring on a real VM: a guest that writes memory produces dirty pages through
//! the ring — including when the ring fills (the vCPU harvests its own ring on the
//! ring-full exit and carries on) — the same pages the dirty bitmap reports.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_image::{abi, GuestParams, Workload};
use guest_mm::{BackingKind, GuestMemory, MemoryConfig, RamConfig};
use vmm::boot;
use vmm::console::{Console, ConsoleMode};
use vmm::vstate::vcpu::{Vcpu, VcpuEnd, VcpuOutcome};
use vmm::vstate::vcpu_set::VcpuSet;
use vmm::vstate::vm::{open_kvm, DirtyLogMethod, DirtyLogging, Vm};

/// A VM whose vCPUs run one `touch` pass (one write per 4 KiB data page) with dirty
/// logging on from before the first guest instruction.
struct Touched {
    vm: Vm,
    ram: Arc<GuestMemory>,
    outcomes: Vec<VcpuOutcome>,
}

fn touch_once(method: DirtyLogMethod, size: u64, vcpus: usize) -> Touched {
    let kvm = open_kvm(std::path::Path::new("/dev/kvm")).unwrap();
    let ram = GuestMemory::create(&MemoryConfig {
        ram: RamConfig {
            size,
            backing: BackingKind::Shmem,
            ..Default::default()
        },
        vcpus,
        ..Default::default()
    })
    .unwrap();
    let image = boot::load_image(ram.staging(), guest_image::IMAGE, size).unwrap();
    let params = GuestParams {
        workload: Workload::Touch,
        passes: Some(1),
        vcpus: vcpus as u32,
        seed: 1,
        vcpu_nodes: vec![],
    };
    boot::write_boot_tables(ram.staging(), &image, size, vcpus, &params.cmdline()).unwrap();
    let topology = vmm::vstate::cpuid::CpuTopology {
        vcpus: vcpus as u32,
        vcpu_nodes: vec![],
    };
    let vm = Vm::new(&kvm, method, topology).unwrap();
    vm.register_ram(ram.memslot()).unwrap();
    vm.set_dirty_logging(ram.memslot(), DirtyLogging::On)
        .unwrap();
    // Nothing has run yet: the log starts empty.
    let empty = vm.take_dirty_log(ram.memslot()).unwrap();
    assert!(
        empty.iter().all(|&w| w == 0),
        "{method}: dirty before any vCPU ran"
    );
    let console = Arc::new(Console::new(ConsoleMode::Off));
    let vcpus_built: Vec<Vcpu> = (0..vcpus)
        .map(|i| Vcpu::new(&vm, i, &image).unwrap())
        .collect();
    let (ended_tx, ended_rx) = std::sync::mpsc::channel();
    let on_end = Arc::new(move |index, end| {
        let _ = ended_tx.send((index, end));
    });
    let set = VcpuSet::start(vcpus_built, &console, Arc::new(|_| {}), on_end).unwrap();
    // Each vCPU reports the end of its guest; a full ring that was not harvested would
    // leave a vCPU stuck in KVM and its report missing.
    for _ in 0..vcpus {
        let (index, end) = ended_rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!("{method}: the guest did not finish (a full dirty ring not harvested?)")
            });
        assert_eq!(
            end,
            Ok(VcpuEnd::Exited { code: abi::EXIT_OK }),
            "{method}: vCPU {index}"
        );
    }
    let outcomes: Vec<VcpuOutcome> = set.finish();
    for (index, o) in outcomes.iter().enumerate() {
        assert_eq!(
            o.end,
            Ok(VcpuEnd::Exited { code: abi::EXIT_OK }),
            "{method}: vCPU {index}"
        );
    }
    Touched { vm, ram, outcomes }
}

fn data_pages_dirty(bitmap: &[u64], size: u64) -> (u64, u64) {
    let first = abi::DATA_START / 4096;
    let last = size / 4096;
    let dirty = (first..last)
        .filter(|&p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .count() as u64;
    (dirty, last - first)
}

#[test]
fn a_writing_guest_dirties_its_pages_through_the_ring_and_the_bitmap_alike() {
    if !tests::have_kvm() {
        return;
    }
    const SIZE: u64 = 32 << 20;
    // 256 entries: 7168 data pages overflow it many times; every overflow is a ring-full
    // exit the vCPU must harvest and reset, or KVM would not run it again.
    for method in [
        DirtyLogMethod::Ring { entries: 256 },
        DirtyLogMethod::Ring { entries: 65536 },
        DirtyLogMethod::Bitmap,
    ] {
        let t = touch_once(method, SIZE, 1);
        let bitmap = t.vm.take_dirty_log(t.ram.memslot()).unwrap();
        assert_eq!(bitmap.len(), (SIZE / 4096 / 64) as usize, "{method}");
        let (dirty, pages) = data_pages_dirty(&bitmap, SIZE);
        assert_eq!(dirty, pages, "{method}: every data page was written once");
        let full: u64 = t.outcomes.iter().map(|o| o.dirty_ring_full_exits).sum();
        match method {
            DirtyLogMethod::Ring { entries: 256 } => {
                assert!(full >= pages / 256, "{method}: only {full} ring-full exits")
            }
            _ => assert_eq!(full, 0, "{method}"),
        }
        // Taken means cleared: the guest has stopped, so nothing is dirty now.
        let again = t.vm.take_dirty_log(t.ram.memslot()).unwrap();
        assert!(again.iter().all(|&w| w == 0), "{method}: not cleared");
    }
}

/// The cost of fetching the dirty log of a 1 GiB guest, ring against bitmap: with every
/// data page dirty, and with none. Prints figures; run with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn dirty_log_fetch_cost_on_1g() {
    if !tests::have_kvm() {
        return;
    }
    // Heavy: a 1 GiB guest with 8 vCPUs.
    let _heavy = tests::heavy();
    const SIZE: u64 = 1 << 30;
    // 8 vCPUs × 32640 pages each fit their 65536-entry rings with room to spare: no
    // ring-full exit, so the take below harvests all 261120 entries itself.
    for method in [
        DirtyLogMethod::Ring { entries: 65536 },
        DirtyLogMethod::Bitmap,
    ] {
        let t = touch_once(method, SIZE, 8);
        let full: u64 = t.outcomes.iter().map(|o| o.dirty_ring_full_exits).sum();
        let start = Instant::now();
        let bitmap = t.vm.take_dirty_log(t.ram.memslot()).unwrap();
        let all = start.elapsed();
        let (dirty, _) = data_pages_dirty(&bitmap, SIZE);
        let mut idle = Duration::MAX;
        for _ in 0..20 {
            let start = Instant::now();
            let _ = t.vm.take_dirty_log(t.ram.memslot()).unwrap();
            idle = idle.min(start.elapsed());
        }
        println!(
            "{method}: {dirty} dirty pages fetched in {:.3} ms ({:.1} ns/page); nothing dirty: {:.1} µs; ring-full exits {full}",
            all.as_secs_f64() * 1e3,
            all.as_nanos() as f64 / dirty as f64,
            idle.as_secs_f64() * 1e6
        );
    }
}
