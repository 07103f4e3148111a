//! Snapshots as the VMM sees them: what a snapshot is asked to be (where, what the guest
//! does next, how long the hot set is watched), opening one for a run (checked against
//! the run's guest before anything is built), and the restore thread — a migration
//! destination whose source is the snapshot directory (`migration::snapshot::restore`).
//! Taking one is the controller's (`controller/snapshot.rs`): it owns the vCPUs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use migration::snapshot::{RestoreMode, Snapshot, SnapshotError, Target};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::migration_host::DestinationEvent;
use crate::vstate::vm::Vm;
use guest_mm::GuestMemory;

/// How long the dirty log watches the guest before a snapshot, by default: the pages
/// written in that period are the hot set.
pub const DEFAULT_HOT_PERIOD: Duration = Duration::from_millis(200);

/// What the guest does once its snapshot is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// It runs on (Firecracker's `Resume` after `Paused` + snapshot).
    #[default]
    Resume,
    /// The run ends (the guest finishes its pass, as at `--duration`).
    Stop,
}

impl AfterSnapshot {
    pub fn name(self) -> &'static str {
        match self {
            AfterSnapshot::Resume => "resume",
            AfterSnapshot::Stop => "stop",
        }
    }
}

/// Not `resume` or `stop`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: after a snapshot the guest can resume or stop")]
pub struct AfterSnapshotParseError(pub String);

impl std::str::FromStr for AfterSnapshot {
    type Err = AfterSnapshotParseError;
    fn from_str(s: &str) -> std::result::Result<AfterSnapshot, AfterSnapshotParseError> {
        match s {
            "resume" => Ok(AfterSnapshot::Resume),
            "stop" => Ok(AfterSnapshot::Stop),
            other => Err(AfterSnapshotParseError(other.to_string())),
        }
    }
}

/// A snapshot to take (`vm.snapshot`'s body, `--snapshot-at`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The snapshot directory (created if missing; a snapshot there is replaced).
    pub to: PathBuf,
    pub then: AfterSnapshot,
    /// How long the dirty log watches the guest first (zero: no hot set).
    pub hot_period: Duration,
}

/// Why `vm.snapshot` wrote no snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotRefusal {
    #[error("the VM is {0}; only a running guest is snapshotted")]
    NotRunning(&'static str),
    #[error("a snapshot is being taken already")]
    AlreadySnapshotting,
    #[error("a migration is running; snapshot the guest before or after it")]
    Migrating,
    #[error("the guest finished before its snapshot was taken")]
    GuestFinished,
    #[error("the guest's memory is still arriving (post-copy or a lazy restore); snapshot it once vm.info says the incoming phase is complete")]
    MemoryArriving,
    #[error("taking the snapshot: {0}")]
    Failed(#[source] Error),
}

impl SnapshotRefusal {
    /// 409 for a VM in the wrong state; 500 for a snapshot that was tried and failed.
    pub fn status(&self) -> u16 {
        match self {
            SnapshotRefusal::Failed(_) | SnapshotRefusal::GuestFinished => 500,
            _ => 409,
        }
    }
}

/// Opens the snapshot in `dir` and checks it fits the run's guest (memory, backing,
/// vCPUs): every refusal is one line, before the host is touched.
pub fn open(dir: &Path, mode: RestoreMode, cfg: &RunConfig) -> Result<Snapshot> {
    if mode == RestoreMode::Lazy
        && cfg.ram.backing.view_layout() != guest_mm::ViewLayout::GuestAndStaging
    {
        return Err(crate::error::ConfigError::LazyRestoreNeedsFileRam.into());
    }
    let snap = Snapshot::open(dir)?;
    snap.check_target(&Target {
        memory_bytes: cfg.ram.size,
        page_size: cfg.ram.backing.page_size(),
        backing: cfg.ram.backing.name(),
        vcpus: cfg.vcpus,
    })?;
    Ok(snap)
}

/// Restores `snap` into the VM on a thread of its own; `controller` gets the guest's
/// arrival (start it) and, last, the end (every page in, or the error).
pub fn start_restoring(
    snap: Snapshot,
    mode: RestoreMode,
    memory: Arc<GuestMemory>,
    vm: Arc<Vm>,
    vcpus: u32,
    controller: impl Fn(DestinationEvent) + Send + Sync + 'static,
) -> Result<()> {
    let (host, tell) = crate::migration_host::destination(memory, vm, vcpus, controller);
    std::thread::Builder::new()
        .name("restore".into())
        .spawn(move || {
            let r = migration::snapshot::restore(&snap, mode, &host)
                .map_err(|e: SnapshotError| migration::Error::Snapshot(Box::new(e)));
            tell(DestinationEvent::Ended(r));
        })
        .map(drop)
        .map_err(|source| Error::Io {
            what: "starting the restore thread".into(),
            source,
        })
}
