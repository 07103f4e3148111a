//! What the NUMA engine reports (the run report and `vm.info`): counters, the scanner's
//! pace and its log of full scans, locality per vCPU and over time.

use serde::Serialize;

use super::postcopy::PostcopyPlacementReport;
use super::scan::ScanTally;
use crate::addr::{GpaRange, SIZE_2M};

#[derive(Clone, Debug, Serialize)]
pub struct NumaReport {
    pub nodes: u16,
    pub backend: String,
    pub balancing: bool,
    pub vcpu_nodes: Vec<u16>,
    /// Hint faults: one per region per scan (and one after each move).
    pub numa_hint_faults: u64,
    pub numa_hint_faults_local: u64,
    /// 4 KiB pages moved. The name (and `numa_migrate_failures`) is the kernel's
    /// /proc/vmstat counter's, which users compare these against; we say "move".
    pub numa_pages_migrated: u64,
    pub numa_migrate_failures: u64,
    /// Regions moved by the balancer or forced (not initial or post-copy placement).
    pub regions_moved: u64,
    /// Moves not made because the region still waited for post-copy pages.
    pub moves_deferred: u64,
    /// Hint faults on regions held as shared.
    pub held_shared: u64,
    /// Hint faults whose confirmed move the rate limit refused.
    pub rate_limited: u64,
    /// Share of each vCPU's working set on its own node, averaged over vCPUs.
    pub locality_pct: f64,
    pub locality_per_vcpu: Vec<f64>,
    /// Windows hinted.
    pub scans: u64,
    /// Full scans of guest RAM completed.
    pub full_scans: u64,
    /// Windows in one full scan.
    pub scan_windows: u64,
    /// The time one full scan takes now (the scanner backs it off while faults are local).
    pub scan_period_ms: u64,
    /// Share of the last full scan's hint faults that were local.
    pub local_share_pct: Option<f64>,
    /// Each full scan: when it ended, its period, its faults, the moves it made.
    pub scan_log: Vec<FullScan>,
    /// (ms since the engine started, locality %) sampled every 100 ms.
    pub locality_over_time: Vec<(f64, f64)>,
    /// (ms, hint faults so far), sampled with the locality.
    pub hint_faults_over_time: Vec<(f64, u64)>,
    pub time_to_95_ms: Option<f64>,
    /// Full scans (windows hinted / windows per scan) when locality first reached 95 %.
    pub scans_to_95: Option<f64>,
    /// Post-copy placement on a destination.
    pub postcopy: Option<PostcopyPlacementReport>,
    pub note: Option<String>,
}

/// One full scan of guest RAM, as the scan log keeps it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FullScan {
    /// ms since the engine started.
    pub end_ms: f64,
    /// The full-scan period it ran at, and the one it set for the next.
    pub period_ms: u64,
    pub next_period_ms: u64,
    #[serde(flatten)]
    pub tally: ScanTally,
    pub moves: u64,
}

/// Most entries the scan log keeps (the first ones: convergence is what it is for).
pub(crate) const SCAN_LOG_MAX: usize = 1000;

/// Locality samples over the run.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    pub(crate) locality: Vec<(f64, f64)>,
    pub(crate) hint_faults: Vec<(f64, u64)>,
    pub(crate) time_to_95_ms: Option<f64>,
    pub(crate) scans_to_95: Option<f64>,
}

impl Samples {
    pub(crate) fn record(&mut self, t_ms: f64, pct: f64, hint_faults: u64, scans: f64) {
        self.locality.push((t_ms, pct));
        self.hint_faults.push((t_ms, hint_faults));
        if pct >= 95.0 && self.time_to_95_ms.is_none() {
            self.time_to_95_ms = Some(t_ms);
            self.scans_to_95 = Some(scans);
        }
    }
}

/// Share of each working set on its vCPU's node (percent), given the node of every
/// 2 MiB region. A vCPU without a working set counts as local.
pub(crate) fn locality_per_vcpu(
    region_nodes: &[u16],
    working_sets: &[GpaRange],
    vcpu_nodes: &[u16],
) -> Vec<f64> {
    working_sets
        .iter()
        .enumerate()
        .map(|(v, set)| {
            let mine = vcpu_nodes.get(v).copied().unwrap_or(0);
            let (mut local, mut all) = (0u64, 0u64);
            let mut gpa = set.start.0;
            while gpa < set.end.0 {
                let next = ((gpa / SIZE_2M) + 1) * SIZE_2M;
                let len = next.min(set.end.0) - gpa;
                all += len;
                if region_nodes.get((gpa / SIZE_2M) as usize) == Some(&mine) {
                    local += len;
                }
                gpa = next;
            }
            if all > 0 {
                local as f64 * 100.0 / all as f64
            } else {
                100.0
            }
        })
        .collect()
}

/// The average of per-vCPU localities (100 without vCPUs).
pub(crate) fn average(per_vcpu: &[f64]) -> f64 {
    if per_vcpu.is_empty() {
        return 100.0;
    }
    per_vcpu.iter().sum::<f64>() / per_vcpu.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Gpa;

    #[test]
    fn locality_counts_bytes_of_each_working_set_on_its_node() {
        let sets = [
            GpaRange::new(Gpa(0), Gpa(2 * SIZE_2M)),
            GpaRange::new(Gpa(2 * SIZE_2M), Gpa(3 * SIZE_2M + SIZE_2M / 2)),
        ];
        let per = locality_per_vcpu(&[0, 1, 1, 1], &sets, &[0, 1]);
        assert_eq!(per, vec![50.0, 100.0]);
        assert_eq!(average(&per), 75.0);
        let mut s = Samples::default();
        s.record(0.0, 10.0, 0, 0.0);
        s.record(100.0, 96.0, 40, 2.0);
        s.record(200.0, 99.0, 41, 2.5);
        assert_eq!((s.time_to_95_ms, s.scans_to_95), (Some(100.0), Some(2.0)));
    }
}
