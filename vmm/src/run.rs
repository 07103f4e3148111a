//! One run of a built-in guest workload: build the VM, run the vCPUs, watch the mailbox,
//! stop on time, and report what the guest measured.
//!
//! Order matters for "nothing half-built": host capabilities are checked first (KVM),
//! then guest RAM is validated and created (guest-mm checks pools and limits before it
//! maps anything), then the VM. Everything is owned by this function's stack, so an error
//! at any step drops what exists in reverse order.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use guest_image::abi;
use guest_image::{GuestParams, Workload};
use guest_mm::numa::{BalancerConfig, Balancing, NumaSpec};
use guest_mm::stage::{Accounting, LeafSize, PageState, Run};
use guest_mm::{
    CollapseConfig, CollapseReport, FaultReport, GuestMemory, GuestOrigin, MemoryConfig,
    NumaConfig, NumaReport, RamConfig, Recurring,
};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::Killable;

use crate::api::{ApiCall, ApiServer};
use crate::boot;
use crate::clock::{monotonic_ns, TscClock, TscPoint};
use crate::console::{Console, ConsoleMode};
use crate::error::{Error, Result};
use crate::mailbox::Mailbox;
use crate::migrate::{MigrationReport, RunInfo, SourceEvent};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vcpu::{
    install_kick_handler, kick_signal, Vcpu, VcpuEnd, VcpuOutcome, VcpuShared,
};
use crate::vstate::vm::{open_kvm, DirtyLogMethod, Vm};

/// When the workload ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunLimit {
    /// The VMM sets the mailbox stop flag after this long; vCPUs finish their pass.
    Duration(Duration),
    /// Each vCPU runs this many passes.
    Passes(u64),
}

/// A deliberate fault injected by the VMM, to prove the guest's checks work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptionTest {
    None,
    /// After vCPU 0's first pass, overwrite one word of a page in its partition through
    /// the staging view (the VMM's own access path). The run's `--duration` is stretched,
    /// if need be, until vCPU 0 has made two more passes, so the guest always gets to
    /// check the page however slowly the host runs it.
    AfterFirstPass,
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub ram: RamConfig,
    pub vcpus: u32,
    pub workload: Workload,
    pub limit: RunLimit,
    pub seed: u64,
    pub console: ConsoleMode,
    pub kvm_device: PathBuf,
    pub timeout: Duration,
    pub corruption: CorruptionTest,
    /// Monotonic time at process start (for start-up latency).
    pub process_start_ns: u64,
    /// Testing: a VMM thread zaps a random range of the guest view this often.
    pub stress_zap: Option<Duration>,
    pub memmap: MemmapListing,
    /// Guest NUMA topology (`--numa`); None: one node.
    pub numa: Option<NumaSpec>,
    pub numa_balancing: Balancing,
    pub numa_scan: BalancerConfig,
    /// Testing: move a random region to another node this often.
    pub numa_force_move: Option<Duration>,
    /// When guest RAM becomes huge pages (`--collapse`).
    pub collapse: guest_mm::collapse::CollapseMode,
    pub collapse_scan: guest_mm::collapse::ScanBudget,
    /// Serve the control API on this unix socket.
    pub api_socket: Option<PathBuf>,
    /// Receive the guest from a migration source instead of booting it.
    pub incoming: Option<migration::Uri>,
    /// How KVM reports written pages when a migration asks (`--dirty-log`).
    pub dirty_log: DirtyLogMethod,
}

/// Whether the run report includes the second-stage table's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemmapListing {
    Off,
    AtExit,
}

/// The second-stage table as listed by `--memmap`.
#[derive(Clone, Debug, Serialize)]
pub struct Memmap {
    pub accounting: Accounting,
    pub runs: Vec<Run>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    IntegrityErrors,
    GuestException,
    /// The guest was handed over to a migration destination.
    Migrated,
}

