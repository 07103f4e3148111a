//! The run report: what the guest measured (read from its mailbox), what the VMM's
//! memory machinery counted, and how a migration went — as JSON (`--json`) or a human
//! summary.

use guest_mm::table::{Accounting, LeafSize, PageState, Run};
use serde::Serialize;

use crate::fault::FaultReport;
use crate::migrate::MigrationReport;
use crate::numa::NumaReport;

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
    pub collapse: Option<crate::collapse::CollapseReport>,
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

pub const VECTOR_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
    "reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
];

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
                "  NUMA: {} {} node(s), balancing {}: {} hint faults ({} local), {} pages migrated, {} failures, locality {:.1}%{}",
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
            (r.end - r.start) >> 10,
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
