//! The second-stage table behind its one door: every change is widened, notified, applied.

use std::sync::{Mutex, MutexGuard};

use crate::notifier::{GpaRange, InvalidateReason, MmuNotifier, SeqToken};
use crate::table::{
    Accounting, Dirtied, Intent, LeafSize, LeafSpec, Lookup, PageState, Run, Table, TableError,
};

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
    /// Map [start, end) with leaves of `size` (linear backing from `spec.backing`).
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
        gpa: u64,
        to: LeafSize,
    },
    /// Merge the `to`-sized region at `gpa` into one leaf.
    Merge {
        gpa: u64,
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
    /// The range's content moves to `node` (its zone); every mapping goes first.
    Migrate {
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
            | Change::Migrate { range, .. }
            | Change::MarkAbsent { range } => range,
            Change::Split { gpa, to } => GpaRange::new(gpa, gpa + to.bytes()),
            Change::Merge { gpa, to } => GpaRange::new(gpa, gpa + to.bytes()),
        }
    }

    fn reason(&self) -> InvalidateReason {
        match self {
            Change::Map { .. } | Change::Unmap { .. } => InvalidateReason::Unmap,
            Change::Split { .. } => InvalidateReason::Split,
            Change::Merge { .. } => InvalidateReason::Collapse,
            Change::Hint { .. } => InvalidateReason::NumaHint,
            Change::Zap { .. } => InvalidateReason::Zap,
            Change::Migrate { .. } => InvalidateReason::Migrate,
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
    orders: Mutex<std::collections::BTreeMap<u64, Vec<crate::collapse::MthpChoice>>>,
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
        let leaf =
            crate::table::LeafSize::for_bytes(backing_page).ok_or(TableError::Unaligned {
                gpa: 0,
                size: crate::table::LeafSize::Size4K,
            })?;
        let stage = SecondStage::new(backing_page);
        let spec = LeafSpec {
            state: PageState::Present,
            node: 0,
            backing: crate::table::BackingRef { zone: 0, offset: 0 },
        };
        stage.apply(Change::Map {
            range: GpaRange::new(0, ram_size),
            size: leaf,
            spec,
        })?;
        Ok(stage)
    }

    pub fn notifier(&self) -> &MmuNotifier {
        &self.notifier
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

    pub fn lookup(&self, gpa: u64, intent: Intent) -> Lookup {
        self.lock().lookup(gpa, intent)
    }

    pub fn seq(&self) -> SeqToken {
        self.notifier.seq()
    }

    /// The fault path's commit: if no invalidation ran since `token`, make the leaf at
    /// `gpa` present and accessed, then run `install` (the host-side mapping, e.g.
    /// UFFDIO_CONTINUE) while still holding the table, so no invalidation can slip
    /// between the check and the install. Returns `Ok(false)` when the caller must retry.
    pub fn resolve<E>(
        &self,
        gpa: u64,
        token: SeqToken,
        dirtied: Dirtied,
        install: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut t = self.lock();
        if !self.notifier.unchanged_since(token) {
            return Ok(false);
        }
        let span = t.zap_span(gpa);
        t.set_state(
            span.0,
            span.1,
            &[PageState::Hinted, PageState::Absent],
            PageState::Present,
        );
        t.mark_accessed(gpa, dirtied);
        install()?;
        Ok(true)
    }

    /// Post-copy: the content of the leaf at `gpa` has arrived. If the leaf is still
    /// absent, runs `install` (write through the staging view, CONTINUE) under the table
    /// lock and marks the leaf present. Returns `Ok(false)` for a leaf that is not absent
    /// (a duplicate, dropped: the guest may have written it since).
    pub fn fill<E>(&self, gpa: u64, install: impl FnOnce() -> Result<(), E>) -> Result<bool, E> {
        let mut t = self.lock();
        match t.lookup(gpa, Intent::Internal) {
            Lookup::Fault(_, crate::table::FaultCause::Absent) => {}
            _ => return Ok(false),
        }
        install()?;
        let span = t.zap_span(gpa);
        t.set_state(span.0, span.1, &[PageState::Absent], PageState::Present);
        Ok(true)
    }

    pub fn accounting(&self) -> Accounting {
        self.lock().accounting()
    }

    pub fn runs(&self) -> Vec<Run> {
        self.lock().runs()
    }

    pub fn occupancy_2m(&self, gpa: u64) -> u32 {
        self.lock().occupancy_2m(gpa)
    }

    /// Records the mTHP orders chosen for the 2 MiB region at `gpa`.
    pub fn record_orders(&self, gpa: u64, choices: &[crate::collapse::MthpChoice]) {
        let mut o = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        let key = gpa & !(crate::table::SIZE_2M - 1);
        if choices.is_empty() {
            o.remove(&key);
        } else {
            o.insert(key, choices.to_vec());
        }
    }

    /// The mTHP orders recorded for the 2 MiB region at `gpa`.
    pub fn recorded_orders(&self, gpa: u64) -> Vec<crate::collapse::MthpChoice> {
        let o = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        o.get(&(gpa & !(crate::table::SIZE_2M - 1)))
            .cloned()
            .unwrap_or_default()
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
    let last = t.zap_span(range.end - 1);
    let mut r = GpaRange::new(range.start.min(first.0), range.end.max(last.1));
    r.start &= !(backing_page - 1);
    r.end = r.end.div_ceil(backing_page) * backing_page;
    r
}

fn apply_to(t: &mut Table, change: Change, widened: GpaRange) -> Result<(), TableError> {
    match change {
        Change::Map { range, size, spec } => {
            let step = size.bytes();
            if !range.start.is_multiple_of(step) || !range.end.is_multiple_of(step) {
                return Err(TableError::Unaligned {
                    gpa: range.start,
                    size,
                });
            }
            let mut gpa = range.start;
            while gpa < range.end {
                let backing = crate::table::BackingRef {
                    zone: spec.backing.zone,
                    offset: spec.backing.offset + (gpa - range.start),
                };
                t.map(gpa, size, LeafSpec { backing, ..spec })?;
                gpa += step;
            }
            Ok(())
        }
        Change::Unmap { range } => {
            t.unmap(range.start, range.end);
            Ok(())
        }
        Change::Split { gpa, to } => t.split(gpa, to),
        Change::Merge { gpa, to } => t.merge(gpa, to),
        // Whole leaves: the widened range, so no leaf is split to hint part of it.
        Change::Hint { .. } | Change::Zap { .. } => {
            t.set_state(
                widened.start,
                widened.end,
                &[PageState::Present],
                PageState::Hinted,
            );
            Ok(())
        }
        Change::Migrate { node, .. } => {
            // The moved range is mapped nowhere yet: content here, mapping gone.
            t.set_node(widened.start, widened.end, node, node);
            t.set_state(
                widened.start,
                widened.end,
                &[PageState::Present],
                PageState::Hinted,
            );
            Ok(())
        }
        Change::MarkAbsent { .. } => {
            t.set_state(
                widened.start,
                widened.end,
                &[PageState::Present, PageState::Hinted],
                PageState::Absent,
            );
            Ok(())
        }
    }
}
