//! Guest NUMA: the balancing policy ([`balancer`]), the scanner's pace ([`scan`]), the
//! engine that scans, records hint faults and moves regions ([`engine`]), post-copy
//! placement ([`postcopy`]), what the engine reports ([`report`]), and the command-line
//! specification with its resolution into a topology ([`spec`]). The node backends
//! (emulated memfds, host mbind) are [`crate::ram::zones`].

pub mod balancer;
pub mod engine;
pub mod postcopy;
pub mod report;
pub mod scan;
pub mod spec;

pub use crate::ram::zones::{host_nodes, mbind, page_nodes, ExistingPages};
pub use balancer::{Balancer, BalancerConfig, Decision, Stay};
pub use engine::NumaEngine;
pub use postcopy::PostcopyPlacementReport;
pub use report::{FullScan, NumaReport};
pub use scan::{ScanPace, ScanTally};
pub use spec::{parse_scan, Balancing, NumaSpec, SpecError, Topology};
