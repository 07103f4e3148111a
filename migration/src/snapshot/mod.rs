//! Snapshots: a migration to a file, and restores from one (as in QEMU). A snapshot is a
//! directory of two files — `state` ([`format`]: versioned, checksummed; the VM state a
//! migration carries, the guest layout, a CRC-32 per backing page, the hot set) and
//! `memory` ([`memory_file`]: guest RAM at its own offsets, zero pages as holes).
//!
//! A restore is a migration destination whose source is the directory
//! ([`restore`]): `copy` writes every page in before the guest starts (pre-copy's
//! receive), `lazy` starts the guest at once with every page absent and serves them from
//! the file through the same `Pager` seam post-copy uses — a vCPU's fault becomes a
//! request to the file instead of to the source, and a filler installs the hot set
//! first, then every other page, as post-copy's push would.

pub mod error;
pub mod format;
pub mod memory_file;
mod restore;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use error::SnapshotError;
pub use format::{SnapshotState, FORMAT_VERSION, MEMORY_FILE, STATE_FILE};
pub use memory_file::MemoryFile;
pub use restore::restore;

use crate::host::{GuestPages, VmState};
use crate::PageBitmap;

/// How a restore brings guest RAM in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Every page is loaded (and the memory hash checked) before the guest starts.
    Copy,
    /// The guest starts at once; pages come from the file on a fault, the rest in the
    /// background, the hot set first.
    Lazy,
}

impl RestoreMode {
    pub fn name(self) -> &'static str {
        match self {
            RestoreMode::Copy => "copy",
            RestoreMode::Lazy => "lazy",
        }
    }
}

impl std::str::FromStr for RestoreMode {
    type Err = crate::ParseError;
    fn from_str(s: &str) -> Result<RestoreMode, crate::ParseError> {
        match s {
            "copy" => Ok(RestoreMode::Copy),
            "lazy" => Ok(RestoreMode::Lazy),
            other => Err(crate::ParseError::RestoreMode(other.to_string())),
        }
    }
}

/// The pages the guest wrote in the last period before the snapshot.
pub struct HotSet {
    /// One bit per backing page.
    pub pages: PageBitmap,
    pub period_ms: u64,
}

/// What taking a snapshot did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub to: String,
    pub memory_bytes: u64,
    pub page_size: u64,
    /// Pages written to the memory file (the others are holes).
    pub data_pages: u64,
    pub hot_pages: u64,
    pub memory_hash: u32,
    /// Writing both files (the guest is paused meanwhile).
    pub write_ms: f64,
}

/// Writes a snapshot of `pages` and `vm` into `dir` (created if missing). The guest must
/// not run meanwhile. The old state file goes first and the new one is renamed into
/// place last, so a snapshot cut short never pairs a state file with another memory.
pub fn save(
    dir: &Path,
    pages: &dyn GuestPages,
    vcpus: u32,
    vm: VmState,
    hot: HotSet,
) -> Result<SnapshotReport, SnapshotError> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| SnapshotError::io("creating", dir, e))?;
    let state_path = dir.join(STATE_FILE);
    match std::fs::remove_file(&state_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::io("removing", &state_path, e))
        }
        _ => {}
    }
    let written = memory_file::write_memory(pages, &dir.join(MEMORY_FILE))?;
    let state = SnapshotState {
        memory_bytes: pages.size(),
        page_size: pages.page_size(),
        backing: pages.backing(),
        vcpus,
        page_crcs: written.page_crcs,
        memory_hash: written.memory_hash,
        data_pages: written.data_pages,
        hot_set: format::ranges_of(&hot.pages),
        hot_period_ms: hot.period_ms,
        vm,
    };
    format::write_state(&state_path, &state)?;
    Ok(SnapshotReport {
        to: dir.display().to_string(),
        memory_bytes: state.memory_bytes,
        page_size: state.page_size,
        data_pages: state.data_pages,
        hot_pages: state.hot_pages(),
        memory_hash: state.memory_hash,
        write_ms: t0.elapsed().as_secs_f64() * 1000.0,
    })
}

/// A snapshot opened for a restore: both files checked against each other.
pub struct Snapshot {
    pub dir: PathBuf,
    pub state: SnapshotState,
    pub memory: MemoryFile,
}

/// The guest a snapshot is restored into.
pub struct Target<'a> {
    pub memory_bytes: u64,
    pub page_size: u64,
    pub backing: &'a str,
    pub vcpus: u32,
}

impl Snapshot {
    /// Opens the snapshot in `dir`: the state file's header, checksum and body, then the
    /// memory file's size and holes.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        if !dir.is_dir() {
            return Err(SnapshotError::Missing {
                path: dir.to_path_buf(),
            });
        }
        let state = format::read_state(&dir.join(STATE_FILE))?;
        let memory = MemoryFile::open(&dir.join(MEMORY_FILE), &state)?;
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            state,
            memory,
        })
    }

    /// Refuses a guest of another layout, naming every difference.
    pub fn check_target(&self, t: &Target<'_>) -> Result<(), SnapshotError> {
        let s = &self.state;
        let mut diffs = Vec::new();
        if s.memory_bytes != t.memory_bytes {
            diffs.push(format!(
                "memory {} bytes (restoring into {})",
                s.memory_bytes, t.memory_bytes
            ));
        }
        if s.backing != t.backing {
            diffs.push(format!(
                "backing {} (restoring into {})",
                s.backing, t.backing
            ));
        }
        if s.page_size != t.page_size && s.backing == t.backing {
            diffs.push(format!(
                "backing pages of {:#x} (restoring into {:#x})",
                s.page_size, t.page_size
            ));
        }
        if s.vcpus != t.vcpus {
            diffs.push(format!("{} vCPUs (restoring into {})", s.vcpus, t.vcpus));
        }
        if diffs.is_empty() {
            return Ok(());
        }
        Err(SnapshotError::Layout {
            dir: self.dir.clone(),
            diffs: diffs.join(", "),
        })
    }
}
