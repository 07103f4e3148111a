//! The controller's answers to control-API calls: `vm.info` and `vm.counters` from a
//! snapshot of the run, `vm.pause`/`vm.resume` (the vCPUs stopped and run again in
//! place), the shutdowns, and the start of a migration at either end. Each runs on the
//! controller's thread, as every event does.

use std::sync::mpsc::Sender;

use super::{Controller, PauseCause, RunState};
use crate::api::{ApiCall, ReceiveMigration, ReceiveRefusal, StateRefusal};
use crate::config::Exposure;
use crate::status::{MigrationView, Snapshot};

/// What a shutdown call ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShutdownScope {
    /// `vm.shutdown`: the guest (and with it the run).
    Vm,
    /// `vmm.shutdown`: the VMM, guest or not.
    Vmm,
}

impl Controller<'_> {
    pub(super) fn on_api(&mut self, call: ApiCall) {
        match call {
            ApiCall::Info(reply) => {
                let _ = reply.send(crate::status::info(&self.snapshot()));
            }
            ApiCall::Counters(reply) => {
                let _ = reply.send(crate::status::counters(&self.snapshot()));
            }
            ApiCall::Pause(reply) => {
                let _ = reply.send(self.pause_for_api());
            }
            ApiCall::Resume(reply) => {
                let _ = reply.send(self.resume_for_api());
            }
            ApiCall::Shutdown(reply) => {
                let _ = reply.send(self.shutdown(ShutdownScope::Vm));
            }
            ApiCall::VmmShutdown(reply) => {
                let _ = reply.send(self.shutdown(ShutdownScope::Vmm));
            }
            ApiCall::Migrate(req, reply) => self.on_migrate(*req, reply),
            ApiCall::Receive(req, reply) => self.on_receive(req, reply),
            ApiCall::Snapshot(req, reply) => self.on_snapshot(req, Some(reply)),
        }
    }

    /// `vm.pause`: the vCPUs stop in place until `vm.resume`.
    fn pause_for_api(&mut self) -> std::result::Result<(), StateRefusal> {
        match self.state {
            RunState::Running => {}
            RunState::Migrating | RunState::Paused(PauseCause::SwitchOver) => {
                return Err(StateRefusal::Migrating)
            }
            RunState::Waiting => return Err(StateRefusal::NoGuest),
            RunState::Paused(PauseCause::Api) => return Err(StateRefusal::AlreadyPaused),
            s => return Err(StateRefusal::NotRunning(s.name())),
        }
        if let Some(v) = &self.vcpus {
            v.pause().map_err(|source| StateRefusal::Vcpus {
                what: "pausing",
                source,
            })?;
        }
        self.state = RunState::Paused(PauseCause::Api);
        Ok(())
    }

    /// `vm.resume`: the vCPUs `vm.pause` stopped run again, on the same threads.
    fn resume_for_api(&mut self) -> std::result::Result<(), StateRefusal> {
        if self.state != RunState::Paused(PauseCause::Api) {
            return Err(StateRefusal::NotPaused(self.state.name()));
        }
        if let Some(v) = &self.vcpus {
            v.resume().map_err(|source| StateRefusal::Vcpus {
                what: "resuming",
                source,
            })?;
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// `vm.shutdown` and `vmm.shutdown`: the run ends as `--duration` would; a VMM still
    /// waiting for a guest ends at once on `vmm.shutdown`.
    fn shutdown(&mut self, scope: ShutdownScope) -> std::result::Result<(), StateRefusal> {
        match (self.state, scope) {
            (RunState::Waiting, ShutdownScope::Vm) => return Err(StateRefusal::NoGuest),
            // The receiving thread cannot be interrupted before the guest runs here.
            (RunState::Receiving, ShutdownScope::Vmm) if self.vcpus.is_none() => {
                return Err(StateRefusal::Arriving)
            }
            _ => {}
        }
        self.request_shutdown();
        Ok(())
    }

    /// `vm.receive-migration`: a VMM waiting for a guest listens where it is told.
    fn on_receive(
        &mut self,
        req: ReceiveMigration,
        reply: Sender<std::result::Result<(), ReceiveRefusal>>,
    ) {
        if self.state != RunState::Waiting {
            let _ = reply.send(Err(ReceiveRefusal::NotWaiting(self.state.name())));
            return;
        }
        if matches!(req.receiver, migration::Uri::Tcp(_))
            && !self.cfg.migration_auth.is_some()
            && self.cfg.exposure == Exposure::AuthenticatedOnly
        {
            let _ = reply.send(Err(ReceiveRefusal::Unauthenticated(
                req.receiver.to_string(),
            )));
            return;
        }
        let started = migration::Listener::bind(&req.receiver)
            .map_err(ReceiveRefusal::Listen)
            .and_then(|l| self.receive_on(l).map_err(ReceiveRefusal::Start));
        match started {
            Ok(()) => self.receive_reply = Some(reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The run as it is now, for `vm.info` and `vm.counters`.
    pub(super) fn snapshot(&self) -> Snapshot<'_> {
        let mem = self.memory.staging();
        let state = if self.limits.stop_requested_at.is_some() || self.limits.shutdown_requested {
            RunState::Stopping
        } else {
            self.state
        };
        let migration = match (&self.outgoing, self.incoming_phase) {
            (Some(o), _) => Some(MigrationView::Source {
                mode: o.mode,
                destination: &o.destination,
                progress: o.progress.read(),
            }),
            (None, Some(phase)) => Some(MigrationView::Destination {
                mode: self.incoming.as_ref().map(|i| i.mode.as_str()),
                phase: phase.name(),
                refused_connections: self.refused_connections,
                lacking_pages: self.lacking_pages,
            }),
            (None, None) => None,
        };
        Snapshot {
            state,
            // Until a guest runs here, there is no workload to name.
            workload: (!matches!(self.state, RunState::Waiting | RunState::Receiving)).then_some(
                // A guest without a mailbox runs no workload of ours.
                if self.mailbox.is_present() {
                    self.workload.as_str()
                } else {
                    "kernel"
                },
            ),
            entry: &self.entry,
            console_bytes: self.console.bytes(),
            console_last: self.console.recent().pop(),
            cfg: self.cfg,
            memory: &self.memory,
            slots: (0..self.cfg.vcpus as usize)
                .map(|i| self.mailbox.slot(mem, i))
                .collect(),
            migration,
        }
    }
}
