//! Collapse: making 2 MiB regions of guest RAM one huge page once their content is final.
//!
//! - [`policy`]: modes and budgets, when a region may collapse (complete in the table),
//!   which mTHP order a scan chooses, failure reasons, and the host sequence;
//! - [`engine`]: the thread that applies it — on fill (post-copy), on sweeps (a
//!   destination resumed, post-copy ended) and by a khugepaged-like background scan.

pub mod engine;
pub mod policy;

pub(crate) use engine::CollapseEngine;
pub use engine::{CollapseReport, CollapseStatus};
pub use policy::{
    choose_orders, region_complete, BudgetError, CollapseFailure, CollapseMode, CollapseStats,
    MthpChoice, ScanBudget,
};