#[derive(Clone, Debug, Serialize)]
pub struct IntegrityError {
    pub vcpu: usize,
    pub gpa: u64,
    pub expected: u64,
    pub found: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GuestException {
    pub vcpu: usize,
    pub vector: u64,
    pub name: &'static str,
    pub error_code: u64,
    pub cr2: u64,
    pub rip: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Startup {
    /// Process start to the first guest instruction (the earliest vCPU's ring-3 entry).
    pub to_first_insn_ms: f64,
    /// Process start to the end of the workload's last pass.
    pub to_workload_end_ms: f64,
    pub first_insn_monotonic_ns: u64,
    pub process_start_monotonic_ns: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct VcpuReport {
    pub vcpu: usize,
    /// The guest NUMA node the guest reports for this vCPU.
    pub node: u64,
    pub passes: u64,
    pub pages_touched: u64,
    pub bytes: u64,
    pub integrity_errors: u64,
    pub last_pass_ms: f64,
    pub max_pass_ms: f64,
    pub bytes_per_sec: f64,
    /// Throughput of the last pass alone: warm memory, no first-touch faults.
    pub steady_bytes_per_sec: f64,
    pub guest_exits: u64,
    pub partition: [u64; 2],
}

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub workload: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub backing: String,
    pub page_size: u64,
    pub prefault: bool,
    pub entry: &'static str,
    pub outcome: Outcome,
    pub elapsed_ms: f64,
    pub passes: u64,
    pub pages_touched: u64,
    pub integrity_errors: u64,
    pub guest_exits: u64,
    pub bytes_per_sec: f64,
    /// Sum over vCPUs of their last pass's throughput (warm memory).
    pub steady_bytes_per_sec: f64,
    pub max_pass_ms: f64,
    pub first_error: Option<IntegrityError>,
    pub exception: Option<GuestException>,
    pub corrupted_gpa: Option<u64>,
    pub startup: Startup,
    pub tsc_khz: u64,
    pub vmm_rss_bytes: u64,
    pub guest_ram_rss_bytes: u64,
    /// Resident memory of the VMM itself: everything but the guest RAM views.
    pub vmm_overhead_rss_bytes: u64,
    pub per_vcpu: Vec<VcpuReport>,
    /// "uffd-minor" when the fault path runs (file-backed RAM), else why not.
    pub fault_path: String,
    pub uffd_faults: u64,
    pub fault_us_p50: f64,
    pub fault_us_p99: f64,
    pub faults: Option<FaultReport>,
    pub zaps: u64,
    pub memmap: Option<Memmap>,
    pub numa_hint_faults: u64,
    pub numa_hint_faults_local: u64,
    pub numa_pages_migrated: u64,
    pub numa_migrate_failures: u64,
    pub locality_pct: Option<f64>,
    pub numa: Option<NumaReport>,
    /// Source: the migration that handed the guest over.
    pub migration: Option<MigrationReport>,
    /// Source: migrations that failed while the guest kept running here.
    pub migration_failures: Vec<String>,
    /// Destination: what arrived.
    pub incoming: Option<IncomingReport>,
    /// Destination: the worst pass the guest measured across the switch-over.
    pub guest_stall_ms: Option<f64>,
    pub collapses: u64,
    /// Failed collapses by reason (ebusy, eagain, enomem, einval, not_complete, other).
    pub collapse_failures: std::collections::BTreeMap<&'static str, u64>,
    pub collapse_ms_total: f64,
    /// Guest RAM the kernel maps with PMDs at the end of the run (smaps of the guest
    /// view), whatever our own bookkeeping says.
    pub pmd_mapped_bytes: u64,
    /// The collapse engine's mode and counters; None when it did not run (off, hugetlb,
    /// or on-fill in a run that received no migration).
    pub collapse: Option<CollapseReport>,
    /// How KVM reports written pages: "bitmap" or "ring".
    pub dirty_log: &'static str,
    /// Dirty ring: entries per vCPU.
    pub dirty_ring_entries: Option<u32>,
    /// Dirty ring: exits because a vCPU's ring was full (harvested and resumed).
    pub dirty_ring_full_exits: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct IncomingReport {
    pub mode: String,
    pub pages: u64,
    pub bytes: u64,
    pub source_elapsed_ms: f64,
    pub receive_ms: f64,
    /// Post-copy: pages that arrived after the switch, on demand or pushed.
    pub pages_demand: u64,
    pub pages_pushed: u64,
    pub demand_fault_us_p50: f64,
    pub demand_fault_us_p99: f64,
    pub demand_fault_us_max: f64,
    /// Post-copy: switch-over to the last page (then the guest view is unregistered).
    pub postcopy_ms: Option<f64>,
    /// The guest's passes (all vCPUs) before the switch, and those it made here.
    pub passes_at_switch: u64,
    pub passes_after_switch: u64,
}

const VECTOR_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
    "reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
];

const POLL: Duration = Duration::from_millis(2);
/// How long vCPUs get to finish their pass after the stop flag before they are kicked.
const STOP_GRACE: Duration = Duration::from_secs(30);

struct RunningVcpu {
    handle: JoinHandle<VcpuOutcome>,
}

fn spawn_vcpus(
    vcpus: Vec<Vcpu>,
    shared: &Arc<VcpuShared>,
    console: &Arc<Console>,
    memory: &Arc<GuestMemory>,
) -> Result<Vec<RunningVcpu>> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let index = vcpu.index();
        let (s, c, m) = (shared.clone(), console.clone(), memory.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                m.vcpu_threads().register_current(index);
                vcpu.run(s, c)
            });
        match spawned {
            Ok(handle) => threads.push(RunningVcpu { handle }),
            Err(source) => {
                shared.stop.store(true, Ordering::Release);
                kick_until_finished(&threads);
                return Err(Error::Thread { index, source });
            }
        }
    }
    Ok(threads)
}

fn kick_until_finished(threads: &[RunningVcpu]) {
    for _ in 0..500 {
        if threads.iter().all(|t| t.handle.is_finished()) {
            return;
        }
        for t in threads.iter().filter(|t| !t.handle.is_finished()) {
            let _ = t.handle.kill(kick_signal());
        }
        std::thread::sleep(POLL);
    }
}

