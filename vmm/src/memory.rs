//! Guest memory as one object for the rest of the VMM: RAM and its views, the
//! second-stage table, the fault path and the host-side zapper, the NUMA and collapse
//! engines and the stress zapper — created, started and stopped together.
//!
//! (Transitional: guest-mm is gaining a `GuestMemory` with this shape; this module then
//! shrinks to nothing.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_mm::collapse::CollapseMode;
use guest_mm::notifier::GpaRange;
use guest_mm::stage::{Change, SecondStage};
use guest_mm::{GuestRam, ViewLayout};

use crate::collapse::{CollapseEngine, CollapseProgress, CollapseReport};
use crate::config::RunConfig;
use crate::error::{ConfigError, Error, Result};
use crate::fault::{FaultPath, FaultReport, GuestViewZapper, Registration, VcpuThreads};
use crate::numa::{working_sets, Balancing, NumaEngine, NumaReport, Topology};
use crate::periodic::Periodic;

/// What guest memory counted over the run, once its threads have stopped.
pub struct MemoryReport {
    pub faults: Option<FaultReport>,
    pub collapse: Option<CollapseReport>,
    pub numa: Option<NumaReport>,
    pub zaps: u64,
}

/// Threads started by [`Memory::start`].
#[derive(Default)]
struct Running {
    zapper: Option<StressZapper>,
    numa: Vec<Periodic>,
}

pub struct Memory {
    pub ram: Arc<GuestRam>,
    pub stage: Arc<SecondStage>,
    pub numa: Option<Arc<NumaEngine>>,
    pub vcpu_threads: Arc<VcpuThreads>,
    fault_path: std::sync::Mutex<Option<FaultPath>>,
    fault_path_name: std::sync::Mutex<String>,
    host_zapper: Option<Arc<GuestViewZapper>>,
    collapse: OnceLock<Arc<CollapseEngine>>,
    /// A post-copy destination's registration of the guest view (MISSING|MINOR).
    postcopy: OnceLock<Arc<uffd::Uffd>>,
    collapse_mode: CollapseMode,
    collapse_scan: guest_mm::collapse::ScanBudget,
    balancing: Balancing,
    numa_note: Option<String>,
    stress_zap: Option<(Duration, u64)>,
    force_move: Option<(Duration, u64)>,
    running: std::sync::Mutex<Running>,
}

impl Memory {
    /// Creates guest RAM, the table, the NUMA engine (placing RAM as the workload
    /// wants) and, where something will zap the guest view, the fault path.
    pub fn create(cfg: &RunConfig, topology: Option<&Topology>) -> Result<Memory> {
        let mut ram_cfg = cfg.ram.clone();
        if let Some(t) = topology {
            ram_cfg.numa = t.layout;
        }
        let ram = Arc::new(GuestRam::create(&ram_cfg)?);
        // The second-stage table: all of guest RAM present, in leaves of the backing page.
        let stage = Arc::new(
            SecondStage::all_present(ram.size(), ram.page_size()).map_err(|source| {
                Error::Table {
                    what: "building the second-stage table",
                    source,
                }
            })?,
        );
        let vcpus = cfg.vcpus as usize;
        let numa = match topology {
            Some(t) => {
                let sets = working_sets(cfg.workload, ram.size(), vcpus);
                let engine = Arc::new(NumaEngine::new(
                    ram.clone(),
                    stage.clone(),
                    t.vcpu_nodes.clone(),
                    sets,
                    cfg.numa_scan,
                ));
                engine.place_initial(cfg.workload).map_err(Error::Numa)?;
                Some(engine)
            }
            None => None,
        };
        let vcpu_threads = Arc::new(VcpuThreads::new(vcpus));
        let needs_fault_path = numa.is_some() || cfg.stress_zap.is_some();
        let (fault_path, name, host_zapper) = match ram.view_layout() {
            ViewLayout::GuestAndStaging if !needs_fault_path => (
                None,
                "off: nothing zaps the guest view in this run".to_string(),
                None,
            ),
            ViewLayout::GuestAndStaging => {
                let base = ram.guest_view_addr() as u64;
                let fp = FaultPath::start(
                    stage.clone(),
                    vcpu_threads.clone(),
                    base,
                    ram.size(),
                    numa.clone(),
                )?;
                let zapper = Arc::new(GuestViewZapper::new(base, ram.size(), Some(fp.uffd())));
                stage.notifier().subscribe(zapper.clone());
                (Some(fp), "uffd-minor".to_string(), Some(zapper))
            }
            ViewLayout::SingleView => (
                None,
                "off: anon RAM has a single view and no page cache for MINOR faults".to_string(),
                None,
            ),
        };
        Ok(Memory {
            ram,
            stage,
            numa,
            vcpu_threads,
            fault_path: std::sync::Mutex::new(fault_path),
            fault_path_name: std::sync::Mutex::new(name),
            host_zapper,
            collapse: OnceLock::new(),
            postcopy: OnceLock::new(),
            collapse_mode: cfg.collapse,
            collapse_scan: cfg.collapse_scan,
            balancing: cfg.numa_balancing,
            numa_note: topology.and_then(|t| t.note.clone()),
            stress_zap: cfg.stress_zap.map(|p| (p, cfg.seed)),
            force_move: cfg.numa_force_migrate.map(|p| (p, cfg.seed)),
            running: Default::default(),
        })
    }

