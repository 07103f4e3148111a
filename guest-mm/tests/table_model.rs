//! Property tests: random sequences of map / unmap / split / merge / hint / mark-absent /
//! resolve against a plain per-4-KiB model. Lookups must agree with the model, and every
//! notification range must cover every page whose mapping changed.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use guest_mm::stage::{
    BackingRef, Change, Dirtied, FaultCause, Intent, InvalidateReason, LeafSize, LeafSpec, Lookup,
    MmuNotifierSubscriber, PageState, SecondStage, Table,
};
use guest_mm::{Gpa, GpaRange, SIZE_2M, SIZE_4K};
use proptest::prelude::*;

const SPACE: u64 = 16 << 20; // 8 regions of 2 MiB
const PAGES: u64 = SPACE / SIZE_4K;

fn range(start: u64, end: u64) -> GpaRange {
    GpaRange::new(Gpa(start), Gpa(end))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PageModel {
    state: PageState,
    node: u16,
    backing: BackingRef,
}

#[derive(Default)]
struct Recorder {
    ranges: Mutex<Vec<(GpaRange, InvalidateReason, &'static str)>>,
}

impl MmuNotifierSubscriber for Recorder {
    fn invalidate_range_start(&self, range: GpaRange, reason: InvalidateReason) {
        self.ranges.lock().unwrap().push((range, reason, "start"));
    }
    fn invalidate_range_end(&self, range: GpaRange, reason: InvalidateReason) {
        self.ranges.lock().unwrap().push((range, reason, "end"));
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        start: u64,
        count: u64,
        size: LeafSize,
        state: PageState,
        node: u16,
        zone: u16,
    },
    Unmap {
        start: u64,
        pages: u64,
    },
    Split {
        gpa: u64,
        to: LeafSize,
    },
    Merge {
        gpa: u64,
    },
    Hint {
        start: u64,
        pages: u64,
    },
    MarkAbsent {
        start: u64,
        pages: u64,
    },
    Resolve {
        gpa: u64,
    },
}

fn state() -> impl Strategy<Value = PageState> {
    prop_oneof![
        Just(PageState::Present),
        Just(PageState::Absent),
        Just(PageState::Hinted)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let page = 0..PAGES;
    prop_oneof![
        3 => (0..SPACE / SIZE_2M, 1..3u64, state(), 0..2u16, 0..2u16).prop_map(|(r, c, state, node, zone)| {
            let c = c.min(SPACE / SIZE_2M - r);
            Op::Map { start: r * SIZE_2M, count: c, size: LeafSize::Size2M, state, node, zone }
        }),
        3 => (page.clone(), 1..600u64, state(), 0..2u16, 0..2u16).prop_map(|(p, c, state, node, zone)| {
            let c = c.min(PAGES - p);
            Op::Map { start: p * SIZE_4K, count: c, size: LeafSize::Size4K, state, node, zone }
        }),
        2 => (page.clone(), 1..700u64).prop_map(|(p, n)| Op::Unmap { start: p * SIZE_4K, pages: n.min(PAGES - p) }),
        2 => (page.clone()).prop_map(|p| Op::Split { gpa: p * SIZE_4K, to: LeafSize::Size4K }),
        2 => (0..SPACE / SIZE_2M).prop_map(|r| Op::Merge { gpa: r * SIZE_2M }),
        2 => (page.clone(), 1..300u64).prop_map(|(p, n)| Op::Hint { start: p * SIZE_4K, pages: n.min(PAGES - p) }),
        1 => (page.clone(), 1..300u64).prop_map(|(p, n)| Op::MarkAbsent { start: p * SIZE_4K, pages: n.min(PAGES - p) }),
        2 => page.prop_map(|p| Op::Resolve { gpa: p * SIZE_4K }),
    ]
}

/// Per page: what the model tracks plus the leaf that maps it (start, size), so that a
/// split or merge — which changes the mapping but not the content — counts as a change.
fn snapshot(stage: &SecondStage) -> BTreeMap<u64, (PageModel, u64, LeafSize)> {
    let mut m = BTreeMap::new();
    for p in 0..PAGES {
        let gpa = p * SIZE_4K;
        if let Lookup::Mapped(x) | Lookup::Fault(x, _) = stage.lookup(Gpa(gpa), Intent::Internal) {
            let pm = PageModel {
                state: x.leaf.state,
                node: x.leaf.node,
                backing: x.backing_at(Gpa(gpa)),
            };
            m.insert(p, (pm, x.start.0, x.leaf.size));
        }
    }
    m
}

fn check_against(
    stage: &SecondStage,
    model: &BTreeMap<u64, PageModel>,
) -> Result<(), TestCaseError> {
    for p in 0..PAGES {
        let gpa = p * SIZE_4K;
        let internal = stage.lookup(Gpa(gpa), Intent::Internal);
        let vcpu = stage.lookup(Gpa(gpa), Intent::Vcpu);
        match model.get(&p) {
            None => {
                prop_assert_eq!(internal, Lookup::Unmapped, "page {:#x}", gpa);
            }
            Some(want) => {
                let m = match internal {
                    Lookup::Mapped(m) | Lookup::Fault(m, _) => m,
                    Lookup::Unmapped => {
                        return Err(TestCaseError::fail(format!(
                            "{gpa:#x} unmapped, model {want:?}"
                        )))
                    }
                };
                prop_assert_eq!(m.leaf.state, want.state, "state at {:#x}", gpa);
                prop_assert_eq!(m.leaf.node, want.node, "node at {:#x}", gpa);
                prop_assert_eq!(
                    m.backing_at(Gpa(gpa)),
                    want.backing,
                    "backing at {:#x}",
                    gpa
                );
                // Intent: a hinted page faults for a vCPU only; absent faults for both.
                match want.state {
                    PageState::Present => {
                        prop_assert!(matches!(vcpu, Lookup::Mapped(_)));
                        prop_assert!(matches!(internal, Lookup::Mapped(_)));
                    }
                    PageState::Hinted => {
                        prop_assert!(matches!(vcpu, Lookup::Fault(_, FaultCause::Hint)));
                        prop_assert!(matches!(internal, Lookup::Mapped(_)));
                    }
                    PageState::Absent => {
                        prop_assert!(matches!(vcpu, Lookup::Fault(_, FaultCause::Absent)));
                        prop_assert!(matches!(internal, Lookup::Fault(_, FaultCause::Absent)));
                    }
                }
            }
        }
    }
    // Accounting counts hinted pages as present.
    let a = stage.accounting();
    let count =
        |f: &dyn Fn(&PageModel) -> bool| model.values().filter(|m| f(m)).count() as u64 * SIZE_4K;
    prop_assert_eq!(a.present_bytes, count(&|m| m.state.has_content()));
    prop_assert_eq!(a.hinted_bytes, count(&|m| m.state == PageState::Hinted));
    prop_assert_eq!(a.absent_bytes, count(&|m| m.state == PageState::Absent));
    Ok(())
}

fn apply_model(
    model: &mut BTreeMap<u64, PageModel>,
    op: &Op,
    widened: Option<GpaRange>,
    span: Option<(u64, u64)>,
) {
    match *op {
        Op::Map {
            start,
            count,
            size,
            state,
            node,
            zone,
        } => {
            let end = start + count * size.bytes();
            for p in start / SIZE_4K..end / SIZE_4K {
                let backing = BackingRef {
                    zone,
                    offset: p * SIZE_4K - start + 0x1000_0000,
                };
                model.insert(
                    p,
                    PageModel {
                        state,
                        node,
                        backing,
                    },
                );
            }
        }
        Op::Unmap { start, pages } => {
            for p in start / SIZE_4K..start / SIZE_4K + pages {
                model.remove(&p);
            }
        }
        Op::Split { .. } | Op::Merge { .. } => {}
        Op::Hint { .. } | Op::MarkAbsent { .. } => {
            let Some(w) = widened else { return };
            for p in w.start.0 / SIZE_4K..w.end.0 / SIZE_4K {
                if let Some(m) = model.get_mut(&p) {
                    match (op, m.state) {
                        (Op::Hint { .. }, PageState::Present) => m.state = PageState::Hinted,
                        (Op::MarkAbsent { .. }, PageState::Present | PageState::Hinted) => {
                            m.state = PageState::Absent
                        }
                        _ => {}
                    }
                }
            }
        }
        Op::Resolve { .. } => {
            let Some((s, e)) = span else { return };
            for p in s / SIZE_4K..e / SIZE_4K {
                if let Some(m) = model.get_mut(&p) {
                    m.state = PageState::Present;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn table_agrees_with_a_per_page_model(ops in proptest::collection::vec(op(), 1..40)) {
        let stage = SecondStage::new(SIZE_4K);
        let rec = Arc::new(Recorder::default());
        stage.notifier().subscribe(rec.clone());
        let mut model = BTreeMap::new();
        for op in &ops {
            let before = snapshot(&stage);
            rec.ranges.lock().unwrap().clear();
            let mut widened = None;
            let mut span = None;
            let ok = match *op {
                Op::Map { start, count, size, state, node, zone } => {
                    let spec = LeafSpec { state, node, backing: BackingRef { zone, offset: 0x1000_0000 } };
                    let range = range(start, start + count * size.bytes());
                    stage.apply(Change::Map { range, size, spec }).is_ok()
                }
                Op::Unmap { start, pages } => stage.apply(Change::Unmap { range: range(start, start + pages * SIZE_4K) }).is_ok(),
                Op::Split { gpa, to } => stage.apply(Change::Split { gpa: Gpa(gpa), to }).is_ok(),
                Op::Merge { gpa } => stage.apply(Change::Merge { gpa: Gpa(gpa), to: LeafSize::Size2M }).is_ok(),
                Op::Hint { start, pages } => {
                    let r = stage.apply(Change::Hint { range: range(start, start + pages * SIZE_4K) });
                    if let Ok(w) = r {
                        prop_assert!(w.contains(&range(start, start + pages * SIZE_4K)));
                        widened = Some(w);
                    }
                    r.is_ok()
                }
                Op::MarkAbsent { start, pages } => {
                    let r = stage.apply(Change::MarkAbsent { range: range(start, start + pages * SIZE_4K) });
                    widened = r.clone().ok();
                    r.is_ok()
                }
                Op::Resolve { gpa } => {
                    let z = stage.inspect(|t| t.zap_span(Gpa(gpa)));
                    span = Some((z.start.0, z.end.0));
                    let token = stage.seq();
                    stage.resolve(Gpa(gpa), token, Dirtied::No, |_| Ok::<(), ()>(())).unwrap_or(false)
                }
            };
            if ok {
                apply_model(&mut model, op, widened, span);
            }
            check_against(&stage, &model)?;
            // Coverage: every page whose mapping changed lies in a notified range
            // (resolve installs a mapping; it invalidates nothing).
            if !matches!(op, Op::Resolve { .. }) {
                let after = snapshot(&stage);
                let ranges = rec.ranges.lock().unwrap().clone();
                let starts: Vec<_> = ranges.iter().filter(|r| r.2 == "start").collect();
                let ends: Vec<_> = ranges.iter().filter(|r| r.2 == "end").collect();
                prop_assert_eq!(starts.len(), ends.len(), "start/end pairs");
                for p in 0..PAGES {
                    if before.get(&p) != after.get(&p) {
                        let gpa = p * SIZE_4K;
                        prop_assert!(
                            starts.iter().any(|(r, _, _)| r.contains_gpa(Gpa(gpa))),
                            "page {:#x} changed by {:?} outside notified ranges {:?}", gpa, op, starts
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_huge_page_mapped_piecewise_is_one_logical_mapping() {
    // A 2 MiB hugetlb page arrives piece by piece (post-copy CONTINUE of 4 KiB parts).
    let mut t = Table::empty();
    for k in [0u64, 7, 300] {
        let gpa = 4 * SIZE_2M + k * SIZE_4K;
        let spec = LeafSpec {
            state: PageState::Present,
            node: 0,
            backing: BackingRef {
                zone: 0,
                offset: k * SIZE_4K,
            },
        };
        t.map_piece(Gpa(gpa), LeafSize::Size4K, LeafSize::Size2M, spec)
            .unwrap();
    }
    let a = t.accounting();
    assert_eq!(a.leaves_4k, 3);
    assert_eq!(a.piecewise_huge_pages, 1);
    assert_eq!(a.logical_mappings, 1, "{a:?}");
    assert_eq!(t.occupancy_2m(Gpa(4 * SIZE_2M)), 3);
    // A change to any piece may zap the whole huge page.
    assert_eq!(
        t.zap_span(Gpa(4 * SIZE_2M + 7 * SIZE_4K)),
        range(4 * SIZE_2M, 5 * SIZE_2M)
    );
    // A plain 4 KiB table is not piecewise: each leaf is its own mapping.
    let mut plain = Table::empty();
    for k in 0..3u64 {
        let spec = LeafSpec {
            state: PageState::Present,
            node: 0,
            backing: BackingRef {
                zone: 0,
                offset: k * SIZE_4K,
            },
        };
        plain.map(Gpa(k * SIZE_4K), LeafSize::Size4K, spec).unwrap();
    }
    assert_eq!(plain.accounting().logical_mappings, 3);
    assert_eq!(plain.zap_span(Gpa(SIZE_4K)), range(SIZE_4K, 2 * SIZE_4K));
}

#[test]
fn gigabyte_leaves_split_merge_and_widen() {
    let stage = SecondStage::new(SIZE_4K);
    let spec = LeafSpec {
        state: PageState::Present,
        node: 1,
        backing: BackingRef { zone: 2, offset: 0 },
    };
    let g = 1u64 << 30;
    stage
        .apply(Change::Map {
            range: range(g, 2 * g),
            size: LeafSize::Size1G,
            spec,
        })
        .unwrap();
    // Hinting one 4 KiB page of a 1 GiB leaf hints (and notifies) the whole leaf.
    let w = stage
        .apply(Change::Hint {
            range: range(g + 8192, g + 12288),
        })
        .unwrap();
    assert_eq!(w, range(g, 2 * g));
    assert!(matches!(
        stage.lookup(Gpa(g + 5 * SIZE_2M), Intent::Vcpu),
        Lookup::Fault(_, FaultCause::Hint)
    ));
    stage
        .apply(Change::Split {
            gpa: Gpa(g + 3 * SIZE_2M + 5 * SIZE_4K),
            to: LeafSize::Size4K,
        })
        .unwrap();
    let a = stage.accounting();
    assert_eq!((a.leaves_1g, a.leaves_2m, a.leaves_4k), (0, 511, 512));
    assert_eq!(a.present_bytes, g);
    // Backing stays linear through the split.
    match stage.lookup(Gpa(g + 3 * SIZE_2M + 5 * SIZE_4K), Intent::Internal) {
        Lookup::Mapped(m) => assert_eq!(
            m.backing_at(Gpa(g + 3 * SIZE_2M + 5 * SIZE_4K)).offset,
            3 * SIZE_2M + 5 * SIZE_4K
        ),
        other => panic!("{other:?}"),
    }
    stage
        .apply(Change::Merge {
            gpa: Gpa(g),
            to: LeafSize::Size1G,
        })
        .unwrap();
    assert_eq!(stage.accounting().leaves_1g, 1);
    // A different node inside blocks the merge.
    stage
        .apply(Change::Split {
            gpa: Gpa(g),
            to: LeafSize::Size4K,
        })
        .unwrap();
    let odd = LeafSpec {
        node: 0,
        backing: BackingRef {
            zone: 2,
            offset: SIZE_4K,
        },
        ..spec
    };
    stage
        .apply(Change::Map {
            range: range(g + SIZE_4K, g + 2 * SIZE_4K),
            size: LeafSize::Size4K,
            spec: odd,
        })
        .unwrap();
    assert!(stage
        .apply(Change::Merge {
            gpa: Gpa(g),
            to: LeafSize::Size2M
        })
        .is_err());
}
