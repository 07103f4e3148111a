//! NUMA-aware post-copy: on a destination with several guest nodes, each region's pages
//! land on the node of the vCPU that uses them. What this module knows; the engine
//! ([`super::engine`]) carries it out inside `install_page` and the fault path, so the
//! migration code never learns about nodes.
//!
//! - Every demand fault (a vCPU touching an absent page) and every hint fault records the
//!   vCPU as the region's **last toucher**; the latest demand fault's vCPU is the one the
//!   source's push follows (it jumps to the last demanded page and goes on from there).
//! - A region's node is **predicted** as its last toucher's node; for a region no vCPU
//!   touched yet, the toucher of the nearest touched region below it (a vCPU's memory is
//!   contiguous, and the push fills upwards from where a vCPU faulted), else the latest
//!   demander's.
//! - **When** the prediction is carried out depends on the node backend:
//!   - host nodes (mbind, no remap): before the region's first page is installed, so
//!     every page is allocated on its node in the first place (and again when the region
//!     completes, if its last toucher has changed since);
//!   - emulated nodes: only when the region is **complete**, as a move of its content.
//!     An emulated move remaps the region onto the node's memfd, and until the remapped
//!     guest view is registered with userfaultfd again a vCPU touching a page that has
//!     not arrived would read the new memfd's zeros without a fault. With every page
//!     present there is nothing such a touch could get wrong.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use serde::Serialize;

use crate::addr::{Gpa, GpaRange, SIZE_2M};

/// How far below a region the prediction looks for a touched one (1 GiB of regions).
const NEAREST_SEARCH: usize = 512;

/// Counts of post-copy placement, in the NUMA report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PostcopyPlacementReport {
    /// Regions that had pages to receive.
    pub regions: u64,
    /// Regions placed before their first page arrived (host nodes).
    pub placed_before_fill: u64,
    /// Regions moved when their last page arrived.
    pub moved_on_completion: u64,
    /// Regions whose prediction was their node already.
    pub already_placed: u64,
    /// Regions placed from their own last toucher (the rest were predicted from a
    /// neighbour or from the latest demand).
    pub from_own_toucher: u64,
    /// Demand faults seen.
    pub demand_faults: u64,
}

/// What one arrived page did to its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fill {
    /// Its last absent page arrived.
    pub(crate) completed: bool,
}

/// Where a prediction came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Predicted {
    OwnToucher(usize),
    Neighbour(usize),
    LatestDemand(usize),
}

impl Predicted {
    pub(crate) fn vcpu(self) -> usize {
        match self {
            Predicted::OwnToucher(v) | Predicted::Neighbour(v) | Predicted::LatestDemand(v) => v,
        }
    }
}

struct State {
    /// Per region: backing pages still absent.
    absent: Vec<AtomicU32>,
    /// Per region: backing pages absent when post-copy began.
    initial: Vec<u32>,
}

/// The post-copy placement state of one destination.
pub(crate) struct PostcopyPlacement {
    state: OnceLock<State>,
    active: AtomicBool,
    /// Per region: last toucher's vCPU index + 1 (0: none yet).
    toucher: Vec<AtomicU32>,
    /// Latest demand fault's vCPU + 1.
    latest_demand: AtomicU32,
    pub(crate) placed_before_fill: AtomicU64,
    pub(crate) moved_on_completion: AtomicU64,
    pub(crate) already_placed: AtomicU64,
    pub(crate) from_own_toucher: AtomicU64,
    demand_faults: AtomicU64,
}

impl PostcopyPlacement {
    pub(crate) fn new(ram_size: u64) -> PostcopyPlacement {
        let regions = ram_size.div_ceil(SIZE_2M) as usize;
        PostcopyPlacement {
            state: OnceLock::new(),
            active: AtomicBool::new(false),
            toucher: (0..regions).map(|_| AtomicU32::new(0)).collect(),
            latest_demand: AtomicU32::new(0),
            placed_before_fill: AtomicU64::new(0),
            moved_on_completion: AtomicU64::new(0),
            already_placed: AtomicU64::new(0),
            from_own_toucher: AtomicU64::new(0),
            demand_faults: AtomicU64::new(0),
        }
    }

    /// Post-copy begins with `absent` (backing pages of `page` bytes) still to come.
    pub(crate) fn begin(&self, absent: &[GpaRange], page: u64) {
        let regions = self.toucher.len();
        let mut initial = vec![0u32; regions];
        for range in absent {
            for p in range.pages(page) {
                if let Some(n) = initial.get_mut((p * page / SIZE_2M) as usize) {
                    *n += 1;
                }
            }
        }
        let absent = initial.iter().map(|&n| AtomicU32::new(n)).collect();
        if self.state.set(State { absent, initial }).is_ok() {
            self.active.store(true, Ordering::Release);
        }
    }

    pub(crate) fn end(&self) {
        self.active.store(false, Ordering::Release);
    }

    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn index(gpa: Gpa) -> usize {
        (gpa.0 / SIZE_2M) as usize
    }

    /// A vCPU touched the region holding `gpa` (a demand or hint fault).
    pub(crate) fn touched(&self, gpa: Gpa, vcpu: usize) {
        if let Some(t) = self.toucher.get(Self::index(gpa)) {
            t.store(vcpu as u32 + 1, Ordering::Relaxed);
        }
    }

