//! The NUMA engine: initial placement, a scanner that hints guest memory a window at a
//! time (a zap through the mmu notifier) at the pace of [`ScanPace`], hint faults from
//! the fault thread recorded against the faulting vCPU's node (one per 2 MiB region per
//! scan: the fault path resolves the whole region), region moves decided by the
//! [`Balancer`], post-copy placement ([`super::postcopy`]), and locality sampling.
//!
//! What the VMM knows and the kernel's automatic NUMA balancing does not: which thread is
//! which vCPU (the fault's thread id) and the guest topology.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::balancer::{Balancer, Decision, Stay};
use super::postcopy::{PostcopyPlacement, Predicted};
use super::report::{self, FullScan, NumaReport, Samples, SCAN_LOG_MAX};
use super::scan::{ScanPace, ScanTally};
use super::spec::Balancing;
use crate::addr::{Gpa, GpaRange, SIZE_2M, SIZE_4K};
use crate::config::{NodeBackendKind, NumaConfig, Recurring};
use crate::error::Error;
use crate::fault::VcpuThreads;
use crate::periodic::Periodic;
use crate::ram::{GuestRam, MovedCache};
use crate::stage::{ApplyError, Change, LeafSize, Region2M, SecondStage};

/// Why a move was not made.
#[derive(Debug)]
pub(crate) enum MoveRefused {
    /// Emulated nodes: the region still waits for post-copy pages (see
    /// [`super::postcopy`] for why it may not be remapped yet).
    Incomplete,
    Failed(Error),
}

impl MoveRefused {
    pub(crate) fn into_error(self, gpa: Gpa) -> Error {
        match self {
            MoveRefused::Incomplete => Error::MoveWithAbsentPages {
                region: region_of(gpa),
            },
            MoveRefused::Failed(e) => e,
        }
    }
}

fn region_of(gpa: Gpa) -> GpaRange {
    let start = gpa.align_down(SIZE_2M);
    GpaRange::new(start, start.add(SIZE_2M))
}

/// Moves the 2 MiB region at `gpa` to `node` through the one door: every mapping of the
/// range is invalidated (the guest view zapped) before the content moves, the table
/// changes after. On emulated nodes a region with absent pages is refused under the
/// table lock, before anything is touched. `cache` is what the region's page cache
/// becomes where it goes (always huge for a region the table holds as one 2 MiB leaf).
pub(crate) fn move_region(
    stage: &SecondStage,
    ram: &GuestRam,
    gpa: Gpa,
    node: u16,
    cache: MovedCache,
) -> Result<(), MoveRefused> {
    let range = region_of(gpa);
    let remaps = ram.numa().backend == NodeBackendKind::Emulated;
    let cache = Cell::new(cache);
    stage
        .apply_checked(
            Change::Move { range, node },
            |t| {
                if remaps && t.occupancy_2m(range.start) < (SIZE_2M / SIZE_4K) as u32 {
                    return Err(MoveRefused::Incomplete);
                }
                if let Region2M::Huge(l) = t.region_2m(range.start) {
                    if l.size == LeafSize::Size2M && ram.page_size() == SIZE_4K {
                        cache.set(MovedCache::Huge);
                    }
                }
                Ok(())
            },
            |w| {
                ram.move_region(w, node, cache.get())
                    .map_err(MoveRefused::Failed)
            },
        )
        .map(|_| ())
        .map_err(|e| match e {
            ApplyError::Host(r) => r,
            ApplyError::Table(source) => MoveRefused::Failed(Error::Table {
                what: "a NUMA move",
                source,
            }),
        })
}

#[derive(Default)]
struct Counters {
    hint_faults: AtomicU64,
    hint_faults_local: AtomicU64,
    regions_moved: AtomicU64,
    move_failures: AtomicU64,
    moves_deferred: AtomicU64,
    held_shared: AtomicU64,
    rate_limited: AtomicU64,
    windows: AtomicU64,
    full_scans: AtomicU64,
}

/// When the scanner's next window is due: a window's wait of wall-clock time (Linux's
/// `mm->numa_next_scan`) *and* of the busiest vCPU's run time (Linux's `task_tick_numa`
/// compares the task's `sum_exec_runtime`), so that a guest starved of CPU by its host
/// is not scanned faster than it runs.
struct Due {
    wall: Instant,
    /// The busiest vCPU's run time to reach; None while no vCPU thread is registered.
    run: Option<Duration>,
}

