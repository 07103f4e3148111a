//! The collapse engine: one thread that turns complete 2 MiB regions of guest RAM into
//! huge pages (policy and host sequence in [`super::policy`]).
//!
//! Who feeds it:
//! - every migration destination once it resumes (`sweep`): regions that pre-copy
//!   completed before the switch; a post-copy destination (and a lazy restore) once
//!   every page is in (`sweep` from `end_postcopy`): nothing collapses while post-copy
//!   runs, where a collapse's in-kernel copy delays the demand path;
//! - the fault thread, for a region a hint fault resolved whole (`filled`);
//! - with `--collapse background`, its own khugepaged-like scan of populated regions
//!   (mincore of the guest view), within a budget of pages per period and collapses per
//!   second, choosing mTHP orders by recursion over the region's bitmap.
//!
//! A failed collapse is counted by reason and, where the errno says it may pass (EBUSY,
//! EAGAIN, ENOMEM), retried up to `MAX_ATTEMPTS` times; it never changes guest content.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::policy::{
    choose_orders, collapse_region, region_complete, CollapseMode, CollapseStats, ScanBudget,
};
use crate::addr::{Gpa, GpaRange, SIZE_2M};
use crate::error::Error;
use crate::guest_view::GuestView;
use crate::ram::GuestRam;
use crate::stage::{Region2M, SecondStage};

const MAX_ATTEMPTS: u32 = 5;
/// How much nicer than the VMM the collapse thread runs (see `Worker::run`).
const COLLAPSE_NICER_BY: libc::c_int = 10;
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Smallest mTHP order the scan considers (16 KiB), as the kernel's smallest mTHP size.
const MIN_MTHP_ORDER: u32 = 2;

enum Msg {
    /// A page of the region at this GPA became final.
    Filled(Gpa),
    /// Look at every region (a migration destination resumed).
    Sweep,
    Stop,
}

/// Messages taken in one go: regions with new fills, and whether to sweep.
#[derive(Default)]
struct Pending {
    filled: std::collections::BTreeSet<Gpa>,
    sweep: bool,
    /// Messages taken (for the engine's idle count).
    taken: u64,
}

impl Pending {
    /// Adds `msg`; false for Stop.
    fn add(&mut self, msg: Msg) -> bool {
        self.taken += 1;
        match msg {
            Msg::Filled(gpa) => {
                self.filled.insert(gpa.align_down(SIZE_2M));
            }
            Msg::Sweep => self.sweep = true,
            Msg::Stop => return false,
        }
        true
    }
}

/// Handle to the collapse thread. Made with guest memory; its thread starts later
/// (`start`), and messages sent before that wait in the queue.
pub(crate) struct CollapseEngine {
    tx: mpsc::Sender<Msg>,
    worker: Mutex<Option<Worker>>,
    rx: Mutex<Option<mpsc::Receiver<Msg>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<CollapseStats>>,
    work: Arc<Work>,
    mode: CollapseMode,
}

/// Work not done yet: messages queued and regions waiting for a retry.
#[derive(Default)]
struct Work {
    queued: AtomicU64,
    retries: AtomicU64,
}

/// What the run report carries about collapse.
#[derive(Clone, Debug, Serialize)]
pub struct CollapseReport {
    pub mode: &'static str,
    #[serde(flatten)]
    pub stats: CollapseStats,
}

/// The collapse engine while it runs: its counters and whether anything is left to do.
#[derive(Clone, Debug, Serialize)]
pub struct CollapseStatus {
    #[serde(flatten)]
    pub report: CollapseReport,
    /// No fills or sweeps queued and no retries pending.
    pub idle: bool,
}

