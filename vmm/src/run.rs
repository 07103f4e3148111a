//! One run, start to report: build the VM ([`crate::builder`]), run it under the
//! controller ([`crate::controller`]) until the guest ends or leaves, stop guest
//! memory's threads, and report ([`crate::report`]).

use crate::builder;
pub use crate::config::{CorruptionTest, MemmapListing, RunConfig, RunLimit};
use crate::controller::Controller;
use crate::error::Result;
pub use crate::report::{Outcome, RunReport};
use guest_image::clock::TscPoint;

/// Builds the VM, runs the workload and reports. Errors are returned only for problems
/// of the VMM or the host; guest-detected failures are in [`RunReport::outcome`].
pub fn run(cfg: &RunConfig) -> Result<RunReport> {
    let origin = TscPoint::now();
    let vmm = builder::build(cfg)?;
    let end = Controller::start(cfg, vmm)?.run()?;
    let memory_report = end.memory.stop();
    crate::report::assemble(cfg, origin, end, memory_report)
}
