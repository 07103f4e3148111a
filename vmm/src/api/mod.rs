//! The control API: HTTP/1.1 + JSON over a unix socket (mode 0600), in Cloud
//! Hypervisor's shape — its paths, methods, bodies and status codes where the operation
//! exists in hugevisor — so that tooling written for it (`ch-remote`, scripts,
//! dashboards) drives hugevisor too. `docs/api.yaml` is the OpenAPI document of every
//! route; [`routes::ROUTES`] is what is served, and a test keeps the two equal.
//!
//! - [`http`]: one bounded request per connection, read against a deadline.
//! - [`server`]: the listener and the connection threads.
//! - [`routes`]: which path and method is which call, and what is answered.
//! - [`body`]: the request bodies, checked field by field.
//! - [`client`]: the client `hugevisor migrate` uses.
//!
//! Every call becomes an [`ApiCall`] to the run's controller, which owns the run's state
//! and answers on the channel the call carries.

pub mod body;
pub mod client;
pub mod http;
pub mod routes;
pub mod server;

use std::sync::mpsc::Sender;

pub use body::{ReceiveMigration, SendMigration};
pub use client::call;
pub use server::ApiServer;

use crate::error::Error;

/// A request the API hands to the run's controller, with where to answer.
pub enum ApiCall {
    /// `vm.info`: the run's state and guest memory's, as JSON.
    Info(Sender<serde_json::Value>),
    /// `vm.counters`: the integer counters, grouped.
    Counters(Sender<serde_json::Value>),
    /// `vm.pause`: stop the vCPUs in place.
    Pause(Sender<Result<(), StateRefusal>>),
    /// `vm.resume`: run the vCPUs `vm.pause` stopped.
    Resume(Sender<Result<(), StateRefusal>>),
    /// `vm.shutdown`: end the run as `--duration` would: the guest finishes its pass, the
    /// report follows.
    Shutdown(Sender<Result<(), StateRefusal>>),
    /// `vmm.shutdown`: end the VMM — as `vm.shutdown` when a guest runs, at once when
    /// none does yet.
    VmmShutdown(Sender<Result<(), StateRefusal>>),
    /// `vm.send-migration` / `vm.migrate`: answered when the migration has ended.
    Migrate(
        Box<SendMigration>,
        Sender<Result<migration::MigrationReport, MigrateRefusal>>,
    ),
    /// `vm.receive-migration`: answered when the guest has arrived, every page of it.
    Receive(ReceiveMigration, Sender<Result<(), ReceiveRefusal>>),
    /// `vm.snapshot`: answered when the snapshot is written (and the guest resumed or
    /// stopping).
    Snapshot(
        crate::snapshot::SnapshotRequest,
        Sender<Result<migration::snapshot::SnapshotReport, crate::snapshot::SnapshotRefusal>>,
    ),
}

/// Why a pause, resume or shutdown was not done (409 unless the vCPUs failed).
#[derive(Debug, thiserror::Error)]
pub enum StateRefusal {
    #[error("the VM is {0}; only a running guest pauses")]
    NotRunning(&'static str),
    #[error("the VM is paused already (vm.resume runs it again)")]
    AlreadyPaused,
    #[error("the VM is {0}, not paused: vm.resume resumes what vm.pause paused")]
    NotPaused(&'static str),
    #[error("a migration is running; it pauses the guest itself for its switch-over")]
    Migrating,
    #[error("no guest runs here: this VMM waits for vm.receive-migration (vmm.shutdown ends it)")]
    NoGuest,
    #[error("the guest is arriving from a migration source and cannot be stopped until it runs here; wait until vm.info says Running")]
    Arriving,
    #[error("{what} the vCPUs: {source}")]
    Vcpus {
        what: &'static str,
        #[source]
        source: Error,
    },
}

impl StateRefusal {
    pub fn status(&self) -> u16 {
        match self {
            StateRefusal::Vcpus { .. } => 500,
            _ => 409,
        }
    }
}

/// Why `vm.send-migration` did not hand the guest over.
#[derive(Debug, thiserror::Error)]
pub enum MigrateRefusal {
    #[error("a migration is already running")]
    AlreadyMigrating,
    #[error("the VM is {0}; only a running guest migrates")]
    NotRunning(&'static str),
    #[error("the guest finished before the migration could complete")]
    GuestFinished,
    #[error("starting the migration: {0}")]
    Start(#[source] Error),
    #[error(transparent)]
    Failed(#[from] migration::Error),
    #[error("the migration failed after pausing the guest and could not resume it: the guest runs nowhere, and the source's run ends with the error")]
    Unresumed,
    #[error("the guest's memory is still arriving (a post-copy migration or a lazy restore fills it): migrate it once every page is in (vm.info: memory.accounting.absent_bytes = 0)")]
    MemoryArriving,
    #[error("no migration to resume: the VM is {0} (only a postcopy-paused migration resumes)")]
    NothingToResume(&'static str),
    #[error("the migration is paused after the hand-over ({0}): the guest is the destination's and stays stopped here; resume it with `hugevisor migrate --resume --to URI`")]
    Paused(String),
}

impl MigrateRefusal {
    /// 409 for a VM in the wrong state; 500 for a migration that was tried and failed.
    pub fn status(&self) -> u16 {
        match self {
            MigrateRefusal::AlreadyMigrating
            | MigrateRefusal::NotRunning(_)
            | MigrateRefusal::NothingToResume(_)
            | MigrateRefusal::MemoryArriving
            | MigrateRefusal::Paused(_) => 409,
            _ => 500,
        }
    }
}

/// Why `vm.receive-migration` did not receive a guest.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveRefusal {
    #[error("the VM is {0}: only a VMM started without a guest (`run --api-socket` with no --workload and no --incoming) receives one")]
    NotWaiting(&'static str),
    #[error("receiver_url: {0}")]
    Listen(#[source] migration::WireError),
    #[error("receiver_url {0}: a tcp listener takes migrations only with authentication; start this VMM with --migration-key FILE or --tls-cert/--tls-key/--tls-ca (or --insecure to accept anyone who reaches the port)")]
    Unauthenticated(String),
    #[error("starting to receive: {0}")]
    Start(#[source] Error),
    /// The migration's own error ends the run; the client hears its message.
    #[error("the migration failed: {0}")]
    Failed(String),
}

impl ReceiveRefusal {
    pub fn status(&self) -> u16 {
        match self {
            ReceiveRefusal::NotWaiting(_) => 409,
            ReceiveRefusal::Listen(_) | ReceiveRefusal::Unauthenticated(_) => 400,
            _ => 500,
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        matches!(self, ReceiveRefusal::Listen(_)).then_some("receiver_url")
    }
}
