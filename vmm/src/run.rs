//! One run of a built-in guest workload: build the VM, run the vCPUs, watch the mailbox,
//! stop on time, and report what the guest measured.
//!
//! Order matters for "nothing half-built": host capabilities are checked first (KVM),
//! then guest RAM is validated and created (guest-mm checks pools and limits before it
//! maps anything), then the VM. Everything is owned by this function's stack, so an error
//! at any step drops what exists in reverse order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use guest_image::abi;
use guest_image::GuestParams;
use guest_mm::collapse::CollapseMode;
use guest_mm::notifier::GpaRange;
use guest_mm::stage::{Change, SecondStage};
use guest_mm::{GuestRam, ViewLayout};
use vm_memory::{Bytes, GuestAddress};

use crate::api::{ApiCall, ApiServer};
use crate::boot;
use crate::clock::{monotonic_ns, TscClock, TscPoint};
use crate::collapse::CollapseEngine;
pub use crate::config::{CorruptionTest, MemmapListing, RunConfig, RunLimit};
use crate::console::Console;
use crate::error::{Error, Result};
use crate::fault::{FaultPath, GuestViewZapper, VcpuThreads};
use crate::mailbox::Mailbox;
use crate::migrate::{MigrationReport, RunInfo, SourceEvent};
use crate::numa::{working_sets, Balancing, NumaEngine};
use crate::procfs;
pub use crate::report::{
    GuestException, IncomingReport, IntegrityError, Memmap, Outcome, RunReport, Startup,
    VcpuReport, VECTOR_NAMES,
};
use crate::vstate::vcpu::{install_kick_handler, Vcpu, VcpuEnd, VcpuEndResult};
use crate::vstate::vcpu_set::VcpuSet;
use crate::vstate::vm::{open_kvm, DirtyLogMethod, Vm};

