//! The second-stage table: hugevisor's own map of guest-physical memory, what EPT is to
//! the hardware, kept by the VMM.
//!
//! A 512-way radix table like the hardware's: a root of 1 GiB entries, tables of 2 MiB
//! entries, tables of 4 KiB entries. Each entry is empty, a **leaf** (4 KiB, 2 MiB or
//! 1 GiB) or a table. A leaf records its backing (zone and offset), NUMA node, state
//! (present, absent, hinted) and accessed/dirty.
//!
//! **High-granularity mapping** (seed 004): a huge backing page (hugetlb 2 MiB/1 GiB) may
//! be present piecewise, as 4 KiB leaves in a table marked with the huge page it maps
//! pieces of. However many pieces are present it counts as **one** logical mapping.
//! Only creating paths (post-copy CONTINUE of a piece: [`Table::map_piece`]) create such
//! tables.
//!
//! This module is the data structure only. Every change a guest may observe goes through
//! [`crate::stage::SecondStage`], which widens the range and runs the mmu notifier.

use crate::addr::{Gpa, GpaRange, SIZE_1G, SIZE_2M, SIZE_4K};

use super::leaf::{
    Accounting, BackingRef, Dirtied, FaultCause, HugePiecewise, Intent, Leaf, LeafSize, LeafSpec,
    Lookup, Mapped, PageState, Region2M, Run, TableError,
};

/// The table covers guest-physical [0, 512 GiB).
pub const GPA_LIMIT: u64 = 512 * SIZE_1G;
const FANOUT: usize = 512;

#[derive(Clone, Debug, Default)]
enum Entry {
    #[default]
    Empty,
    Leaf(Leaf),
    Table(Box<Table>),
}

#[derive(Clone, Debug)]
pub struct Table {
    /// log2 of the bytes one entry maps (30, 21, 12).
    shift: u32,
    entries: Vec<Entry>,
    /// Set when this table maps pieces of one huge backing page.
    piecewise: Option<HugePiecewise>,
}

impl Default for Table {
    fn default() -> Self {
        Table::new(LeafSize::Size1G.shift(), None)
    }
}

/// Where a subtable sits, for its accounting: inside a piecewise huge page (whose leaves
/// are one logical mapping, counted at the top) or not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Within {
    Plain,
    Piecewise,
}

impl Table {
    fn new(shift: u32, piecewise: Option<HugePiecewise>) -> Table {
        Table {
            shift,
            entries: vec![Entry::Empty; FANOUT],
            piecewise,
        }
    }

    /// An empty table covering [0, 512 GiB).
    pub fn empty() -> Table {
        Table::default()
    }

    fn entry_size(&self) -> u64 {
        1 << self.shift
    }

    fn index(&self, gpa: u64) -> usize {
        ((gpa >> self.shift) as usize) & (FANOUT - 1)
    }

    fn check(gpa: u64, size: LeafSize) -> Result<(), TableError> {
        if gpa >= GPA_LIMIT {
            return Err(TableError::OutOfRange { gpa: Gpa(gpa) });
        }
        if !gpa.is_multiple_of(size.bytes()) {
            return Err(TableError::Unaligned {
                gpa: Gpa(gpa),
                size,
            });
        }
        Ok(())
    }

    /// Installs a leaf of `size` at `gpa`, replacing whatever mapped that range (a larger
    /// leaf around it is split first).
    pub fn map(&mut self, gpa: Gpa, size: LeafSize, spec: LeafSpec) -> Result<(), TableError> {
        let gpa = gpa.0;
        Self::check(gpa, size)?;
        self.map_at(gpa, size, spec);
        Ok(())
    }

    fn map_at(&mut self, gpa: u64, size: LeafSize, spec: LeafSpec) {
        let i = self.index(gpa);
        if self.shift == size.shift() {
            self.entries[i] = Entry::Leaf(Leaf::new(size, spec));
            return;
        }
        let child = self.child_for(i);
        child.map_at(gpa, size, spec);
    }

