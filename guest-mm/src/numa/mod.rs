//! Guest NUMA: the balancing policy ([`balancer`]), the engine that scans, records hint
//! faults and moves regions ([`engine`]), and the command-line specification with its
//! resolution into a topology ([`spec`]). The node backends (emulated memfds, host mbind)
//! are [`crate::ram::zones`].

pub mod balancer;
pub mod engine;
pub mod spec;

pub use crate::ram::zones::{host_nodes, mbind, page_nodes, ExistingPages};
pub use balancer::{Balancer, BalancerConfig, Decision};
pub use engine::{NumaEngine, NumaReport};
pub use spec::{parse_scan, Balancing, NumaSpec, SpecError, Topology};
