//! hugevisor's VMM: KVM VM and vCPU threads, the fast-path boot of the built-in guest,
//! the run loop and its report. The binary's CLI is in `cli.rs`.
//!
//! Where things are:
//! - vCPU loop and exit handling: [`vstate::vcpu`]
//! - the fault path (userfaultfd events → second-stage table → CONTINUE): [`fault`]
//! - VM, memslots: [`vstate::vm`]
//! - entering the guest image (tables, registers): [`boot`]
//! - one workload run, start to report: [`run`]
//! - live migration (pre-copy state machine over the `migration` protocol): [`migrate`]
//! - the control API: [`api`]
//! - guest RAM (backings, views): the `guest-mm` crate

pub mod api;
pub mod boot;
pub mod builder;
pub mod caps;
pub mod cli;
pub mod clock;
pub mod collapse;
pub mod config;
pub mod console;
pub mod controller;
pub mod error;
pub mod fault;
pub mod mailbox;
pub mod memory;
pub mod migration_host;
pub mod numa;
pub mod periodic;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod run;
pub mod vstate;

pub use error::{Error, Result};
