//! The run report: what the guest measured (read from its mailbox), what the VMM's
//! memory machinery counted, and how a migration went — as JSON (`--json`) or a human
//! summary.

use guest_image::abi::{self, VcpuSlot};
use guest_mm::stage::{Accounting, LeafSize, PageState, Run};
use guest_mm::{CollapseReport, FaultReport, MemoryReport, NumaReport};
use migration::{IncomingReport, MigrationReport};
use serde::Serialize;

use crate::config::{MemmapListing, RunConfig};
use crate::console::Console;
use crate::controller::RunEnd;
use crate::error::{Error, Result};
use crate::vstate::vcpu::{ExitKinds, VcpuEnd, VcpuOutcome};
use crate::vstate::vm::DirtyLogMethod;
use guest_image::clock::{TscClock, TscPoint};

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
    /// No guest ran: a VMM that waited for `vm.receive-migration` was ended first.
    NoGuest,
    /// A migration failure ended the run: a post-copy destination whose source never
    /// sent the pages it lacks (the guest stopped rather than read zeros), or a source
    /// that could not run its guest again (`migration_error` says which).
    MigrationFailed,
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
    /// Process start to the guest's first instruction as the VMM sees it: vCPU 0's
    /// first KVM_RUN (any guest, any entry).
    pub to_vcpu_start_ms: f64,
    /// Process start to the guest's first console byte (any guest).
    pub to_first_console_byte_ms: Option<f64>,
    /// Process start to the built-in image's own first ring-3 stamp (the earliest vCPU's
    /// `user_main`); under the PVH path this includes the image's ring-0 boot.
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
    pub exits_by_kind: ExitKinds,
    /// CPU time of this vCPU's thread (guest and KVM).
    pub vcpu_time_ms: f64,
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
    pub entry: String,
    /// Whether the guest publishes the built-in mailbox (its figures below are the
    /// guest's own); a guest hugevisor did not build reports only what the VMM saw.
    pub guest_mailbox: bool,
    /// How the guest ended: "exit" (every vCPU's exit port), "power-off" (ACPI S5),
    /// "reset" (i8042), "stopped" (the VMM: --duration, vm.shutdown, a timeout).
    pub ended_by: &'static str,
    pub outcome: Outcome,
    pub elapsed_ms: f64,
    pub passes: u64,
    pub pages_touched: u64,
    pub integrity_errors: u64,
    pub guest_exits: u64,
    pub exits_by_kind: ExitKinds,
    /// Bytes the guest wrote to its console (COM1).
    pub console_bytes: u64,
    /// CPU time of all vCPU threads.
    pub vcpu_time_ms: f64,
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
    /// A migration destination's population of its RAM while it waited (how it ended,
    /// how far it got); None where none ran.
    pub populate: Option<guest_mm::ram::populate::PopulateReport>,
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
    /// The migration failure that ended the run (outcome `migration_failed`).
    pub migration_error: Option<String>,
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

pub const VECTOR_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
    "reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
];

/// How the run's guest ended, from its vCPUs' ends.
fn ended_by(outcomes: &[VcpuOutcome]) -> &'static str {
    let ends: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.end.as_ref().ok())
        .collect();
    if ends.contains(&&VcpuEnd::PowerOff) {
        "power-off"
    } else if ends.contains(&&VcpuEnd::Reset) {
        "reset"
    } else if !ends.is_empty() && ends.iter().all(|e| matches!(e, VcpuEnd::Exited { .. })) {
        "exit"
    } else {
        "stopped"
    }
}