/// Builds the VM, runs the workload and reports. Errors are returned only for problems
/// of the VMM or the host; guest-detected failures are in [`RunReport::outcome`].
pub fn run(cfg: &RunConfig) -> Result<RunReport> {
    let origin = TscPoint::now();
    cfg.ram.check_shape()?;
    let vcpus = cfg.vcpus as usize;
    if vcpus == 0 || vcpus > abi::MAX_VCPUS {
        return Err(Error::Config(format!(
            "--vcpus {vcpus}: must be between 1 and {}",
            abi::MAX_VCPUS
        )));
    }
    if !cfg.ram.size.is_multiple_of(2 << 20) {
        return Err(Error::Config(format!(
            "--memory {}: must be a multiple of 2 MiB (the guest maps its RAM with 2 MiB pages)",
            cfg.ram.size
        )));
    }
    let data_pages = cfg.ram.size.saturating_sub(abi::DATA_START) / 4096;
    if data_pages < vcpus as u64 {
        return Err(Error::Config(format!(
            "--memory {} leaves {data_pages} data pages for {vcpus} vCPUs; give each vCPU at least one page",
            cfg.ram.size
        )));
    }
    let topology = match &cfg.numa {
        Some(spec) => Some(spec.resolve(cfg.vcpus, guest_mm::numa::host_nodes().len())?),
        None => None,
    };
    let mem_cfg = memory_config(cfg, topology.as_ref());
    mem_cfg.check()?;
    // Host capabilities first, so a missing KVM leaves nothing behind.
    let kvm = open_kvm(&cfg.kvm_device)?;
    install_kick_handler()?;

    let ram = GuestMemory::create(&mem_cfg)?;
    let mem = ram.staging();
    let image = match cfg.incoming {
        // The image (and everything else) arrives with the guest's memory.
        Some(_) => boot::LoadedImage {
            info: guest_image::image_info(guest_image::IMAGE)?,
        },
        None => boot::load_image(mem, guest_image::IMAGE, ram.size())?,
    };
    let params = GuestParams {
        workload: cfg.workload,
        passes: match cfg.limit {
            RunLimit::Passes(p) => Some(p),
            RunLimit::Duration(_) => None,
        },
        vcpus: cfg.vcpus,
        seed: cfg.seed,
        vcpu_nodes: topology
            .as_ref()
            .map(|t| t.vcpu_nodes.clone())
            .unwrap_or_default(),
    };
    if cfg.incoming.is_none() {
        boot::write_boot_tables(mem, &image, ram.size(), vcpus, &params.cmdline())?;
    }
    let mailbox = Mailbox::new(image.info.mailbox);

    let vm = Arc::new(Vm::new(&kvm, cfg.dirty_log)?);
    vm.register_ram(ram.memslot())?;
    let api = match &cfg.api_socket {
        Some(p) => Some(ApiServer::start(p)?),
        None => None,
    };
    // Destination: receive the guest before any vCPU exists.
    let mut incoming_report = None;
    let mut incoming_link = None;
    let mut postcopy: Option<(Arc<crate::migrate::PostcopyLink>, migration::Stream)> = None;
    let mut postcopy_threads = None;
    let mut source_elapsed_ns = 0u64;
    let mut workload_name = cfg.workload.to_string();
    let built: Vec<Vcpu> = match &cfg.incoming {
        Some(uri) => {
            let t = monotonic_ns();
            let inc = crate::migrate::receive(uri, &ram, cfg.vcpus, cfg.timeout)
                .map_err(|e| Error::Config(format!("incoming migration: {e}")))?;
            // Each vCPU's worst pass was cleared by the source when it paused (and that
            // mailbox page sent after the pause), so from here on it is the guest's own
            // view of the stall. Writing it here instead would, in post-copy, put a page
            // into the page cache before the source's copy arrives.
            source_elapsed_ns = inc.switch.run.elapsed_ns;
            workload_name = inc.switch.run.workload.clone();
            incoming_report = Some(IncomingReport {
                mode: inc.hello.mode.clone(),
                pages: inc.pages,
                bytes: inc.bytes,
                source_elapsed_ms: inc.switch.run.elapsed_ns as f64 / 1e6,
                receive_ms: (monotonic_ns() - t) as f64 / 1e6,
                pages_demand: 0,
                pages_pushed: 0,
                demand_fault_us_p50: 0.0,
                demand_fault_us_p99: 0.0,
                demand_fault_us_max: 0.0,
                postcopy_ms: None,
                passes_at_switch: inc.switch.run.passes,
                passes_after_switch: 0,
            });
            if let Some(missing) = inc.switch.postcopy_missing.clone() {
                let urgent = inc.accept_urgent().map_err(Error::Config)?;
                let urgent_reader = urgent
                    .try_clone()
                    .map_err(|e| Error::Config(e.to_string()))?;
                let link = crate::migrate::postcopy_begin(&ram, &missing, urgent)?;
                postcopy = Some((link, urgent_reader));
            }
            let built = (0..vcpus)
                .map(|i| Vcpu::restore(&vm, i, &inc.switch.vcpus[i]))
                .collect::<Result<Vec<_>>>()?;
            incoming_link = Some(inc);
            built
        }
        None => (0..vcpus)
            .map(|i| Vcpu::new(&vm, i, &image))
            .collect::<Result<_>>()?,
    };

    let shared = Arc::new(VcpuShared {
        stop: Default::default(),
    });
    let console = Arc::new(Console::new(cfg.console));
    let launch_ns = monotonic_ns();
    ram.start()?;
    let mut threads = spawn_vcpus(built, &shared, &console, &ram)?;
    if let Some(inc) = incoming_link.take() {
        match postcopy.take() {
            // Post-copy: pages keep arriving on both channels while the guest runs.
            Some((link, urgent_reader)) => {
                let main = inc.resumed_postcopy().map_err(Error::Config)?;
                let rm = ram.clone();
                let switched = monotonic_ns();
                let handle = std::thread::Builder::new()
                    .name("postcopy".into())
                    .spawn(move || -> (Arc<crate::migrate::PostcopyLink>, std::result::Result<Option<f64>, String>) {
                        let filled = std::sync::atomic::AtomicU64::new(0);
                        let r = std::thread::scope(|sc| {
                            let urgent = sc.spawn(|| {
                                crate::migrate::postcopy_receive(
                                    &link,
                                    &rm,
                                    migration::FrameReader::new(urgent_reader),
                                    &filled,
                                    crate::migrate::Silence::Idle,
                                )
                            });
                            let m = crate::migrate::postcopy_receive(&link, &rm, main, &filled, crate::migrate::Silence::PeerGone);
                            let u = urgent.join().unwrap_or_else(|_| Err("urgent receiver panicked".into()));
                            m.and(u)
                        });
                        let done = filled.load(Ordering::Relaxed) == link.missing;
                        if done {
                            // Every page arrived: the guest view needs no userfaultfd
                            // anymore, and regions whose collapse failed on fill get one
                            // more try.
                            let _ = rm.end_postcopy();
                        }
                        let ms = (monotonic_ns() - switched) as f64 / 1e6;
                        let r = r.and_then(|_| if done { Ok(Some(ms)) } else { Err(format!("post-copy ended with {} of {} pages", filled.load(Ordering::Relaxed), link.missing)) });
                        (link, r)
                    })
                    .map_err(|source| Error::Thread { index: vcpus, source })?;
                postcopy_threads = Some(handle);
                // Regions that pre-copy rounds (hybrid) completed before the switch.
                ram.resumed_after_migration();
            }
            None => {
                // The end of the downtime: tell the source, which then completes.
                if let Err(e) = inc.confirm_resumed() {
                    eprintln!("hugevisor: warning: the source did not complete the hand-over cleanly: {e}");
                }
                // Every region arrived complete by pre-copy.
                ram.resumed_after_migration();
            }
        }
    }

    // Watch the run.
    let deadline = launch_ns + cfg.timeout.as_nanos() as u64;
    let stop_at = match cfg.limit {
        // The duration counts from the guest's first start, on whichever host.
        RunLimit::Duration(d) => {
            Some(launch_ns + (d.as_nanos() as u64).saturating_sub(source_elapsed_ns))
        }
        RunLimit::Passes(_) => None,
    };
    let (events_tx, events_rx) = std::sync::mpsc::channel::<SourceEvent>();
    let mut migrate_reply: Option<
        std::sync::mpsc::Sender<std::result::Result<serde_json::Value, String>>,
    > = None;
    let mut paused: Option<Vec<VcpuOutcome>> = None;
    let mut paused_max_pass: Vec<u64> = Vec::new();
    let mut migrated: Option<MigrationReport> = None;
    let mut migration_failures = Vec::new();

    let mut stop_requested_at: Option<u64> = None;
    let mut corrupted_gpa = None;
    // vCPU 0's pass count when the corruption was written.
    let mut corrupted_at_pass: Option<u64> = None;
    let mut timed_out = false;
    while paused.is_some() || !threads.iter().all(|t| t.handle.is_finished()) {
        std::thread::sleep(POLL);
        let now = monotonic_ns();
        if let Some((_, calls)) = &api {
            while let Ok(call) = calls.try_recv() {
                match call {
                    ApiCall::Info(reply) => {
                        let slots: Vec<_> = (0..vcpus).map(|i| mailbox.slot(mem, i)).collect();
                        let memory = ram.stats();
                        let _ = reply.send(serde_json::json!({
                            "state": if paused.is_some() { "paused" } else { "running" },
                            "workload": workload_name,
                            "vcpus": vcpus,
                            "memory_bytes": ram.size(),
                            "backing": ram.backing().to_string(),
                            "passes": slots.iter().map(|s| s.passes).sum::<u64>(),
                            "integrity_errors": slots.iter().map(|s| s.integrity_errors).sum::<u64>(),
                            "numa": memory.numa,
                            "memory": memory,
                        }));
                    }
                    ApiCall::Migrate(req, reply) => {
                        if migrate_reply.is_some() {
                            let _ = reply.send(Err("a migration is already running".into()));
                            continue;
                        }
                        let (vm2, ram2, tx) = (vm.clone(), ram.clone(), events_tx.clone());
                        let n = cfg.vcpus;
                        let spawned =
                            std::thread::Builder::new()
                                .name("migrate".into())
                                .spawn(move || {
                                    let r = crate::migrate::send(vm2, ram2, n, req, tx.clone());
                                    let _ = tx.send(SourceEvent::Done(r));
                                });
                        match spawned {
                            Ok(_) => migrate_reply = Some(reply),
                            Err(e) => {
                                let _ =
                                    reply.send(Err(format!("starting the migration thread: {e}")));
                            }
                        }
                    }
                }
            }
        }
        while let Ok(ev) = events_rx.try_recv() {
            match ev {
                SourceEvent::Pause(reply) => {
                    shared.stop.store(true, Ordering::Release);
                    kick_until_finished(&threads);
                    if !threads.iter().all(|t| t.handle.is_finished()) {
                        // A vCPU did not leave KVM_RUN: keep the guest running here.
                        shared.stop.store(false, Ordering::Release);
                        let (done, running): (Vec<_>, Vec<_>) =
                            threads.drain(..).partition(|t| t.handle.is_finished());
                        let back: Vec<Vcpu> = done
                            .into_iter()
                            .filter_map(|t| t.handle.join().ok())
                            .map(|o| o.vcpu)
                            .collect();
                        threads = running;
                        threads.extend(spawn_vcpus(back, &shared, &console, &ram)?);
                        let _ = reply.send(Err(
                            "a vCPU did not stop within 1 s; the guest keeps running here".into(),
                        ));
                        continue;
                    }
                    let mut outcomes = Vec::new();
                    for t in threads.drain(..) {
                        if let Ok(o) = t.handle.join() {
                            outcomes.push(o);
                        }
                    }
                    let states: std::result::Result<Vec<VcpuState>, String> = outcomes
                        .iter()
                        .map(|o| o.vcpu.save().map_err(|e| e.to_string()))
                        .collect();
                    let slots: Vec<_> = (0..vcpus).map(|i| mailbox.slot(mem, i)).collect();
                    let info = RunInfo {
                        workload: workload_name.clone(),
                        elapsed_ns: source_elapsed_ns + (monotonic_ns() - launch_ns),
                        duration_ns: match cfg.limit {
                            RunLimit::Duration(d) => Some(d.as_nanos() as u64),
                            RunLimit::Passes(_) => None,
                        },
                        max_pass_cycles: slots.iter().map(|s| s.max_pass_cycles).collect(),
                        source_exits: outcomes.iter().map(|o| o.exits).sum(),
                        passes: slots.iter().map(|s| s.passes).sum(),
                    };
                    // The pass that spans the switch-over is measured from here: clear
                    // each worst pass (restored below if the migration fails).
                    paused_max_pass = info.max_pass_cycles.clone();
                    for i in 0..vcpus {
                        mailbox.reset_max_pass(mem, i);
                    }
                    let _ = reply.send(states.map(|s| crate::migrate::Paused {
                        vcpus: s,
                        run: info,
                        mailbox: mailbox.gpa_range(vcpus),
                    }));
                    paused = Some(outcomes);
                }
                SourceEvent::Done(result) => {
                    let reply = migrate_reply.take();
                    match result {
                        Ok(mut report) => {
                            report.dirty_log = vm.dirty_log_method().name().to_string();
                            (report.dirty_log_takes, report.dirty_log_ms) = vm.dirty_log_cost();
                            if let Some(r) = reply {
                                let _ =
                                    r.send(Ok(serde_json::to_value(&report).unwrap_or_default()));
                            }
                            migrated = Some(report);
                        }
                        Err(e) => {
                            if let Some(r) = reply {
                                let _ = r.send(Err(e.clone()));
                            }
                            migration_failures.push(e);
                            // The guest never left: run it here again.
                            if let Some(outcomes) = paused.take() {
                                for (i, &before) in paused_max_pass.iter().enumerate() {
                                    let now = mailbox.slot(mem, i).max_pass_cycles;
                                    mailbox.set_max_pass(mem, i, now.max(before));
                                }
                                shared.stop.store(false, Ordering::Release);
                                let vcpus_back = outcomes.into_iter().map(|o| o.vcpu).collect();
                                threads = spawn_vcpus(vcpus_back, &shared, &console, &ram)?;
                            }
                        }
                    }
                }
            }
        }
        if migrated.is_some() {
            break;
        }
        if paused.is_some() {
            continue;
        }
        let corruption_checked = match cfg.corruption {
            CorruptionTest::None => true,
            CorruptionTest::AfterFirstPass => {
                corrupted_at_pass.is_some_and(|at| mailbox.slot(mem, 0).passes >= at + 2)
            }
        };
        if stop_requested_at.is_none() && stop_at.is_some_and(|t| now >= t) && corruption_checked {
            mailbox.request_stop(mem);
            stop_requested_at = Some(now);
        }
        if cfg.corruption == CorruptionTest::AfterFirstPass && corrupted_gpa.is_none() {
            let slot = mailbox.slot(mem, 0);
            if slot.passes >= 1 {
                let pages = (slot.part_end - slot.part_start) / 4096;
                let gpa = slot.part_start + pages / 2 * 4096 + 8;
                let word: u64 = mem.read_obj(GuestAddress(gpa)).unwrap_or(0);
                mem.write_obj(word ^ 0x5a5a_0000_0000_5a5a, GuestAddress(gpa))
                    .map_err(|e| Error::GuestWrite {
                        gpa,
                        what: e.to_string(),
                    })?;
                corrupted_gpa = Some(gpa & !0xfff);
                corrupted_at_pass = Some(slot.passes);
            }
        }
        // One vCPU's failure ends the run for all.
        if threads.iter().any(|t| t.handle.is_finished()) && stop_requested_at.is_none() {
            let failed = (0..vcpus).any(|i| {
                let st = mailbox.slot(mem, i).state;
                st == abi::STATE_EXCEPTION || st == abi::STATE_BAD_PARAMS
            });
            if failed {
                mailbox.request_stop(mem);
                stop_requested_at = Some(now);
            }
        }
        let grace_over = stop_requested_at.is_some_and(|t| now >= t + STOP_GRACE.as_nanos() as u64);
        if now >= deadline || grace_over {
            timed_out = true;
            shared.stop.store(true, Ordering::Release);
            kick_until_finished(&threads);
            break;
        }
    }
    let mut outcomes = paused.take().unwrap_or_default();
    for (index, t) in threads.into_iter().enumerate() {
        let o = t.handle.join().map_err(|_| Error::Vcpu {
            index,
            what: "vCPU thread panicked".into(),
        })?;
        outcomes.push(o);
    }
    // A migration still in flight ends here: the guest finished (or failed) first.
    if let Some(r) = migrate_reply.take() {
        let why = "the guest finished before the migration could complete".to_string();
        let _ = r.send(Err(why.clone()));
        migration_failures.push(why);
    }
    while let Ok(ev) = events_rx.try_recv() {
        if let SourceEvent::Pause(reply) = ev {
            let _ = reply.send(Err("the guest has finished".into()));
        }
    }
    drop(events_rx);
    drop(api);
    let end_ns = monotonic_ns();
    if let (Some(h), Some(inc)) = (postcopy_threads.take(), incoming_report.as_mut()) {
        match h.join() {
            Ok((link, r)) => {
                let lat = link.latency.lock().unwrap_or_else(|e| e.into_inner());
                inc.pages_demand = link.demand_pages.load(Ordering::Relaxed);
                inc.pages_pushed = link.pushed_pages.load(Ordering::Relaxed);
                inc.demand_fault_us_p50 = lat.percentile_us(50.0);
                inc.demand_fault_us_p99 = lat.percentile_us(99.0);
                inc.demand_fault_us_max = lat.max_us();
                inc.postcopy_ms = r.map_err(|e| Error::Config(format!("post-copy: {e}")))?;
            }
            Err(_) => return Err(Error::Config("the post-copy receiver panicked".into())),
        }
    }
    let memory_report = ram.stop();
    let pmd_mapped_bytes = ram.pmd_mapped_bytes()?;
    let (collapse, zaps, numa) = (
        memory_report.collapse,
        memory_report.zaps,
        memory_report.numa,
    );
    let faults = memory_report.faults;
    let clock = TscClock::calibrate(origin);
    if let Some(e) = faults.as_ref().and_then(|f| f.error.clone()) {
        return Err(Error::Config(format!("fault path: {e}")));
    }
    if let Some(n) = Some(memory_report.host_failures).filter(|&n| n > 0) {
        return Err(Error::Config(format!(
            "{n} host-side mapping changes (zap or userfaultfd re-registration after a NUMA move) failed; guest memory may not be protected"
        )));
    }
    let memmap = match cfg.memmap {
        MemmapListing::AtExit => Some(Memmap {
            accounting: ram.accounting(),
            runs: ram.runs(),
        }),
        MemmapListing::Off => None,
    };

    // Resident memory while guest RAM is still mapped.
    let rss = ram.rss_split()?;
    let (vmm_rss, ram_rss) = (rss.vmm_rss_bytes, rss.guest_ram_rss_bytes);

    let slots: Vec<_> = (0..vcpus).map(|i| mailbox.slot(mem, i)).collect();
    for (index, o) in outcomes.iter().enumerate() {
        if let Err(what) = &o.end {
            return Err(Error::Vcpu {
                index,
                what: with_console(what, &console),
            });
        }
        if o.end
            == Ok(VcpuEnd::Exited {
                code: abi::EXIT_BAD_PARAMS,
            })
        {
            return Err(Error::Vcpu {
                index,
                what: with_console("the guest rejected its parameters", &console),
            });
        }
    }
    let exception = slots
        .iter()
        .enumerate()
        .find(|(_, s)| s.state == abi::STATE_EXCEPTION)
        .map(|(i, s)| GuestException {
            vcpu: i,
            vector: s.exc_vector,
            name: VECTOR_NAMES[(s.exc_vector & 31) as usize],
            error_code: s.exc_error_code,
            cr2: s.exc_cr2,
            rip: s.exc_rip,
        });
    if timed_out && exception.is_none() && migrated.is_none() {
        return Err(Error::Timeout(cfg.timeout));
    }

    let per_vcpu: Vec<VcpuReport> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let secs = clock.cycles_to_ms(s.end_tsc.saturating_sub(s.start_tsc)) / 1000.0;
            VcpuReport {
                vcpu: i,
                node: s.node,
                passes: s.passes,
                pages_touched: s.pages_touched,
                bytes: s.bytes,
                integrity_errors: s.integrity_errors,
                last_pass_ms: clock.cycles_to_ms(s.last_pass_cycles),
                max_pass_ms: clock.cycles_to_ms(s.max_pass_cycles),
                bytes_per_sec: if secs > 0.0 {
                    s.bytes as f64 / secs
                } else {
                    0.0
                },
                steady_bytes_per_sec: {
                    let last = clock.cycles_to_ms(s.last_pass_cycles) / 1000.0;
                    if last > 0.0 && s.passes > 0 {
                        s.bytes as f64 / s.passes as f64 / last
                    } else {
                        0.0
                    }
                },
                guest_exits: outcomes[i].exits,
                partition: [s.part_start, s.part_end],
            }
        })
        .collect();
    let first_error = slots
        .iter()
        .enumerate()
        .find(|(_, s)| s.integrity_errors > 0)
        .map(|(i, s)| IntegrityError {
            vcpu: i,
            gpa: s.err_gpa,
            expected: s.err_expected,
            found: s.err_found,
        });
    let integrity_errors: u64 = slots.iter().map(|s| s.integrity_errors).sum();
    let first_insn_tsc = slots
        .iter()
        .map(|s| s.entry_tsc)
        .filter(|&t| t != 0)
        .min()
        .unwrap_or(origin.tsc);
    let first_insn_ns = clock.tsc_to_monotonic_ns(first_insn_tsc);
    let last_end_tsc = slots.iter().map(|s| s.end_tsc).max().unwrap_or(0);
    let end_ns_guest = if last_end_tsc > 0 {
        clock.tsc_to_monotonic_ns(last_end_tsc)
    } else {
        end_ns
    };
    let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e6;

    let total_passes: u64 = per_vcpu.iter().map(|v| v.passes).sum();
    if let Some(i) = incoming_report.as_mut() {
        i.passes_after_switch = total_passes.saturating_sub(i.passes_at_switch);
    }
    Ok(RunReport {
        workload: workload_name.clone(),
        vcpus: cfg.vcpus,
        memory_bytes: ram.size(),
        backing: ram.backing().to_string(),
        page_size: ram.page_size(),
        prefault: cfg.ram.prefault == guest_mm::Prefault::Populate,
        entry: "ring-3 fast path",
        outcome: if exception.is_some() {
            Outcome::GuestException
        } else if migrated.is_some() {
            Outcome::Migrated
        } else if integrity_errors > 0 {
            Outcome::IntegrityErrors
        } else {
            Outcome::Ok
        },
        elapsed_ms: ms(launch_ns, end_ns),
        passes: per_vcpu.iter().map(|v| v.passes).sum(),
        pages_touched: per_vcpu.iter().map(|v| v.pages_touched).sum(),
        integrity_errors,
        guest_exits: outcomes.iter().map(|o| o.exits).sum(),
        bytes_per_sec: per_vcpu.iter().map(|v| v.bytes_per_sec).sum(),
        steady_bytes_per_sec: per_vcpu.iter().map(|v| v.steady_bytes_per_sec).sum(),
        max_pass_ms: per_vcpu.iter().map(|v| v.max_pass_ms).fold(0.0, f64::max),
        first_error,
        exception,
        corrupted_gpa,
        startup: Startup {
            to_first_insn_ms: ms(cfg.process_start_ns, first_insn_ns),
            to_workload_end_ms: ms(cfg.process_start_ns, end_ns_guest),
            first_insn_monotonic_ns: first_insn_ns,
            process_start_monotonic_ns: cfg.process_start_ns,
        },
        tsc_khz: clock.khz(),
        vmm_rss_bytes: vmm_rss,
        guest_ram_rss_bytes: ram_rss,
        vmm_overhead_rss_bytes: vmm_rss.saturating_sub(ram_rss),
        per_vcpu,
        fault_path: memory_report.fault_path.to_string(),
        uffd_faults: faults.as_ref().map(|f| f.uffd_faults).unwrap_or(0),
        fault_us_p50: faults.as_ref().map(|f| f.fault_us_p50).unwrap_or(0.0),
        fault_us_p99: faults.as_ref().map(|f| f.fault_us_p99).unwrap_or(0.0),
        faults,
        zaps,
        memmap,
        numa_hint_faults: numa.as_ref().map(|n| n.numa_hint_faults).unwrap_or(0),
        numa_hint_faults_local: numa.as_ref().map(|n| n.numa_hint_faults_local).unwrap_or(0),
        numa_pages_migrated: numa.as_ref().map(|n| n.numa_pages_migrated).unwrap_or(0),
        numa_migrate_failures: numa.as_ref().map(|n| n.numa_migrate_failures).unwrap_or(0),
        locality_pct: numa.as_ref().map(|n| n.locality_pct),
        numa,
        migration: migrated,
        migration_failures,
        guest_stall_ms: incoming_report.as_ref().map(|_| {
            clock.cycles_to_ms(slots.iter().map(|s| s.max_pass_cycles).max().unwrap_or(0))
        }),
        incoming: incoming_report,
        collapses: collapse.as_ref().map(|c| c.stats.collapses).unwrap_or(0),
        collapse_failures: collapse
            .as_ref()
            .map(|c| c.stats.collapse_failures.clone())
            .unwrap_or_default(),
        collapse_ms_total: collapse
            .as_ref()
            .map(|c| c.stats.collapse_ms_total)
            .unwrap_or(0.0),
        pmd_mapped_bytes,
        collapse,
        dirty_log: cfg.dirty_log.name(),
        dirty_ring_entries: match cfg.dirty_log {
            DirtyLogMethod::Ring { entries } => Some(entries),
            DirtyLogMethod::Bitmap => None,
        },
        dirty_ring_full_exits: outcomes.iter().map(|o| o.dirty_ring_full_exits).sum(),
    })
}