const POLL: Duration = Duration::from_millis(2);
/// How long vCPUs get to finish their pass after the stop flag before they are kicked.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Builds the VM, runs the workload and reports. Errors are returned only for problems
/// of the VMM or the host; guest-detected failures are in [`RunReport::outcome`].
pub fn run(cfg: &RunConfig) -> Result<RunReport> {
    let origin = TscPoint::now();
    cfg.ram.check_shape()?;
    if cfg.collapse == CollapseMode::Background {
        if cfg.ram.backing == guest_mm::BackingKind::Anon && cfg.ram.thp == guest_mm::ThpMode::Off {
            return Err(Error::Config(
                "--collapse background on anon with --thp off: --thp off tells the kernel no huge pages (MADV_NOHUGEPAGE), so nothing could collapse; use --thp on or --backing shmem".into(),
            ));
        }
        if cfg.numa.is_some() {
            return Err(Error::Config(
                "--collapse background with --numa is not supported yet (NUMA moves remap regions under the scanner); use --collapse on-fill".into(),
            ));
        }
    }
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
        Some(spec) => Some(
            spec.resolve(cfg.vcpus, guest_mm::numa::host_nodes().len())
                .map_err(Error::Config)?,
        ),
        None => None,
    };
    let mut ram_cfg = cfg.ram.clone();
    if let Some(t) = &topology {
        ram_cfg.numa = t.layout;
        ram_cfg.check_shape()?;
        if cfg.numa_balancing == Balancing::On && ram_cfg.backing == guest_mm::BackingKind::Anon {
            return Err(Error::Config(
                "NUMA balancing takes hint faults through userfaultfd MINOR faults, which need file-backed RAM (shmem or hugetlb); use --numa-balancing off with anon".into(),
            ));
        }
    }
    // Host capabilities first, so a missing KVM leaves nothing behind.
    let kvm = open_kvm(&cfg.kvm_device)?;
    install_kick_handler()?;

    let ram = Arc::new(GuestRam::create(&ram_cfg)?);
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

    // The second-stage table: all of guest RAM present, in leaves of the backing page.
    let stage = Arc::new(
        SecondStage::all_present(ram.size(), ram.page_size())
            .map_err(|e| Error::Config(format!("building the second-stage table: {e}")))?,
    );
    let numa_engine = match &topology {
        Some(t) => {
            let sets = working_sets(cfg.workload, ram.size(), vcpus);
            let engine = Arc::new(NumaEngine::new(
                ram.clone(),
                stage.clone(),
                t.vcpu_nodes.clone(),
                sets,
                cfg.numa_scan,
            ));
            engine.place_initial(cfg.workload).map_err(Error::Config)?;
            Some(engine)
        }
        None => None,
    };
    let vcpu_threads = Arc::new(VcpuThreads::new(vcpus));
    let mut host_zapper = None;
    let needs_fault_path = numa_engine.is_some() || cfg.stress_zap.is_some();
    let (mut fault_path, mut fault_path_name) = match ram.view_layout() {
        ViewLayout::GuestAndStaging if !needs_fault_path => (
            None,
            "off: nothing zaps the guest view in this run".to_string(),
        ),
        ViewLayout::GuestAndStaging => {
            let base = ram.guest_view_addr() as u64;
            let fp = FaultPath::start(
                stage.clone(),
                vcpu_threads.clone(),
                base,
                ram.size(),
                numa_engine.clone(),
            )?;
            let zapper = Arc::new(GuestViewZapper::new(base, ram.size(), Some(fp.uffd())));
            stage.notifier().subscribe(zapper.clone());
            host_zapper = Some(zapper);
            (Some(fp), "uffd-minor".to_string())
        }
        ViewLayout::SingleView => (
            None,
            "off: anon RAM has a single view and no page cache for MINOR faults".to_string(),
        ),
    };
    if cfg.stress_zap.is_some() && ram.view_layout() == ViewLayout::SingleView {
        return Err(Error::Config(
            "--stress-zap needs file-backed RAM (shmem or hugetlb): zapping anon RAM would discard it".into(),
        ));
    }

    let vm = Arc::new(Vm::new(&kvm, cfg.dirty_log)?);
    vm.register_ram(&ram)?;
    let api = match &cfg.api_socket {
        Some(p) => Some(ApiServer::start(p)?),
        None => None,
    };
    // Destination: receive the guest before any vCPU exists.
    let mut incoming_report = None;
    let mut incoming_link = None;
    let mut postcopy: Option<(
        Arc<crate::migrate::PostcopyLink>,
        migration::Stream,
        Arc<uffd::Uffd>,
    )> = None;
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
                if fault_path.is_some() {
                    return Err(Error::Config(
                        "post-copy into a destination that also runs --numa or --stress-zap is not supported yet".into(),
                    ));
                }
                if ram.view_layout() == ViewLayout::SingleView {
                    return Err(Error::Config(
                        "post-copy needs file-backed RAM (shmem or hugetlb) on the destination"
                            .into(),
                    ));
                }
                let urgent = inc.accept_urgent().map_err(Error::Config)?;
                let urgent_reader = urgent
                    .try_clone()
                    .map_err(|e| Error::Config(e.to_string()))?;
                let link = Arc::new(
                    crate::migrate::postcopy_begin(&stage, &ram, &missing, urgent)
                        .map_err(Error::Config)?,
                );
                let fp = FaultPath::start_with(
                    stage.clone(),
                    vcpu_threads.clone(),
                    ram.guest_view_addr() as u64,
                    ram.size(),
                    None,
                    Some(link.clone()),
                    crate::fault::Registration::MissingAndMinor,
                )?;
                fault_path_name = "uffd-missing-minor (post-copy)".to_string();
                postcopy = Some((link, urgent_reader, fp.uffd()));
                fault_path = Some(fp);
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

    // The engine runs only where it can have work: on-fill needs an incoming migration
    // (a booted guest's regions never "fill"), background scans any run.
    let collapse_has_work = match cfg.collapse {
        CollapseMode::Off => false,
        CollapseMode::OnFill => cfg.incoming.is_some(),
        CollapseMode::Background => true,
    };
    let collapse = if collapse_has_work && crate::collapse::applies_to(ram.backing()) {
        let uffd = postcopy.as_ref().map(|p| p.2.clone());
        let engine = CollapseEngine::start(
            cfg.collapse,
            cfg.collapse_scan,
            ram.clone(),
            stage.clone(),
            uffd,
        )
        .map_err(|source| Error::Io {
            what: "starting the collapse thread".into(),
            source,
        })?;
        Some(Arc::new(engine))
    } else {
        None
    };

    let console = Arc::new(Console::new(cfg.console));
    let launch_ns = monotonic_ns();
    let (ended_tx, ended_rx) = std::sync::mpsc::channel::<(usize, VcpuEndResult)>();
    let tids = vcpu_threads.clone();
    let vcpu_set = Arc::new(VcpuSet::start(
        built,
        &console,
        Arc::new(move |index| tids.register_current(index)),
        &ended_tx,
    )?);
    // How each vCPU's guest ended, as it does.
    let mut ended: Vec<Option<VcpuEndResult>> = vec![None; vcpus];
    if let Some(inc) = incoming_link.take() {
        match postcopy.take() {
            // Post-copy: pages keep arriving on both channels while the guest runs.
            Some((link, urgent_reader, uffd)) => {
                let main = inc.resumed_postcopy().map_err(Error::Config)?;
                let (st, rm, co) = (stage.clone(), ram.clone(), collapse.clone());
                let switched = monotonic_ns();
                let handle = std::thread::Builder::new()
                    .name("postcopy".into())
                    .spawn(move || -> (Arc<crate::migrate::PostcopyLink>, std::result::Result<Option<f64>, String>) {
                        let filled = std::sync::atomic::AtomicU64::new(0);
                        let r = std::thread::scope(|sc| {
                            let urgent = sc.spawn(|| {
                                crate::migrate::postcopy_receive(
                                    &link,
                                    &st,
                                    &rm,
                                    &uffd,
                                    migration::FrameReader::new(urgent_reader),
                                    &filled,
                                    co.as_deref(),
                                    crate::migrate::Silence::Idle,
                                )
                            });
                            let m = crate::migrate::postcopy_receive(&link, &st, &rm, &uffd, main, &filled, co.as_deref(), crate::migrate::Silence::PeerGone);
                            let u = urgent.join().unwrap_or_else(|_| Err("urgent receiver panicked".into()));
                            m.and(u)
                        });
                        let done = filled.load(Ordering::Relaxed) == link.missing;
                        if done {
                            // Every page arrived: the guest view needs no userfaultfd anymore.
                            let _ = uffd.unregister(rm.guest_view_addr() as u64, rm.size());
                            // Regions whose collapse failed on fill get one more try.
                            if let Some(c) = &co {
                                c.sweep();
                            }
                        }
                        let ms = (monotonic_ns() - switched) as f64 / 1e6;
                        let r = r.and_then(|_| if done { Ok(Some(ms)) } else { Err(format!("post-copy ended with {} of {} pages", filled.load(Ordering::Relaxed), link.missing)) });
                        (link, r)
                    })
                    .map_err(|source| Error::Thread { index: vcpus, source })?;
                postcopy_threads = Some(handle);
                // Regions that pre-copy rounds (hybrid) completed before the switch.
                if let Some(c) = &collapse {
                    c.sweep();
                }
            }
            None => {
                // The end of the downtime: tell the source, which then completes.
                if let Err(e) = inc.confirm_resumed() {
                    eprintln!("hugevisor: warning: the source did not complete the hand-over cleanly: {e}");
                }
                // Every region arrived complete by pre-copy.
                if let Some(c) = &collapse {
                    c.sweep();
                }
            }
        }
    }

    let zapper = cfg
        .stress_zap
        .map(|period| StressZapper::start(stage.clone(), ram.size(), period, cfg.seed));
    let mut numa_threads = Vec::new();
    if let Some(e) = &numa_engine {
        let io = |source| Error::Io {
            what: "starting a NUMA thread".into(),
            source,
        };
        numa_threads = e.start_threads(cfg.numa_balancing).map_err(io)?;
        if let Some(p) = cfg.numa_force_migrate {
            numa_threads.push(e.start_forced_migrations(p, cfg.seed).map_err(io)?);
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
    // The vCPUs are paused in place for a migration's switch-over.
    let mut paused = false;
    let mut paused_max_pass: Vec<u64> = Vec::new();
    let mut migrated: Option<MigrationReport> = None;
    let mut migration_failures = Vec::new();

    let mut stop_requested_at: Option<u64> = None;
    let mut corrupted_gpa = None;
    // vCPU 0's pass count when the corruption was written.
    let mut corrupted_at_pass: Option<u64> = None;
    let mut timed_out = false;
    // `vm.shutdown` asked for the end of the run.
    let mut shutdown_requested = false;
    while paused || ended.iter().any(Option::is_none) {
        std::thread::sleep(POLL);
        let now = monotonic_ns();
        while let Ok((index, end)) = ended_rx.try_recv() {
            ended[index] = Some(end);
        }
        if let Some((_, calls)) = &api {
            while let Ok(call) = calls.try_recv() {
                match call {
                    ApiCall::Info(reply) => {
                        let slots: Vec<_> = (0..vcpus).map(|i| mailbox.slot(mem, i)).collect();
                        let state = if stop_requested_at.is_some() || shutdown_requested {
                            "stopping"
                        } else if paused {
                            "paused"
                        } else if migrate_reply.is_some() {
                            "migrating"
                        } else {
                            "running"
                        };
                        let incoming = incoming_report.as_ref().map(|i| {
                            let postcopy_running =
                                postcopy_threads.as_ref().is_some_and(|h| !h.is_finished());
                            serde_json::json!({
                                "mode": i.mode,
                                "phase": if postcopy_running { "postcopy" } else { "complete" },
                            })
                        });
                        let _ = reply.send(serde_json::json!({
                            "state": state,
                            "workload": workload_name,
                            "vcpus": vcpus,
                            "memory_bytes": ram.size(),
                            "backing": ram.backing().to_string(),
                            "passes": slots.iter().map(|s| s.passes).sum::<u64>(),
                            "per_vcpu_passes": slots.iter().map(|s| s.passes).collect::<Vec<_>>(),
                            "integrity_errors": slots.iter().map(|s| s.integrity_errors).sum::<u64>(),
                            "numa": numa_engine.as_ref().map(|e| e.report(cfg.numa_balancing, None)),
                            "incoming": incoming,
                            "collapse": collapse.as_ref().map(|c| c.progress()),
                            "pmd_mapped_bytes": ram.guest_view_pmd_mapped_bytes().ok(),
                        }));
                    }
                    ApiCall::Shutdown(reply) => {
                        shutdown_requested = true;
                        let _ = reply.send(());
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
                    // Stopped in place: a failed migration resumes the same threads.
                    let states = vcpu_set.pause().and_then(|()| {
                        vcpu_set.save_states().inspect_err(|_| {
                            let _ = vcpu_set.resume();
                        })
                    });
                    let states = match states {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = reply.send(Err(e.to_string()));
                            continue;
                        }
                    };
                    let slots: Vec<_> = (0..vcpus).map(|i| mailbox.slot(mem, i)).collect();
                    let info = RunInfo {
                        workload: workload_name.clone(),
                        elapsed_ns: source_elapsed_ns + (monotonic_ns() - launch_ns),
                        duration_ns: match cfg.limit {
                            RunLimit::Duration(d) => Some(d.as_nanos() as u64),
                            RunLimit::Passes(_) => None,
                        },
                        max_pass_cycles: slots.iter().map(|s| s.max_pass_cycles).collect(),
                        passes: slots.iter().map(|s| s.passes).sum(),
                    };
                    // The pass that spans the switch-over is measured from here: clear
                    // each worst pass (restored below if the migration fails).
                    paused_max_pass = info.max_pass_cycles.clone();
                    for i in 0..vcpus {
                        mailbox.reset_max_pass(mem, i);
                    }
                    let _ = reply.send(Ok(crate::migrate::Paused {
                        vcpus: states,
                        run: info,
                        mailbox: mailbox.gpa_range(vcpus),
                    }));
                    paused = true;
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
                            // The guest never left: run it here again, on the same threads.
                            if paused {
                                for (i, &before) in paused_max_pass.iter().enumerate() {
                                    let now = mailbox.slot(mem, i).max_pass_cycles;
                                    mailbox.set_max_pass(mem, i, now.max(before));
                                }
                                vcpu_set.resume()?;
                                paused = false;
                            }
                        }
                    }
                }
            }
        }
        if migrated.is_some() {
            break;
        }
        if paused {
            continue;
        }
        let corruption_checked = match cfg.corruption {
            CorruptionTest::None => true,
            CorruptionTest::AfterFirstPass => {
                corrupted_at_pass.is_some_and(|at| mailbox.slot(mem, 0).passes >= at + 2)
            }
        };
        let limit_reached = shutdown_requested || stop_at.is_some_and(|t| now >= t);
        if stop_requested_at.is_none() && limit_reached && corruption_checked {
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
        if ended.iter().any(Option::is_some) && stop_requested_at.is_none() {
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
            break;
        }
    }
    let outcomes = vcpu_set.finish();
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
    let collapse = collapse.map(|c| c.stop());
    let pmd_mapped_bytes = ram.guest_view_pmd_mapped_bytes()?;
    let zaps = zapper.map(StressZapper::stop).unwrap_or(0);
    numa_threads.into_iter().for_each(|t| t.stop());
    let numa = numa_engine.as_ref().map(|e| {
        e.report(
            cfg.numa_balancing,
            topology.as_ref().and_then(|t| t.note.clone()),
        )
    });
    let faults = fault_path.map(|fp| fp.stop().report());
    let clock = TscClock::calibrate(origin);
    if let Some(e) = faults.as_ref().and_then(|f| f.error.clone()) {
        return Err(Error::Config(format!("fault path: {e}")));
    }
    if let Some(n) = host_zapper
        .as_ref()
        .map(|z| z.failures())
        .filter(|&n| n > 0)
    {
        return Err(Error::Config(format!(
            "{n} host-side mapping changes (zap or userfaultfd re-registration after a NUMA move) failed; guest memory may not be protected"
        )));
    }
    let memmap = match cfg.memmap {
        MemmapListing::AtExit => Some(Memmap {
            accounting: stage.accounting(),
            runs: stage.runs(),
        }),
        MemmapListing::Off => None,
    };

    // Resident memory while guest RAM is still mapped.
    let (vmm_rss, ram_rss) = procfs::rss_split(&ram.host_ranges()).map_err(|source| Error::Io {
        what: "reading /proc/self/smaps".into(),
        source,
    })?;

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
        fault_path: fault_path_name,
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

/// Testing: zaps random ranges of guest RAM through the second-stage table (and so the
/// guest view) until stopped. The guest keeps running; every zapped page comes back as a
/// MINOR fault on its next vCPU touch.
struct StressZapper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: JoinHandle<u64>,
}

impl StressZapper {
    fn start(stage: Arc<SecondStage>, size: u64, period: Duration, seed: u64) -> StressZapper {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
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
