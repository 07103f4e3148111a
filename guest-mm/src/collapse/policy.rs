//! The collapse policy: when a 2 MiB region of guest RAM may become one huge page,
//! which mTHP order a scan would choose, how failures are counted, and the sequence that
//! touches the host ([`collapse_region`]); the thread that applies it is
//! [`super::engine`]. Vocabulary (docs/architecture.md): a region is *complete* when all
//! 512 of its 4 KiB pages are present in the second-stage table (their content is final);
//! a region is *populated* where the host holds a page for it (first touch).
//!
//! Seed 000: a post-copy destination fills memory 4 KiB at a time and must collapse each
//! region as it completes — never earlier, because collapsing a partly resolved MINOR
//! range maps the unreceived pages (host-facts). Seed 001: choose the order by binary
//! recursion over an occupancy bitmap, with `max_ptes_none` scaled by order.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::addr::{Gpa, GpaRange, SIZE_2M};
use crate::guest_view::GuestView;
use crate::ram::{GuestRam, View};
use crate::stage::{ApplyError, Change, LeafSize, Region2M, SecondStage};

/// `--collapse`: when guest RAM becomes huge pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CollapseMode {
    /// Never: guest RAM stays at its backing page size.
    Off,
    /// When a region becomes complete: on a migration destination (post-copy fills,
    /// pre-copy receive). The default.
    OnFill,
    /// On-fill, plus a khugepaged-like background scanner for populated regions.
    Background,
}

impl CollapseMode {
    pub fn name(self) -> &'static str {
        match self {
            CollapseMode::Off => "off",
            CollapseMode::OnFill => "on-fill",
            CollapseMode::Background => "background",
        }
    }
}

impl std::str::FromStr for CollapseMode {
    type Err = BudgetError;
    fn from_str(s: &str) -> Result<Self, BudgetError> {
        match s {
            "off" => Ok(CollapseMode::Off),
            "on-fill" => Ok(CollapseMode::OnFill),
            "background" => Ok(CollapseMode::Background),
            _ => Err(BudgetError::UnknownMode(s.to_string())),
        }
    }
}

/// What is wrong with a `--collapse` or `--collapse-scan` argument.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("unknown collapse mode {0:?}; choose one of: off, on-fill, background")]
    UnknownMode(String),
    #[error("collapse scan setting {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("collapse scan setting {key}={value:?} is not a number")]
    NotANumber { key: String, value: String },
    #[error("collapse scan setting {0} must be above 0")]
    Zero(String),
    #[error("collapse scan setting max-ptes-none must be 0..=511")]
    MaxPtesNone,
    #[error("unknown collapse scan setting {0:?}; use pages, period, rate, max-ptes-none")]
    UnknownKey(String),
}

/// The background scanner's budget, khugepaged-style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ScanBudget {
    /// 4 KiB pages looked at per period.
    pub pages_per_period: u64,
    pub period: Duration,
    /// Collapses per second at most.
    pub max_collapses_per_sec: u32,
    /// A region (or mTHP chunk, scaled by order) may collapse with up to this many of
    /// its 512 pages unpopulated (khugepaged's `max_ptes_none`).
    pub max_ptes_none: u32,
}

impl Default for ScanBudget {
    fn default() -> Self {
        ScanBudget {
            pages_per_period: 16384,
            period: Duration::from_millis(100),
            max_collapses_per_sec: 200,
            max_ptes_none: 64,
        }
    }
}

