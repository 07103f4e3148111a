//! The second stage: hugevisor's own map of guest-physical memory (the radix [`table`])
//! behind its one door. Every change the guest may observe is widened, announced to the
//! mmu [`notifier`]'s subscribers, applied, and announced as ended; the fault path's
//! commit ([`SecondStage::resolve`]) and post-copy's ([`SecondStage::fill`]) run under the
//! same lock, so no invalidation slips between a decision and its host-side mapping.

pub mod leaf;
pub mod notifier;
pub mod table;

use std::sync::{Mutex, MutexGuard};

use crate::addr::{Gpa, GpaRange, SIZE_2M, SIZE_4K};
use crate::collapse::MthpChoice;
pub use leaf::{
    Accounting, BackingRef, Dirtied, FaultCause, HugePiecewise, Intent, Leaf, LeafSize, LeafSpec,
    Lookup, Mapped, PageState, Region2M, Run, TableError,
};
pub use notifier::{InvalidateReason, MmuNotifier, MmuNotifierSubscriber, SeqToken};
pub use table::Table;

/// Which leaves of a region [`SecondStage::resolve_region`] maps with the faulting one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionRuns {
    /// The hinted ones (a hint fault: the scanner zapped the region).
    Hinted,
    /// Every one with content, present or hinted (a fault on a present page: something
    /// outside the table unmapped the region, e.g. the kernel retracting the guest
    /// view's page table when the staging view of the same file collapsed).
    WithContent,
}

/// Why [`SecondStage::apply_with`] failed.
#[derive(Debug)]
pub enum ApplyError<E> {
    Table(TableError),
    Host(E),
}

impl<E: std::fmt::Display> std::fmt::Display for ApplyError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Table(e) => e.fmt(f),
            ApplyError::Host(e) => e.fmt(f),
        }
    }
}

/// A change to the table that the guest may observe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Map the range with leaves of `size` (linear backing from `spec.backing`).
    Map {
        range: GpaRange,
        size: LeafSize,
        spec: LeafSpec,
    },
    Unmap {
        range: GpaRange,
    },
    /// Split the leaf at `gpa` down to `to`.
    Split {
        gpa: Gpa,
        to: LeafSize,
    },
    /// Merge the `to`-sized region at `gpa` into one leaf.
    Merge {
        gpa: Gpa,
        to: LeafSize,
    },
    /// Present leaves in the range become hinted (whole leaves: the range is widened).
    Hint {
        range: GpaRange,
    },
    /// Like `Hint` (content stays, the mapping goes, the next vCPU access faults), for no
    /// policy reason: tests and stress.
    Zap {
        range: GpaRange,
    },
    /// The range's content moves to `node` (its zone); every mapping goes first. Only
    /// meaningful with the host-side move as the `host` step of
    /// [`SecondStage::apply_with`] (`GuestRam::move_region`).
    Move {
        range: GpaRange,
        node: u16,
    },
    /// Leaves in the range become absent (their content must come again).
    MarkAbsent {
        range: GpaRange,
    },
}

impl Change {
    fn range(&self) -> GpaRange {
        match *self {
            Change::Map { range, .. }
            | Change::Unmap { range }
            | Change::Hint { range }
            | Change::Zap { range }
            | Change::Move { range, .. }
            | Change::MarkAbsent { range } => range,
            Change::Split { gpa, to } | Change::Merge { gpa, to } => {
                GpaRange::new(gpa, gpa.add(to.bytes()))
            }
        }
    }

    fn reason(&self) -> InvalidateReason {
        match self {
            Change::Map { .. } | Change::Unmap { .. } => InvalidateReason::Unmap,
            Change::Split { .. } => InvalidateReason::Split,
            Change::Merge { .. } => InvalidateReason::Collapse,
            Change::Hint { .. } => InvalidateReason::NumaHint,
            Change::Zap { .. } => InvalidateReason::Zap,
            Change::Move { .. } => InvalidateReason::Move,
            Change::MarkAbsent { .. } => InvalidateReason::StateChange,
        }
    }
}