    /// The table under entry `i`, splitting a leaf or creating an empty table as needed.
    fn child_for(&mut self, i: usize) -> &mut Table {
        let child_shift = self.shift - 9;
        let replaced = std::mem::take(&mut self.entries[i]);
        self.entries[i] = match replaced {
            Entry::Table(t) => Entry::Table(t),
            Entry::Empty => Entry::Table(Box::new(Table::new(child_shift, None))),
            Entry::Leaf(leaf) => Entry::Table(Box::new(Table::split_leaf(leaf, child_shift))),
        };
        match &mut self.entries[i] {
            Entry::Table(t) => t,
            _ => unreachable!("entry was just made a table"),
        }
    }

    /// 512 leaves of the next smaller size with the same state and linear backing. If the
    /// leaf was one huge backing page, the new table maps pieces of it.
    fn split_leaf(leaf: Leaf, child_shift: u32) -> Table {
        let child = LeafSize::from_shift(child_shift);
        let mut t = Table::new(
            child_shift,
            Some(HugePiecewise {
                page: leaf.size,
                backing: leaf.backing,
                node: leaf.node,
            }),
        );
        for (k, e) in t.entries.iter_mut().enumerate() {
            let mut l = leaf;
            l.size = child;
            l.backing = leaf.backing.plus(k as u64 * child.bytes());
            *e = Entry::Leaf(l);
        }
        t
    }

    /// Maps one `piece` of a huge backing page (post-copy CONTINUE of part of a hugetlb
    /// page): creates the piecewise table for the huge page at `huge_start` if needed;
    /// other pieces stay as they were (absent ones are not mapped).
    pub fn map_piece(
        &mut self,
        gpa: Gpa,
        piece: LeafSize,
        huge: LeafSize,
        spec: LeafSpec,
    ) -> Result<(), TableError> {
        let gpa = gpa.0;
        Self::check(gpa, piece)?;
        if piece >= huge {
            return Err(TableError::NotSplittable {
                gpa: Gpa(gpa),
                size: piece,
            });
        }
        let huge_start = gpa & !(huge.bytes() - 1);
        let huge_backing = BackingRef {
            zone: spec.backing.zone,
            offset: spec.backing.offset.saturating_sub(gpa - huge_start),
        };
        let pw = HugePiecewise {
            page: huge,
            backing: huge_backing,
            node: spec.node,
        };
        self.map_piece_at(gpa, piece, huge, pw, spec);
        Ok(())
    }

    fn map_piece_at(
        &mut self,
        gpa: u64,
        piece: LeafSize,
        huge: LeafSize,
        pw: HugePiecewise,
        spec: LeafSpec,
    ) {
        let i = self.index(gpa);
        if self.shift == huge.shift() {
            // The entry for the huge page itself: make it a piecewise table.
            let child_shift = self.shift - 9;
            let is_piecewise_table =
                matches!(&self.entries[i], Entry::Table(t) if t.piecewise == Some(pw));
            if !is_piecewise_table {
                let mut t = Table::new(child_shift, Some(pw));
                if let Entry::Leaf(l) = self.entries[i] {
                    t = Table::split_leaf(l, child_shift);
                    t.piecewise = Some(pw);
                }
                self.entries[i] = Entry::Table(Box::new(t));
            }
            if let Entry::Table(t) = &mut self.entries[i] {
                t.map_at(gpa, piece, spec);
            }
            return;
        }
        let child = self.child_for(i);
        child.map_piece_at(gpa, piece, huge, pw, spec);
    }

    /// Removes every mapping in `range`; partly covered leaves are split first.
    pub fn unmap(&mut self, range: GpaRange) {
        let (start, end) = (range.start.0, range.end.0.min(GPA_LIMIT));
        self.for_range_mut(start, end, &mut |e| *e = Entry::Empty);
    }

    /// Applies `f` to every entry fully inside [start, end), splitting leaves that are
    /// partly inside. Empty tables left behind are freed.
    fn for_range_mut(&mut self, start: u64, end: u64, f: &mut dyn FnMut(&mut Entry)) {
        self.for_range_mut_at(0, start, end, f);
    }