impl std::str::FromStr for ScanBudget {
    type Err = BudgetError;
    /// `pages=N,period=MS,rate=N,max-ptes-none=N`, any subset.
    fn from_str(s: &str) -> Result<Self, BudgetError> {
        let mut b = ScanBudget::default();
        for kv in s.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| BudgetError::NotKeyValue(kv.to_string()))?;
            let n: u64 = v
                .trim_end_matches("ms")
                .parse()
                .map_err(|_| BudgetError::NotANumber {
                    key: k.to_string(),
                    value: v.to_string(),
                })?;
            match k {
                "pages" if n > 0 => b.pages_per_period = n,
                "period" if n > 0 => b.period = Duration::from_millis(n),
                "rate" if n > 0 => b.max_collapses_per_sec = n.min(u32::MAX as u64) as u32,
                "max-ptes-none" if n <= 511 => b.max_ptes_none = n as u32,
                "pages" | "period" | "rate" => return Err(BudgetError::Zero(k.to_string())),
                "max-ptes-none" => return Err(BudgetError::MaxPtesNone),
                _ => return Err(BudgetError::UnknownKey(k.to_string())),
            }
        }
        Ok(b)
    }
}

/// Why a collapse did not happen (counted by reason in the run report).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CollapseFailure {
    /// EBUSY: pages are pinned, locked or under writeback. Retried later.
    Busy,
    /// EAGAIN: a transient page-cache or LRU state. Retried later.
    Again,
    /// ENOMEM: no huge page could be allocated. Retried later.
    NoMemory,
    /// EINVAL: the range cannot be huge (never touched, NOHUGEPAGE, write-protected).
    Invalid,
    /// The table says the region is not complete or not linear: not collapsed (policy).
    NotComplete,
    /// Any other errno.
    Other,
}

impl CollapseFailure {
    pub(crate) fn from_errno(e: i32) -> CollapseFailure {
        match e {
            libc::EBUSY => CollapseFailure::Busy,
            libc::EAGAIN => CollapseFailure::Again,
            libc::ENOMEM => CollapseFailure::NoMemory,
            libc::EINVAL => CollapseFailure::Invalid,
            _ => CollapseFailure::Other,
        }
    }

    /// Whether trying again later may succeed.
    pub fn retry_later(self) -> bool {
        matches!(
            self,
            CollapseFailure::Busy | CollapseFailure::Again | CollapseFailure::NoMemory
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            CollapseFailure::Busy => "ebusy",
            CollapseFailure::Again => "eagain",
            CollapseFailure::NoMemory => "enomem",
            CollapseFailure::Invalid => "einval",
            CollapseFailure::NotComplete => "not_complete",
            CollapseFailure::Other => "other",
        }
    }
}

/// Counters of one run's collapses.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CollapseStats {
    pub collapses: u64,
    pub collapse_failures: BTreeMap<&'static str, u64>,
    pub collapse_ms_total: f64,
    /// Regions the background scanner looked at.
    pub regions_scanned: u64,
    /// Full passes of the background scan over guest RAM (what a test waits for).
    pub scan_sweeps: u64,
    /// mTHP orders the scanner chose, by order (recorded in the second stage even where
    /// the host can collapse only at PMD order, 9).
    pub orders_chosen: BTreeMap<u32, u64>,
    /// Time from the engine's start (a destination's resume) until half, and 95 %, of all
    /// regions had collapsed.
    pub collapsed_50pct_ms: Option<f64>,
    pub collapsed_95pct_ms: Option<f64>,
}

impl CollapseStats {
    pub fn failed(&mut self, why: CollapseFailure) {
        *self.collapse_failures.entry(why.name()).or_default() += 1;
    }
}

/// One chunk the order choice picked: `order` pages (2^order × 4 KiB) at page `offset`
/// of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MthpChoice {
    pub offset: u32,
    pub order: u32,
}

