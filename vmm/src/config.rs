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
    /// A migration destination given neither: the guest's own limit arrives with it (the
    /// source's `--duration`, or the passes in the guest's command line).
    FromSource,
}

/// Where the run's guest comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestSource {
    /// Booted here from the built-in image.
    Boot,
    /// Received from a migration source on `--incoming`'s URI.
    Incoming(migration::Uri),
    /// Received where a `vm.receive-migration` call says: a VMM started with
    /// `--api-socket` and no guest (no `--workload`, no `--incoming`) waits for one.
    ApiReceive,
    /// Restored from a snapshot directory (`--restore DIR --restore-mode copy|lazy`): a
    /// migration destination whose source is the directory.
    Restore {
        dir: PathBuf,
        mode: migration::snapshot::RestoreMode,
    },
}

impl GuestSource {
    /// Whether the guest arrives by migration rather than booting here.
    pub fn is_migration(&self) -> bool {
        !matches!(self, GuestSource::Boot)
    }
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
    /// `--timeout`; without it, see [`RunConfig::timeout_for`].
    pub timeout: Option<Duration>,
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
    /// Boot the guest, or receive it from a migration source.
    pub guest: GuestSource,
    /// How KVM reports written pages when a migration asks (`--dirty-log`).
    pub dirty_log: DirtyLogMethod,
    /// Boot this kernel instead of the built-in image's fast path (`--kernel`).
    pub kernel: Option<crate::boot::kernel::KernelConfig>,
    /// How every migration connection, in and out, authenticates (`--migration-key`).
    pub migration_auth: migration::Auth,
    /// Whether a `tcp:` listener may go without authentication (`--insecure`).
    pub exposure: Exposure,
    /// Destination: how long a broken post-copy waits for its source to resume.
    pub recovery_timeout: Duration,
    /// Take a snapshot this long into the run (`--snapshot-at D --to DIR`).
    pub snapshot_at: Option<SnapshotAt>,
}

/// Whether an unauthenticated migration listener may be reachable over the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// A `tcp:` listener needs authentication (the default).
    AuthenticatedOnly,
    /// `--insecure`: anyone who reaches the port may hand this destination a guest.
    Insecure,
}

/// A snapshot the run takes by itself, for scripted experiments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotAt {
    /// From the guest's start here.
    pub after: Duration,
    pub request: crate::snapshot::SnapshotRequest,
}

/// Whether the run report includes the second-stage table's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemmapListing {
    Off,
    AtExit,
}

impl RunConfig {
    /// How long a run may take from its guest's start here, when it is to run for
    /// `run_for` (None: until its passes are done): `--timeout`, or a minute more than
    /// `run_for`, or 10 minutes.
    pub fn timeout_for(&self, run_for: Option<Duration>) -> Duration {
        self.timeout.unwrap_or(match run_for {
            Some(d) => d + Duration::from_secs(60),
            None => Duration::from_secs(600),
        })
    }

    /// How long a destination waits for its source to connect: as long as a run of its
    /// own `--duration` may take.
    pub fn accept_timeout(&self) -> Duration {
        self.timeout_for(match self.limit {
            RunLimit::Duration(d) => Some(d),
            RunLimit::Passes(_) | RunLimit::FromSource => None,
        })
    }
}
