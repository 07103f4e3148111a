//! Pre-copy that keeps its budget, or says it could not: throttling the vCPUs
//! (auto-converge), switching to post-copy (`Mode::Auto`), and stopping over budget
//! where neither is possible.

use std::time::Duration;

use super::fakes::{FakeDestination, FakeSource};
use super::net::TestNet;
use super::{pair, request, timeouts, MIB};
use crate::{Converged, Mode, Verify};

fn same_ram(src: &FakeSource, dst: &FakeDestination) {
    let (a, b) = (src.ram.snapshot(), dst.ram.snapshot());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(first_diff.is_none(), "RAM differs at {first_diff:x?}");
}

#[test]
fn rounds_that_stop_shrinking_throttle_the_vcpus_until_the_rest_fits() {
    let mut src = FakeSource::new(4 * MIB, 4096, "shmem");
    src.throttleable = true;
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let mut req = request(Mode::Precopy);
    // Only nothing fits a zero budget: 8 pages a round never shrink, until the guest is
    // held back enough to write none (8 × 10 % rounds down to 0 at 90 %).
    req.downtime = Duration::ZERO;
    req.verify = Some(Verify::MemoryHash);
    let (s, d) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
    let (s, d) = (s.unwrap(), d.unwrap());
    same_ram(&src, &dst);
    assert_eq!(s.converged_by, Converged::Throttle, "{s:?}");
    let throttles = src.throttles.lock().unwrap().clone();
    // Raised from 20 % in steps of 10 while it did not fit, then full speed at the end.
    assert_eq!(throttles.first(), Some(&20), "{throttles:?}");
    let raised = &throttles[..throttles.len() - 1];
    assert!(
        raised.windows(2).all(|w| w[1] == (w[0] + 10).min(99)),
        "{throttles:?}"
    );
    assert_eq!(throttles.last(), Some(&0), "{throttles:?}");
    assert_eq!(s.throttle_percent, throttles[throttles.len() - 2]);
    assert_eq!(s.expected_downtime_ms, 0.0, "{s:?}");
    assert_eq!(s.downtime_budget_ms, 0.0);
    assert_eq!(d.memory_hash, s.memory_hash);
    assert!(s.memory_hash.is_some());
}

#[test]
fn a_vm_that_cannot_throttle_stops_over_budget_and_says_so() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let mut req = request(Mode::Precopy);
    req.downtime = Duration::ZERO;
    let (s, _) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
    let s = s.unwrap();
    same_ram(&src, &dst);
    assert_eq!(s.converged_by, Converged::OverBudget, "{s:?}");
    assert!(s.expected_downtime_ms > 0.0, "{s:?}");
    assert_eq!(s.budget_met, Some(false), "{s:?}");
    assert_eq!(s.throttle_percent, 0);
    assert!(src.throttles.lock().unwrap().is_empty());
}

#[test]
fn a_vm_whose_throttle_fails_resumes_its_guest() {
    let mut src = FakeSource::new(4 * MIB, 4096, "shmem");
    src.throttleable = true;
    src.ram.faults.fail("throttle", 0);
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let mut req = request(Mode::Precopy);
    req.downtime = Duration::ZERO;
    let (s, _) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
    let e = s.unwrap_err();
    assert!(e.to_string().contains("throttling the vCPUs"), "{e}");
    assert!(!src.calls().contains(&"pause"), "{:?}", src.calls());
}

#[test]
fn auto_switches_to_postcopy_when_the_rounds_stop_converging() {
    let mut src = FakeSource::new(4 * MIB, 4096, "shmem");
    // Auto never throttles, even where it could.
    src.throttleable = true;
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let mut req = request(Mode::Auto);
    req.downtime = Duration::ZERO;
    req.verify = Some(Verify::MemoryHash);
    let (s, d) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
    let (s, d) = (s.unwrap(), d.unwrap());
    same_ram(&src, &dst);
    assert_eq!(s.converged_by, Converged::Postcopy, "{s:?}");
    assert_eq!(s.precopy_rounds, 4, "{s:?}");
    assert!(s.pages_pushed + s.pages_demand > 0, "{s:?}");
    assert!(src.throttles.lock().unwrap().is_empty());
    assert_eq!(d.memory_hash, s.memory_hash);
    assert!(s.memory_hash.is_some());
    assert_eq!((s.mode.as_str(), d.mode.as_str()), ("auto", "auto"));
    assert!(d.postcopy_ms.is_some());
}

#[test]
fn auto_that_converges_is_a_precopy() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let (s, d) = pair(
        &src,
        &dst,
        &request(Mode::Auto),
        &TestNet::new(),
        &timeouts(),
    );
    let (s, d) = (s.unwrap(), d.unwrap());
    same_ram(&src, &dst);
    assert_eq!(s.converged_by, Converged::Rounds, "{s:?}");
    assert_eq!(s.pages_pushed + s.pages_demand, 0, "{s:?}");
    assert!(d.postcopy_ms.is_none());
    assert_eq!(s.downtime_budget_ms, 50.0);
    assert!(s.budget_met.is_some());
    assert_eq!(dst.calls(), ["restore", "start", "resumed_after_migration"]);
}
