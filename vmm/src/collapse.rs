//! The collapse engine: one thread that turns complete 2 MiB regions of guest RAM into
//! huge pages (policy and host sequence in `guest_mm::collapse`).
//!
//! Who feeds it:
//! - a post-copy destination's receivers, after each page they install (`filled`);
//! - every migration destination once it resumes (`sweep`): regions that pre-copy
//!   completed before the switch;
//! - with `--collapse background`, its own khugepaged-like scan of populated regions
//!   (mincore of the guest view), within a budget of pages per period and collapses per
//!   second, choosing mTHP orders by recursion over the region's bitmap.
//!
//! A failed collapse is counted by reason and, where the errno says it may pass (EBUSY,
//! EAGAIN, ENOMEM), retried up to `MAX_ATTEMPTS` times; it never changes guest content.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_mm::collapse::{
    choose_orders, collapse_region, region_complete, CollapseMode, CollapseStats, ScanBudget,
};
use guest_mm::stage::SecondStage;
use guest_mm::table::{Region2M, SIZE_2M};
use guest_mm::{BackingKind, GuestRam};

const MAX_ATTEMPTS: u32 = 5;
/// The collapse thread's nice value (see `Worker::run`).
const COLLAPSE_NICE: libc::c_int = 10;
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Smallest mTHP order the scan considers (16 KiB), as the kernel's smallest mTHP size.
const MIN_MTHP_ORDER: u32 = 2;

enum Msg {
    /// A page of the region at this GPA became final.
    Filled(u64),
    /// Look at every region (a migration destination resumed).
    Sweep,
    Stop,
}

/// Messages taken in one go: regions with new fills, and whether to sweep.
#[derive(Default)]
struct Pending {
    filled: std::collections::BTreeSet<u64>,
    sweep: bool,
}

impl Pending {
    /// Adds `msg`; false for Stop.
    fn add(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Filled(gpa) => {
                self.filled.insert(gpa & !(SIZE_2M - 1));
            }
            Msg::Sweep => self.sweep = true,
            Msg::Stop => return false,
        }
        true
    }
}

/// Handle to the collapse thread.
pub struct CollapseEngine {
    tx: mpsc::Sender<Msg>,
    /// Fill and sweep messages sent but not yet handled, plus queued retries: zero when
    /// the engine has nothing left to do (what tests and `vm.info` wait for).
    outstanding: Arc<std::sync::atomic::AtomicU64>,
    scan_sweeps: Arc<std::sync::atomic::AtomicU64>,
    handle: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<CollapseStats>>,
    mode: CollapseMode,
}

/// The engine's state while it runs (`vm.info`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CollapseProgress {
    pub mode: &'static str,
    pub collapses: u64,
    /// Nothing queued: no fill or sweep waiting, no retry pending.
    pub idle: bool,
    pub regions_scanned: u64,
    /// Full passes of the background scan over guest RAM.
    pub scan_sweeps: u64,
}

/// What the run report carries about collapse.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CollapseReport {
    pub mode: &'static str,
    #[serde(flatten)]
    pub stats: CollapseStats,
}

/// Whether collapse applies to this backing at all: hugetlb is huge already.
pub fn applies_to(backing: BackingKind) -> bool {
    !matches!(backing, BackingKind::Hugetlb2M | BackingKind::Hugetlb1G)
}