impl RunReport {
    /// The summary of a guest without a mailbox: what the VMM saw.
    fn write_kernel_guest(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "kernel guest on {} vCPU(s), {} MiB {} ({} KiB pages): {:.1} ms",
            self.vcpus,
            self.memory_bytes >> 20,
            self.backing,
            self.page_size >> 10,
            self.elapsed_ms
        )?;
        self.write_vmm_view(f)?;
        writeln!(
            f,
            "  start-up: vCPU start at {:.1} ms, first console byte at {}",
            self.startup.to_vcpu_start_ms,
            self.startup
                .to_first_console_byte_ms
                .map_or("never".to_string(), |t| format!("{t:.1} ms"))
        )?;
        if let Some(m) = &self.migration {
            writeln!(
                f,
                "  migrated ({}) to {}: {:.0} ms total, {:.1} ms downtime, {} MiB sent",
                m.mode,
                m.to,
                m.total_ms,
                m.downtime_ms,
                m.bytes_sent >> 20
            )?;
        }
        Ok(())
    }

    /// What the VMM saw of any guest: exits by kind, console bytes, vCPU time.
    fn write_vmm_view(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = &self.exits_by_kind;
        writeln!(
            f,
            "  entry: {}; ended by {}; {} guest exits (port out {}, port in {}, kicks {}, halts {}, outside RAM {}, dirty ring full {}); console {} bytes; vCPU time {:.1} ms",
            self.entry,
            self.ended_by,
            self.guest_exits,
            k.io_out,
            k.io_in,
            k.kick,
            k.hlt,
            k.mmio,
            k.dirty_ring_full,
            self.console_bytes,
            self.vcpu_time_ms
        )
    }
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.guest_mailbox {
            return self.write_kernel_guest(f);
        }
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
                Outcome::NoGuest => "no guest (ended while waiting for vm.receive-migration)",
                Outcome::MigrationFailed => "MIGRATION FAILED",
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
            "  start-up: vCPU start at {:.1} ms, first ring-3 instruction at {:.1} ms, workload end at {:.1} ms; VMM overhead RSS {} KiB",
            self.startup.to_vcpu_start_ms,
            self.startup.to_first_insn_ms,
            self.startup.to_workload_end_ms,
            self.vmm_overhead_rss_bytes >> 10
        )?;
        self.write_vmm_view(f)?;
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
            if let Some(met) = m.budget_met {
                writeln!(
                    f,
                    "  downtime budget {:.0} ms {}: expected {:.1} ms, measured {:.1} ms; rounds ended by {}{}",
                    m.downtime_budget_ms,
                    if met { "kept" } else { "EXCEEDED" },
                    m.expected_downtime_ms,
                    m.downtime_ms,
                    m.converged_by.name(),
                    match m.throttle_percent {
                        0 => String::new(),
                        p => format!(" (vCPUs throttled up to {p} %)"),
                    }
                )?;
            }
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

