//! The scanner's pace: how long one full scan of guest RAM takes, adjusted after every
//! full scan from the hint faults it raised, as Linux's `update_task_scan_period` does.
//! Pure arithmetic; the engine's scanner thread ([`super::engine`]) follows it.
//!
//! Like Linux, the period is the time for a **full** scan of guest RAM, hinted in windows
//! of `scan_window` bytes, each window waiting its share of the period (Linux divides its
//! scan period by `task_nr_scan_windows`). After each full scan, with `lr` the share of
//! its private hint faults (those on regions not held as shared) that were local and `sr`
//! the share of all its faults on shared regions (in tenths, Linux's `NUMA_PERIOD_SLOTS`,
//! threshold 7 = `NUMA_PERIOD_THRESHOLD`):
//!
//! 1. no hint fault at all, or a move failed: twice the period (as Linux);
//! 2. every private fault local: twice the period — **we differ**: Linux grows by 30 %
//!    at best here, and counts shared faults into its local ratio (one buffer two nodes
//!    write, like the guest image's mailbox, would then keep the scan fast forever). A
//!    hint fault costs a userfaultfd round trip on these hosts (~14–27 µs) and, for the
//!    2 MiB region it resolves, KVM refaults every 4 KiB page (~1 µs each), against well
//!    under a microsecond for a hardware NUMA-hint fault; at +30 % a converged guest pays
//!    for ~15 more scans before the period reaches its maximum;
//! 3. `lr` ≥ 7: longer by `(lr − 7)` tenths (at least one) of the period (as Linux);
//! 4. `sr` ≥ 7: longer the same way: shared memory moves back as fast as it moves, so
//!    scanning fast buys nothing (Linux's second rule, on shared faults);
//! 5. otherwise shorter by `(7 − lr)` tenths: remote private faults, memory to move.
//!
//! Clamped to `[scan_period_min_ms, scan_period_max_ms]`. Where Linux floors a window's
//! wait at 100 ms per 256 MB (`MAX_SCAN_WINDOW`, 2.56 GB/s) we take the periods as given:
//! a user who asks for a fast scan (the tests do) gets it.
//!
//! A window's wait is counted, as in Linux, both on the wall clock (`mm->numa_next_scan`)
//! and in run time of the guest (`task_tick_numa` compares the task's
//! `sum_exec_runtime`; here the busiest vCPU thread's CPU time): a guest its host starves
//! of CPU is scanned no faster than it runs, so its hint faults per scan, and its scans to
//! converge, do not depend on the host's load.

use std::time::Duration;

use serde::Serialize;

use super::balancer::BalancerConfig;

/// The hint faults of one full scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScanTally {
    pub local: u64,
    pub remote: u64,
    /// Of local + remote, the faults on regions held as shared ...
    pub shared: u64,
    /// ... and of those, the remote ones.
    pub shared_remote: u64,
    /// Moves that failed.
    pub failures: u64,
}

impl ScanTally {
    pub fn faults(&self) -> u64 {
        self.local + self.remote
    }

    fn private_remote(&self) -> u64 {
        self.remote.saturating_sub(self.shared_remote)
    }

    fn private(&self) -> u64 {
        self.faults().saturating_sub(self.shared)
    }

    /// Local faults as a percentage of all (100 without faults).
    pub fn local_pct(&self) -> f64 {
        match self.faults() {
            0 => 100.0,
            n => self.local as f64 * 100.0 / n as f64,
        }
    }
}

/// Linux's `NUMA_PERIOD_SLOTS` and `NUMA_PERIOD_THRESHOLD`.
const SLOTS: u64 = 10;
const THRESHOLD: u64 = 7;

/// The scanner's pace over guest RAM of one size.
#[derive(Clone, Debug)]
pub struct ScanPace {
    cfg: BalancerConfig,
    ram_size: u64,
    period_ms: u64,
}

impl ScanPace {
    /// Starts at the shortest period (Linux's `task_scan_start`).
    pub fn new(cfg: BalancerConfig, ram_size: u64) -> ScanPace {
        ScanPace {
            period_ms: cfg.scan_period_min_ms.max(1),
            cfg,
            ram_size,
        }
    }

    /// Windows in one full scan.
    pub fn windows(&self) -> u64 {
        self.ram_size.div_ceil(self.cfg.scan_window.max(1)).max(1)
    }

