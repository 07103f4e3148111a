//! What a migration reports: [`MigrationReport`] on the source, [`IncomingReport`] on
//! the destination. The JSON field names are the run report's (`"migration"` and
//! `"incoming"`); the fields this crate cannot know are filled by the VMM, as noted.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub mode: String,
    pub to: String,
    pub total_ms: f64,
    /// Source vCPU stop to destination vCPU resume.
    pub downtime_ms: f64,
    /// Both connections.
    pub bytes_sent: u64,
    pub pages_precopy: u64,
    pub pages_pushed: u64,
    pub pages_demand: u64,
    /// Post-copy: pages sent on the urgent channel right after a demanded one (the rest
    /// of its extent: the next pages in its region), unasked.
    #[serde(default)]
    pub pages_prefetched: u64,
    pub demand_fault_us_p50: f64,
    pub demand_fault_us_p99: f64,
    pub demand_fault_us_max: f64,
    pub precopy_rounds: u32,
    /// Post-copy: the background push order used.
    #[serde(default)]
    pub push_order: String,
    /// Connections the pre-copy rounds used (`--channels`).
    #[serde(default)]
    pub channels: u32,
    /// Bytes per page frame: the backing page size (4 KiB shmem, 2 MiB/1 GiB hugetlb).
    pub granularity_bytes: u64,
    /// CRC-32 of guest RAM at the switch-over, checked by the destination, if asked.
    pub memory_hash: Option<u32>,
    /// Filled by the VMM: how KVM reported written pages, "bitmap" or "ring".
    pub dirty_log: String,
    /// Filled by the VMM: dirty-log fetches and their total time.
    pub dirty_log_takes: u64,
    pub dirty_log_ms: f64,
    /// Times a broken connection was resumed after the hand-over.
    #[serde(default)]
    pub recoveries: u32,
    /// Pre-copy and auto: the downtime asked for (`--downtime-ms`).
    #[serde(default)]
    pub downtime_budget_ms: f64,
    /// Pre-copy and auto: the downtime the last round's rate predicted for what was left
    /// at the pause (the stop-and-copy's bytes over that rate).
    #[serde(default)]
    pub expected_downtime_ms: f64,
    /// How the rounds ended: see [`Converged`].
    #[serde(default)]
    pub converged_by: Converged,
    /// The highest share of time the vCPUs were held back (auto-converge), in percent.
    #[serde(default)]
    pub throttle_percent: u32,
    /// Whether the measured downtime kept within the budget (pre-copy and auto).
    #[serde(default)]
    pub budget_met: Option<bool>,
}

/// How a pre-copy (or auto) migration reached its switch-over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Converged {
    /// Not a question for this mode (post-copy, hybrid).
    #[default]
    NotApplicable,
    /// What was left fit the budget without help.
    Rounds,
    /// It fit after the vCPUs were throttled (auto-converge).
    Throttle,
    /// The rounds stopped converging and the migration switched to post-copy (auto).
    Postcopy,
    /// The rounds stopped converging and nothing could make them: the source stopped and
    /// copied anyway, over its budget (`expected_downtime_ms` says by how much).
    OverBudget,
}

impl Converged {
    pub fn name(self) -> &'static str {
        match self {
            Converged::NotApplicable => "n/a",
            Converged::Rounds => "rounds",
            Converged::Throttle => "throttle",
            Converged::Postcopy => "postcopy",
            Converged::OverBudget => "over-budget",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IncomingReport {
    pub mode: String,
    /// Pages received before the switch-over.
    pub pages: u64,
    /// Bytes received on the main connection before the switch-over.
    pub bytes: u64,
    /// Filled by the VMM (from its run info in the VM state): guest run time on the source.
    pub source_elapsed_ms: f64,
    /// From the start of `receive` to the switch-over's arrival.
    pub receive_ms: f64,
    /// Post-copy: pages that arrived after the switch, on demand or pushed.
    pub pages_demand: u64,
    pub pages_pushed: u64,
    pub demand_fault_us_p50: f64,
    pub demand_fault_us_p99: f64,
    pub demand_fault_us_max: f64,
    /// Post-copy: switch-over to the last page.
    pub postcopy_ms: Option<f64>,
    /// Filled by the VMM: the guest's passes (all vCPUs) before the switch, and those it
    /// made here.
    pub passes_at_switch: u64,
    pub passes_after_switch: u64,
    /// Connections refused at the door: unauthenticated, garbage, not this migration's.
    #[serde(default)]
    pub refused_connections: u64,
    /// Times a broken connection was resumed.
    #[serde(default)]
    pub recoveries: u32,
    /// The memory hash this end computed and found equal to the source's (`verify`).
    #[serde(default)]
    pub memory_hash: Option<u32>,
}