    /// Starts the collapse engine where it has work: on-fill needs an incoming migration
    /// (a booted guest's regions never "fill"), background scans any run. `postcopy` is
    /// the post-copy registration of the guest view, whose CONTINUE maps a collapsed
    /// region before the guest view's own collapse.
    pub fn start_collapse(
        &self,
        destination: bool,
        postcopy: Option<Arc<uffd::Uffd>>,
    ) -> Result<()> {
        let has_work = match self.collapse_mode {
            CollapseMode::Off => false,
            CollapseMode::OnFill => destination,
            CollapseMode::Background => true,
        };
        if !has_work
            || !crate::collapse::applies_to(self.ram.backing())
            || self.collapse.get().is_some()
        {
            return Ok(());
        }
        let engine = CollapseEngine::start(
            self.collapse_mode,
            self.collapse_scan,
            self.ram.clone(),
            self.stage.clone(),
            postcopy,
        )
        .map_err(|source| Error::Io {
            what: "starting the collapse thread".into(),
            source,
        })?;
        let _ = self.collapse.set(Arc::new(engine));
        Ok(())
    }

    pub fn collapse(&self) -> Option<&Arc<CollapseEngine>> {
        self.collapse.get()
    }

    /// Starts what runs beside the guest: the stress zapper, the NUMA scanner and
    /// sampler, forced moves.
    pub fn start(&self) -> Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.zapper = self.stress_zap.map(|(period, seed)| {
            StressZapper::start(self.stage.clone(), self.ram.size(), period, seed)
        });
        if let Some(e) = &self.numa {
            let io = |source| Error::Io {
                what: "starting a NUMA thread".into(),
                source,
            };
            running.numa = e.start_threads(self.balancing).map_err(io)?;
            if let Some((p, seed)) = self.force_move {
                running
                    .numa
                    .push(e.start_forced_migrations(p, seed).map_err(io)?);
            }
        }
        Ok(())
    }

    /// Post-copy destination: a fault path with MISSING|MINOR registration and `pager`
    /// for absent pages replaces none (post-copy with a zapping fault path is refused).
    pub fn start_postcopy_fault_path(
        &self,
        pager: Arc<dyn crate::fault::Pager>,
    ) -> Result<Arc<uffd::Uffd>> {
        let mut fp = self.fault_path.lock().unwrap_or_else(|e| e.into_inner());
        if fp.is_some() {
            return Err(ConfigError::PostcopyWithZapping.into());
        }
        if self.ram.view_layout() == ViewLayout::SingleView {
            return Err(ConfigError::PostcopyNeedsFileRam.into());
        }
        let path = FaultPath::start_with(
            self.stage.clone(),
            self.vcpu_threads.clone(),
            self.ram.guest_view_addr() as u64,
            self.ram.size(),
            None,
            Some(pager),
            Registration::MissingAndMinor,
        )?;
        let uffd = path.uffd();
        *fp = Some(path);
        *self
            .fault_path_name
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = "uffd-missing-minor (post-copy)".to_string();
        Ok(uffd)
    }

    pub fn fault_path_name(&self) -> String {
        self.fault_path_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn collapse_progress(&self) -> Option<CollapseProgress> {
        self.collapse.get().map(|c| c.progress())
    }

    pub fn numa_report(&self) -> Option<NumaReport> {
        self.numa
            .as_ref()
            .map(|e| e.report(self.balancing, self.numa_note.clone()))
    }

    /// A migration destination resumed the guest: complete regions collapse.
    pub fn resumed_after_migration(&self) {
        if let Some(c) = self.collapse.get() {
            c.sweep();
        }
    }

    /// Stops every memory thread and returns what they counted.
    pub fn stop(&self) -> Result<MemoryReport> {
        let collapse = self.collapse.get().map(|c| c.stop());
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()));
        let zaps = running.zapper.map(StressZapper::stop).unwrap_or(0);
        running.numa.into_iter().for_each(|t| t.stop());
        let numa = self.numa_report();
        let faults = self
            .fault_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|fp| fp.stop().report());
        if let Some(e) = faults.as_ref().and_then(|f| f.error.clone()) {
            return Err(Error::FaultPath(e));
        }
        if let Some(n) = self
            .host_zapper
            .as_ref()
            .map(|z| z.failures())
            .filter(|&n| n > 0)
        {
            return Err(Error::HostMapping { failures: n });
        }
        Ok(MemoryReport {
            faults,
            collapse,
            numa,
            zaps,
        })
    }
}

