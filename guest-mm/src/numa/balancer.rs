//! The NUMA balancing policy: from NUMA-hint faults, where a 2 MiB region should live.
//! Pure policy, no host calls: the engine ([`super::engine`]) feeds it faults and
//! carries out its decisions.

use serde::Serialize;

use crate::addr::{Gpa, SIZE_2M, SIZE_4K};

/// Balancing knobs (defaults follow Linux's task_numa_work: 256 MB per 1 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BalancerConfig {
    /// Bytes hinted per scan period.
    pub scan_window: u64,
    pub scan_period_min_ms: u64,
    pub scan_period_max_ms: u64,
    /// At most this many region moves per second.
    pub max_moves_per_sec: u64,
    /// A region that took hint faults from two nodes stays put this long.
    pub shared_hold_ms: u64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            scan_window: 256 << 20,
            scan_period_min_ms: 1000,
            scan_period_max_ms: 60_000,
            max_moves_per_sec: 128,
            shared_hold_ms: 10_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Stay,
    Move { to: u16 },
}

/// The placement policy, per 4 KiB page like the kernel's `should_numa_migrate_memory`:
/// a hint fault records the faulting node on the page; the page's 2 MiB region moves to
/// that node only when the page's previous hint fault came from the same node (the
/// two-fault filter). A page touched alternately from several nodes (a shared buffer)
/// never passes the filter, so shared regions stay put. Moves are rate limited.
#[derive(Debug)]
pub struct Balancer {
    cfg: BalancerConfig,
    /// Node of each page's last hint fault; `NO_NODE` when none yet.
    last_node: Vec<u8>,
    /// Per 2 MiB region: the node of its last hint fault, and until when it counts as
    /// shared (it took hint faults from two nodes).
    regions: Vec<(u8, u64)>,
    budget_window_start_ms: u64,
    moves_in_window: u64,
}

const NO_NODE: u8 = u8::MAX;

impl Balancer {
    /// A balancer for guest RAM of `ram_size` bytes.
    pub fn new(cfg: BalancerConfig, ram_size: u64) -> Self {
        Balancer {
            cfg,
            last_node: vec![NO_NODE; (ram_size / SIZE_4K) as usize],
            regions: vec![(NO_NODE, 0); ram_size.div_ceil(SIZE_2M) as usize],
            budget_window_start_ms: 0,
            moves_in_window: 0,
        }
    }

    pub fn config(&self) -> &BalancerConfig {
        &self.cfg
    }

    /// A hint fault at `gpa` by a vCPU on `node`; the page's region is on `current`.
    pub fn on_hint_fault(&mut self, gpa: Gpa, node: u16, current: u16, now_ms: u64) -> Decision {
        let Some(last) = self.last_node.get_mut((gpa.0 / SIZE_4K) as usize) else {
            return Decision::Stay;
        };
        let node8 = node.min(NO_NODE as u16 - 1) as u8;
        let previous = std::mem::replace(last, node8);
        // A region faulted from two nodes is shared for a while: pages of a shared
        // buffer walked at different speeds by several vCPUs would otherwise pass the
        // per-page filter now and then and ping-pong.
        let region = &mut self.regions[(gpa.0 / SIZE_2M) as usize];
        if region.0 != NO_NODE && region.0 != node8 {
            region.1 = now_ms + self.cfg.shared_hold_ms;
        }
        region.0 = node8;
        if node == current || previous != node8 || now_ms < region.1 {
            return Decision::Stay;
        }
        if now_ms.saturating_sub(self.budget_window_start_ms) >= 1000 {
            self.budget_window_start_ms = now_ms;
            self.moves_in_window = 0;
        }
        if self.moves_in_window >= self.cfg.max_moves_per_sec {
            return Decision::Stay;
        }
        self.moves_in_window += 1;
        Decision::Move { to: node }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_faults_from_a_remote_node_move() {
        let mut b = Balancer::new(BalancerConfig::default(), 64 << 20);
        assert_eq!(
            b.on_hint_fault(Gpa(4096), 1, 0, 0),
            Decision::Stay,
            "first fault only records"
        );
        assert_eq!(
            b.on_hint_fault(Gpa(8192), 1, 0, 5),
            Decision::Stay,
            "another page: its first fault"
        );
        assert_eq!(
            b.on_hint_fault(Gpa(4096), 1, 0, 10),
            Decision::Move { to: 1 }
        );
        // Local faults never move.
        b.on_hint_fault(Gpa(SIZE_2M), 0, 0, 20);
        assert_eq!(b.on_hint_fault(Gpa(SIZE_2M), 0, 0, 30), Decision::Stay);
        // Beyond guest RAM: ignored.
        assert_eq!(b.on_hint_fault(Gpa(1 << 40), 1, 0, 30), Decision::Stay);
    }

    #[test]
    fn pages_touched_from_alternating_nodes_stay_put() {
        let mut b = Balancer::new(BalancerConfig::default(), 64 << 20);
        for k in 0..10u64 {
            let node = (k % 2) as u16;
            // Always remote, always a different node than the page's last fault.
            assert_eq!(
                b.on_hint_fault(Gpa(0), node, 1 - node, k * 10),
                Decision::Stay,
                "fault {k}"
            );
        }
    }

    #[test]
    fn a_region_faulted_from_two_nodes_is_held_even_when_a_page_passes_the_filter() {
        let mut b = Balancer::new(BalancerConfig::default(), 64 << 20);
        b.on_hint_fault(Gpa(0), 1, 0, 0);
        b.on_hint_fault(Gpa(4096), 0, 0, 1);
        // Page 0's second fault from node 1 would pass the per-page filter...
        assert_eq!(
            b.on_hint_fault(Gpa(0), 1, 0, 2),
            Decision::Stay,
            "...but the region is shared"
        );
        // After the hold expires, a private pattern moves again.
        b.on_hint_fault(Gpa(8192), 1, 0, 20_000);
        assert_eq!(
            b.on_hint_fault(Gpa(8192), 1, 0, 20_001),
            Decision::Move { to: 1 }
        );
    }

    #[test]
    fn moves_are_rate_limited() {
        let cfg = BalancerConfig {
            max_moves_per_sec: 3,
            ..Default::default()
        };
        let mut b = Balancer::new(cfg, 64 << 20);
        for r in 0..10u64 {
            b.on_hint_fault(Gpa(r * SIZE_2M), 1, 0, 0);
        }
        let moved = (0..10u64)
            .filter(|r| b.on_hint_fault(Gpa(r * SIZE_2M), 1, 0, 5) != Decision::Stay)
            .count();
        assert_eq!(moved, 3);
        // Next second: budget again.
        let moved = (0..10u64)
            .filter(|r| b.on_hint_fault(Gpa(r * SIZE_2M), 1, 0, 1500) != Decision::Stay)
            .count();
        assert_eq!(moved, 3);
    }
}