impl CollapseEngine {
    /// Starts the engine; `uffd` is the post-copy registration of the guest view, if any
    /// (its CONTINUE maps a collapsed region before the guest view's own collapse).
    pub fn start(
        mode: CollapseMode,
        budget: ScanBudget,
        ram: Arc<GuestRam>,
        stage: Arc<SecondStage>,
        uffd: Option<Arc<uffd::Uffd>>,
    ) -> std::io::Result<CollapseEngine> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(CollapseStats::default()));
        let outstanding = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let scan_sweeps = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker = Worker {
            outstanding: outstanding.clone(),
            scan_sweeps: scan_sweeps.clone(),
            mode,
            budget,
            ram,
            stage,
            uffd,
            stats: stats.clone(),
            retries: VecDeque::new(),
            attempted: Default::default(),
            cursor: 0,
            started: Instant::now(),
            window_start: Instant::now(),
            collapses_in_window: 0,
        };
        let handle = std::thread::Builder::new()
            .name("collapse".into())
            .spawn(move || worker.run(rx))?;
        Ok(CollapseEngine {
            tx,
            outstanding,
            scan_sweeps,
            handle: Mutex::new(Some(handle)),
            stats,
            mode,
        })
    }

    /// A page at `gpa` now holds its final content.
    pub fn filled(&self, gpa: u64) {
        self.send(Msg::Filled(gpa));
    }

    /// Look at every region once (complete ones collapse).
    pub fn sweep(&self) {
        self.send(Msg::Sweep);
    }

    fn send(&self, msg: Msg) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(msg).is_err() {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// What the engine has done so far, while it runs.
    pub fn progress(&self) -> CollapseProgress {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        CollapseProgress {
            mode: self.mode.name(),
            collapses: s.collapses,
            idle: self.outstanding.load(Ordering::Acquire) == 0,
            regions_scanned: s.regions_scanned,
            scan_sweeps: self.scan_sweeps.load(Ordering::Acquire),
        }
    }

    /// Stops the thread (pending work is dropped) and returns what it did.
    pub fn stop(&self) -> CollapseReport {
        let _ = self.tx.send(Msg::Stop);
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        CollapseReport {
            mode: self.mode.name(),
            stats,
        }
    }
}