/// The table, its notifier, and the host backing page size (a change is never narrower
/// than one backing page: the host cannot zap part of a hugetlb page).
pub struct SecondStage {
    table: Mutex<Table>,
    notifier: MmuNotifier,
    backing_page: u64,
    /// The mTHP orders the collapse scan chose, per 2 MiB region (recorded even where
    /// the host can collapse only at PMD order).
    orders: Mutex<std::collections::BTreeMap<Gpa, Vec<MthpChoice>>>,
}

impl SecondStage {
    pub fn new(backing_page: u64) -> SecondStage {
        SecondStage {
            table: Mutex::new(Table::empty()),
            notifier: MmuNotifier::default(),
            backing_page,
            orders: Default::default(),
        }
    }

    /// A table with all of guest RAM [0, `ram_size`) present on node 0, zone 0, in leaves
    /// of the backing page size: how every VM starts.
    pub fn all_present(ram_size: u64, backing_page: u64) -> Result<SecondStage, TableError> {
        let leaf = LeafSize::for_bytes(backing_page).ok_or(TableError::Unaligned {
            gpa: Gpa::ZERO,
            size: LeafSize::Size4K,
        })?;
        let stage = SecondStage::new(backing_page);
        let spec = LeafSpec {
            state: PageState::Present,
            node: 0,
            backing: BackingRef { zone: 0, offset: 0 },
        };
        stage.apply(Change::Map {
            range: GpaRange::new(Gpa::ZERO, Gpa(ram_size)),
            size: leaf,
            spec,
        })?;
        Ok(stage)
    }

    pub fn notifier(&self) -> &MmuNotifier {
        &self.notifier
    }

