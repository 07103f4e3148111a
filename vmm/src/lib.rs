//! hugevisor's VMM: KVM VM and vCPU threads, the fast-path boot of the built-in guest,
//! the run loop and its report. The binary's CLI is in `cli.rs`.
//!
//! Where things are:
//! - vCPU loop and exit handling: [`vstate::vcpu`]
//! - VM, memslots: [`vstate::vm`]
//! - entering the guest image (tables, registers): [`boot`]
//! - one workload run, start to report: [`run`]
//! - live migration (pre-copy state machine over the `migration` protocol): [`migrate`]
//! - the control API: [`api`]
//! - guest memory (backings, views, the second-stage table, the fault path, collapse and
//!   NUMA engines): the `guest-mm` crate; the workload-specific NUMA placement:
//!   [`placement`]

pub mod api;
pub mod bench;
pub mod boot;
pub mod caps;
pub mod cli;
pub mod clock;
pub mod console;
pub mod error;
pub mod mailbox;
pub mod migrate;
pub mod placement;
pub mod plot;
pub mod run;
pub mod vstate;

pub use error::{Error, Result};
