//! hugevisor's VMM: it builds a KVM VM around guest memory from `guest-mm`, runs its vCPU
//! threads, serves the control API, and wires a live migration (the `migration` crate)
//! to the VM. It holds no memory or migration policy of its own. The binary's CLI is in
//! [`cli`].
//!
//! Where things are:
//! - building a VM (boot or migration destination): [`builder`]
//! - the run's states and events (API calls, vCPU ends, migrations): [`controller`]
//! - the vCPU loop and exit handling: [`vstate::vcpu`]; pausing and resuming vCPUs in
//!   place: [`vstate::vcpu_set`]; the VM and memslots: [`vstate::vm`]; the KVM dirty ring:
//!   [`vstate::dirty_ring`]
//! - entering the guest image (tables, registers): [`boot`]
//! - the port-I/O devices (COM1, i8042, ACPI power-off): [`devices`]
//! - what a migration asks of the VM (the `migration` crate's traits): [`migration_host`]
//! - snapshots (the request, opening one for a run, the restore thread): [`snapshot`]
//! - the run report: [`report`]; the workload-specific NUMA placement: [`placement`]
//! - the control API: [`api`]; what `vm.info` and `vm.counters` say: [`status`]
//! - guest memory (backings, views, the second-stage table, the fault path, collapse and
//!   NUMA engines): the `guest-mm` crate

pub mod acpi;
pub mod api;
pub mod boot;
pub mod builder;
pub mod caps;
pub mod cli;
pub mod config;
pub mod console;
pub mod controller;
pub mod devices;
pub mod error;
pub mod mailbox;
pub mod migration_host;
pub mod placement;
pub mod progress;
pub mod report;
pub mod run;
pub mod signals;
pub mod snapshot;
pub mod status;
pub mod vstate;

pub use error::{Error, Result};