    pub fn backing_page(&self) -> u64 {
        self.backing_page
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves a consistent table (every operation
        // completes its writes before returning), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The range a change of `range` may zap: every leaf overlapping it, whole piecewise
    /// huge pages, and whole backing pages (seed 002: notify at least what is cleared).
    pub fn widen(&self, range: GpaRange) -> GpaRange {
        widen(&self.lock(), range, self.backing_page)
    }

    /// Applies `change` through the notifier; returns the range that was invalidated.
    pub fn apply(&self, change: Change) -> Result<GpaRange, TableError> {
        self.apply_with(change, |_| Ok::<(), TableError>(()))
            .map_err(|e| match e {
                ApplyError::Table(t) | ApplyError::Host(t) => t,
            })
    }

    /// Applies `change` through the notifier, running `host` (the host-side operation,
    /// e.g. copying and remapping a NUMA move) after every subscriber has invalidated the
    /// widened range and before the table changes. If `host` fails the table is left
    /// as it was (the content did not move) and the error is returned.
    pub fn apply_with<E>(
        &self,
        change: Change,
        host: impl FnOnce(GpaRange) -> Result<(), E>,
    ) -> Result<GpaRange, ApplyError<E>> {
        self.apply_checked(change, |_| Ok(()), host)
    }

    /// As [`apply_with`](Self::apply_with), after `check` has accepted the table under
    /// the same lock (so nothing changes between the check and the change). A refusal
    /// returns before any subscriber is notified.
    pub fn apply_checked<E>(
        &self,
        change: Change,
        check: impl FnOnce(&Table) -> Result<(), E>,
        host: impl FnOnce(GpaRange) -> Result<(), E>,
    ) -> Result<GpaRange, ApplyError<E>> {
        let mut t = self.lock();
        check(&t).map_err(ApplyError::Host)?;
        let range = widen(&t, change.range(), self.backing_page);
        let reason = change.reason();
        self.notifier.start(range, reason);
        let r = match host(range) {
            Ok(()) => apply_to(&mut t, change, range).map_err(ApplyError::Table),
            Err(e) => Err(ApplyError::Host(e)),
        };
        self.notifier.end(range, reason);
        r.map(|_| range)
    }

    pub fn lookup(&self, gpa: Gpa, intent: Intent) -> Lookup {
        self.lock().lookup(gpa, intent)
    }

    pub fn seq(&self) -> SeqToken {
        self.notifier.seq()
    }

    /// A fault path's decision: the leaf at `gpa` and the sequence token, both read
    /// under the table lock. Every invalidation runs under that lock, so the token is
    /// never in progress: a fault that meets a running invalidation sleeps on the lock
    /// until it ends, instead of spinning on the count (a spinning fault thread of
    /// higher priority would starve the invalidating thread on its core).
    pub fn decide(&self, gpa: Gpa, intent: Intent) -> (SeqToken, Lookup) {
        let t = self.lock();
        (self.notifier.seq(), t.lookup(gpa, intent))
    }

    /// The fault path's commit: if no invalidation ran since `token`, make the leaf at
    /// `gpa` present and accessed, then run `install` (the host-side mapping of the span
    /// it is given, e.g. UFFDIO_CONTINUE) while still holding the table, so no
    /// invalidation can slip between the check and the install. Returns `Ok(false)` when
    /// the caller must retry.
    pub fn resolve<E>(
        &self,
        gpa: Gpa,
        token: SeqToken,
        dirtied: Dirtied,
        install: impl FnOnce(GpaRange) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut t = self.lock();
        if !self.notifier.unchanged_since(token) {
            return Ok(false);
        }
        let span = t.zap_span(gpa);
        t.set_state(
            span,
            &[PageState::Hinted, PageState::Absent],
            PageState::Present,
        );
        t.mark_accessed(gpa, dirtied);
        install(span)?;
        Ok(true)
    }

    /// The fault path's commit at the granularity that decides NUMA placement: as
    /// [`resolve`](Self::resolve), and every other leaf of the 2 MiB region around `gpa`
    /// that `runs` names becomes present with it, so that a region takes one fault
    /// however many of its pages the vCPU touches next. `install` gets the faulting
    /// leaf's span and the runs of those leaves (the span among them); absent leaves are
    /// never in a run. On huge backing pages the span is the region already (or more):
    /// nothing else is resolved.
    pub fn resolve_region<E>(
        &self,
        gpa: Gpa,
        token: SeqToken,
        dirtied: Dirtied,
        runs_of: RegionRuns,
        install: impl FnOnce(GpaRange, &[GpaRange]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut t = self.lock();
        if !self.notifier.unchanged_since(token) {
            return Ok(false);
        }
        let span = t.zap_span(gpa);
        let region = if self.backing_page == SIZE_4K {
            let start = gpa.align_down(SIZE_2M);
            GpaRange::new(start, start.add(SIZE_2M)).union(&span)
        } else {
            span
        };
        let mut runs: Vec<GpaRange> = Vec::new();
        t.visit(region, &mut |s, l| {
            let wanted = match runs_of {
                RegionRuns::Hinted => l.state == PageState::Hinted,
                RegionRuns::WithContent => l.state.has_content(),
            };
            if !wanted {
                return;
            }
            let r = GpaRange::new(s, s.add(l.size.bytes()));
            match runs.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => runs.push(r),
            }
        });
        t.set_state(
            span,
            &[PageState::Hinted, PageState::Absent],
            PageState::Present,
        );
        t.set_state(region, &[PageState::Hinted], PageState::Present);
        t.mark_accessed(gpa, dirtied);
        install(span, &runs)?;
        Ok(true)
    }

    /// Post-copy: the content of the leaf at `gpa` has arrived. If the leaf is still
    /// absent, runs `install` (write through the staging view, CONTINUE) under the table
    /// lock and marks the leaf present. Returns `Ok(false)` for a leaf that is not absent
    /// (a duplicate, dropped: the guest may have written it since).
    pub fn fill<E>(&self, gpa: Gpa, install: impl FnOnce() -> Result<(), E>) -> Result<bool, E> {
        let mut t = self.lock();
        match t.lookup(gpa, Intent::Internal) {
            Lookup::Fault(_, FaultCause::Absent) => {}
            _ => return Ok(false),
        }
        install()?;
        let span = t.zap_span(gpa);
        t.set_state(span, &[PageState::Absent], PageState::Present);
        Ok(true)
    }

    /// Post-copy: the content of the extent `range` (backing pages of `page`) has
    /// arrived. Under one hold of the table lock, runs `install` once for each stretch of
    /// pages that are still absent (write, CONTINUE) and marks them present; pages that are
    /// not absent are duplicates, left alone. Returns which pages were installed (bit `i`:
    /// page `i` of the extent; at most 64 pages).
    pub fn fill_extent<E>(
        &self,
        range: GpaRange,
        page: u64,
        mut install: impl FnMut(GpaRange) -> Result<(), E>,
    ) -> Result<crate::page::InstalledPages, E> {
        let pages = (range.len() / page).min(64);
        let mut t = self.lock();
        let mut new = 0u64;
        for i in 0..pages {
            if let Lookup::Fault(_, FaultCause::Absent) =
                t.lookup(range.start.add(i * page), Intent::Internal)
            {
                new |= 1 << i;
            }
        }
        let mut i = 0;
        while i < pages {
            if new & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let first = i;
            while i < pages && new & (1 << i) != 0 {
                i += 1;
            }
            let stretch = GpaRange::new(range.start.add(first * page), range.start.add(i * page));
            install(stretch)?;
            let span = GpaRange::new(
                t.zap_span(stretch.start).start,
                t.zap_span(Gpa(stretch.end.0 - 1)).end,
            );
            t.set_state(span, &[PageState::Absent], PageState::Present);
        }
        Ok(crate::page::InstalledPages(new))
    }

    pub fn accounting(&self) -> Accounting {
        self.lock().accounting()
    }

    pub fn runs(&self) -> Vec<Run> {
        self.lock().runs()
    }

    pub fn occupancy_2m(&self, gpa: Gpa) -> u32 {
        self.lock().occupancy_2m(gpa)
    }

    /// Records the mTHP orders chosen for the 2 MiB region at `gpa`.
    pub fn record_orders(&self, gpa: Gpa, choices: &[MthpChoice]) {
        let mut o = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        let key = gpa.align_down(SIZE_2M);
        if choices.is_empty() {
            o.remove(&key);
        } else {
            o.insert(key, choices.to_vec());
        }
    }

    /// The mTHP orders recorded for the 2 MiB region at `gpa`.
    pub fn recorded_orders(&self, gpa: Gpa) -> Vec<MthpChoice> {
        let o = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        o.get(&gpa.align_down(SIZE_2M)).cloned().unwrap_or_default()
    }

    /// Runs `f` on the table without notification: for read-only inspection.
    pub fn inspect<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        f(&self.lock())
    }
}

fn widen(t: &Table, range: GpaRange, backing_page: u64) -> GpaRange {
    if range.is_empty() {
        return range;
    }
    let first = t.zap_span(range.start);
    let last = t.zap_span(Gpa(range.end.0 - 1));
    let start = range.start.min(first.start).align_down(backing_page);
    let end = Gpa(range.end.max(last.end).0.div_ceil(backing_page) * backing_page);
    GpaRange::new(start, end)
}

fn apply_to(t: &mut Table, change: Change, widened: GpaRange) -> Result<(), TableError> {
    match change {
        Change::Map { range, size, spec } => {
            let step = size.bytes();
            if !range.start.is_aligned(step) || !range.end.is_aligned(step) {
                return Err(TableError::Unaligned {
                    gpa: range.start,
                    size,
                });
            }
            let mut gpa = range.start;
            while gpa < range.end {
                let backing = BackingRef {
                    zone: spec.backing.zone,
                    offset: spec.backing.offset + gpa.offset_from(range.start),
                };
                t.map(gpa, size, LeafSpec { backing, ..spec })?;
                gpa = gpa.add(step);
            }
            Ok(())
        }
        Change::Unmap { range } => {
            t.unmap(range);
            Ok(())
        }
        Change::Split { gpa, to } => t.split(gpa, to),
        Change::Merge { gpa, to } => t.merge(gpa, to),
        // Whole leaves: the widened range, so no leaf is split to hint part of it.
        Change::Hint { .. } | Change::Zap { .. } => {
            t.set_state(widened, &[PageState::Present], PageState::Hinted);
            Ok(())
        }
        Change::Move { node, .. } => {
            // The moved range is mapped nowhere yet: content here, mapping gone.
            t.set_node(widened, node, node);
            t.set_state(widened, &[PageState::Present], PageState::Hinted);
            Ok(())
        }
        Change::MarkAbsent { .. } => {
            t.set_state(
                widened,
                &[PageState::Present, PageState::Hinted],
                PageState::Absent,
            );
            Ok(())
        }
    }
}
