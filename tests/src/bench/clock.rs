//! The bench's clocks: CLOCK_MONOTONIC, which `hugevisor run` reports its start-up
//! timestamps in (so the bench can measure from its own fork), and the TSC, which the
//! guest stamps its passes with (kvm_pvm passes the host TSC through) and which the QEMU
//! baseline's slow-pass lines carry.
//!
//! The VMM has its own copy in `vmm/src/clock.rs`; this harness drives the binary from
//! outside and does not link the VMM, so it keeps the few lines it needs.

use std::time::Duration;

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is available on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A (TSC, monotonic) reference pair.
#[derive(Clone, Copy, Debug)]
pub struct TscPoint {
    pub tsc: u64,
    pub ns: u64,
}

impl TscPoint {
    pub fn now() -> Self {
        TscPoint {
            tsc: rdtsc(),
            ns: monotonic_ns(),
        }
    }
}

/// TSC cycles to time, from two reference points.
#[derive(Clone, Copy, Debug)]
pub struct TscClock {
    hz: f64,
}

impl TscClock {
    /// Calibrates from `origin` to now; waits until at least 20 ms have passed.
    pub fn calibrate(origin: TscPoint) -> Self {
        let min = Duration::from_millis(20).as_nanos() as u64;
        let elapsed = monotonic_ns().saturating_sub(origin.ns);
        if elapsed < min {
            std::thread::sleep(Duration::from_nanos(min - elapsed));
        }
        let end = TscPoint::now();
        let hz = (end.tsc - origin.tsc) as f64 * 1e9 / (end.ns - origin.ns).max(1) as f64;
        TscClock { hz }
    }

    pub fn cycles_to_ms(&self, cycles: u64) -> f64 {
        cycles as f64 * 1000.0 / self.hz
    }
}