/// Builds the run's report from how the run ended and what guest memory counted. Errors
/// are problems of the VMM or the host (a vCPU that failed, a timeout); what the guest
/// found is in [`RunReport::outcome`].
pub fn assemble(
    cfg: &RunConfig,
    origin: TscPoint,
    end: RunEnd,
    mem: MemoryReport,
) -> Result<RunReport> {
    let memory = &end.memory;
    let clock = TscClock::calibrate(origin);
    let figures = memory_figures(cfg, memory, &mem)?;
    let slots: Vec<VcpuSlot> = (0..cfg.vcpus as usize)
        .map(|i| end.mailbox.slot(memory.staging(), i))
        .collect();
    if !end.abandoned {
        check_vcpus(&end)?;
    }
    let exception = exception(&slots);
    if end.timed_out && exception.is_none() && end.migrated.is_none() && !end.handed_over {
        return Err(Error::Timeout(end.timeout));
    }
    let per_vcpu = vcpu_reports(&slots, &end.outcomes, &clock);
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
    let startup = startup(
        cfg,
        &end.outcomes,
        end.console.first_byte_ns(),
        &slots,
        &clock,
        origin,
        end.end_ns,
    );
    let total_passes: u64 = per_vcpu.iter().map(|v| v.passes).sum();
    let mut incoming = end.incoming;
    if let Some(i) = incoming.as_mut() {
        i.passes_after_switch = total_passes.saturating_sub(i.passes_at_switch);
    }
    let faults = mem.faults;
    let numa = mem.numa;
    let collapse = mem.collapse;
    let mut exits_by_kind = ExitKinds::default();
    for o in &end.outcomes {
        exits_by_kind.add(&o.exit_kinds);
    }
    Ok(RunReport {
        workload: if end.mailbox.is_present() {
            end.workload
        } else {
            "kernel".to_string()
        },
        guest_mailbox: end.mailbox.is_present(),
        ended_by: ended_by(&end.outcomes),
        exits_by_kind,
        console_bytes: end.console.bytes(),
        vcpu_time_ms: end.outcomes.iter().map(|o| o.cpu_ns as f64 / 1e6).sum(),
        vcpus: cfg.vcpus,
        memory_bytes: memory.size(),
        backing: memory.backing().to_string(),
        page_size: memory.page_size(),
        prefault: cfg.ram.prefault == guest_mm::Prefault::Populate,
        entry: end.entry,
        outcome: if end.no_guest {
            Outcome::NoGuest
        } else if end.abandoned && end.migration_error.is_some() {
            Outcome::MigrationFailed
        } else if exception.is_some() {
            Outcome::GuestException
        } else if end.migration_error.is_some() {
            Outcome::MigrationFailed
        } else if end.migrated.is_some() || end.handed_over {
            Outcome::Migrated
        } else if integrity_errors > 0 {
            Outcome::IntegrityErrors
        } else {
            Outcome::Ok
        },
        elapsed_ms: end.end_ns.saturating_sub(end.launch_ns) as f64 / 1e6,
        passes: total_passes,
        pages_touched: per_vcpu.iter().map(|v| v.pages_touched).sum(),
        integrity_errors,
        guest_exits: end.outcomes.iter().map(|o| o.exits).sum(),
        bytes_per_sec: per_vcpu.iter().map(|v| v.bytes_per_sec).sum(),
        steady_bytes_per_sec: per_vcpu.iter().map(|v| v.steady_bytes_per_sec).sum(),
        max_pass_ms: per_vcpu.iter().map(|v| v.max_pass_ms).fold(0.0, f64::max),
        first_error,
        exception,
        corrupted_gpa: end.corrupted_gpa,
        startup,
        tsc_khz: clock.khz(),
        vmm_rss_bytes: figures.rss.vmm_rss_bytes,
        guest_ram_rss_bytes: figures.rss.guest_ram_rss_bytes,
        vmm_overhead_rss_bytes: figures.rss.overhead_bytes(),
        per_vcpu,
        fault_path: mem.fault_path.to_string(),
        uffd_faults: faults.as_ref().map(|f| f.uffd_faults).unwrap_or(0),
        fault_us_p50: faults.as_ref().map(|f| f.fault_us_p50).unwrap_or(0.0),
        fault_us_p99: faults.as_ref().map(|f| f.fault_us_p99).unwrap_or(0.0),
        faults,
        populate: mem.populate.clone(),
        zaps: mem.zaps,
        memmap: figures.memmap,
        numa_hint_faults: numa.as_ref().map(|n| n.numa_hint_faults).unwrap_or(0),
        numa_hint_faults_local: numa.as_ref().map(|n| n.numa_hint_faults_local).unwrap_or(0),
        numa_pages_migrated: numa.as_ref().map(|n| n.numa_pages_migrated).unwrap_or(0),
        numa_migrate_failures: numa.as_ref().map(|n| n.numa_migrate_failures).unwrap_or(0),
        locality_pct: numa.as_ref().map(|n| n.locality_pct),
        numa,
        migration: end.migrated,
        migration_failures: end.migration_failures,
        migration_error: end.migration_error,
        guest_stall_ms: incoming.as_ref().map(|_| {
            clock.cycles_to_ms(slots.iter().map(|s| s.max_pass_cycles).max().unwrap_or(0))
        }),
        incoming,
        collapses: collapse.as_ref().map(|c| c.stats.collapses).unwrap_or(0),
        collapse_failures: collapse
            .as_ref()
            .map(|c| c.stats.collapse_failures.clone())
            .unwrap_or_default(),
        collapse_ms_total: collapse
            .as_ref()
            .map(|c| c.stats.collapse_ms_total)
            .unwrap_or(0.0),
        pmd_mapped_bytes: figures.pmd_mapped_bytes,
        collapse,
        dirty_log: cfg.dirty_log.name(),
        dirty_ring_entries: match cfg.dirty_log {
            DirtyLogMethod::Ring { entries } => Some(entries),
            DirtyLogMethod::Bitmap => None,
        },
        dirty_ring_full_exits: end.outcomes.iter().map(|o| o.dirty_ring_full_exits).sum(),
    })
}