/// The orders to collapse a region at, from which of its 512 pages are populated (bit
/// set): binary recursion from PMD order (9) down to `min_order`. A chunk of order `o`
/// qualifies when its unpopulated pages are at most `max_ptes_none` scaled by order
/// (`max_ptes_none >> (9 - o)`); otherwise each half is tried at `o - 1`. (Seed 001.)
pub fn choose_orders(populated: &[u64; 8], max_ptes_none: u32, min_order: u32) -> Vec<MthpChoice> {
    fn count(populated: &[u64; 8], offset: u32, pages: u32) -> u32 {
        (offset..offset + pages)
            .filter(|&i| populated[(i / 64) as usize] & (1 << (i % 64)) != 0)
            .count() as u32
    }
    fn recurse(
        populated: &[u64; 8],
        offset: u32,
        order: u32,
        max_ptes_none: u32,
        min_order: u32,
        out: &mut Vec<MthpChoice>,
    ) {
        let pages = 1u32 << order;
        let present = count(populated, offset, pages);
        if present == 0 {
            return;
        }
        let allowed_none = max_ptes_none >> (9 - order);
        if pages - present <= allowed_none {
            out.push(MthpChoice { offset, order });
            return;
        }
        if order > min_order {
            let half = pages / 2;
            recurse(populated, offset, order - 1, max_ptes_none, min_order, out);
            recurse(
                populated,
                offset + half,
                order - 1,
                max_ptes_none,
                min_order,
                out,
            );
        }
    }
    let mut out = Vec::new();
    recurse(
        populated,
        0,
        9,
        max_ptes_none.min(511),
        min_order.clamp(1, 9),
        &mut out,
    );
    out
}

/// Whether the region at `gpa` is complete in the table: 512 present 4 KiB leaves with
/// linear backing, not yet one leaf. Only such a region may collapse on fill.
pub fn region_complete(stage: &SecondStage, gpa: Gpa) -> bool {
    matches!(
        stage.inspect(|t| t.region_2m(gpa)),
        Region2M::Pieces {
            mergeable: true,
            ..
        }
    )
}