/// Testing: zaps random ranges of guest RAM through the second-stage table (and so the
/// guest view) until stopped. The guest keeps running; every zapped page comes back as a
/// MINOR fault on its next vCPU touch.
struct StressZapper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl StressZapper {
    fn start(stage: Arc<SecondStage>, size: u64, period: Duration, seed: u64) -> StressZapper {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut zaps = 0u64;
            let pages = size / 4096;
            while !s.load(Ordering::Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let start = (x % pages) * 4096;
                let len = (1 + (x >> 32) % 512) * 4096;
                let range = GpaRange::new(start, (start + len).min(size));
                if stage.apply(Change::Zap { range }).is_ok() {
                    zaps += 1;
                }
                std::thread::sleep(period);
            }
            zaps
        });
        StressZapper { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or(0)
    }
}

/// A page installed or written outside guest RAM, or not one backing page long.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(
        "page at GPA {gpa:#x} is outside guest RAM or not aligned to its {page}-byte backing page"
    )]
    OutOfRange { gpa: u64, page: u64 },
    #[error("page at GPA {gpa:#x}: {len} bytes for a {page}-byte backing page")]
    WrongLength { gpa: u64, len: usize, page: u64 },
    #[error("guest memory at GPA {gpa:#x}: {source}")]
    Access {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("installing GPA {gpa:#x}: {source}")]
    Continue {
        gpa: u64,
        #[source]
        source: uffd::Error,
    },
    #[error("post-copy has not begun on this destination")]
    NotInPostcopy,
    #[error("marking post-copy pages absent: {0}")]
    Table(#[from] guest_mm::table::TableError),
}

impl Memory {
    /// The backing page holding `gpa`, checked against guest RAM.
    fn page_at(&self, gpa: guest_mm::Gpa) -> std::result::Result<u64, PageError> {
        let page = self.ram.page_size();
        let g = gpa.raw();
        match g.checked_add(page) {
            Some(end) if g.is_multiple_of(page) && end <= self.ram.size() => Ok(g),
            _ => Err(PageError::OutOfRange { gpa: g, page }),
        }
    }

    /// Writes one arriving page through the staging view.
    fn write_content(
        &self,
        gpa: u64,
        page: guest_mm::PageContent<'_>,
    ) -> std::result::Result<(), PageError> {
        use vm_memory::Bytes;
        static ZEROS: [u8; 65536] = [0; 65536];
        let size = self.ram.page_size();
        let write = |bytes: &[u8], at: u64| {
            self.ram
                .staging()
                .write_slice(bytes, vm_memory::GuestAddress(at))
                .map_err(|source| PageError::Access { gpa: at, source })
        };
        match page {
            guest_mm::PageContent::Bytes(b) if b.len() as u64 != size => {
                Err(PageError::WrongLength {
                    gpa,
                    len: b.len(),
                    page: size,
                })
            }
            guest_mm::PageContent::Bytes(b) => write(b, gpa),
            guest_mm::PageContent::Zero => {
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(ZEROS.len() as u64);
                    write(&ZEROS[..n as usize], gpa + off)?;
                    off += n;
                }
                Ok(())
            }
        }
    }

    /// Whether this destination is in post-copy (pages still arrive while the guest runs).
    pub fn in_postcopy(&self) -> bool {
        self.postcopy.get().is_some()
    }
}