/// What guest memory looks like at the end, read while it is still mapped.
struct MemoryFigures {
    pmd_mapped_bytes: u64,
    memmap: Option<Memmap>,
    rss: guest_mm::RssSplit,
}

/// Guest memory's end figures; a fault path that failed, or host-side mapping changes
/// that did, fail the run (guest memory may not have been protected).
fn memory_figures(
    cfg: &RunConfig,
    memory: &guest_mm::GuestMemory,
    mem: &MemoryReport,
) -> Result<MemoryFigures> {
    if let Some(e) = mem.faults.as_ref().and_then(|f| f.error.clone()) {
        return Err(Error::FaultPath(e));
    }
    if mem.host_failures > 0 {
        return Err(Error::HostMapping {
            failures: mem.host_failures,
        });
    }
    Ok(MemoryFigures {
        pmd_mapped_bytes: memory.pmd_mapped_bytes()?,
        memmap: match cfg.memmap {
            MemmapListing::AtExit => Some(Memmap {
                accounting: memory.accounting(),
                runs: memory.runs(),
            }),
            MemmapListing::Off => None,
        },
        rss: memory.rss_split()?,
    })
}

/// A vCPU that failed, or a guest that rejected its parameters, fails the run.
fn check_vcpus(end: &RunEnd) -> Result<()> {
    for (index, o) in end.outcomes.iter().enumerate() {
        if let Err(what) = &o.end {
            return Err(Error::Vcpu {
                index,
                what: with_console(&what.to_string(), &end.console),
            });
        }
        if o.end
            == Ok(VcpuEnd::Exited {
                code: abi::EXIT_BAD_PARAMS,
            })
        {
            return Err(Error::Vcpu {
                index,
                what: with_console("the guest rejected its parameters", &end.console),
            });
        }
    }
    Ok(())
}

/// The first exception a vCPU's slot reports.
fn exception(slots: &[VcpuSlot]) -> Option<GuestException> {
    slots
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
        })
}

fn vcpu_reports(slots: &[VcpuSlot], outcomes: &[VcpuOutcome], clock: &TscClock) -> Vec<VcpuReport> {
    slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let secs = clock.cycles_to_ms(s.end_tsc.saturating_sub(s.start_tsc)) / 1000.0;
            let last = clock.cycles_to_ms(s.last_pass_cycles) / 1000.0;
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
                steady_bytes_per_sec: if last > 0.0 && s.passes > 0 {
                    s.bytes as f64 / s.passes as f64 / last
                } else {
                    0.0
                },
                guest_exits: outcomes.get(i).map(|o| o.exits).unwrap_or(0),
                exits_by_kind: outcomes.get(i).map(|o| o.exit_kinds).unwrap_or_default(),
                vcpu_time_ms: outcomes.get(i).map_or(0.0, |o| o.cpu_ns as f64 / 1e6),
                partition: [s.part_start, s.part_end],
            }
        })
        .collect()
}

/// Start-up latency, from the guest's own TSC stamps.
fn startup(
    cfg: &RunConfig,
    outcomes: &[VcpuOutcome],
    console_first_byte: Option<u64>,
    slots: &[VcpuSlot],
    clock: &TscClock,
    origin: TscPoint,
    end_ns: u64,
) -> Startup {
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
    Startup {
        to_vcpu_start_ms: outcomes
            .iter()
            .map(|o| o.first_run_ns)
            .filter(|&t| t != 0)
            .min()
            .map_or(0.0, |t| ms(cfg.process_start_ns, t)),
        to_first_console_byte_ms: console_first_byte.map(|t| ms(cfg.process_start_ns, t)),
        to_first_insn_ms: ms(cfg.process_start_ns, first_insn_ns),
        to_workload_end_ms: ms(cfg.process_start_ns, end_ns_guest),
        first_insn_monotonic_ns: first_insn_ns,
        process_start_monotonic_ns: cfg.process_start_ns,
    }
}

/// `what`, followed by the guest's last console lines if it printed any.
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
