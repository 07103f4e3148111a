//! NUMA at region granularity, without KVM: a hinted 2 MiB region takes one hint fault
//! and is resolved (and collapsed) whole; on a post-copy destination with two emulated
//! nodes, each region lands on the node of the vCPU that touched it, and a region with
//! pages still absent is never moved.
//!
//! The "vCPUs" are host threads registered as vCPUs touching the guest view: the same
//! host path a KVM vCPU's access takes (a fault on the guest view, delivered by
//! userfaultfd with the thread's id).

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use guest_mm::numa::Balancing;
use guest_mm::stage::{Change, Intent, Lookup};
use guest_mm::{
    BackingKind, Error, FaultPathNeed, Gpa, GpaRange, GuestMemory, Installed, MemoryConfig,
    NodeBackendKind, NumaConfig, NumaLayout, PageContent, Pager, RamConfig, SIZE_2M, SIZE_4K,
};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u64 = 16 << 20;

/// Runs `f` on a thread registered as vCPU `vcpu`, waiting (bounded) for it to finish.
fn on_vcpu<T: Send + 'static>(
    memory: &Arc<GuestMemory>,
    vcpu: usize,
    f: impl FnOnce(u64) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let m = memory.clone();
    std::thread::spawn(move || {
        m.vcpu_threads().register_current(vcpu);
        f(m.memslot().userspace_addr)
    })
}

fn join<T>(t: std::thread::JoinHandle<T>, what: &str) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "{what}: never resolved");
        std::thread::sleep(Duration::from_millis(2));
    }
    t.join().unwrap()
}

/// Reads the u64 at `gpa` through the guest view based at `base`.
fn read(base: u64, gpa: u64) -> u64 {
    // SAFETY: test: an aligned u64 inside the guest view.
    unsafe { std::ptr::read_volatile((base + gpa) as *const u64) }
}

#[test]
fn a_hinted_region_takes_one_fault_and_is_resolved_whole() {
    let memory = GuestMemory::create(&MemoryConfig {
        ram: RamConfig {
            size: SIZE,
            backing: BackingKind::Shmem,
            ..Default::default()
        },
        vcpus: 1,
        fault_path: FaultPathNeed::Minor,
        ..Default::default()
    })
    .unwrap();
    let region = GpaRange::new(Gpa(4 << 20), Gpa((4 << 20) + SIZE_2M));
    for p in region.pages(SIZE_4K) {
        memory
            .staging()
            .write_obj(p * SIZE_4K, GuestAddress(p * SIZE_4K))
            .unwrap();
    }
    memory.start().unwrap();
    memory
        .stage()
        .apply(Change::Hint { range: region })
        .unwrap();
    let start = region.start.0;
    // Every page of the region, in order: only the first one faults.
    let sum = join(
        on_vcpu(&memory, 0, move |base| {
            (0..512u64)
                .map(|k| read(base, start + k * SIZE_4K))
                .sum::<u64>()
        }),
        "the region's hint fault",
    );
    assert_eq!(sum, (0..512u64).map(|k| start + k * SIZE_4K).sum::<u64>());
    assert!((0..512u64).all(|k| matches!(
        memory
            .stage()
            .lookup(Gpa(start + k * SIZE_4K), Intent::Vcpu),
        Lookup::Mapped(_)
    )));
    let report = memory.stop();
    let f = report.faults.unwrap();
    assert_eq!((f.uffd_faults, f.hint_faults), (1, 1), "{f:?}");
    assert_eq!(f.error, None);
    // The resolved region went to the collapse engine as a fill (it may or may not
    // have collapsed before the stop; it never failed as incomplete).
    let c = report.collapse.unwrap();
    assert!(
        !c.stats.collapse_failures.contains_key("not_complete"),
        "{c:?}"
    );
}

/// What the "source" sent for a page: its GPA in every word.
fn content(gpa: u64) -> Vec<u8> {
    (0..SIZE_4K / 8).flat_map(|_| gpa.to_le_bytes()).collect()
}

/// The "source": every demand request goes to the test, which answers it.
struct ChannelPager(Mutex<mpsc::Sender<Gpa>>);