/// Collapses the complete 2 MiB region at `gpa` through the mmu notifier (full 2 MiB
/// range, reason Collapse) and merges its leaves in the table:
///
/// 1. MADV_COLLAPSE the staging view (shmem): the page cache becomes one huge page, with
///    no guest-visible mapping involved;
/// 2. on a post-copy destination, UFFDIO_CONTINUE of the whole 2 MiB through the guest
///    view (mapping is made only by the creating path, seed 004);
/// 3. MADV_COLLAPSE the guest view: the PMD is installed in place, while the range may
///    still be registered with userfaultfd (seed 000).
///
/// The table is checked first, and again under its lock before steps 2-3 (which alone
/// decide what the guest view maps), so a region that is not complete is never mapped
/// huge. Returns the time the host steps took.
pub(crate) fn collapse_region(
    ram: &GuestRam,
    stage: &SecondStage,
    view: &GuestView,
    gpa: Gpa,
) -> Result<Duration, CollapseFailure> {
    let start = gpa.align_down(SIZE_2M);
    let region = GpaRange::new(start, start.add(SIZE_2M));
    if region.end.0 > ram.size() || !region_complete(stage, start) {
        return Err(CollapseFailure::NotComplete);
    }
    let t0 = Instant::now();
    // Step 1 runs without the table lock: it is the expensive step (allocate a huge page,
    // copy 512 pages; milliseconds on a busy host), and holding the lock through it would
    // stall every fault and every arriving page. It is safe unlocked: the staging view is
    // never registered and never mapped into the guest, and what the guest view maps is
    // decided in steps 2-3, under the lock, after the completeness check is repeated.
    if ram.view_layout() == crate::config::ViewLayout::GuestAndStaging {
        ram.collapse(View::Staging, region)?;
    }
    let r = stage.apply_checked(
        Change::Merge {
            gpa: start,
            to: LeafSize::Size2M,
        },
        // Checked again under the table lock: a region that stopped being complete since
        // (marked absent, hinted) is never collapsed.
        |t| match t.region_2m(start) {
            Region2M::Pieces {
                mergeable: true, ..
            } => Ok(()),
            _ => Err(CollapseFailure::NotComplete),
        },
        |range: GpaRange| {
            debug_assert!(range.contains(&region));
            // Any outcome is fine here: EEXIST where 4 KiB pages are mapped already, or
            // not registered (no post-copy, or it ended). The guest view's collapse that
            // follows maps the (complete) region either way.
            let _ = view.continue_range(region);
            ram.collapse(View::Guest, region)
        },
    );
    match r {
        Ok(_) => Ok(t0.elapsed()),
        Err(ApplyError::Host(e)) => Err(e),
        Err(ApplyError::Table(_)) => Err(CollapseFailure::NotComplete),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(ranges: &[(u32, u32)]) -> [u64; 8] {
        let mut b = [0u64; 8];
        for &(s, e) in ranges {
            for i in s..e {
                b[(i / 64) as usize] |= 1 << (i % 64);
            }
        }
        b
    }

    #[test]
    fn a_full_region_is_one_pmd() {
        assert_eq!(
            choose_orders(&bits(&[(0, 512)]), 0, 2),
            vec![MthpChoice {
                offset: 0,
                order: 9
            }]
        );
    }

    #[test]
    fn an_empty_region_chooses_nothing() {
        assert!(choose_orders(&[0; 8], 511, 2).is_empty());
    }

    #[test]
    fn max_ptes_none_is_scaled_by_order() {
        // 448 of 512 populated: 64 none. At max_ptes_none 64 the PMD qualifies; at 63 it
        // does not, and the first half (fully populated) becomes order 8 while the second
        // half (192 of 256, 64 none > 63 >> 1) recurses further.
        let b = bits(&[(0, 448)]);
        assert_eq!(
            choose_orders(&b, 64, 2),
            vec![MthpChoice {
                offset: 0,
                order: 9
            }]
        );
        let c = choose_orders(&b, 63, 2);
        assert_eq!(
            c[0],
            MthpChoice {
                offset: 0,
                order: 8
            }
        );
        assert!(c.iter().all(|m| m.order < 9));
        let covered: u32 = c.iter().map(|m| 1 << m.order).sum();
        assert_eq!(covered, 448, "{c:?}");
    }

    #[test]
    fn sparse_chunks_stop_at_min_order() {
        // One page every 16: no chunk of order >= 2 has at most (max_ptes_none >> ...)
        // none when max_ptes_none is 0.
        let mut b = [0u64; 8];
        for i in (0..512u32).step_by(16) {
            b[(i / 64) as usize] |= 1 << (i % 64);
        }
        assert!(choose_orders(&b, 0, 2).is_empty());
        // khugepaged's default 511 takes the whole region.
        assert_eq!(choose_orders(&b, 511, 2)[0].order, 9);
    }

    #[test]
    fn chosen_orders_are_recorded_per_region() {
        let stage = SecondStage::all_present(4 * SIZE_2M, 4096).unwrap();
        let choices = choose_orders(&bits(&[(0, 448)]), 63, 2);
        stage.record_orders(Gpa(SIZE_2M + 4096), &choices);
        assert_eq!(stage.recorded_orders(Gpa(SIZE_2M)), choices);
        assert!(stage.recorded_orders(Gpa(0)).is_empty());
        stage.record_orders(Gpa(SIZE_2M), &[]);
        assert!(stage.recorded_orders(Gpa(SIZE_2M)).is_empty());
    }

    #[test]
    fn budget_parses_and_rejects() {
        let b: ScanBudget = "pages=1024,period=50ms,rate=10,max-ptes-none=0"
            .parse()
            .unwrap();
        assert_eq!(b.pages_per_period, 1024);
        assert_eq!(b.period, Duration::from_millis(50));
        assert_eq!(b.max_collapses_per_sec, 10);
        assert_eq!(b.max_ptes_none, 0);
        assert!("max-ptes-none=512".parse::<ScanBudget>().is_err());
        assert!("pages=0".parse::<ScanBudget>().is_err());
        assert!("speed=3".parse::<ScanBudget>().is_err());
        assert!("off".parse::<CollapseMode>().is_ok());
        assert!("sometimes".parse::<CollapseMode>().is_err());
    }
}