    fn for_range_mut_at(&mut self, base: u64, start: u64, end: u64, f: &mut dyn FnMut(&mut Entry)) {
        let size = self.entry_size();
        for i in 0..FANOUT {
            let es = base + i as u64 * size;
            let ee = es + size;
            if ee <= start || es >= end {
                continue;
            }
            if start <= es && ee <= end {
                f(&mut self.entries[i]);
                continue;
            }
            if matches!(self.entries[i], Entry::Empty) {
                continue;
            }
            let child = self.child_for(i);
            child.for_range_mut_at(es, start, end, f);
            if child.entries.iter().all(|e| matches!(e, Entry::Empty)) {
                self.entries[i] = Entry::Empty;
            }
        }
    }

    /// Sets the state of every mapped leaf in `range` whose state is in `from`.
    /// Leaves partly in the range are split (callers that must not split widen first).
    pub fn set_state(&mut self, range: GpaRange, from: &[PageState], to: PageState) {
        let (start, end) = (range.start.0, range.end.0.min(GPA_LIMIT));
        self.for_range_mut(start, end, &mut |e| set_state_entry(e, from, to));
    }

    /// Sets the node and backing zone of every leaf in `range` (a NUMA move: the offset
    /// stays, the zone is the node's).
    pub fn set_node(&mut self, range: GpaRange, node: u16, zone: u16) {
        let (start, end) = (range.start.0, range.end.0.min(GPA_LIMIT));
        self.for_range_mut(start, end, &mut |e| set_node_entry(e, node, zone));
    }

    /// Splits the leaf that maps `gpa` down to leaves of `to`.
    pub fn split(&mut self, gpa: Gpa, to: LeafSize) -> Result<(), TableError> {
        let gpa = gpa.0;
        Self::check(gpa, to)?;
        let m = match self.lookup(Gpa(gpa), Intent::Internal) {
            Lookup::Mapped(m) | Lookup::Fault(m, _) => m,
            Lookup::Unmapped => return Err(TableError::NotMapped { gpa: Gpa(gpa) }),
        };
        if m.leaf.size <= to {
            return Err(TableError::NotSplittable {
                gpa: Gpa(gpa),
                size: m.leaf.size,
            });
        }
        let mut size = m.leaf.size;
        while size > to {
            let Some(smaller) = size.smaller() else { break };
            self.split_entry_at(gpa, size);
            size = smaller;
        }
        Ok(())
    }

    fn split_entry_at(&mut self, gpa: u64, leaf: LeafSize) {
        let i = self.index(gpa);
        if self.shift == leaf.shift() {
            self.child_for(i);
            return;
        }
        if let Entry::Table(t) = &mut self.entries[i] {
            t.split_entry_at(gpa, leaf);
        }
    }

    /// Replaces the 512 leaves under the `to`-sized region at `gpa` with one leaf of
    /// `to`: they must all be leaves of the next smaller size, with equal state and node
    /// and linear backing (a 1 GiB merge first merges each 2 MiB).
    pub fn merge(&mut self, gpa: Gpa, to: LeafSize) -> Result<(), TableError> {
        let gpa = gpa.0;
        Self::check(gpa, to)?;
        let Some(smaller) = to.smaller() else {
            return Err(TableError::NotMergeable {
                gpa: Gpa(gpa),
                size: to,
                why: "4 KiB is the smallest leaf",
            });
        };
        self.merge_at(gpa, to, smaller)
    }

