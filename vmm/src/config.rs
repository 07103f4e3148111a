//! What a run is asked to do: the configuration `hugevisor run` builds from its flags.

use std::path::PathBuf;
use std::time::Duration;

use guest_image::Workload;
use guest_mm::numa::{BalancerConfig, Balancing, NumaSpec};
use guest_mm::RamConfig;

use crate::console::ConsoleMode;
use crate::vstate::vm::DirtyLogMethod;

/// When the workload ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunLimit {
    /// The VMM sets the mailbox stop flag after this long; vCPUs finish their pass.
    Duration(Duration),
    /// Each vCPU runs this many passes.
    Passes(u64),
}

/// A deliberate fault injected by the VMM, to prove the guest's checks work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptionTest {
    None,
    /// After vCPU 0's first pass, overwrite one word of a page in its partition through
    /// the staging view (the VMM's own access path). The run's `--duration` is stretched,
    /// if need be, until vCPU 0 has made two more passes, so the guest always gets to
    /// check the page however slowly the host runs it.
    AfterFirstPass,
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub ram: RamConfig,
    pub vcpus: u32,
    pub workload: Workload,
    pub limit: RunLimit,
    pub seed: u64,
    pub console: ConsoleMode,
    pub kvm_device: PathBuf,
    pub timeout: Duration,
    pub corruption: CorruptionTest,
    /// Monotonic time at process start (for start-up latency).
    pub process_start_ns: u64,
    /// Testing: a VMM thread zaps a random range of the guest view this often.
    pub stress_zap: Option<Duration>,
    pub memmap: MemmapListing,
    /// Guest NUMA topology (`--numa`); None: one node.
    pub numa: Option<NumaSpec>,
    pub numa_balancing: Balancing,
    pub numa_scan: BalancerConfig,
    /// Testing: move a random region to another node this often.
    pub numa_force_move: Option<Duration>,
    /// When guest RAM becomes huge pages (`--collapse`).
    pub collapse: guest_mm::collapse::CollapseMode,
    pub collapse_scan: guest_mm::collapse::ScanBudget,
    /// Serve the control API on this unix socket.
    pub api_socket: Option<PathBuf>,
    /// Receive the guest from a migration source instead of booting it.
    pub incoming: Option<migration::Uri>,
    /// How KVM reports written pages when a migration asks (`--dirty-log`).
    pub dirty_log: DirtyLogMethod,
    /// How every migration connection, in and out, authenticates (`--migration-key`).
    pub migration_auth: migration::Auth,
    /// Whether a `tcp:` listener may go without authentication (`--insecure`).
    pub exposure: Exposure,
    /// Destination: how long a broken post-copy waits for its source to resume.
    pub recovery_timeout: Duration,
}

/// Whether an unauthenticated migration listener may be reachable over the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// A `tcp:` listener needs authentication (the default).
    AuthenticatedOnly,
    /// `--insecure`: anyone who reaches the port may hand this destination a guest.
    Insecure,
}

/// Whether the run report includes the second-stage table's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemmapListing {
    Off,
    AtExit,
}
