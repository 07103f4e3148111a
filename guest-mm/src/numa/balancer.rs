//! The NUMA balancing policy: from NUMA-hint faults, where a 2 MiB region should live.
//! Pure policy, no host calls: the engine ([`super::engine`]) feeds it one hint fault per
//! region per scan and carries out its decisions.
//!
//! A region is placed as a whole, so the policy keeps its state per region (the kernel's
//! `should_numa_migrate_memory` keeps it per page, in the page's last cpupid):
//! - **two-fault filter**: a region moves to a node only after two consecutive hint
//!   faults from that node; the first one records, the second confirms and moves.
//! - **shared regions are held**: a region whose hint faults came from two nodes is
//!   shared. It stays where it is until `shared_streak` consecutive faults from one node
//!   say the sharing ended.
//! - **no ping-pong**: every move a region has made doubles the streak it needs before
//!   the next, so a region that keeps changing hands moves at most logarithmically often
//!   in the run's length. One hint fault per region per scan sees only the region's first
//!   toucher after the zap; for a buffer two nodes walk one after the other that is
//!   whichever arrives first, for long stretches the same one, so a fixed streak alone
//!   would let such a region move back and forth for ever.
//! - **rate limit**: at most `max_moves_per_sec` moves a second over all regions; a
//!   region refused by the limit keeps its evidence and moves on a later fault.

use serde::Serialize;

use crate::addr::{Gpa, SIZE_2M};

/// Balancing knobs. Defaults start from Linux's automatic NUMA balancing: 256 MB scan
/// window, a full scan of guest RAM every 1 s at the fastest and 60 s at the slowest
/// (`numa_balancing_scan_size_mb`, `..._scan_period_min_ms`, `..._scan_period_max_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BalancerConfig {
    /// Bytes hinted at once (one window).
    pub scan_window: u64,
    /// Shortest time for one full scan of guest RAM; each window waits its share.
    pub scan_period_min_ms: u64,
    /// Longest time for one full scan, reached while the working set stays local.
    pub scan_period_max_ms: u64,
    /// At most this many region moves per second (default 256: 512 MiB/s, enough for a
    /// 512 MiB guest placed all wrong to move in one full scan; Linux has no such limit
    /// for NUMA balancing, ours bounds what a misbehaving policy can cost).
    pub max_moves_per_sec: u64,
    /// Consecutive hint faults from one node that a shared region needs before it counts
    /// as private again (and may move).
    pub shared_streak: u32,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            scan_window: 256 << 20,
            scan_period_min_ms: 1000,
            scan_period_max_ms: 60_000,
            max_moves_per_sec: 256,
            shared_streak: 4,
        }
    }
}

/// Why a hint fault moved nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stay {
    /// The region is on the faulting node already.
    Local,
    /// Not confirmed yet: the two-fault filter (or the longer streak a region that has
    /// moved before needs).
    Filtered,
    /// The region is shared between nodes and held where it is.
    Shared,
    /// Confirmed, but this second's move budget is spent.
    RateLimited,
    /// Outside guest RAM.
    Outside,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Stay(Stay),
    Move { to: u16 },
}

/// What the policy remembers of one region.
#[derive(Clone, Copy, Debug, Default)]
struct RegionState {
    /// Node of the last hint fault, `NO_NODE` before the first.
    last_node: u8,
    /// Consecutive hint faults from `last_node`.
    streak: u32,
    /// Took hint faults from two nodes and has not shown a long streak from one since.
    shared: bool,
    /// Balancing moves this region made.
    moves: u32,
}

const NO_NODE: u8 = u8::MAX;
/// Doublings beyond which the needed streak is simply "never" (u32 arithmetic).
const MAX_ESCALATION: u32 = 24;

/// The placement policy (module header). One per guest.
#[derive(Debug)]
pub struct Balancer {
    cfg: BalancerConfig,
    regions: Vec<RegionState>,
    budget_window_start_ms: u64,
    moves_in_window: u64,
}

impl Balancer {
    /// A balancer for guest RAM of `ram_size` bytes.
    pub fn new(cfg: BalancerConfig, ram_size: u64) -> Self {
        let fresh = RegionState {
            last_node: NO_NODE,
            ..Default::default()
        };
        Balancer {
            cfg,
            regions: vec![fresh; ram_size.div_ceil(SIZE_2M) as usize],
            budget_window_start_ms: 0,
            moves_in_window: 0,
        }
    }

    pub fn config(&self) -> &BalancerConfig {
        &self.cfg
    }

    /// Whether the region holding `gpa` is held as shared.
    pub fn is_shared(&self, gpa: Gpa) -> bool {
        self.regions
            .get((gpa.0 / SIZE_2M) as usize)
            .is_some_and(|r| r.shared)
    }