/// The fault path's pager, speaking guest-mm's `Pager` (post-copy demand requests).
struct PagerLink(Arc<dyn guest_mm::Pager>);

impl crate::fault::Pager for PagerLink {
    fn request(&self, gpa: u64) {
        self.0.request(guest_mm::Gpa(gpa));
    }
}

impl migration::GuestPages for Memory {
    fn size(&self) -> u64 {
        self.ram.size()
    }

    fn page_size(&self) -> u64 {
        self.ram.page_size()
    }

    fn backing(&self) -> String {
        self.ram.backing().to_string()
    }

    fn read_page(
        &self,
        gpa: guest_mm::Gpa,
        buf: &mut [u8],
    ) -> std::result::Result<(), migration::HostError> {
        use vm_memory::Bytes;
        let g = self.page_at(gpa)?;
        self.ram
            .staging()
            .read_slice(buf, vm_memory::GuestAddress(g))
            .map_err(|source| PageError::Access { gpa: g, source })?;
        Ok(())
    }

    fn write_page(
        &self,
        gpa: guest_mm::Gpa,
        page: guest_mm::PageContent<'_>,
    ) -> std::result::Result<(), migration::HostError> {
        let g = self.page_at(gpa)?;
        Ok(self.write_content(g, page)?)
    }

    fn begin_postcopy(
        &self,
        absent: &[guest_mm::GpaRange],
        pager: Arc<dyn guest_mm::Pager>,
    ) -> std::result::Result<u64, migration::HostError> {
        let page = self.ram.page_size();
        let mut count = 0;
        for r in absent {
            let range = GpaRange::new(r.start.raw(), r.end.raw().min(self.ram.size()));
            if range.is_empty() {
                continue;
            }
            count += range.len().div_ceil(page);
            self.stage
                .apply(Change::MarkAbsent { range })
                .map_err(PageError::Table)?;
        }
        let uffd = self.start_postcopy_fault_path(Arc::new(PagerLink(pager)))?;
        self.start_collapse(true, Some(uffd.clone()))?;
        let _ = self.postcopy.set(uffd);
        Ok(count)
    }

    fn install_page(
        &self,
        gpa: guest_mm::Gpa,
        page: guest_mm::PageContent<'_>,
    ) -> std::result::Result<guest_mm::Installed, migration::HostError> {
        let g = self.page_at(gpa)?;
        let uffd = self.postcopy.get().ok_or(PageError::NotInPostcopy)?;
        let base = self.ram.guest_view_addr() as u64;
        let size = self.ram.page_size();
        let installed = self.stage.fill(g, || {
            self.write_content(g, page)?;
            match uffd.continue_range(base + g, size, uffd::Wake::Yes) {
                Ok(()) | Err(uffd::Error::AlreadyMapped { .. }) => Ok(()),
                Err(source) => Err(PageError::Continue { gpa: g, source }),
            }
        })?;
        if !installed {
            return Ok(guest_mm::Installed::Duplicate);
        }
        if let Some(c) = self.collapse.get() {
            c.filled(g);
        }
        Ok(guest_mm::Installed::New)
    }

    fn end_postcopy(&self) -> std::result::Result<(), migration::HostError> {
        let uffd = self.postcopy.get().ok_or(PageError::NotInPostcopy)?;
        // Every page arrived: the guest view needs no userfaultfd anymore.
        let _ = uffd.unregister(self.ram.guest_view_addr() as u64, self.ram.size());
        // Regions whose collapse failed on fill get one more try.
        self.resumed_after_migration();
        Ok(())
    }

    fn resumed_after_migration(&self) {
        Memory::resumed_after_migration(self);
    }
}
