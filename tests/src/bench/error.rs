//! What can stop a benchmark. A failure inside one measured case (one migration, one
//! backing) is not an error of the bench: it becomes that row's `error` and the bench goes
//! on; these are the failures that leave nothing to report.

use std::path::PathBuf;

use crate::api::ApiError;

use super::qemu::QemuError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{path} not found: build it first (`cargo build --release -p vmm`) or name one with --hugevisor PATH")]
    HugevisorMissing { path: PathBuf },
    #[error("finding this program's own path (hugevisor is looked for next to it): {0}; name the binary with --hugevisor PATH")]
    OwnPath(#[source] std::io::Error),
    #[error("spawning {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {message}")]
    ChildFailed { what: String, message: String },
    #[error("{what} printed no JSON report: {source}")]
    ChildJson {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rendering the locality plot: {0}")]
    Plot(#[source] png::EncodingError),
    #[error(
        "a host baseline (raw userfaultfd, populating a backing): {0} (run `hugevisor caps` to see what this host offers)"
    )]
    BaselineRam(#[source] guest_mm::Error),
    #[error("loopback TCP baseline: {what}: {source}")]
    Loopback {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the {0} thread of the bench panicked")]
    ThreadPanicked(&'static str),
    #[error("control API: {0}")]
    Api(#[from] ApiError),
    #[error("QEMU baseline: {0}")]
    Qemu(#[from] QemuError),
}

impl BenchError {
    /// The text a result row carries in its `error` field: a failed child's own last
    /// line of stderr (it names the problem and the fix), else this error.
    pub fn row_message(&self) -> String {
        match self {
            BenchError::ChildFailed { message, .. } => message.clone(),
            e => e.to_string(),
        }
    }
}