    /// A hint fault in the region holding `gpa` by a vCPU on `node`; the region is on
    /// `current`.
    pub fn on_hint_fault(&mut self, gpa: Gpa, node: u16, current: u16, now_ms: u64) -> Decision {
        let shared_streak = self.cfg.shared_streak.max(2);
        let Some(r) = self.regions.get_mut((gpa.0 / SIZE_2M) as usize) else {
            return Decision::Stay(Stay::Outside);
        };
        let node8 = node.min(NO_NODE as u16 - 1) as u8;
        if r.last_node == node8 {
            r.streak = r.streak.saturating_add(1);
        } else {
            // Faults from another node than the last one: the region is shared (a
            // buffer several nodes' vCPUs walk).
            r.shared |= r.last_node != NO_NODE;
            r.last_node = node8;
            r.streak = 1;
        }
        let base = if r.shared { shared_streak } else { 2 };
        let need = base.saturating_mul(1 << r.moves.min(MAX_ESCALATION));
        let confirmed = r.streak >= need;
        if confirmed {
            r.shared = false;
        }
        if node == current {
            return Decision::Stay(Stay::Local);
        }
        if !confirmed {
            return Decision::Stay(if r.shared {
                Stay::Shared
            } else {
                Stay::Filtered
            });
        }
        if now_ms.saturating_sub(self.budget_window_start_ms) >= 1000 {
            self.budget_window_start_ms = now_ms;
            self.moves_in_window = 0;
        }
        if self.moves_in_window >= self.cfg.max_moves_per_sec {
            return Decision::Stay(Stay::RateLimited);
        }
        self.moves_in_window += 1;
        r.moves = r.moves.saturating_add(1);
        r.streak = 0;
        Decision::Move { to: node }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = SIZE_2M;

    fn balancer() -> Balancer {
        Balancer::new(BalancerConfig::default(), 64 << 20)
    }

    #[test]
    fn the_second_remote_fault_moves_the_region() {
        let mut b = balancer();
        assert_eq!(
            b.on_hint_fault(Gpa(R + 4096), 1, 0, 0),
            Decision::Stay(Stay::Filtered),
            "first fault only records"
        );
        // Another page of the same region: the region's second fault, confirmed.
        assert_eq!(
            b.on_hint_fault(Gpa(R + 8192), 1, 0, 10),
            Decision::Move { to: 1 }
        );
        // Local faults never move.
        b.on_hint_fault(Gpa(2 * R), 0, 0, 20);
        assert_eq!(
            b.on_hint_fault(Gpa(2 * R), 0, 0, 30),
            Decision::Stay(Stay::Local)
        );
        assert_eq!(
            b.on_hint_fault(Gpa(1 << 40), 1, 0, 30),
            Decision::Stay(Stay::Outside)
        );
    }

    #[test]
    fn a_region_faulted_from_alternating_nodes_stays_put() {
        let mut b = balancer();
        for k in 0..20u64 {
            let node = (k % 2) as u16;
            // Always remote, always a different node than the region's last fault.
            let d = b.on_hint_fault(Gpa(0), node, 1 - node, k * 10);
            assert!(matches!(d, Decision::Stay(_)), "fault {k}: {d:?}");
        }
        assert!(b.is_shared(Gpa(0)));
    }

    #[test]
    fn a_shared_region_moves_only_after_a_long_streak_from_one_node() {
        let mut b = balancer();
        b.on_hint_fault(Gpa(0), 1, 0, 0);
        b.on_hint_fault(Gpa(0), 0, 0, 1);
        // Two from node 1 would pass the plain filter, but the region is shared.
        assert_eq!(
            b.on_hint_fault(Gpa(0), 1, 0, 2),
            Decision::Stay(Stay::Shared)
        );
        assert_eq!(
            b.on_hint_fault(Gpa(0), 1, 0, 3),
            Decision::Stay(Stay::Shared)
        );
        assert_eq!(
            b.on_hint_fault(Gpa(0), 1, 0, 4),
            Decision::Stay(Stay::Shared)
        );
        // The fourth in a row: the sharing ended, the region is node 1's.
        assert_eq!(b.on_hint_fault(Gpa(0), 1, 0, 5), Decision::Move { to: 1 });
        assert!(!b.is_shared(Gpa(0)));
    }

    #[test]
    fn every_move_doubles_the_evidence_the_next_needs() {
        let mut b = balancer();
        let mut on = 1u16;
        let mut moves = Vec::new();
        // A private region whose owner alternates every 8 faults (a workload whose
        // threads trade buffers): the faults needed per move grow 2, 8, 16, ...
        for k in 0..400u64 {
            let node = ((k / 8) % 2) as u16;
            if let Decision::Move { to } = b.on_hint_fault(Gpa(0), node, on, k) {
                on = to;
                moves.push(k);
            }
        }
        assert!(moves.len() <= 6, "moves at faults {moves:?}: no ping-pong");
        assert_eq!(
            moves[0], 1,
            "the first move needs the two-fault filter only"
        );
    }

    #[test]
    fn moves_are_rate_limited_and_the_refused_move_later() {
        let cfg = BalancerConfig {
            max_moves_per_sec: 3,
            ..Default::default()
        };
        let mut b = Balancer::new(cfg, 64 << 20);
        for r in 0..10u64 {
            b.on_hint_fault(Gpa(r * R), 1, 0, 0);
        }
        let moved = (0..10u64)
            .filter(|r| matches!(b.on_hint_fault(Gpa(r * R), 1, 0, 5), Decision::Move { .. }))
            .count();
        assert_eq!(moved, 3);
        // Next second: budget again, and the refused regions kept their evidence.
        let moved = (3..10u64)
            .filter(|r| {
                matches!(
                    b.on_hint_fault(Gpa(r * R), 1, 0, 1500),
                    Decision::Move { .. }
                )
            })
            .count();
        assert_eq!(moved, 3);
    }
}
