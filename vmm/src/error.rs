//! Errors of the VMM crate. Each message names the problem and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: no such device; KVM is not available here (load the kvm module, e.g. `modprobe kvm_intel` or `modprobe kvm_amd`, or pass --kvm-device)", path = .0.display())]
    KvmMissing(PathBuf),
    #[error("{path}: permission denied; run as root or add your user to the kvm group", path = .0.display())]
    KvmPermission(PathBuf),
    #[error("opening {path}: {source}", path = .path.display())]
    KvmOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("KVM API version {0} is not 12; this kernel's KVM is unsupported")]
    KvmApiVersion(i32),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING); use --dirty-log bitmap")]
    DirtyRingUnsupported,
    #[error("--dirty-log ring={entries}: this KVM allows at most {max_entries} entries per vCPU; choose a smaller power of two, or --dirty-log bitmap")]
    DirtyRingTooLarge { entries: u32, max_entries: u64 },
    #[error(transparent)]
    Memory(#[from] guest_mm::Error),
    #[error(transparent)]
    Numa(#[from] guest_mm::numa::SpecError),
    #[error(transparent)]
    Image(#[from] guest_image::Error),
    #[error("writing guest memory at {gpa:#x}: {what}")]
    GuestWrite { gpa: u64, what: String },
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("the fault path failed: {0}")]
    FaultPath(String),
    #[error("{failures} host-side mapping changes (zap or userfaultfd re-registration after a NUMA move) failed; guest memory may not be protected")]
    HostMapping { failures: u64 },
    #[error("live migration: {0}")]
    Migration(#[source] migration::Error),
    #[error(transparent)]
    Snapshot(#[from] migration::snapshot::SnapshotError),
    #[error(transparent)]
    Kernel(#[from] crate::boot::kernel::KernelError),
    #[error("the ACPI tables end at {end:#x}, beyond the area reserved for them (1 MiB); use fewer vCPUs or NUMA nodes")]
    AcpiTooLarge { end: u64 },
    #[error("the guest's TSC runs at {source_khz} kHz on the source; this host's KVM runs it at {here_khz} kHz and cannot scale it (migrate between hosts of the same TSC frequency)")]
    TscFrequency { source_khz: u32, here_khz: u32 },
    #[error("this host's KVM lacks CPUID features the guest was given: {0} (migrate to a host with the same CPU features)")]
    CpuidMismatch(String),
    #[error("KVM refused to restore MSR {index:#x}")]
    MsrRefused { index: u32 },
    #[error("restoring device state: {0}")]
    DeviceState(String),
    #[error("the migration's VM state is malformed: {0}")]
    VmState(#[source] serde_json::Error),
    #[error("the migration carries {arrived} vCPU states but this VM has {here} vCPUs (give the destination the same --vcpus)")]
    VcpuCount { here: usize, arrived: usize },
    #[error("the migration started a VM that was never restored")]
    NotRestored,
    #[error("the run ended while a migration still needed it")]
    ControllerGone,
    #[error("the guest has finished")]
    GuestFinished,
    #[error("the migration had not switched over after timeout_s = {}; cancelled (Cloud Hypervisor's Cancel strategy), the guest keeps running here", .0.as_secs())]
    MigrationTimeout(std::time::Duration),
    #[error("{signal} arrived before the guest did; nothing ran here")]
    Interrupted { signal: &'static str },
    #[error("--incoming: {0}")]
    Listen(#[source] migration::WireError),
    #[error("the arrived guest could not start: {0}")]
    GuestStart(String),
    #[error("vCPU {index}: {what}")]
    Vcpu { index: usize, what: String },
    #[error("vCPU {index} is running; its state can only be read while it is paused")]
    VcpuRunning { index: usize },
    #[error("vCPU {index} did not answer within {waited:?} (stuck in KVM_RUN?); the guest keeps running")]
    VcpuUnresponsive {
        index: usize,
        waited: std::time::Duration,
    },
    #[error("vCPU {index}'s thread has ended")]
    VcpuGone { index: usize },
    #[error("starting vCPU thread {index}: {source}")]
    Thread {
        index: usize,
        source: std::io::Error,
    },
    #[error("starting the thread that throttles the vCPUs (auto-converge): {source}; the migration goes on unthrottled only if asked again")]
    ThrottleThread { source: std::io::Error },
    #[error("the guest did not finish within the timeout of {0:?} (raise --timeout, or check the guest console)")]
    Timeout(std::time::Duration),
    #[error("installing the vCPU kick signal handler failed: {source}")]
    Signal {
        #[source]
        source: std::io::Error,
    },
    #[error("--api-socket {path}: the path exists; remove it or choose another", path = .0.display())]
    ApiSocketExists(PathBuf),
    #[error("the API at {path} answered something that is not HTTP: {what}", path = .path.display())]
    ApiAnswer { path: PathBuf, what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<migration::Error> for Error {
    /// A restore's failure comes back through the migration's destination path; it is a
    /// snapshot's error, not a live migration's.
    fn from(e: migration::Error) -> Error {
        match e {
            migration::Error::Snapshot(s) => Error::Snapshot(*s),
            e => Error::Migration(e),
        }
    }
}

/// A request that cannot be run as asked (flags or API fields); nothing was built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--vcpus {vcpus}: must be between 1 and {max} (the guest image's limit)")]
    VcpusOutOfRange { vcpus: usize, max: usize },
    #[error(
        "--memory {size}: must be a multiple of 2 MiB (the guest maps its RAM with 2 MiB pages)"
    )]
    MemoryNotMultipleOf2M { size: u64 },
    #[error("--memory {size} cannot be identity mapped by the guest image: at most {max_gib} GiB")]
    MemoryTooLargeForImage { size: u64, max_gib: u64 },
    #[error("--memory {size} leaves {pages} data pages for {vcpus} vCPUs; give each vCPU at least one page")]
    TooFewDataPages { size: u64, pages: u64, vcpus: usize },
    #[error("guest image segment at {start:#x}..{end:#x} does not fit below the data area; rebuild hugevisor")]
    ImageTooLarge { start: u64, end: u64 },
    #[error("guest command line longer than {max} bytes")]
    CmdlineTooLong { max: usize },
    #[error("--dirty-log ring={entries}: {why}")]
    DirtyRingEntries { entries: u32, why: &'static str },
    #[error("--dirty-log ring={entries}: KVM refused a ring of {bytes} bytes per vCPU; try a larger ring (e.g. ring=65536) or --dirty-log bitmap")]
    DirtyRingRefused { entries: u32, bytes: u64 },
    #[error("--inject-corruption needs the built-in image (its verify workload checks the page); this --kernel has no hugevisor mailbox")]
    CorruptionNeedsMailbox,
    #[error("KVM device path {path} contains NUL", path = .0.display())]
    NulInPath(PathBuf),
    #[error("--restore-mode lazy needs file-backed RAM (--backing shmem, hugetlb-2m or hugetlb-1g): pages are filled through a second view of it; restore anon RAM with --restore-mode copy")]
    LazyRestoreNeedsFileRam,
    #[error("--incoming {uri}: a tcp listener accepts anyone who reaches its port; give both ends --tls-cert/--tls-key/--tls-ca or --migration-key FILE, or pass --insecure to listen without authentication")]
    UnauthenticatedTcp { uri: String },
}

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