impl CollapseEngine {
    pub(crate) fn new(
        mode: CollapseMode,
        budget: ScanBudget,
        ram: Arc<GuestRam>,
        stage: Arc<SecondStage>,
        view: Arc<GuestView>,
    ) -> CollapseEngine {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(CollapseStats::default()));
        let work = Arc::new(Work::default());
        let worker = Worker {
            mode,
            budget,
            ram,
            stage,
            view,
            stats: stats.clone(),
            work: work.clone(),
            retries: VecDeque::new(),
            attempted: Default::default(),
            cursor: Gpa::ZERO,
            started: Instant::now(),
            window_start: Instant::now(),
            collapses_in_window: 0,
        };
        CollapseEngine {
            tx,
            worker: Mutex::new(Some(worker)),
            rx: Mutex::new(Some(rx)),
            handle: Mutex::new(None),
            stats,
            work,
            mode,
        }
    }

    /// Starts the thread (once; later calls do nothing).
    pub(crate) fn start(&self) -> Result<(), Error> {
        let worker = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (Some(mut worker), Some(rx)) = (worker, rx) else {
            return Ok(());
        };
        worker.started = Instant::now();
        let handle = std::thread::Builder::new()
            .name("collapse".into())
            .spawn(move || worker.run(rx))
            .map_err(|source| Error::Thread {
                name: "collapse",
                source,
            })?;
        *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    fn send(&self, msg: Msg) {
        self.work.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(msg).is_err() {
            self.work.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A page at `gpa` now holds its final content.
    pub(crate) fn filled(&self, gpa: Gpa) {
        self.send(Msg::Filled(gpa));
    }

    /// Look at every region once (complete ones collapse).
    pub(crate) fn sweep(&self) {
        self.send(Msg::Sweep);
    }

    fn report(&self) -> CollapseReport {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        CollapseReport {
            mode: self.mode.name(),
            stats,
        }
    }

    /// The counters so far, and whether the engine has nothing left to do.
    pub(crate) fn status(&self) -> CollapseStatus {
        CollapseStatus {
            report: self.report(),
            idle: self.work.queued.load(Ordering::Acquire) == 0
                && self.work.retries.load(Ordering::Acquire) == 0,
        }
    }

    /// Stops the thread (pending work is dropped) and returns what it did.
    pub(crate) fn stop(&self) -> CollapseReport {
        let _ = self.tx.send(Msg::Stop);
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.report()
    }
}

struct Worker {
    mode: CollapseMode,
    budget: ScanBudget,
    ram: Arc<GuestRam>,
    stage: Arc<SecondStage>,
    view: Arc<GuestView>,
    stats: Arc<Mutex<CollapseStats>>,
    work: Arc<Work>,
    /// (region, attempts so far, not before)
    retries: VecDeque<(Gpa, u32, Instant)>,
    /// Regions on-fill has tried already.
    attempted: std::collections::HashSet<Gpa>,
    cursor: Gpa,
    started: Instant,
    window_start: Instant,
    collapses_in_window: u32,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        // Collapsing is background work: on a small host it competes for CPU with the
        // vCPUs and the post-copy receivers, which the guest waits on. Run it 10 nicer
        // than the VMM (nice 10 for a VMM at 0): relative, because a fixed nice 10 would
        // *raise* the thread above vCPUs of a VMM started at nice 19 (measured: it
        // starved them on a shared host). Linux applies PRIO_PROCESS to a single thread
        // when given its tid; no crate wraps per-thread priority, so libc. Failure only
        // means the VMM's priority.
        // SAFETY: plain syscalls on this thread's own id; no memory is passed.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            *libc::__errno_location() = 0;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            if *libc::__errno_location() == 0 {
                libc::setpriority(libc::PRIO_PROCESS, tid, (now + COLLAPSE_NICER_BY).min(19));
            }
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
            match rx.recv_timeout(wait) {
                Ok(msg) => {
                    let mut next = Some(msg);
                    while let Some(msg) = next {
                        if !pending.add(msg) {
                            return;
                        }
                        next = rx.try_recv().ok();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let taken = pending.taken;
            for region in pending.filled {
                // The first look that finds a region complete tries it (retries are
                // queued separately).
                if !self.attempted.contains(&region) && region_complete(&self.stage, region) {
                    self.attempted.insert(region);
                    self.attempt(region, 1);
                }
            }
            if pending.sweep {
                for r in 0..self.ram.size() / SIZE_2M {
                    let region = Gpa(r * SIZE_2M);
                    if region_complete(&self.stage, region) {
                        self.attempt(region, 1);
                    }
                }
            }
            if Instant::now() >= next_scan {
                self.retry_due();
                if self.mode == CollapseMode::Background {
                    self.scan();
                }
                next_scan = Instant::now() + tick;
            }
            self.work
                .retries
                .store(self.retries.len() as u64, Ordering::Release);
            self.work.queued.fetch_sub(taken, Ordering::AcqRel);
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, CollapseStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Collapses `region` now; on a transient failure queues it for later.
    fn attempt(&mut self, region: Gpa, attempt: u32) -> bool {
        match collapse_region(&self.ram, &self.stage, &self.view, region) {
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
        for (region, attempt, _) in due {
            if region_complete(&self.stage, region) {
                self.attempt(region, attempt);
            }
        }
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
            self.cursor = Gpa((self.cursor.0 + SIZE_2M) % (total * SIZE_2M));
            if self.cursor == Gpa::ZERO {
                self.stats().scan_sweeps += 1;
            }
            // Already one leaf: nothing to do.
            if !matches!(
                self.stage.inspect(|t| t.region_2m(region)),
                Region2M::Pieces { .. }
            ) {
                continue;
            }
            // Populated: which of the region's 512 pages the host holds (mincore of the
            // guest view).
            let span = GpaRange::new(region, region.add(SIZE_2M));
            let Some(populated) = self.ram.resident_2m(span) else {
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
