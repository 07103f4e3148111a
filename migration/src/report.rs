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
    /// Post-copy: requested pages the push had claimed already (in flight on the main
    /// connection), sent again on the urgent channel rather than waited for.
    #[serde(default)]
    pub pages_resent: u64,
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
    /// Where the downtime went, step by step on the source's clock.
    #[serde(default)]
    pub downtime_steps: DowntimeSteps,
    /// Pre-copy, hybrid and auto: each round as it was sent (see [`RoundReport`]).
    #[serde(default)]
    pub rounds: Vec<RoundReport>,
}

/// One pre-copy round: what it sent, how long it took, what the guest wrote meanwhile
/// (the next round's pages, or the stop-and-copy's), and the throttle it ran under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    pub pages: u64,
    pub ms: f64,
    /// Bytes per second the peer took over the rounds of dirty pages so far (round 0's
    /// alone for round 0), the rate the pause decision uses.
    pub mib_per_s: f64,
    /// Pages written while this round was sent.
    pub dirty_after: u64,
    pub throttle_percent: u32,
}

/// The switch-over's steps as the source timed them, in milliseconds: stopping the
/// vCPUs, the last pages (the final dirty log, the stop-and-copy, the memory hash),
/// SwitchOver sent until the destination's Ready (its restore), and Start sent until
/// its Resumed. Together about the downtime (which ends when the destination resumed,
/// on its clock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeSteps {
    pub pause_ms: f64,
    pub last_pages_ms: f64,
    pub restore_ms: f64,
    pub start_ms: f64,
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
    /// Post-copy: each demand fault's time, stage by stage (see [`DemandBreakdown`]).
    #[serde(default)]
    pub demand_breakdown: Option<Box<DemandBreakdown>>,
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

/// Where a post-copy destination's demand faults spent their time, stage by stage. The
/// clock starts when the fault path asks the pager for the page (the fault thread has
/// read the vCPU's userfaultfd event and found the page absent).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandBreakdown {
    /// Asked → the `PageRequest` written to the urgent connection.
    pub request_sent: StageLatency,
    /// Sent → the page's frame read and checked here: the source's turn-around and the
    /// wire both ways.
    pub page_arrived: StageLatency,
    /// Arrived → installed (written, CONTINUEd, marked present). UFFDIO_CONTINUE wakes
    /// the faulting vCPU as it maps the page, so this is also when the vCPU is resumed —
    /// runnable; when the scheduler then runs it is the kernel's, and not seen from here.
    pub installed_resumed: StageLatency,
    /// Asked → installed: the whole demand fault as the VMM sees it.
    pub total: StageLatency,
}

/// One stage's latencies: percentiles and a histogram.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageLatency {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// `[upper edge µs, faults]` per non-empty power-of-two bucket (1, 2, 4 … µs).
    pub histogram: Vec<(f64, u64)>,
}

impl StageLatency {
    pub fn of(h: &guest_mm::stats::LatencyHistogram) -> StageLatency {
        StageLatency {
            count: h.count(),
            p50_us: h.percentile_us(50.0),
            p99_us: h.percentile_us(99.0),
            max_us: h.max_us(),
            histogram: h.log2_buckets(),
        }
    }
}
