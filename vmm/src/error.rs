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
    Config(String),
    #[error("vCPU {index}: {what}")]
    Vcpu { index: usize, what: String },
    #[error("starting vCPU thread {index}: {source}")]
    Thread {
        index: usize,
        source: std::io::Error,
    },
    #[error("the guest did not finish within the timeout of {0:?} (raise --timeout, or check the guest console)")]
    Timeout(std::time::Duration),
    #[error("signal set-up failed: {0}")]
    Signal(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