impl Pager for ChannelPager {
    fn request(&self, gpa: Gpa) {
        let _ = self.0.lock().unwrap().send(gpa);
    }
}

fn install(memory: &GuestMemory, gpa: u64) -> Installed {
    memory
        .install_page(Gpa(gpa), PageContent::Bytes(&content(gpa)))
        .unwrap()
}

/// A vCPU touches `gpa` (absent): the demand reaches the pager, the test installs the
/// page, the vCPU reads it.
fn demand(memory: &Arc<GuestMemory>, requests: &mpsc::Receiver<Gpa>, vcpu: usize, gpa: u64) {
    let t = on_vcpu(memory, vcpu, move |base| read(base, gpa));
    let asked = requests.recv_timeout(Duration::from_secs(120)).unwrap();
    assert_eq!(asked, Gpa(gpa));
    assert_eq!(install(memory, gpa), Installed::New);
    assert_eq!(join(t, "a demand fault"), gpa);
}

#[test]
fn postcopy_places_each_region_on_its_touchers_node_and_never_moves_an_incomplete_one() {
    let half = SIZE / 2;
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
        vcpus: 2,
        numa: Some(NumaConfig {
            balancing: Balancing::Off,
            vcpu_nodes: vec![0, 1],
            working_sets: vec![
                GpaRange::new(Gpa(0), Gpa(half)),
                GpaRange::new(Gpa(half), Gpa(SIZE)),
            ],
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
    let (tx, requests) = mpsc::channel();
    let all = [GpaRange::new(Gpa(0), Gpa(SIZE))];
    memory
        .begin_postcopy(&all, Arc::new(ChannelPager(Mutex::new(tx))))
        .unwrap();
    memory.start().unwrap();
    // Each vCPU demands the first page of its half.
    demand(&memory, &requests, 0, 4096);
    demand(&memory, &requests, 1, half + 4096);
    // An emulated move of a region that still waits for pages is refused.
    let e = memory.move_region(Gpa(half), 0).unwrap_err();
    assert!(matches!(e, Error::MoveWithAbsentPages { .. }), "{e}");
    // The push: every other page, in address order.
    for p in 0..SIZE / SIZE_4K {
        let gpa = p * SIZE_4K;
        if gpa != 4096 && gpa != half + 4096 {
            assert_eq!(install(&memory, gpa), Installed::New, "{gpa:#x}");
        }
    }
    memory.end_postcopy().unwrap();
    // vCPU 0's half on node 0, vCPU 1's on node 1: the toucher's region and the regions
    // above it, filled before anyone touched them.
    for r in 0..SIZE / SIZE_2M {
        let want = u16::from(r * SIZE_2M >= half);
        assert_eq!(memory.node_of(Gpa(r * SIZE_2M)), want, "region {r}");
    }
    // Every page reads what was sent, through the staging view and through a vCPU.
    let mut page = vec![0u8; SIZE_4K as usize];
    for p in 0..SIZE / SIZE_4K {
        memory.read_page(Gpa(p * SIZE_4K), &mut page).unwrap();
        assert_eq!(page, content(p * SIZE_4K), "page {p}");
    }
    let ok = join(
        on_vcpu(&memory, 1, |base| {
            (0..SIZE / SIZE_4K).all(|p| read(base, p * SIZE_4K) == p * SIZE_4K)
        }),
        "reading every page after post-copy",
    );
    assert!(ok, "a vCPU reads what was sent");
    let report = memory.stop();
    let n = report.numa.unwrap();
    assert!(n.locality_per_vcpu.iter().all(|&l| l == 100.0), "{n:?}");
    let p = n.postcopy.unwrap();
    assert_eq!(p.regions, SIZE / SIZE_2M);
    assert_eq!(p.moved_on_completion, 4, "vCPU 1's half moved: {p:?}");
    assert_eq!(p.demand_faults, 2);
    assert_eq!(n.numa_migrate_failures, 0);
    assert_eq!(report.host_failures, 0);
    assert_eq!(report.faults.unwrap().error, None);
}