/// What guest memory is asked to be in this run: the RAM, and the fault path, collapse,
/// NUMA and stress options, with the workload's working sets and placement plan.
fn memory_config(cfg: &RunConfig, topology: Option<&guest_mm::numa::Topology>) -> MemoryConfig {
    let vcpus = cfg.vcpus as usize;
    let mut ram = cfg.ram.clone();
    let numa = topology.map(|t| {
        ram.numa = t.layout;
        let sets = crate::placement::working_sets(cfg.workload, ram.size, vcpus);
        let placement =
            crate::placement::plan(cfg.workload, ram.size, &sets, &t.vcpu_nodes, t.layout.nodes);
        NumaConfig {
            balancing: cfg.numa_balancing,
            scan: cfg.numa_scan,
            vcpu_nodes: t.vcpu_nodes.clone(),
            working_sets: sets,
            placement,
            forced_moves: cfg.numa_force_move.map(|period| Recurring {
                period,
                seed: cfg.seed,
            }),
            note: t.note.clone(),
        }
    });
    MemoryConfig {
        ram,
        vcpus,
        origin: match cfg.incoming {
            Some(_) => GuestOrigin::MigrationDestination,
            None => GuestOrigin::Booted,
        },
        fault_path: guest_mm::FaultPathNeed::Derived,
        collapse: CollapseConfig {
            mode: cfg.collapse,
            scan: cfg.collapse_scan,
        },
        numa,
        stress_zap: cfg.stress_zap.map(|period| Recurring {
            period,
            seed: cfg.seed,
        }),
    }
}

