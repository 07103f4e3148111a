//! The fault thread: userfaultfd events of the guest view, resolved against the
//! second-stage table.
//!
//! ```text
//! vCPU touches GPA ─▶ KVM shadow/EPT miss ─▶ host fault on the guest view ─▶ uffd event
//!   ─▶ fault thread: VA→GPA, thread id→vCPU (the registry vCPU threads fill)
//!   ─▶ table lookup (Intent::Vcpu)
//!        hinted  ─▶ count the hint, tell the NUMA engine (it may move the region), then
//!                   resolve every hinted page of the 2 MiB region with one CONTINUE
//!        absent  ─▶ tell the NUMA engine who touched the region, ask the `Pager`
//!                   (post-copy); the page's arrival resolves the fault
//!        present ─▶ a zap raced us: resolve the same way
//!   ─▶ resolve: under the table lock, if no invalidation ran since the decision's
//!      sequence token, table → present, then the one CONTINUE; otherwise retry
//! ```
//!
//! Only file-backed RAM has this path: MINOR faults need shmem or hugetlbfs page cache.
//! A MINOR-only registration leaves holes to the kernel, which zero-fills them without
//! an event; post-copy registers MISSING too.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;

use crate::addr::{Gpa, GpaRange, SIZE_2M, SIZE_4K};
use crate::collapse::CollapseEngine;
use crate::error::Error;
use crate::guest_view::GuestView;
use crate::numa::NumaEngine;
use crate::page::Pager;
use crate::ram::{GuestRam, View};
use crate::stage::{Dirtied, FaultCause, Intent, Lookup, RegionRuns, SecondStage};
use crate::stats::LatencyHistogram;

/// What the fault path counted.
#[derive(Default)]
pub struct FaultStats {
    pub faults: AtomicU64,
    /// Faults on a hole of the page cache (MISSING: post-copy's not-yet-arrived pages).
    pub missing: AtomicU64,
    /// Faults on a page the page cache holds but the guest view does not map (MINOR).
    pub minor: AtomicU64,
    pub hint_faults: AtomicU64,
    /// Faults on a page the table already had present (a zap raced the fault).
    pub raced: AtomicU64,
    /// Decisions retried because an invalidation ran in between.
    pub retries: AtomicU64,
    /// Events whose thread id is no vCPU's (VMM threads touching the guest view).
    pub unknown_thread: AtomicU64,
    pub errors: AtomicU64,
    pub per_vcpu: Vec<AtomicU64>,
    pub latency: Mutex<LatencyHistogram>,
    pub first_error: Mutex<Option<String>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    pub uffd_faults: u64,
    pub missing_faults: u64,
    pub minor_faults: u64,
    pub fault_us_p50: f64,
    pub fault_us_p99: f64,
    pub fault_us_max: f64,
    pub hint_faults: u64,
    pub raced_faults: u64,
    pub retries: u64,
    pub per_vcpu: Vec<u64>,
    pub error: Option<String>,
}

