//! What can be wrong with a snapshot, each naming the file and what to do.

use std::path::{Path, PathBuf};

use guest_mm::Gpa;

use crate::host::HostError;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: no such file (is the snapshot directory right? `hugevisor snapshot --to DIR` writes one)")]
    Missing { path: PathBuf },
    #[error("snapshot {path}: truncated: {what}; the snapshot was not written to its end — take it again")]
    Truncated { path: PathBuf, what: String },
    #[error("snapshot {path}: not a hugevisor snapshot state file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("snapshot {path}: format version {found}, this hugevisor reads version {ours}; restore it with the hugevisor that took it")]
    Version {
        path: PathBuf,
        found: u32,
        ours: u32,
    },
    #[error("snapshot {path}: checksum mismatch (expected {expected:#010x}, computed {computed:#010x}); the state file is corrupted")]
    Checksum {
        path: PathBuf,
        expected: u32,
        computed: u32,
    },
    #[error("snapshot {path}: malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("snapshot {path}: decoding the state: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding the snapshot state: {source}")]
    Encode {
        #[source]
        source: serde_json::Error,
    },
    #[error("snapshot {dir}: taken of a guest with {diffs}; restore it with the same --memory/--backing/--vcpus")]
    Layout { dir: PathBuf, diffs: String },
    #[error("snapshot {path}: the memory file is {found} bytes, the guest has {expected}; it was truncated or replaced — take the snapshot again")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("snapshot {path}: the page at GPA {gpa} does not match its checksum (expected {expected:#010x}, read {computed:#010x}): the memory file changed after the snapshot was taken; the page was not given to the guest")]
    PageChecksum {
        path: PathBuf,
        gpa: Gpa,
        expected: u32,
        computed: u32,
    },
    #[error("snapshot: guest memory differs after loading: CRC-32 {here:#010x}, the snapshot recorded {there:#010x}")]
    MemoryHash { here: u32, there: u32 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot: {what} failed: {source}")]
    Host {
        what: &'static str,
        #[source]
        source: HostError,
    },
    #[error("after the guest started (lazy restore): {source}")]
    AfterStart {
        #[source]
        source: Box<SnapshotError>,
    },
    #[error("lazy restore ended with {installed} of {absent} pages installed")]
    Incomplete { installed: u64, absent: u64 },
}

impl SnapshotError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> SnapshotError {
        SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn host(what: &'static str) -> impl FnOnce(HostError) -> SnapshotError {
        move |source| SnapshotError::Host { what, source }
    }
}
