//! What `vm.info` and `vm.counters` say about a run, from a [`Snapshot`] the controller
//! takes on its thread.
//!
//! `vm.info` is Cloud Hypervisor's `VmInfo` (`config`, `state`, `memory_actual_size`)
//! with hugevisor's own properties beside it: the run state in hugevisor's words, the
//! guest's counters, and guest memory's state — backing, PMD-mapped bytes, the
//! second-stage table's accounting, the fault path, collapse and NUMA figures — and the
//! migration in progress with its phase and progress. `vm.counters` is Cloud
//! Hypervisor's `VmCounters` shape (groups of integer counters) over the same figures;
//! fractional figures become integers in a finer unit (`_ms` → `_us`, `_us` → `_ns`,
//! `_pct` → `_basis_points`).

use guest_image::abi::VcpuSlot;
use guest_mm::GuestMemory;
use serde_json::{json, Map, Value};

use crate::config::RunConfig;
use crate::controller::{PauseCause, RunState};
use crate::progress::Reading;

/// The run as the controller sees it at one moment.
pub struct Snapshot<'a> {
    pub state: RunState,
    /// None until a guest runs here.
    pub workload: Option<&'a str>,
    /// How the guest was entered (`ring-3 fast path`, `pvh`, …, or how it arrived).
    pub entry: &'a str,
    /// What any guest shows without a mailbox: its console.
    pub console_bytes: u64,
    pub console_last: Option<String>,
    pub cfg: &'a RunConfig,
    pub memory: &'a GuestMemory,
    pub slots: Vec<VcpuSlot>,
    pub migration: Option<MigrationView<'a>>,
}

/// A migration in progress, from either end.
pub enum MigrationView<'a> {
    Source {
        mode: migration::Mode,
        destination: &'a migration::Uri,
        progress: Reading,
    },
    Destination {
        /// Known once the migration has ended.
        mode: Option<&'a str>,
        phase: &'static str,
        /// Connections refused (strangers, failed authentication).
        refused_connections: u64,
        /// While a broken post-copy waits for its source: the pages still lacking.
        lacking_pages: Option<u64>,
    },
}

/// Cloud Hypervisor's `VmState` for hugevisor's run state.
fn ch_state(state: RunState) -> &'static str {
    match state {
        RunState::Waiting | RunState::Receiving => "Created",
        RunState::Running | RunState::Migrating | RunState::Stopping => "Running",
        RunState::Paused(_) | RunState::PostcopyPaused => "Paused",
        RunState::Migrated => "Shutdown",
    }
}

/// Cloud Hypervisor's `VmConfig`, as far as hugevisor has its parts.
fn config(s: &Snapshot) -> Value {
    let backing = s.memory.backing();
    let hugetlb = matches!(
        backing,
        guest_mm::BackingKind::Hugetlb2M | guest_mm::BackingKind::Hugetlb1G
    );
    json!({
        "cpus": { "boot_vcpus": s.cfg.vcpus, "max_vcpus": s.cfg.vcpus },
        "memory": {
            "size": s.memory.size(),
            "shared": backing != guest_mm::BackingKind::Anon,
            "hugepages": hugetlb,
            "hugepage_size": hugetlb.then(|| s.memory.page_size()),
            "prefault": s.cfg.ram.prefault == guest_mm::Prefault::Populate,
            "thp": s.cfg.ram.thp == guest_mm::ThpMode::Madvise,
        },
        "payload": { "kernel": "hugevisor's built-in guest image (PVH ELF)" },
    })
}

fn migration(view: &MigrationView, absent_bytes: u64) -> Value {
    match view {
        MigrationView::Source {
            mode,
            destination,
            progress,
        } => json!({
            "role": "source",
            "mode": mode.name(),
            "destination_url": destination.to_string(),
            "phase": progress.phase.map_or_else(|| "connecting".to_string(), |p| p.to_string()),
            "bytes_sent": progress.bytes_sent,
            "elapsed_ms": progress.elapsed_ns as f64 / 1e6,
        }),
        MigrationView::Destination {
            mode,
            phase,
            refused_connections,
            lacking_pages,
        } => json!({
            "role": "destination",
            "mode": mode,
            "phase": phase,
            "refused_connections": refused_connections,
            "lacking_pages": lacking_pages,
            // Post-copy's progress: what has yet to arrive.
            "absent_bytes": absent_bytes,
        }),
    }
}