struct Worker {
    outstanding: Arc<std::sync::atomic::AtomicU64>,
    scan_sweeps: Arc<std::sync::atomic::AtomicU64>,
    mode: CollapseMode,
    budget: ScanBudget,
    ram: Arc<GuestRam>,
    stage: Arc<SecondStage>,
    uffd: Option<Arc<uffd::Uffd>>,
    stats: Arc<Mutex<CollapseStats>>,
    /// (region, attempts so far, not before)
    retries: VecDeque<(u64, u32, Instant)>,
    /// Regions on-fill has tried already.
    attempted: std::collections::HashSet<u64>,
    cursor: u64,
    started: Instant,
    window_start: Instant,
    collapses_in_window: u32,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        // Collapsing is background work: on a small host it competes for CPU with the
        // vCPUs and the post-copy receivers, which the guest waits on. Run it at nice 10
        // (Linux applies PRIO_PROCESS to a single thread when given its tid; no crate
        // wraps per-thread priority, so libc). Failure only means normal priority.
        // SAFETY: plain syscalls on this thread's own id; no memory is passed.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, COLLAPSE_NICE);
        }
        let tick = match self.mode {
            CollapseMode::Background => self.budget.period,
            _ => RETRY_AFTER,
        };
        let mut next_scan = Instant::now() + tick;
        loop {
            let wait = next_scan.saturating_duration_since(Instant::now());
            // Take everything queued: under load, hundreds of fills arrive together, and
            // each region's table entries are then read once, not once per page.
            let mut pending = Pending::default();
            let mut taken = 0u64;
            match rx.recv_timeout(wait) {
                Ok(msg) => {
                    let mut next = Some(msg);
                    while let Some(msg) = next {
                        if !pending.add(msg) {
                            return;
                        }
                        taken += 1;
                        next = rx.try_recv().ok();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            for region in pending.filled {
                // The first look that finds a region complete tries it (retries are
                // queued separately).
                if !self.attempted.contains(&region) && region_complete(&self.stage, region) {
                    self.attempted.insert(region);
                    self.attempt(region, 1);
                }
            }
            if pending.sweep {
                let mut r = 0;
                while r + SIZE_2M <= self.ram.size() {
                    if region_complete(&self.stage, r) {
                        self.attempt(r, 1);
                    }
                    r += SIZE_2M;
                }
            }
            if Instant::now() >= next_scan {
                self.retry_due();
                if self.mode == CollapseMode::Background {
                    self.scan();
                }
                next_scan = Instant::now() + tick;
            }
            // Handled only now, after the regions they named were tried.
            self.outstanding.fetch_sub(taken, Ordering::AcqRel);
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, CollapseStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Collapses `region` now; on a transient failure queues it for later.
    fn attempt(&mut self, region: u64, attempt: u32) -> bool {
        let uffd = self.uffd.clone();
        let map_guest_view = |start: u64| {
            if let Some(u) = &uffd {
                // Errors are harmless here: EEXIST where pages are mapped already, or
                // the range was unregistered because post-copy ended. The guest view's
                // collapse that follows maps the (complete) region either way.
                let base = self.ram.guest_view_addr() as u64;
                let _ = u.continue_range(base + start, SIZE_2M, uffd::Wake::Yes);
            }
            Ok(())
        };
        match collapse_region(&self.ram, &self.stage, region, map_guest_view) {
            Ok(took) => {
                let regions = (self.ram.size() / SIZE_2M).max(1);
                let since_start = self.started.elapsed().as_secs_f64() * 1e3;
                let mut s = self.stats();
                s.collapses += 1;
                s.collapse_ms_total += took.as_secs_f64() * 1e3;
                if s.collapsed_50pct_ms.is_none() && s.collapses * 2 >= regions {
                    s.collapsed_50pct_ms = Some(since_start);
                }
                if s.collapsed_95pct_ms.is_none() && s.collapses * 100 >= regions * 95 {
                    s.collapsed_95pct_ms = Some(since_start);
                }
                true
            }
            Err(why) => {
                self.stats().failed(why);
                if why.retry_later() && attempt < MAX_ATTEMPTS {
                    self.outstanding.fetch_add(1, Ordering::AcqRel);
                    self.retries
                        .push_back((region, attempt + 1, Instant::now() + RETRY_AFTER));
                }
                false
            }
        }
    }

    fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<_> = self
            .retries
            .iter()
            .copied()
            .filter(|r| r.2 <= now)
            .collect();
        self.retries.retain(|r| r.2 > now);
        let due_count = due.len() as u64;
        for (region, attempt, _) in due {
            if region_complete(&self.stage, region) {
                self.attempt(region, attempt);
            }
        }
        self.outstanding.fetch_sub(due_count, Ordering::AcqRel);
    }

    /// Which of the region's 512 pages the host holds (mincore of the guest view).
    fn populated(&self, region: u64) -> Option<[u64; 8]> {
        let mut vec = [0u8; 512];
        // SAFETY: `region + 2 MiB <= ram.size()` (the caller checks), so the range lies in
        // the guest view mapping; `vec` has one byte per 4 KiB page of it.
        let r = unsafe {
            libc::mincore(
                self.ram.guest_view_addr().add(region as usize).cast(),
                SIZE_2M as usize,
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return None;
        }
        let mut bits = [0u64; 8];
        for (i, b) in vec.iter().enumerate() {
            if b & 1 != 0 {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        Some(bits)
    }

    /// One period of the background scan: up to `pages_per_period` pages' worth of
    /// regions from the cursor, collapsing at most the rate allows.
    fn scan(&mut self) {
        if self.window_start.elapsed() >= Duration::from_secs(1) {
            self.window_start = Instant::now();
            self.collapses_in_window = 0;
        }
        let regions = (self.budget.pages_per_period / 512).max(1);
        let total = self.ram.size() / SIZE_2M;
        for _ in 0..regions.min(total) {
            let region = self.cursor;
            self.cursor = (self.cursor + SIZE_2M) % (total * SIZE_2M);
            if self.cursor == 0 {
                self.scan_sweeps.fetch_add(1, Ordering::AcqRel);
            }
            // Already one leaf: nothing to do.
            if !matches!(
                self.stage.inspect(|t| t.region_2m(region)),
                Region2M::Pieces { .. }
            ) {
                continue;
            }
            let Some(populated) = self.populated(region) else {
                continue;
            };
            let choices = choose_orders(&populated, self.budget.max_ptes_none, MIN_MTHP_ORDER);
            {
                let mut s = self.stats();
                s.regions_scanned += 1;
                for c in &choices {
                    *s.orders_chosen.entry(c.order).or_default() += 1;
                }
            }
            self.stage.record_orders(region, &choices);
            let pmd = choices.iter().any(|c| c.order == 9);
            if pmd && self.collapses_in_window < self.budget.max_collapses_per_sec {
                self.collapses_in_window += 1;
                self.attempt(region, 1);
            }
        }
    }
}
