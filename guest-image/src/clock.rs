//! The clocks the guest's timestamps are read with: the guest stamps its passes and its
//! first instruction with the TSC (kvm_pvm passes the host's through), and the VMM and the
//! benchmark harness convert those stamps against CLOCK_MONOTONIC, which is comparable
//! across processes on one host. One copy for both readers of the guest's ABI.

use std::time::Duration;

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes (the bench uses it to
/// measure from its own fork to a child's first guest instruction).
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

/// TSC ↔ time conversion from two reference points.
#[derive(Clone, Copy, Debug)]
pub struct TscClock {
    origin: TscPoint,
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
        TscClock { origin, hz }
    }

    pub fn khz(&self) -> u64 {
        (self.hz / 1000.0) as u64
    }

    pub fn cycles_to_ms(&self, cycles: u64) -> f64 {
        cycles as f64 * 1000.0 / self.hz
    }

    /// Monotonic nanoseconds at which the TSC read `tsc`.
    pub fn tsc_to_monotonic_ns(&self, tsc: u64) -> u64 {
        let d = (tsc as f64 - self.origin.tsc as f64) * 1e9 / self.hz;
        (self.origin.ns as f64 + d).max(0.0) as u64
    }
}
