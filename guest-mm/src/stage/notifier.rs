//! The mmu notifier: the one door for every change to a mapping the guest may be using.
//!
//! `invalidate_range_start(range, reason)` → the change → `invalidate_range_end(range,
//! reason)`. Subscribers (the host guest-view mapping, dirty tracking, the collapse and
//! NUMA engines) see every invalidation. A sequence count, odd while an invalidation is
//! in progress, lets a fault path detect that an invalidation raced with its decision and
//! retry (KVM's `mmu_invalidate_seq` pattern).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::addr::GpaRange;

/// Why a range is invalidated; subscribers react by reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidateReason {
    /// Mapping removed (guest RAM going away, or content discarded).
    Unmap,
    /// Mapping zapped so the next vCPU access takes a NUMA-hint fault; content stays.
    NumaHint,
    /// Mapping zapped for no policy reason (tests, manual zap); content stays.
    Zap,
    /// Leaves split into smaller ones.
    Split,
    /// Leaves merged into a huge one (collapse).
    Collapse,
    /// Content moves (a NUMA region move); every mapping must go before the copy.
    Move,
    /// State change of leaves that the guest may be using (e.g. absent after a failure,
    /// or post-copy's pages that must come again).
    StateChange,
}

impl InvalidateReason {
    /// Whether the host mapping of the range must be zapped for this change. A collapse
    /// replaces the mapping in place (the kernel's own mmu notifier tells KVM), so
    /// zapping it first would only make the vCPUs fault it back in. Every other change
    /// zaps: a leaf that became absent must not stay mapped (a guest view populated up
    /// front, as emulated NUMA nodes are, would otherwise let the guest read the stale
    /// page without a fault).
    pub fn zaps_host_mapping(self) -> bool {
        !matches!(self, InvalidateReason::Collapse)
    }
}

pub trait MmuNotifierSubscriber: Send + Sync {
    /// Called before the change, with the widened range. Must not call back into the
    /// second-stage table (it is locked).
    fn invalidate_range_start(&self, range: GpaRange, reason: InvalidateReason);
    /// Called after the change with the same range.
    fn invalidate_range_end(&self, range: GpaRange, reason: InvalidateReason);
}

/// A snapshot of the invalidation sequence, taken before a fault-path decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqToken(u64);

impl SeqToken {
    /// Whether an invalidation was in progress when the token was taken (odd count).
    pub fn in_progress(self) -> bool {
        self.0 & 1 == 1
    }
}

#[derive(Default)]
pub struct MmuNotifier {
    subscribers: RwLock<Vec<Arc<dyn MmuNotifierSubscriber>>>,
    seq: AtomicU64,
}

impl MmuNotifier {
    pub fn subscribe(&self, s: Arc<dyn MmuNotifierSubscriber>) {
        if let Ok(mut v) = self.subscribers.write() {
            v.push(s);
        }
    }

    pub fn seq(&self) -> SeqToken {
        SeqToken(self.seq.load(Ordering::Acquire))
    }

    /// Whether no invalidation started since `token` was taken (and none was running).
    pub fn unchanged_since(&self, token: SeqToken) -> bool {
        !token.in_progress() && self.seq.load(Ordering::Acquire) == token.0
    }

    pub(crate) fn start(&self, range: GpaRange, reason: InvalidateReason) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        if let Ok(v) = self.subscribers.read() {
            v.iter()
                .for_each(|s| s.invalidate_range_start(range, reason));
        }
    }

    pub(crate) fn end(&self, range: GpaRange, reason: InvalidateReason) {
        if let Ok(v) = self.subscribers.read() {
            v.iter().for_each(|s| s.invalidate_range_end(range, reason));
        }
        self.seq.fetch_add(1, Ordering::AcqRel);
    }
}