impl Due {
    /// How long still to wait, or None when the window is due.
    fn wait(&self, vcpus: &VcpuThreads) -> Option<Duration> {
        let wall = self.wall.saturating_duration_since(Instant::now());
        if !wall.is_zero() {
            return Some(wall);
        }
        let (target, now) = (self.run?, vcpus.busiest_runtime()?);
        // The vCPU cannot run faster than the clock: sleep at least what it lacks.
        (now < target).then(|| (target - now).max(Duration::from_millis(1)))
    }
}

/// The hint faults and moves since the last full scan ended.
#[derive(Default)]
struct Tally {
    local: AtomicU64,
    remote: AtomicU64,
    shared: AtomicU64,
    shared_remote: AtomicU64,
    failures: AtomicU64,
    moves: AtomicU64,
}

impl Tally {
    fn take(&self) -> (ScanTally, u64) {
        let t = ScanTally {
            local: self.local.swap(0, Ordering::Relaxed),
            remote: self.remote.swap(0, Ordering::Relaxed),
            shared: self.shared.swap(0, Ordering::Relaxed),
            shared_remote: self.shared_remote.swap(0, Ordering::Relaxed),
            failures: self.failures.swap(0, Ordering::Relaxed),
        };
        (t, self.moves.swap(0, Ordering::Relaxed))
    }
}