    fn merge_at(&mut self, gpa: u64, to: LeafSize, smaller: LeafSize) -> Result<(), TableError> {
        let i = self.index(gpa);
        if self.shift != to.shift() {
            return match &mut self.entries[i] {
                Entry::Table(t) => t.merge_at(gpa, to, smaller),
                Entry::Leaf(l) if l.size > to => Err(TableError::NotMergeable {
                    gpa: Gpa(gpa),
                    size: to,
                    why: "already inside a larger leaf",
                }),
                _ => Err(TableError::NotMapped { gpa: Gpa(gpa) }),
            };
        }
        let merged = match &mut self.entries[i] {
            Entry::Leaf(_) => {
                return Err(TableError::NotMergeable {
                    gpa: Gpa(gpa),
                    size: to,
                    why: "already one leaf",
                })
            }
            Entry::Empty => return Err(TableError::NotMapped { gpa: Gpa(gpa) }),
            Entry::Table(t) => {
                if let Some(next) = smaller.smaller() {
                    for k in 0..FANOUT {
                        let sub = gpa + k as u64 * smaller.bytes();
                        if matches!(t.entries[k], Entry::Table(_)) {
                            t.merge_at(sub, smaller, next)?;
                        }
                    }
                }
                let first = match t.entries[0] {
                    Entry::Leaf(l) => l,
                    _ => {
                        return Err(TableError::NotMergeable {
                            gpa: Gpa(gpa),
                            size: to,
                            why: "not fully mapped",
                        })
                    }
                };
                for (k, e) in t.entries.iter().enumerate() {
                    match e {
                        Entry::Leaf(l) if l.continues(&first, k as u64) => {}
                        Entry::Leaf(_) => {
                            return Err(TableError::NotMergeable {
                                gpa: Gpa(gpa),
                                size: to,
                                why: "leaves differ in state, node or backing",
                            })
                        }
                        _ => {
                            return Err(TableError::NotMergeable {
                                gpa: Gpa(gpa),
                                size: to,
                                why: "not fully mapped",
                            })
                        }
                    }
                }
                let accessed = t
                    .entries
                    .iter()
                    .any(|e| matches!(e, Entry::Leaf(l) if l.accessed));
                let dirty = t
                    .entries
                    .iter()
                    .any(|e| matches!(e, Entry::Leaf(l) if l.dirty));
                Leaf {
                    size: to,
                    accessed,
                    dirty,
                    ..first
                }
            }
        };
        self.entries[i] = Entry::Leaf(merged);
        Ok(())
    }

    /// The leaf mapping `gpa` and, for `intent`, whether the access faults.
    pub fn lookup(&self, gpa: Gpa, intent: Intent) -> Lookup {
        let gpa = gpa.0;
        if gpa >= GPA_LIMIT {
            return Lookup::Unmapped;
        }
        let mut t = self;
        loop {
            let i = t.index(gpa);
            match &t.entries[i] {
                Entry::Empty => return Lookup::Unmapped,
                Entry::Table(child) => t = child,
                Entry::Leaf(leaf) => {
                    let start = gpa & !(t.entry_size() - 1);
                    let m = Mapped {
                        start: Gpa(start),
                        leaf: *leaf,
                    };
                    return match (leaf.state, intent) {
                        (PageState::Absent, _) => Lookup::Fault(m, FaultCause::Absent),
                        (PageState::Hinted, Intent::Vcpu) => Lookup::Fault(m, FaultCause::Hint),
                        _ => Lookup::Mapped(m),
                    };
                }
            }
        }
    }

    /// Marks the leaf mapping `gpa` accessed (and dirty for a write).
    pub fn mark_accessed(&mut self, gpa: Gpa, dirty: Dirtied) {
        let gpa = gpa.0;
        if gpa >= GPA_LIMIT {
            return;
        }
        let mut t = self;
        loop {
            let i = t.index(gpa);
            match &mut t.entries[i] {
                Entry::Empty => return,
                Entry::Table(child) => t = child,
                Entry::Leaf(leaf) => {
                    leaf.accessed = true;
                    if dirty == Dirtied::Yes {
                        leaf.dirty = true;
                    }
                    return;
                }
            }
        }
    }

    /// The span that a change touching `gpa` may zap: the leaf that maps it, or the whole
    /// huge backing page when it is mapped piecewise (or 4 KiB when nothing is mapped).
    pub fn zap_span(&self, gpa: Gpa) -> GpaRange {
        let (start, end) = self.zap_span_raw(gpa.0);
        GpaRange::new(Gpa(start), Gpa(end))
    }