impl FaultStats {
    pub fn new(vcpus: usize) -> Self {
        FaultStats {
            per_vcpu: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    pub(crate) fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.first_error.lock() {
            e.get_or_insert(what);
        }
    }

    pub fn report(&self) -> FaultReport {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        FaultReport {
            uffd_faults: self.faults.load(Ordering::Relaxed),
            missing_faults: self.missing.load(Ordering::Relaxed),
            minor_faults: self.minor.load(Ordering::Relaxed),
            fault_us_p50: h.percentile_us(50.0),
            fault_us_p99: h.percentile_us(99.0),
            fault_us_max: h.max_us(),
            hint_faults: self.hint_faults.load(Ordering::Relaxed),
            raced_faults: self.raced.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            per_vcpu: self
                .per_vcpu
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            error: self.first_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// vCPU thread ids, so a fault event's thread id names its vCPU. The VMM's vCPU threads
/// fill it; faults of threads not (yet) in it are counted as unknown, never refused.
pub struct VcpuThreads {
    tids: Vec<AtomicU32>,
}

impl VcpuThreads {
    pub fn new(vcpus: usize) -> Self {
        VcpuThreads {
            tids: (0..vcpus).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Called on the vCPU's own thread before it first enters the guest.
    pub fn register_current(&self, index: usize) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        if let Some(t) = self.tids.get(index) {
            t.store(tid, Ordering::Release);
        }
    }

    pub fn vcpu_of(&self, tid: u32) -> Option<usize> {
        self.tids
            .iter()
            .position(|t| t.load(Ordering::Acquire) == tid)
    }

    /// CPU time the busiest registered vCPU thread has run, or None before any has
    /// registered. The NUMA scanner paces itself by it, as Linux's `task_tick_numa`
    /// counts the task's own run time: a vCPU starved of CPU scans no faster than it
    /// runs.
    pub fn busiest_runtime(&self) -> Option<std::time::Duration> {
        self.tids
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .filter(|&tid| tid != 0)
            .filter_map(thread_cpu_time)
            .max()
    }

    pub fn len(&self) -> usize {
        self.tids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tids.is_empty()
    }
}

/// The CPU time thread `tid` of this process has run (its per-thread CPU clock, the
/// kernel's `MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`, as glibc builds it); None when
/// the thread is gone.
fn thread_cpu_time(tid: u32) -> Option<std::time::Duration> {
    let clock = ((!(tid as libc::clockid_t)) << 3) | 6;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; an id that names no thread of
    // this process only makes it fail.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(std::time::Duration::new(
        ts.tv_sec as u64,
        ts.tv_nsec as u32,
    ))
}

/// What the fault thread resolves with.
pub(crate) struct FaultContext {
    pub(crate) ram: Arc<GuestRam>,
    /// Makes hint-resolved regions huge again; None with `--collapse off` or on
    /// backings that do not collapse (each 4 KiB page is then refaulted by KVM).
    pub(crate) collapse: Option<Arc<CollapseEngine>>,
    pub(crate) view: Arc<GuestView>,
    pub(crate) stage: Arc<SecondStage>,
    pub(crate) vcpus: Arc<VcpuThreads>,
    pub(crate) numa: Option<Arc<NumaEngine>>,
    /// Set when post-copy begins (absent pages are asked of it).
    pub(crate) pager: Arc<OnceLock<Arc<dyn Pager>>>,
    pub(crate) stats: Arc<FaultStats>,
}

/// The fault-handling thread.
pub(crate) struct FaultThread {
    stop: Arc<uffd::StopFd>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<FaultStats>,
}

impl FaultThread {
    /// Starts the thread over the guest view's (registered) userfaultfd.
    pub(crate) fn start(ctx: FaultContext) -> Result<FaultThread, Error> {
        let uffd = ctx.view.uffd()?.clone();
        let stop = Arc::new(uffd::StopFd::new().map_err(|source| Error::Uffd {
            what: "the fault thread's stop eventfd",
            source,
        })?);
        let stats = ctx.stats.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-fault".into())
            .spawn(move || {
                // Every vCPU fault waits on this thread.
                let _ = crate::host::favour_this_thread();
                let r = uffd::run_until_stopped(&uffd, &stop2, |ev| handle_event(&ctx, ev));
                if let Err(e) = r {
                    ctx.stats.error(format!("fault thread: {e}"));
                }
            })
            .map_err(|source| Error::Thread {
                name: "fault",
                source,
            })?;
        Ok(FaultThread {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// Stops the thread and returns its figures.
    pub(crate) fn stop(mut self) -> FaultReport {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stats.report()
    }
}

fn handle_event(ctx: &FaultContext, ev: uffd::Event) {
    let uffd::Event::Pagefault {
        address,
        kind,
        access,
        thread_id,
    } = ev
    else {
        return;
    };
    let t0 = Instant::now();
    ctx.stats.faults.fetch_add(1, Ordering::Relaxed);
    match kind {
        uffd::FaultKind::Missing => ctx.stats.missing.fetch_add(1, Ordering::Relaxed),
        uffd::FaultKind::Minor => ctx.stats.minor.fetch_add(1, Ordering::Relaxed),
        uffd::FaultKind::WriteProtect => 0,
    };
    let Some(gpa) = ctx.view.gpa_of(address) else {
        ctx.stats.error(format!(
            "fault at host address {address:#x}, outside the guest view"
        ));
        return;
    };
    let vcpu = thread_id.and_then(|t| ctx.vcpus.vcpu_of(t));
    match vcpu.and_then(|v| ctx.stats.per_vcpu.get(v)) {
        Some(c) => c.fetch_add(1, Ordering::Relaxed),
        None => ctx.stats.unknown_thread.fetch_add(1, Ordering::Relaxed),
    };
    let dirtied = match access {
        uffd::Access::Write => Dirtied::Yes,
        uffd::Access::Read => Dirtied::No,
    };
    let outcome = resolve_fault(ctx, gpa, vcpu, dirtied);
    if outcome == Outcome::Unresolved {
        return;
    }
    let ns = t0.elapsed().as_nanos() as u64;
    if let Ok(mut h) = ctx.stats.latency.lock() {
        h.record(ns);
    }
    // After the latency: the vCPU runs again already (the CONTINUE woke it).
    if outcome == Outcome::ResolvedRegion {
        collapse_resolved_region(ctx, gpa, vcpu);
    }
}

/// A hint fault resolved the whole region at `gpa`: it is complete again; the collapse
/// engine makes it one huge page (on its own thread: the first collapse of a region
/// copies it), so that the next scan's hint costs KVM one refault, not 512. Only a
/// region whose every page the host holds (collapsing fills holes, and a sparse guest
/// would grow by whatever its hinted regions lacked), and only one on the faulting
/// vCPU's node: a remote region is what the balancer moves, and a move copies it into
/// 4 KiB pages again, so collapsing it first would be a copy thrown away.
fn collapse_resolved_region(ctx: &FaultContext, gpa: Gpa, vcpu: Option<usize>) {
    let Some(engine) = &ctx.collapse else {
        return;
    };
    if let (Some(numa), Some(v)) = (&ctx.numa, vcpu) {
        if !numa.is_local(gpa, v) {
            return;
        }
    }
    let start = gpa.align_down(SIZE_2M);
    let region = GpaRange::new(start, start.add(SIZE_2M));
    if ctx.ram.resident_2m(region) == Some([u64::MAX; 8]) {
        engine.filled(start);
    }
}

/// Whether a fault was resolved here or waits for something else to resolve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Resolved,
    /// A hint fault: its whole region was resolved.
    ResolvedRegion,
    /// Not here: post-copy's page arrival wakes the vCPU, or the fault was refused
    /// (counted as an error).
    Unresolved,
}

/// Decides what the fault at `gpa` is and resolves it, retrying when an invalidation
/// ran in between.
fn resolve_fault(ctx: &FaultContext, gpa: Gpa, vcpu: Option<usize>, dirtied: Dirtied) -> Outcome {
    let mut first_decision = true;
    loop {
        let (token, lookup) = ctx.stage.decide(gpa, Intent::Vcpu);
        let (counter, hinted) = match lookup {
            Lookup::Fault(_, FaultCause::Hint) => (&ctx.stats.hint_faults, true),
            Lookup::Mapped(_) => (&ctx.stats.raced, false),
            Lookup::Fault(_, FaultCause::Absent) if ctx.pager.get().is_some() => {
                // Post-copy demand fault: the NUMA engine learns who touches the region
                // (where its pages should land), and the vCPU waits until the page
                // arrives.
                if let (Some(numa), Some(v)) = (&ctx.numa, vcpu) {
                    numa.on_demand_fault(gpa, v);
                }
                if let Some(p) = ctx.pager.get() {
                    p.request(gpa.align_down(ctx.stage.backing_page()));
                }
                return Outcome::Unresolved;
            }
            Lookup::Fault(_, FaultCause::Absent) | Lookup::Unmapped => {
                ctx.stats.error(format!(
                    "vCPU fault at GPA {gpa}, which has no content in the second-stage table"
                ));
                return Outcome::Unresolved;
            }
        };
        if first_decision {
            counter.fetch_add(1, Ordering::Relaxed);
            first_decision = false;
            // A NUMA-hint fault: record it against the vCPU's node; the policy may move
            // the region (through the notifier), so decide again afterwards.
            if let (Some(numa), Some(v), true) = (&ctx.numa, vcpu, hinted) {
                numa.on_hint_fault(gpa, v);
                continue;
            }
        }
        // A hinted page resolves its whole region (one hint fault per region per scan);
        // so does a raced one on 4 KiB backing: what unmapped it (a zap racing us, the
        // kernel retracting the guest view when the staging view collapsed) most likely
        // unmapped its neighbours too.
        let runs_of = match hinted {
            true => RegionRuns::Hinted,
            false => RegionRuns::WithContent,
        };
        let resolved = if hinted || ctx.stage.backing_page() == SIZE_4K {
            ctx.stage
                .resolve_region(gpa, token, dirtied, runs_of, |span, runs| {
                    ctx.view.continue_region(span, runs)?;
                    if ctx.collapse.is_some() && span.len() == SIZE_2M {
                        // A region collapsed before (one 2 MiB leaf on 4 KiB backing): its
                        // page cache is one huge page still, so mapping it huge again is
                        // cheap (no copy). A failure leaves it mapped in 4 KiB pages.
                        let _ = ctx.ram.collapse(View::Guest, span);
                    }
                    Ok::<(), Error>(())
                })
        } else {
            ctx.stage.resolve(gpa, token, dirtied, |span| {
                ctx.view.continue_range(span).map(|_| ())
            })
        };
        match resolved {
            Ok(true) if hinted => return Outcome::ResolvedRegion,
            Ok(true) => return Outcome::Resolved,
            Ok(false) => {
                ctx.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                ctx.stats.error(format!("resolving GPA {gpa}: {e}"));
                return Outcome::Unresolved;
            }
        }
    }
}