pub struct NumaEngine {
    ram: Arc<GuestRam>,
    stage: Arc<SecondStage>,
    cfg: NumaConfig,
    balancer: Mutex<Balancer>,
    counters: Counters,
    tally: Tally,
    /// The full-scan period now, and the last full scan's share of local hint faults.
    period_ms: AtomicU64,
    last_local_share: Mutex<Option<f64>>,
    windows_per_scan: u64,
    /// When the engine's threads started (the guest runs from about then); times in the
    /// report count from here.
    started: OnceLock<Instant>,
    created: Instant,
    samples: Mutex<Samples>,
    scan_log: Mutex<Vec<FullScan>>,
    postcopy: PostcopyPlacement,
    /// The vCPU threads: the scanner paces itself by their run time.
    vcpus: Arc<VcpuThreads>,
    /// What a move leaves in the page cache: huge where hint-resolved regions are made
    /// huge (a move is the cheapest moment: the guest view is zapped for it anyway,
    /// while collapsing later also unmaps the region from the guest view).
    moved_cache: MovedCache,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NumaEngine {
    pub(crate) fn new(
        ram: Arc<GuestRam>,
        stage: Arc<SecondStage>,
        cfg: NumaConfig,
        vcpus: Arc<VcpuThreads>,
        moved_cache: MovedCache,
    ) -> Self {
        let ram_size = ram.size();
        let pace = ScanPace::new(cfg.scan, ram_size);
        NumaEngine {
            balancer: Mutex::new(Balancer::new(cfg.scan, ram_size)),
            period_ms: AtomicU64::new(pace.period_ms()),
            windows_per_scan: pace.windows(),
            last_local_share: Mutex::new(None),
            postcopy: PostcopyPlacement::new(ram_size),
            moved_cache,
            vcpus,
            ram,
            stage,
            cfg,
            counters: Counters::default(),
            tally: Tally::default(),
            started: OnceLock::new(),
            created: Instant::now(),
            samples: Mutex::new(Samples::default()),
            scan_log: Mutex::new(Vec::new()),
        }
    }

    pub fn node_of_vcpu(&self, vcpu: usize) -> u16 {
        self.cfg.vcpu_nodes.get(vcpu).copied().unwrap_or(0)
    }

    /// Whether the region holding `gpa` is on `vcpu`'s node.
    pub fn is_local(&self, gpa: Gpa, vcpu: usize) -> bool {
        self.ram.node_of(gpa) == self.node_of_vcpu(vcpu)
    }

    fn t0(&self) -> Instant {
        self.started.get().copied().unwrap_or(self.created)
    }

    fn now_ms(&self) -> u64 {
        self.t0().elapsed().as_millis() as u64
    }

    fn balances(&self) -> bool {
        self.cfg.balancing == Balancing::On && self.ram.numa().nodes > 1
    }

    /// A move the balancer (or the forced-move tester) asked for, counted.
    fn balance_move(&self, gpa: Gpa, node: u16) {
        match move_region(&self.stage, &self.ram, gpa, node, self.moved_cache) {
            Ok(()) => {
                self.counters.regions_moved.fetch_add(1, Ordering::Relaxed);
                self.tally.moves.fetch_add(1, Ordering::Relaxed);
            }
            Err(MoveRefused::Incomplete) => {
                self.counters.moves_deferred.fetch_add(1, Ordering::Relaxed);
            }
            Err(MoveRefused::Failed(_)) => {
                self.counters.move_failures.fetch_add(1, Ordering::Relaxed);
                self.tally.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A hint fault in the region holding `gpa` by `vcpu`: count it, and move the region
    /// if the policy says so. Called on the fault thread before the fault is resolved.
    pub fn on_hint_fault(&self, gpa: Gpa, vcpu: usize) {
        let node = self.node_of_vcpu(vcpu);
        let current = self.ram.node_of(gpa);
        let local = node == current;
        self.counters.hint_faults.fetch_add(1, Ordering::Relaxed);
        if local {
            self.counters
                .hint_faults_local
                .fetch_add(1, Ordering::Relaxed);
        }
        let side = if local {
            &self.tally.local
        } else {
            &self.tally.remote
        };
        side.fetch_add(1, Ordering::Relaxed);
        if self.postcopy.active() {
            self.postcopy.touched(gpa, vcpu);
            if self.postcopy.incomplete(gpa) {
                // Post-copy placement decides where this region goes when it completes.
                return;
            }
        }
        if !self.balances() {
            return;
        }
        let (decision, shared) = {
            let mut b = locked(&self.balancer);
            let d = b.on_hint_fault(gpa, node, current, self.now_ms());
            (d, b.is_shared(gpa))
        };
        if shared {
            self.tally.shared.fetch_add(1, Ordering::Relaxed);
            if !local {
                self.tally.shared_remote.fetch_add(1, Ordering::Relaxed);
            }
        }
        match decision {
            Decision::Move { to } => self.balance_move(gpa, to),
            Decision::Stay(Stay::Shared) => {
                self.counters.held_shared.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Stay(Stay::RateLimited) => {
                self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Stay(_) => {}
        }
    }

    /// Post-copy begins: `absent` (backing pages of `page` bytes) are still to come.
    pub(crate) fn begin_postcopy(&self, absent: &[GpaRange], page: u64) {
        self.postcopy.begin(absent, page);
    }

    pub(crate) fn end_postcopy(&self) {
        self.postcopy.end();
    }

    fn places_on_host(&self) -> bool {
        let n = self.ram.numa();
        self.postcopy.active() && n.nodes > 1 && n.backend == NodeBackendKind::Host
    }

    /// Post-copy: `vcpu` faulted on the absent page at `gpa`. On host nodes a region that
    /// has received nothing yet goes to the vCPU's node now, so the page lands there.
    pub fn on_demand_fault(&self, gpa: Gpa, vcpu: usize) {
        if !self.postcopy.active() {
            return;
        }
        self.postcopy.demanded(gpa, vcpu);
        if self.places_on_host() && self.postcopy.untouched_by_fill(gpa) {
            self.place_before_fill(gpa, self.node_of_vcpu(vcpu));
        }
    }

    fn place_before_fill(&self, gpa: Gpa, node: u16) {
        if self.ram.node_of(gpa) == node {
            return;
        }
        match move_region(&self.stage, &self.ram, gpa, node, self.moved_cache) {
            Ok(()) => {
                self.postcopy
                    .placed_before_fill
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.move_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Post-copy, before a page is installed at `gpa`: on host nodes, the first page of a
    /// region places the region on its predicted node.
    pub(crate) fn before_install(&self, gpa: Gpa) {
        if !self.places_on_host() || !self.postcopy.untouched_by_fill(gpa) {
            return;
        }
        if let Some(p) = self.postcopy.predict(gpa) {
            self.place_before_fill(gpa, self.node_of_vcpu(p.vcpu()));
        }
    }

    /// Post-copy, after a page was installed at `gpa`: the region's last page moves the
    /// region to its last toucher's node (or the predicted one) if it is elsewhere.
    pub(crate) fn after_install(&self, gpa: Gpa) {
        if !self.postcopy.active()
            || !self.postcopy.filled(gpa).completed
            || self.ram.numa().nodes < 2
        {
            return;
        }
        let Some(p) = self.postcopy.predict(gpa) else {
            return;
        };
        if matches!(p, Predicted::OwnToucher(_)) {
            self.postcopy
                .from_own_toucher
                .fetch_add(1, Ordering::Relaxed);
        }
        let node = self.node_of_vcpu(p.vcpu());
        if self.ram.node_of(gpa) == node {
            self.postcopy.already_placed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match move_region(&self.stage, &self.ram, gpa, node, self.moved_cache) {
            Ok(()) => {
                self.postcopy
                    .moved_on_completion
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(MoveRefused::Incomplete) => {
                self.counters.moves_deferred.fetch_add(1, Ordering::Relaxed);
            }
            Err(MoveRefused::Failed(_)) => {
                self.counters.move_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Applies the configured initial placement (before the guest runs).
    pub(crate) fn place_initial(&self) -> Result<(), Error> {
        if self.ram.numa().nodes < 2 {
            return Ok(());
        }
        for &(range, node) in &self.cfg.placement {
            for r in range.pages(SIZE_2M) {
                let gpa = Gpa(r * SIZE_2M);
                if self.ram.node_of(gpa) == node {
                    continue;
                }
                // In 4 KiB pages: a region placed before the guest runs is collapsed, if
                // at all, once hint faults show it is where its vCPU is.
                move_region(&self.stage, &self.ram, gpa, node, MovedCache::Pages).map_err(|e| {
                    Error::Placement {
                        range: region_of(gpa),
                        node,
                        source: Box::new(e.into_error(gpa)),
                    }
                })?;
            }
        }
        Ok(())
    }

    fn locality_per_vcpu(&self) -> Vec<f64> {
        report::locality_per_vcpu(
            &self.ram.region_nodes(),
            &self.cfg.working_sets,
            &self.cfg.vcpu_nodes,
        )
    }

    /// Share of each vCPU's working set on its own node, averaged over vCPUs (percent).
    pub fn locality_pct(&self) -> f64 {
        report::average(&self.locality_per_vcpu())
    }

    fn full_scans_so_far(&self) -> f64 {
        self.counters.windows.load(Ordering::Relaxed) as f64 / self.windows_per_scan as f64
    }

    fn sample(&self) {
        let t = self.t0().elapsed().as_secs_f64() * 1000.0;
        let pct = self.locality_pct();
        let faults = self.counters.hint_faults.load(Ordering::Relaxed);
        locked(&self.samples).record(t, pct, faults, self.full_scans_so_far());
    }

    /// Starts the locality sampler, the scanner (balancing on, more than one node) and
    /// the forced moves (if configured).
    pub(crate) fn start_threads(self: &Arc<Self>) -> Result<Vec<Periodic>, Error> {
        let io = |source| Error::Thread {
            name: "NUMA",
            source,
        };
        let mut threads = Vec::new();
        let _ = self.started.set(Instant::now());
        let e = self.clone();
        e.sample();
        threads.push(
            Periodic::spawn("numa-sampler", move || {
                e.sample();
                Duration::from_millis(100)
            })
            .map_err(io)?,
        );
        if self.balances() {
            threads.push(self.start_scanner().map_err(io)?);
        }
        if let Some(f) = self.cfg.forced_moves {
            threads.push(self.start_forced_moves(f).map_err(io)?);
        }
        Ok(threads)
    }

    fn start_scanner(self: &Arc<Self>) -> std::io::Result<Periodic> {
        let e = self.clone();
        let mut pace = ScanPace::new(self.cfg.scan, self.ram.size());
        // Whole regions per window: a region is hinted, and resolved, as a whole.
        let window = (self.cfg.scan.scan_window / SIZE_2M).max(1) * SIZE_2M;
        let mut cursor = 0u64;
        let mut due: Option<Due> = None;
        Periodic::spawn("numa-scanner", move || {
            if let Some(wait) = due.as_ref().and_then(|d| d.wait(&e.vcpus)) {
                return wait;
            }
            let size = e.ram.size();
            if cursor == 0 && e.counters.windows.load(Ordering::Relaxed) > 0 {
                e.full_scan_done(&mut pace);
            }
            let end = (cursor + window).min(size);
            let _ = e.stage.apply(Change::Hint {
                range: GpaRange::new(Gpa(cursor), Gpa(end)),
            });
            cursor = if end >= size { 0 } else { end };
            e.counters.windows.fetch_add(1, Ordering::Relaxed);
            let wait = pace.window_wait();
            due = Some(Due {
                wall: Instant::now() + wait,
                run: e.vcpus.busiest_runtime().map(|r| r + wait),
            });
            wait
        })
    }

    /// A full scan ended: the pace follows its hint faults (like task_numa_work's
    /// `update_task_scan_period`), and the scan log keeps what it saw.
    fn full_scan_done(&self, pace: &mut ScanPace) {
        let (tally, moves) = self.tally.take();
        let period_ms = pace.period_ms();
        let next_period_ms = pace.after_full_scan(&tally);
        self.period_ms.store(next_period_ms, Ordering::Relaxed);
        self.counters.full_scans.fetch_add(1, Ordering::Relaxed);
        if tally.faults() > 0 {
            *locked(&self.last_local_share) = Some(tally.local_pct());
        }
        let mut log = locked(&self.scan_log);
        if log.len() < SCAN_LOG_MAX {
            log.push(FullScan {
                end_ms: self.t0().elapsed().as_secs_f64() * 1000.0,
                period_ms,
                next_period_ms,
                tally,
                moves,
            });
        }
    }

    /// Testing: moves a pseudo-random region to another node every period.
    fn start_forced_moves(self: &Arc<Self>, f: Recurring) -> std::io::Result<Periodic> {
        let e = self.clone();
        let mut x = f.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        Periodic::spawn("numa-force-move", move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let regions = e.ram.size() / SIZE_2M;
            let gpa = Gpa((x % regions) * SIZE_2M);
            let nodes = e.ram.numa().nodes as u64;
            let to =
                ((e.ram.node_of(gpa) as u64 + 1 + (x >> 40) % (nodes - 1).max(1)) % nodes) as u16;
            e.balance_move(gpa, to);
            f.period
        })
    }

    pub fn report(&self) -> NumaReport {
        let samples = locked(&self.samples);
        let c = &self.counters;
        let per_vcpu = self.locality_per_vcpu();
        let moved = c.regions_moved.load(Ordering::Relaxed);
        NumaReport {
            nodes: self.ram.numa().nodes,
            backend: self.ram.numa().backend.to_string(),
            balancing: self.cfg.balancing == Balancing::On,
            vcpu_nodes: self.cfg.vcpu_nodes.clone(),
            numa_hint_faults: c.hint_faults.load(Ordering::Relaxed),
            numa_hint_faults_local: c.hint_faults_local.load(Ordering::Relaxed),
            numa_pages_migrated: moved * (SIZE_2M / SIZE_4K),
            numa_migrate_failures: c.move_failures.load(Ordering::Relaxed),
            regions_moved: moved,
            moves_deferred: c.moves_deferred.load(Ordering::Relaxed),
            held_shared: c.held_shared.load(Ordering::Relaxed),
            rate_limited: c.rate_limited.load(Ordering::Relaxed),
            locality_pct: report::average(&per_vcpu),
            locality_per_vcpu: per_vcpu,
            scans: c.windows.load(Ordering::Relaxed),
            full_scans: c.full_scans.load(Ordering::Relaxed),
            scan_windows: self.windows_per_scan,
            scan_period_ms: self.period_ms.load(Ordering::Relaxed),
            local_share_pct: *locked(&self.last_local_share),
            scan_log: locked(&self.scan_log).clone(),
            locality_over_time: samples.locality.clone(),
            hint_faults_over_time: samples.hint_faults.clone(),
            time_to_95_ms: samples.time_to_95_ms,
            scans_to_95: samples.scans_to_95,
            postcopy: self.postcopy.report(),
            note: self.cfg.note.clone(),
        }
    }
}