fn with_console(what: &str, console: &Console) -> String {
    let recent = console.recent();
    if recent.is_empty() {
        what.to_string()
    } else {
        format!(
            "{what}\n  last guest console lines:\n    {}",
            recent.join("\n    ")
        )
    }
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} on {} vCPU(s), {} MiB {} ({} KiB pages){}: {}",
            self.workload,
            self.vcpus,
            self.memory_bytes >> 20,
            self.backing,
            self.page_size >> 10,
            if self.prefault { ", prefaulted" } else { "" },
            match self.outcome {
                Outcome::Ok => "ok",
                Outcome::IntegrityErrors => "INTEGRITY ERRORS",
                Outcome::GuestException => "GUEST EXCEPTION",
                Outcome::Migrated => "migrated",
            }
        )?;
        writeln!(
            f,
            "  {:.1} ms, {} passes, {} pages, {:.1} MiB/s ({:.1} MiB/s warm), worst pass {:.2} ms, {} guest exits",
            self.elapsed_ms,
            self.passes,
            self.pages_touched,
            self.bytes_per_sec / (1 << 20) as f64,
            self.steady_bytes_per_sec / (1 << 20) as f64,
            self.max_pass_ms,
            self.guest_exits
        )?;
        writeln!(
            f,
            "  start-up: first guest instruction at {:.1} ms, workload end at {:.1} ms; VMM overhead RSS {} KiB",
            self.startup.to_first_insn_ms,
            self.startup.to_workload_end_ms,
            self.vmm_overhead_rss_bytes >> 10
        )?;
        if let Some(e) = &self.first_error {
            writeln!(
                f,
                "  integrity errors: {} (first on vCPU {} at GPA {:#x}: expected {:#x}, found {:#x})",
                self.integrity_errors, e.vcpu, e.gpa, e.expected, e.found
            )?;
        }
        if self.fault_path == "uffd-minor" {
            writeln!(
                f,
                "  fault path: {} MINOR faults, p50 {:.0} µs, p99 {:.0} µs{}",
                self.uffd_faults,
                self.fault_us_p50,
                self.fault_us_p99,
                if self.zaps > 0 {
                    format!(", {} zaps", self.zaps)
                } else {
                    String::new()
                }
            )?;
        }
        if let Some(n) = &self.numa {
            writeln!(
                f,
                "  NUMA: {} {} node(s), balancing {}: {} hint faults ({} local), {} pages moved, {} failures, locality {:.1}%{}",
                n.nodes,
                n.backend,
                if n.balancing { "on" } else { "off" },
                n.numa_hint_faults,
                n.numa_hint_faults_local,
                n.numa_pages_migrated,
                n.numa_migrate_failures,
                n.locality_pct,
                n.time_to_95_ms.map(|t| format!(", 95% after {t:.0} ms")).unwrap_or_default()
            )?;
            if let Some(note) = &n.note {
                writeln!(f, "  note: {note}")?;
            }
        }
        if let Some(x) = &self.exception {
            writeln!(
                f,
                "  guest exception on vCPU {}: {} (vector {}) error code {:#x}, CR2 {:#x}, RIP {:#x}",
                x.vcpu, x.name, x.vector, x.error_code, x.cr2, x.rip
            )?;
        }
        if let Some(m) = &self.migration {
            writeln!(
                f,
                "  migrated ({}) to {}: {:.0} ms total, {:.1} ms downtime, {} MiB sent, {} pre-copy pages in {} rounds",
                m.mode,
                m.to,
                m.total_ms,
                m.downtime_ms,
                m.bytes_sent >> 20,
                m.pages_precopy,
                m.precopy_rounds
            )?;
        }
        if let Some(entries) = self.dirty_ring_entries {
            writeln!(
                f,
                "  dirty ring: {entries} entries per vCPU, {} ring-full exits",
                self.dirty_ring_full_exits
            )?;
        }
        for e in &self.migration_failures {
            writeln!(f, "  a migration failed; the guest kept running here: {e}")?;
        }
        if let (Some(i), Some(stall)) = (&self.incoming, self.guest_stall_ms) {
            writeln!(
                f,
                "  arrived by {} migration: {} pages, {} MiB, after {:.0} ms on the source; guest stall {:.1} ms",
                i.mode,
                i.pages,
                i.bytes >> 20,
                i.source_elapsed_ms,
                stall
            )?;
        }
        if let Some(m) = &self.memmap {
            write_memmap(f, m)?;
        }
        Ok(())
    }
}

