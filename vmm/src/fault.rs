//! The fault path: userfaultfd MINOR faults of the guest view, resolved against the
//! second-stage table.
//!
//! ```text
//! vCPU touches GPA ─▶ KVM shadow/EPT miss ─▶ host fault on the guest view ─▶ uffd event
//!   ─▶ fault thread: VA→GPA, thread id→vCPU ─▶ table lookup (Intent::Vcpu)
//!        hinted  ─▶ count the hint ─▶ resolve: table → present, UFFDIO_CONTINUE
//!        present ─▶ a zap raced us: resolve the same way
//!   (the table's invalidation sequence is read before the decision and checked, under
//!    the table lock, right before CONTINUE: a zap in between means retry)
//! ```
//!
//! Only file-backed RAM has this path: MINOR faults need shmem or hugetlbfs page cache,
//! and zapping (MADV_DONTNEED) the single view of anonymous RAM would discard it.
//! The guest view is registered MINOR only, so a first touch of a never-written page is
//! zero-filled by the kernel without an event.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use guest_mm::notifier::{GpaRange, InvalidateReason, MmuNotifierSubscriber};
use guest_mm::stage::SecondStage;
use guest_mm::table::{Dirtied, FaultCause, Intent, Lookup};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::numa::NumaEngine;
pub use guest_mm::stats::LatencyHistogram;

/// The host side of the mmu notifier: zaps the guest view so that the kernel's own mmu
/// notifier drops KVM's real EPT/shadow entries. MADV_DONTNEED keeps shmem and hugetlb
/// page cache, so content stays and the next vCPU touch is a MINOR fault.
///
/// A NUMA move remaps the guest view in place, which drops its userfaultfd registration;
/// the zapper registers the range again when the move ends.
pub struct GuestViewZapper {
    base: u64,
    size: u64,
    failures: AtomicU64,
    uffd: Option<Arc<uffd::Uffd>>,
}