    fn zap_span_raw(&self, gpa: u64) -> (u64, u64) {
        if gpa >= GPA_LIMIT {
            return (gpa, gpa + SIZE_4K);
        }
        let mut t = self;
        let mut span = (gpa & !(SIZE_4K - 1), (gpa & !(SIZE_4K - 1)) + SIZE_4K);
        loop {
            let i = t.index(gpa);
            let start = gpa & !(t.entry_size() - 1);
            match &t.entries[i] {
                Entry::Empty => return span,
                Entry::Leaf(_) => return (start, start + t.entry_size()),
                Entry::Table(child) => {
                    if child
                        .piecewise
                        .is_some_and(|pw| pw.page.bytes() == t.entry_size())
                    {
                        // The whole huge page: its pieces share one logical mapping.
                        span = (start, start + t.entry_size());
                        return span;
                    }
                    t = child;
                }
            }
        }
    }

    /// Pages with content (present or hinted) in the 2 MiB region at `gpa`: 0..=512.
    pub fn occupancy_2m(&self, gpa: Gpa) -> u32 {
        match self.region_2m(gpa) {
            Region2M::Unmapped => 0,
            Region2M::Huge(leaf) => {
                if leaf.state.has_content() {
                    512
                } else {
                    0
                }
            }
            Region2M::Pieces { occupied, .. } => occupied.iter().map(|w| w.count_ones()).sum(),
        }
    }

    /// What maps the 2 MiB region at `gpa`, looking at that region only (cost: 512
    /// entries at most, whatever the size of guest RAM).
    pub fn region_2m(&self, gpa: Gpa) -> Region2M {
        let start = gpa.align_down(SIZE_2M).0;
        if start >= GPA_LIMIT {
            return Region2M::Unmapped;
        }
        let mut t = self;
        loop {
            match &t.entries[t.index(start)] {
                Entry::Empty => return Region2M::Unmapped,
                Entry::Leaf(l) => return Region2M::Huge(*l),
                Entry::Table(child) if t.shift > LeafSize::Size2M.shift() => t = child,
                Entry::Table(child) => {
                    let mut occupied = [0u64; 8];
                    let mut final_ = [0u64; 8];
                    let first = match child.entries[0] {
                        Entry::Leaf(l) => Some(l),
                        _ => None,
                    };
                    let mut linear = first.is_some();
                    for (k, e) in child.entries.iter().enumerate() {
                        match e {
                            Entry::Leaf(l) => {
                                if l.state.has_content() {
                                    occupied[k / 64] |= 1 << (k % 64);
                                }
                                if l.state == PageState::Present {
                                    final_[k / 64] |= 1 << (k % 64);
                                }
                                if let Some(f) = &first {
                                    linear &= l.continues(f, k as u64);
                                }
                            }
                            _ => linear = false,
                        }
                    }
                    return Region2M::Pieces {
                        occupied,
                        mergeable: linear && final_.iter().all(|w| *w == u64::MAX),
                    };
                }
            }
        }
    }

    /// Visits every leaf that overlaps `range`, in address order, with its start (read
    /// only: nothing is split; cost follows the leaves in the range, not guest RAM).
    pub fn visit(&self, range: GpaRange, f: &mut dyn FnMut(Gpa, &Leaf)) {
        let (start, end) = (range.start.0, range.end.0.min(GPA_LIMIT));
        if start < end {
            self.visit_at(0, start, end, f);
        }
    }

    fn visit_at(&self, base: u64, start: u64, end: u64, f: &mut dyn FnMut(Gpa, &Leaf)) {
        let size = self.entry_size();
        let first = (start.max(base) - base) / size;
        let last = ((end - base).div_ceil(size)).min(FANOUT as u64);
        for i in first..last {
            let es = base + i * size;
            match &self.entries[i as usize] {
                Entry::Empty => {}
                Entry::Leaf(l) => f(Gpa(es), l),
                Entry::Table(t) => t.visit_at(es, start, end, f),
            }
        }
    }

    /// Visits every leaf in address order with its start and whether it is a piece of a
    /// piecewise huge page.
    pub fn walk(&self, f: &mut dyn FnMut(Gpa, &Leaf, Option<HugePiecewise>)) {
        self.walk_at(0, None, f);
    }