/// `vm.info`.
pub fn info(s: &Snapshot) -> Value {
    let stats = s.memory.stats();
    let accounting = s.memory.accounting();
    let incoming = match &s.migration {
        Some(MigrationView::Destination {
            mode,
            phase,
            refused_connections,
            lacking_pages,
        }) => json!({
            "mode": mode,
            "phase": phase,
            "refused_connections": refused_connections,
            "lacking_pages": lacking_pages,
        }),
        _ => Value::Null,
    };
    json!({
        "config": config(s),
        "state": ch_state(s.state),
        "memory_actual_size": s.memory.size(),
        "run_state": s.state.name(),
        "paused_by": match s.state {
            RunState::Paused(PauseCause::Api) => Some("vm.pause"),
            RunState::Paused(PauseCause::SwitchOver) => Some("migration"),
            _ => None,
        },
        "workload": s.workload,
        "entry": s.entry,
        "vcpus": s.cfg.vcpus,
        "memory_bytes": s.memory.size(),
        "backing": s.memory.backing().to_string(),
        "page_size": s.memory.page_size(),
        "passes": s.slots.iter().map(|v| v.passes).sum::<u64>(),
        "per_vcpu_passes": s.slots.iter().map(|v| v.passes).collect::<Vec<_>>(),
        "integrity_errors": s.slots.iter().map(|v| v.integrity_errors).sum::<u64>(),
        "numa": stats.numa,
        "incoming": incoming,
        "migration": s.migration.as_ref().map(|m| migration(m, accounting.absent_bytes)),
        "collapse": stats.collapse,
        "pmd_mapped_bytes": s.memory.pmd_mapped_bytes().ok(),
        "accounting": accounting,
        "memory": stats,
        "console_bytes": s.console_bytes,
        "console_last": s.console_last,
    })
}

/// `vm.counters`: groups of integers.
pub fn counters(s: &Snapshot) -> Value {
    let stats = s.memory.stats();
    let mut groups = Map::new();
    let mut guest = Map::new();
    guest.insert("vcpus".into(), s.cfg.vcpus.into());
    guest.insert(
        "passes".into(),
        s.slots.iter().map(|v| v.passes).sum::<u64>().into(),
    );
    guest.insert(
        "integrity_errors".into(),
        s.slots
            .iter()
            .map(|v| v.integrity_errors)
            .sum::<u64>()
            .into(),
    );
    for (i, v) in s.slots.iter().enumerate() {
        guest.insert(format!("vcpu{i}_passes"), v.passes.into());
    }
    guest.insert("console_bytes".into(), s.console_bytes.into());
    groups.insert("guest".into(), Value::Object(guest));
    let mut memory = Map::new();
    memory.insert("size_bytes".into(), s.memory.size().into());
    memory.insert("page_size".into(), s.memory.page_size().into());
    if let Ok(b) = s.memory.pmd_mapped_bytes() {
        memory.insert("pmd_mapped_bytes".into(), b.into());
    }
    integers("", &json!(s.memory.accounting()), &mut memory);
    groups.insert("memory".into(), Value::Object(memory));
    for (name, figures) in [
        ("fault_path", json!(stats.faults)),
        ("collapse", json!(stats.collapse)),
        ("numa", json!(stats.numa)),
        (
            "migration",
            json!(s.migration.as_ref().map(|m| migration(m, 0))),
        ),
    ] {
        let mut group = Map::new();
        integers("", &figures, &mut group);
        if !group.is_empty() {
            groups.insert(name.into(), Value::Object(group));
        }
    }
    Value::Object(groups)
}

/// The integer figures of `v` into `out`, nested names joined with `_`; fractions in a
/// finer unit; text, flags and lists left out.
fn integers(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
    let Value::Object(fields) = v else { return };
    for (k, v) in fields {
        let name = format!("{prefix}{k}");
        match v {
            Value::Number(n) if n.is_u64() || n.is_i64() => {
                out.insert(name, v.clone());
            }
            Value::Number(n) => {
                if let Some((name, x)) = n.as_f64().and_then(|x| finer(&name, x)) {
                    out.insert(name, x.into());
                }
            }
            Value::Object(_) => integers(&format!("{name}_"), v, out),
            _ => {}
        }
    }
}

/// A fractional figure as an integer in a finer unit, by the unit its name says
/// (`fault_us_p50` → `fault_ns_p50`, `collapse_ms_total` → `collapse_us_total`).
fn finer(name: &str, x: f64) -> Option<(String, u64)> {
    let mut parts: Vec<&str> = name.split('_').collect();
    let (i, unit, by) = parts.iter().enumerate().find_map(|(i, p)| match *p {
        "ms" => Some((i, "us", 1e3)),
        "us" => Some((i, "ns", 1e3)),
        "pct" => Some((i, "basis_points", 100.0)),
        _ => None,
    })?;
    parts[i] = unit;
    Some((parts.join("_"), (x * by).round().max(0.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_integers_in_finer_units() {
        let mut out = Map::new();
        let v = json!({
            "uffd_faults": 3, "fault_us_p50": 2.5, "collapse_ms_total": 1.25,
            "locality_pct": 97.5, "collapse_failures": {"ebusy": 2}, "backend": "emulated",
            "idle": true, "vcpu_nodes": [0, 1], "time_to_95_ms": null, "ratio": 0.5,
        });
        integers("", &v, &mut out);
        assert_eq!(
            Value::Object(out),
            json!({
                "uffd_faults": 3, "fault_ns_p50": 2500, "collapse_us_total": 1250,
                "locality_basis_points": 9750, "collapse_failures_ebusy": 2,
            })
        );
    }
}