    /// The time for one full scan now.
    pub fn period_ms(&self) -> u64 {
        self.period_ms
    }

    /// How long to wait after hinting one window.
    pub fn window_wait(&self) -> Duration {
        Duration::from_micros(self.period_ms * 1000 / self.windows()).max(Duration::from_millis(1))
    }

    /// Adjusts the period after a full scan (module header); returns the new period.
    pub fn after_full_scan(&mut self, t: &ScanTally) -> u64 {
        let p = self.period_ms;
        let slot = p.div_ceil(SLOTS);
        let faults = t.faults();
        let next = if faults == 0 || t.failures > 0 || t.private_remote() == 0 {
            p.saturating_mul(2)
        } else {
            let private = t.private().max(1);
            let lr = private.saturating_sub(t.private_remote()) * SLOTS / private;
            let sr = t.shared * SLOTS / faults;
            if lr >= THRESHOLD {
                p + (lr - THRESHOLD).max(1) * slot
            } else if sr >= THRESHOLD {
                p + (sr - THRESHOLD).max(1) * slot
            } else {
                p.saturating_sub((THRESHOLD - lr) * slot)
            }
        };
        let min = self.cfg.scan_period_min_ms.max(1);
        self.period_ms = next.clamp(min, self.cfg.scan_period_max_ms.max(min));
        self.period_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(ram: u64) -> ScanPace {
        ScanPace::new(BalancerConfig::default(), ram)
    }

    /// `shared` of the faults on shared regions, half of them remote.
    fn tally(local: u64, remote: u64, shared: u64) -> ScanTally {
        ScanTally {
            local,
            remote,
            shared,
            shared_remote: shared / 2,
            failures: 0,
        }
    }

    #[test]
    fn a_full_scan_takes_the_period_however_many_windows() {
        let p = pace(512 << 20);
        assert_eq!(p.windows(), 2);
        assert_eq!(p.window_wait(), Duration::from_millis(500));
        let small = pace(64 << 20);
        assert_eq!(small.windows(), 1);
        assert_eq!(small.window_wait(), Duration::from_secs(1));
    }

    #[test]
    fn local_faults_back_off_to_the_maximum_and_remote_ones_speed_up() {
        let mut p = pace(512 << 20);
        // Remote private faults: as fast as allowed.
        assert_eq!(p.after_full_scan(&tally(0, 254, 0)), 1000);
        // Converged: doubling up to 60 s.
        let periods: Vec<u64> = (0..8)
            .map(|_| p.after_full_scan(&tally(254, 0, 0)))
            .collect();
        assert_eq!(
            periods,
            [2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
        );
        // Mostly local: Linux's slot rule, 10 % at 70-79 % local.
        let mut q = pace(512 << 20);
        q.after_full_scan(&tally(10, 0, 0));
        assert_eq!(q.after_full_scan(&tally(75, 25, 0)), 2200);
        // Mostly remote again: shorter.
        assert_eq!(q.after_full_scan(&tally(10, 90, 0)), 1000);
    }

    #[test]
    fn shared_faults_idleness_and_failures_slow_the_scan() {
        let mut p = pace(64 << 20);
        // 80 % of the faults on shared regions, the private ones mostly remote.
        let mostly_shared = ScanTally {
            local: 40,
            remote: 60,
            shared: 80,
            shared_remote: 45,
            failures: 0,
        };
        assert_eq!(p.after_full_scan(&mostly_shared), 1100);
        // Only shared faults: nothing private to move, as slow as all-local.
        assert_eq!(p.after_full_scan(&tally(50, 50, 100)), 2200);
        assert_eq!(p.after_full_scan(&ScanTally::default()), 4400, "no faults");
        let failed = ScanTally {
            failures: 1,
            ..tally(0, 10, 0)
        };
        assert_eq!(p.after_full_scan(&failed), 8800);
        assert_eq!(tally(3, 1, 0).local_pct(), 75.0);
    }

    #[test]
    fn remote_faults_on_a_shared_region_do_not_keep_the_scan_fast() {
        let mut p = pace(512 << 20);
        // 250 private regions local, one shared region faulted from the other node.
        let t = ScanTally {
            local: 250,
            remote: 1,
            shared: 1,
            shared_remote: 1,
            failures: 0,
        };
        assert_eq!(p.after_full_scan(&t), 2000);
    }
}