    fn walk_at(
        &self,
        base: u64,
        pw: Option<HugePiecewise>,
        f: &mut dyn FnMut(Gpa, &Leaf, Option<HugePiecewise>),
    ) {
        let pw = self.piecewise.or(pw);
        for (i, e) in self.entries.iter().enumerate() {
            let s = base + i as u64 * self.entry_size();
            match e {
                Entry::Empty => {}
                Entry::Leaf(l) => f(Gpa(s), l, pw),
                Entry::Table(t) => t.walk_at(s, pw, f),
            }
        }
    }

    pub fn accounting(&self) -> Accounting {
        let mut a = Accounting::default();
        self.account_at(&mut a, Within::Plain);
        a
    }

    fn account_at(&self, a: &mut Accounting, within: Within) {
        let inside_piecewise = within == Within::Piecewise;
        let piecewise_here = self.piecewise.is_some() && !inside_piecewise;
        let mut any_content = false;
        for e in &self.entries {
            match e {
                Entry::Empty => {}
                Entry::Leaf(l) => {
                    let b = l.size.bytes();
                    match l.state {
                        PageState::Absent => a.absent_bytes += b,
                        PageState::Hinted => {
                            a.present_bytes += b;
                            a.hinted_bytes += b;
                        }
                        PageState::Present => a.present_bytes += b,
                    }
                    match l.size {
                        LeafSize::Size4K => a.leaves_4k += 1,
                        LeafSize::Size2M => a.leaves_2m += 1,
                        LeafSize::Size1G => a.leaves_1g += 1,
                    }
                    if l.state.has_content() {
                        any_content = true;
                        if !(piecewise_here || inside_piecewise) {
                            a.logical_mappings += 1;
                        }
                    }
                }
                Entry::Table(t) => t.account_at(
                    a,
                    match inside_piecewise || piecewise_here {
                        true => Within::Piecewise,
                        false => Within::Plain,
                    },
                ),
            }
        }
        if piecewise_here {
            a.piecewise_huge_pages += 1;
            if any_content || self.has_content_below() {
                a.logical_mappings += 1;
            }
        }
    }

    fn has_content_below(&self) -> bool {
        self.entries.iter().any(|e| match e {
            Entry::Leaf(l) => l.state.has_content(),
            Entry::Table(t) => t.has_content_below(),
            Entry::Empty => false,
        })
    }

    /// Coalesced runs of equal leaves, for the memory map listing.
    pub fn runs(&self) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        self.walk(&mut |s, l, pw| {
            let e = s.add(l.size.bytes());
            if let Some(last) = out.last_mut() {
                if last.end == s
                    && last.size == l.size
                    && last.state == l.state
                    && last.node == l.node
                    && last.zone == l.backing.zone
                    && last.piecewise == pw.is_some()
                {
                    last.end = e;
                    return;
                }
            }
            out.push(Run {
                start: s,
                end: e,
                size: l.size,
                state: l.state,
                node: l.node,
                zone: l.backing.zone,
                piecewise: pw.is_some(),
            });
        });
        out
    }
}

fn set_node_entry(e: &mut Entry, node: u16, zone: u16) {
    match e {
        Entry::Empty => {}
        Entry::Leaf(l) => {
            l.node = node;
            l.backing.zone = zone;
        }
        Entry::Table(t) => {
            if let Some(pw) = &mut t.piecewise {
                pw.node = node;
                pw.backing.zone = zone;
            }
            t.entries
                .iter_mut()
                .for_each(|c| set_node_entry(c, node, zone));
        }
    }
}

fn set_state_entry(e: &mut Entry, from: &[PageState], to: PageState) {
    match e {
        Entry::Empty => {}
        Entry::Leaf(l) => {
            if from.contains(&l.state) {
                l.state = to;
            }
        }
        Entry::Table(t) => t
            .entries
            .iter_mut()
            .for_each(|c| set_state_entry(c, from, to)),
    }
}
