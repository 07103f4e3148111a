//! Errors of guest-mm. Each names the problem and what to do about it.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid size {text:?}: {why} (write e.g. 512M, 1G, 2048K or a byte count)")]
    BadSize { text: String, why: &'static str },
    #[error("unknown backing {0:?}; choose one of: shmem, hugetlb-2m, hugetlb-1g, anon")]
    UnknownBacking(String),
    #[error("guest memory of {size} is not a multiple of the {backing} page size ({page}); use {nearest}")]
    Unaligned {
        size: String,
        backing: String,
        page: String,
        /// The nearest valid sizes, e.g. "16 MiB or 18 MiB".
        nearest: String,
    },
    #[error("guest memory of {size} is too small: at least {min} is needed (the guest image and its tables take the first 4 MiB)")]
    TooSmall { size: String, min: String },
    #[error("guest memory of {size} is too large: at most {max} (the guest image's page tables map up to {max})")]
    TooLarge { size: String, max: String },
    #[error("guest memory of {size} exceeds the host's available memory ({available} MemAvailable); ask for less")]
    NotEnoughMemory { size: String, available: String },
    #[error("this host has no {page} hugetlb pool ({dir} does not exist); use another backing or boot with hugepagesz={page_arg}")]
    NoHugetlbPool {
        page: String,
        dir: String,
        page_arg: String,
    },
    #[error("the {page} hugetlb pool has {free} free pages but {needed} are needed; reserve them with `echo {total} > {dir}/nr_hugepages` (as root)")]
    HugetlbPoolTooSmall {
        page: String,
        free: u64,
        needed: u64,
        total: u64,
        dir: String,
    },
    #[error("--thp applies to the anon backing only; {backing} is {why}")]
    ThpNotApplicable { backing: String, why: &'static str },
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("NUMA: {0}")]
    Numa(String),
    #[error("vm-memory: {0}")]
    VmMemory(String),
}

pub(crate) fn os(op: &'static str) -> Error {
    Error::Os {
        op,
        source: std::io::Error::last_os_error(),
    }
}