    /// A demand fault by `vcpu` at `gpa`.
    pub(crate) fn demanded(&self, gpa: Gpa, vcpu: usize) {
        self.touched(gpa, vcpu);
        self.latest_demand.store(vcpu as u32 + 1, Ordering::Relaxed);
        self.demand_faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the region holding `gpa` has received nothing yet.
    pub(crate) fn untouched_by_fill(&self, gpa: Gpa) -> bool {
        let i = Self::index(gpa);
        self.state.get().is_some_and(|s| {
            s.initial.get(i).is_some_and(|&n| {
                n > 0 && s.absent.get(i).map(|a| a.load(Ordering::Acquire)) == Some(n)
            })
        })
    }

    /// Whether the region holding `gpa` still waits for pages.
    pub(crate) fn incomplete(&self, gpa: Gpa) -> bool {
        self.active()
            && self.state.get().is_some_and(|s| {
                s.absent
                    .get(Self::index(gpa))
                    .is_some_and(|a| a.load(Ordering::Acquire) > 0)
            })
    }

    /// One absent backing page of the region holding `gpa` arrived.
    pub(crate) fn filled(&self, gpa: Gpa) -> Fill {
        let Some(a) = self
            .state
            .get()
            .and_then(|s| s.absent.get(Self::index(gpa)))
        else {
            return Fill { completed: false };
        };
        let before = a
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        Fill {
            completed: before == 1,
        }
    }

    fn toucher_of(&self, i: usize) -> Option<usize> {
        match self.toucher.get(i)?.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v as usize - 1),
        }
    }

    /// The vCPU whose node the region holding `gpa` should be on (module header).
    pub(crate) fn predict(&self, gpa: Gpa) -> Option<Predicted> {
        let i = Self::index(gpa);
        if let Some(v) = self.toucher_of(i) {
            return Some(Predicted::OwnToucher(v));
        }
        if let Some(v) = (i.saturating_sub(NEAREST_SEARCH)..i)
            .rev()
            .find_map(|j| self.toucher_of(j))
        {
            return Some(Predicted::Neighbour(v));
        }
        match self.latest_demand.load(Ordering::Relaxed) {
            0 => None,
            v => Some(Predicted::LatestDemand(v as usize - 1)),
        }
    }

    pub(crate) fn report(&self) -> Option<PostcopyPlacementReport> {
        let s = self.state.get()?;
        Some(PostcopyPlacementReport {
            regions: s.initial.iter().filter(|&&n| n > 0).count() as u64,
            placed_before_fill: self.placed_before_fill.load(Ordering::Relaxed),
            moved_on_completion: self.moved_on_completion.load(Ordering::Relaxed),
            already_placed: self.already_placed.load(Ordering::Relaxed),
            from_own_toucher: self.from_own_toucher.load(Ordering::Relaxed),
            demand_faults: self.demand_faults.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = SIZE_2M;

    #[test]
    fn regions_complete_when_their_last_absent_page_arrives() {
        let p = PostcopyPlacement::new(8 * R);
        // Region 1 fully absent, region 2 only two pages.
        p.begin(
            &[
                GpaRange::new(Gpa(R), Gpa(2 * R)),
                GpaRange::new(Gpa(2 * R), Gpa(2 * R + 8192)),
            ],
            4096,
        );
        assert!(p.active());
        assert!(p.untouched_by_fill(Gpa(R)) && !p.untouched_by_fill(Gpa(0)));
        assert!(p.incomplete(Gpa(2 * R)) && !p.incomplete(Gpa(3 * R)));
        assert!(!p.filled(Gpa(2 * R)).completed);
        assert!(p.filled(Gpa(2 * R + 4096)).completed);
        assert!(!p.incomplete(Gpa(2 * R)));
        for _ in 0..511 {
            assert!(!p.filled(Gpa(R)).completed);
        }
        assert!(!p.untouched_by_fill(Gpa(R)));
        assert!(p.filled(Gpa(R)).completed);
        // A duplicate beyond the count does not complete anything twice.
        assert!(!p.filled(Gpa(R)).completed);
        assert_eq!(p.report().unwrap().regions, 2);
    }

    #[test]
    fn predictions_prefer_the_region_then_its_neighbour_then_the_latest_demand() {
        let p = PostcopyPlacement::new(64 * R);
        assert_eq!(p.predict(Gpa(5 * R)), None);
        p.demanded(Gpa(10 * R), 1);
        assert_eq!(p.predict(Gpa(3 * R)), Some(Predicted::LatestDemand(1)));
        assert_eq!(p.predict(Gpa(12 * R)), Some(Predicted::Neighbour(1)));
        p.touched(Gpa(12 * R + 4096), 0);
        assert_eq!(p.predict(Gpa(12 * R)), Some(Predicted::OwnToucher(0)));
        assert_eq!(p.predict(Gpa(20 * R)), Some(Predicted::Neighbour(0)));
        assert_eq!(p.predict(Gpa(11 * R)).map(Predicted::vcpu), Some(1));
    }
}