fn write_memmap(f: &mut std::fmt::Formatter<'_>, m: &Memmap) -> std::fmt::Result {
    let a = &m.accounting;
    writeln!(f, "second-stage table:")?;
    writeln!(
        f,
        "  present {} KiB (hinted {} KiB), absent {} KiB; leaves 4K {} 2M {} 1G {}; piecewise huge pages {}; logical mappings {}",
        a.present_bytes >> 10,
        a.hinted_bytes >> 10,
        a.absent_bytes >> 10,
        a.leaves_4k,
        a.leaves_2m,
        a.leaves_1g,
        a.piecewise_huge_pages,
        a.logical_mappings
    )?;
    writeln!(
        f,
        "  {:>18} {:>18} {:>10} {:>4} {:>8} {:>4} {:>4}",
        "start", "end", "size KiB", "leaf", "state", "node", "zone"
    )?;
    for r in &m.runs {
        writeln!(
            f,
            "  {:#018x} {:#018x} {:>10} {:>4} {:>8} {:>4} {:>4}{}",
            r.start,
            r.end,
            r.end.offset_from(r.start) >> 10,
            match r.size {
                LeafSize::Size4K => "4K",
                LeafSize::Size2M => "2M",
                LeafSize::Size1G => "1G",
            },
            match r.state {
                PageState::Present => "present",
                PageState::Absent => "absent",
                PageState::Hinted => "hinted",
            },
            r.node,
            r.zone,
            if r.piecewise { " piecewise" } else { "" }
        )?;
    }
    Ok(())
}