impl GuestViewZapper {
    pub fn new(base: u64, size: u64, uffd: Option<Arc<uffd::Uffd>>) -> Self {
        GuestViewZapper {
            base,
            size,
            failures: AtomicU64::new(0),
            uffd,
        }
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl MmuNotifierSubscriber for GuestViewZapper {
    fn invalidate_range_start(&self, range: GpaRange, reason: InvalidateReason) {
        if !reason.zaps_host_mapping() || range.start >= self.size {
            return;
        }
        let end = range.end.min(self.size);
        // MADV_DONTNEED on a shared file mapping drops page-table entries only; the page
        // cache (the guest's memory content) stays.
        // SAFETY: [base+start, base+end) lies inside the guest view, a MAP_SHARED mapping
        // of a shmem/hugetlb memfd that GuestRam keeps mapped for the VM's lifetime.
        let r = unsafe {
            libc::madvise(
                (self.base + range.start) as *mut libc::c_void,
                (end - range.start) as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn invalidate_range_end(&self, range: GpaRange, reason: InvalidateReason) {
        if reason != InvalidateReason::Migrate || range.start >= self.size {
            return;
        }
        if let Some(u) = &self.uffd {
            let len = range.end.min(self.size) - range.start;
            if u.register(self.base + range.start, len, uffd::RegisterMode::MINOR)
                .is_err()
            {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the fault path counted.
#[derive(Default)]
pub struct FaultStats {
    pub faults: AtomicU64,
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

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.first_error.lock() {
            e.get_or_insert(what);
        }
    }

    pub fn report(&self) -> FaultReport {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        FaultReport {
            uffd_faults: self.faults.load(Ordering::Relaxed),
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

/// vCPU thread ids, so a fault event's thread id names its vCPU.
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
}

/// The fault-handling thread and what it shares.
pub struct FaultPath {
    uffd: Arc<uffd::Uffd>,
    stop: Arc<uffd::StopFd>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<FaultStats>,
}

/// Post-copy: asks the source for a page that has not arrived yet.
pub trait Pager: Send + Sync {
    /// The vCPU faulted on `gpa`, whose content is absent. The page's arrival resolves it.
    fn request(&self, gpa: u64);
}

/// Which faults the guest view raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// Zapped pages only (a hole is zero-filled by the kernel without an event).
    MinorOnly,
    /// Post-copy: holes raise MISSING too, so no page is ever zero-filled behind our back.
    MissingAndMinor,
}

struct Ctx {
    pager: Option<Arc<dyn Pager>>,
    numa: Option<Arc<NumaEngine>>,
    uffd: Arc<uffd::Uffd>,
    stage: Arc<SecondStage>,
    stats: Arc<FaultStats>,
    vcpus: Arc<VcpuThreads>,
    base: u64,
    size: u64,
}

impl FaultPath {
    /// Opens userfaultfd, registers the guest view [base, base+size) for MINOR faults and
    /// starts the fault thread.
    pub fn start(
        stage: Arc<SecondStage>,
        vcpus: Arc<VcpuThreads>,
        base: u64,
        size: u64,
        numa: Option<Arc<NumaEngine>>,
    ) -> Result<FaultPath> {
        Self::start_with(
            stage,
            vcpus,
            base,
            size,
            numa,
            None,
            Registration::MinorOnly,
        )
    }

    /// As `start`, with a post-copy pager and the registration it needs.
    pub fn start_with(
        stage: Arc<SecondStage>,
        vcpus: Arc<VcpuThreads>,
        base: u64,
        size: u64,
        numa: Option<Arc<NumaEngine>>,
        pager: Option<Arc<dyn Pager>>,
        registration: Registration,
    ) -> Result<FaultPath> {
        let uffd = uffd::Uffd::open(
            uffd::Features::THREAD_ID
                | uffd::Features::MINOR_SHMEM
                | uffd::Features::MINOR_HUGETLBFS,
        )
        .map_err(|e| Error::FaultPath(format!("userfaultfd for the fault path: {e}")))?;
        let mode = match registration {
            Registration::MinorOnly => uffd::RegisterMode::MINOR,
            Registration::MissingAndMinor => {
                uffd::RegisterMode::MINOR | uffd::RegisterMode::MISSING
            }
        };
        uffd.register(base, size, mode).map_err(|e| {
            Error::FaultPath(format!("registering the guest view with userfaultfd: {e}"))
        })?;
        let uffd = Arc::new(uffd);
        let stop = Arc::new(
            uffd::StopFd::new()
                .map_err(|e| Error::FaultPath(format!("fault thread stop eventfd: {e}")))?,
        );
        let stats = Arc::new(FaultStats::new(vcpus.tids.len()));
        let ctx = Ctx {
            pager,
            numa,
            uffd: uffd.clone(),
            stage,
            stats: stats.clone(),
            vcpus,
            base,
            size,
        };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-fault".into())
            .spawn(move || {
                let r = uffd::run_until_stopped(&ctx.uffd, &stop2, |ev| handle_event(&ctx, ev));
                if let Err(e) = r {
                    ctx.stats.error(format!("fault thread: {e}"));
                }
            })
            .map_err(|source| Error::Io {
                what: "starting the fault thread".into(),
                source,
            })?;
        Ok(FaultPath {
            uffd,
            stop,
            thread: Some(thread),
            stats,
        })
    }

    pub fn uffd(&self) -> Arc<uffd::Uffd> {
        self.uffd.clone()
    }

    /// Stops the fault thread. Closing the userfaultfd (when the last Arc drops) wakes any
    /// thread still waiting in a fault.
    pub fn stop(mut self) -> Arc<FaultStats> {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stats.clone()
    }
}

fn handle_event(ctx: &Ctx, ev: uffd::Event) {
    let uffd::Event::Pagefault {
        address,
        access,
        thread_id,
        ..
    } = ev
    else {
        return;
    };
    let t0 = Instant::now();
    ctx.stats.faults.fetch_add(1, Ordering::Relaxed);
    if address < ctx.base || address >= ctx.base + ctx.size {
        ctx.stats.error(format!(
            "fault at host address {address:#x}, outside the guest view"
        ));
        return;
    }
    let gpa = address - ctx.base;
    let vcpu = thread_id.and_then(|t| ctx.vcpus.vcpu_of(t));
    match vcpu {
        Some(v) => {
            ctx.stats.per_vcpu[v].fetch_add(1, Ordering::Relaxed);
        }
        None => {
            ctx.stats.unknown_thread.fetch_add(1, Ordering::Relaxed);
        }
    }
    let dirtied = match access {
        uffd::Access::Write => Dirtied::Yes,
        uffd::Access::Read => Dirtied::No,
    };
    let mut first_decision = true;
    loop {
        let token = ctx.stage.seq();
        if token.in_progress() {
            std::thread::yield_now();
            continue;
        }
        let counter = match ctx.stage.lookup(gpa, Intent::Vcpu) {
            Lookup::Fault(_, FaultCause::Hint) => &ctx.stats.hint_faults,
            Lookup::Mapped(_) => &ctx.stats.raced,
            Lookup::Fault(_, FaultCause::Absent) if ctx.pager.is_some() => {
                // Post-copy demand fault: the vCPU waits until the page arrives.
                if let Some(p) = &ctx.pager {
                    p.request(gpa);
                }
                return;
            }
            Lookup::Fault(_, FaultCause::Absent) | Lookup::Unmapped => {
                ctx.stats.error(format!(
                    "vCPU fault at GPA {gpa:#x}, which has no content in the second-stage table"
                ));
                return;
            }
        };
        if first_decision {
            counter.fetch_add(1, Ordering::Relaxed);
            first_decision = false;
            // A NUMA-hint fault: record it against the vCPU's node; the policy may move
            // the region (through the notifier), so decide again afterwards.
            if let (Some(numa), Some(v), Lookup::Fault(_, FaultCause::Hint)) =
                (&ctx.numa, vcpu, ctx.stage.lookup(gpa, Intent::Vcpu))
            {
                numa.on_hint_fault(gpa, v);
                continue;
            }
        }
        let (s, e) = ctx.stage.inspect(|t| t.zap_span(gpa));
        let (start, len) = (ctx.base + s, (e.min(ctx.size)) - s);
        let resolved = ctx.stage.resolve(gpa, token, dirtied, || {
            match ctx.uffd.continue_range(start, len, uffd::Wake::Yes) {
                Ok(()) => Ok(()),
                // Another fault of the same page was resolved first: make sure we wake.
                Err(uffd::Error::AlreadyMapped { .. }) => ctx.uffd.wake(start, len),
                // The range was unregistered meanwhile (post-copy completed): unregistering
                // woke the vCPU, which now faults the page in without us.
                Err(uffd::Error::Ioctl { ref source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        });
        match resolved {
            Ok(true) => break,
            Ok(false) | Err(uffd::Error::Retry { .. }) => {
                ctx.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                ctx.stats.error(format!("resolving GPA {gpa:#x}: {e}"));
                return;
            }
        }
    }
    let ns = t0.elapsed().as_nanos() as u64;
    if let Ok(mut h) = ctx.stats.latency.lock() {
        h.record(ns);
    }
}
