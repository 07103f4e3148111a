//! The run controller's side of live migration: `vm.send-migration` (a new migration, or the
//! resume of one paused after the hand-over), the source's pause and resume in place and
//! its migration's end, and a destination's guest arriving, pausing while its post-copy
//! waits for the source, and its migration's end. The events reach these from
//! [`Controller::handle`]; the state they change is the controller's.

use std::sync::Arc;
use std::time::Duration;

use guest_image::clock::monotonic_ns;
use migration::{GuestAt, IncomingReport, MigrationReport, Paused, VmState};

use super::{Controller, Event, IncomingPhase, MigrateReply, Outgoing, PauseCause, RunState};
use crate::api::{MigrateRefusal, ReceiveRefusal, SendMigration};
use crate::config::RunLimit;
use crate::error::{Error, Result};
use crate::mailbox::Mailbox;
use crate::migration_host::{Arrival, MigratedState, RunInfo, Sending};
use crate::progress::Tracker;

impl Controller<'_> {
    /// `vm.send-migration` (and `vm.migrate`): a new migration of the running guest, or
    /// the resume of a postcopy-paused one (to the request's destination).
    pub(super) fn on_migrate(&mut self, req: SendMigration, reply: MigrateReply) {
        if req.request.action == migration::Action::Resume {
            let waiting = self
                .outgoing
                .as_mut()
                .and_then(|o| o.resume.take().map(|r| (o, r)));
            match waiting {
                Some((o, resume)) if self.state == RunState::PostcopyPaused => {
                    o.destination = req.request.to.clone();
                    let _ = resume.send(Some(req.request.to));
                    o.replies.push(reply);
                    self.state = RunState::Paused(PauseCause::SwitchOver);
                }
                _ => {
                    let _ = reply.send(Err(MigrateRefusal::NothingToResume(self.state.name())));
                }
            }
            return;
        }
        if self.state != RunState::Running {
            let why = match self.state {
                RunState::Migrating
                | RunState::Paused(PauseCause::SwitchOver)
                | RunState::PostcopyPaused => MigrateRefusal::AlreadyMigrating,
                s => MigrateRefusal::NotRunning(s.name()),
            };
            let _ = reply.send(Err(why));
            return;
        }
        // A post-copy destination (or a lazy restore) whose pages are still arriving
        // would send the absent ones as the page cache's zeros.
        if self.memory_arriving() {
            let _ = reply.send(Err(MigrateRefusal::MemoryArriving));
            return;
        }
        let tx = self.events_tx.clone();
        let progress = Arc::new(Tracker::new());
        let (mode, destination) = (req.request.mode, req.request.to.clone());
        let spawned = crate::migration_host::start_sending(
            self.memory.clone(),
            self.vm.clone(),
            self.cfg.vcpus,
            Sending {
                request: req.request,
                timeout: req.timeout,
                options: migration::source::Options {
                    timeouts: migration::Timeouts::default(),
                    auth: self.cfg.migration_auth.clone(),
                },
                progress: progress.clone(),
            },
            move |r| {
                let _ = tx.send(Event::Source(r));
            },
        );
        match spawned {
            Ok(()) => {
                self.state = RunState::Migrating;
                self.outgoing = Some(Outgoing {
                    replies: vec![reply],
                    max_pass_at_pause: Vec::new(),
                    resume: None,
                    mode,
                    destination,
                    progress,
                });
            }
            Err(e) => {
                let _ = reply.send(Err(MigrateRefusal::Start(e)));
            }
        }
    }

    /// A migration source's switch-over: the vCPUs stop in place, their state and the
    /// run's info go to the destination.
    pub(super) fn pause_for_migration(&mut self) -> Result<Paused> {
        let (Some(vcpus), Some(out)) = (&self.vcpus, self.outgoing.as_mut()) else {
            return Err(Error::GuestFinished);
        };
        if self.limits.timed_out || self.ended.iter().all(Option::is_some) {
            return Err(Error::GuestFinished);
        }
        // Stopped in place: a failed migration resumes the same threads.
        vcpus.pause()?;
        let states = vcpus.save_states().inspect_err(|_| drop(vcpus.resume()))?;
        let mem = self.memory.staging();
        let n = self.cfg.vcpus as usize;
        let slots: Vec<_> = (0..n).map(|i| self.mailbox.slot(mem, i)).collect();
        let run = RunInfo {
            workload: self.workload.clone(),
            elapsed_ns: self.source_elapsed_ns + (monotonic_ns() - self.launch_ns),
            duration_ns: self.limits.duration.map(|d| d.as_nanos() as u64),
            max_pass_cycles: slots.iter().map(|s| s.max_pass_cycles).collect(),
            passes: slots.iter().map(|s| s.passes).sum(),
            mailbox: self.mailbox.base(),
            entry: self.entry.clone(),
        };
        // The pass that spans the switch-over is measured from here: clear each worst
        // pass (restored if the migration fails).
        out.max_pass_at_pause = run.max_pass_cycles.clone();
        for i in 0..n {
            self.mailbox.reset_max_pass(mem, i);
        }
        let state = MigratedState::capture(&self.vm, states, run)
            .and_then(|s| serde_json::to_value(s).map_err(Error::VmState))
            .inspect_err(|_| drop(vcpus.resume()))?;
        self.state = RunState::Paused(PauseCause::SwitchOver);
        let mailbox = self.mailbox.gpa_range(n);
        Ok(Paused {
            state: VmState(state),
            vmm_written: vec![guest_mm::GpaRange::new(
                guest_mm::Gpa(mailbox.start),
                guest_mm::Gpa(mailbox.end),
            )],
        })
    }

    /// The migration failed after the pause: the guest runs here again, on the same
    /// threads, with the worst passes it had.
    pub(super) fn resume_after_failed_migration(&mut self) -> Result<()> {
        if self.state != RunState::Paused(PauseCause::SwitchOver) {
            return Ok(());
        }
        let mem = self.memory.staging();
        let before = self
            .outgoing
            .as_ref()
            .map(|o| o.max_pass_at_pause.clone())
            .unwrap_or_default();
        for (i, &before) in before.iter().enumerate() {
            let now = self.mailbox.slot(mem, i).max_pass_cycles;
            self.mailbox.set_max_pass(mem, i, now.max(before));
        }
        if let Some(v) = &self.vcpus {
            v.resume()?;
        }
        self.state = RunState::Migrating;
        Ok(())
    }

    pub(super) fn on_migration_done(
        &mut self,
        result: std::result::Result<MigrationReport, migration::Error>,
    ) {
        let out = self.outgoing.take();
        // The call waiting: the first, or the resume (a pause answered the ones before).
        let reply = |answer: std::result::Result<MigrationReport, MigrateRefusal>| {
            if let Some(r) = out.as_ref().and_then(|o| o.replies.last()) {
                let _ = r.send(answer);
            }
        };
        match result {
            Ok(mut report) => {
                report.dirty_log = self.vm.dirty_log_method().name().to_string();
                (report.dirty_log_takes, report.dirty_log_ms) = self.vm.dirty_log_cost();
                if report.budget_met == Some(false) {
                    eprintln!(
                        "hugevisor: warning: the migration's downtime ({:.1} ms) exceeded its budget of {:.0} ms (rounds ended by {}, {:.1} ms expected): raise --downtime-ms, or migrate with --mode auto",
                        report.downtime_ms,
                        report.downtime_budget_ms,
                        report.converged_by.name(),
                        report.expected_downtime_ms
                    );
                }
                reply(Ok(report.clone()));
                self.migrated = Some(report);
                self.state = RunState::Migrated;
            }
            Err(e) => {
                self.migration_failures.push(e.to_string());
                let guest_at = e.guest_at();
                let e = match guest_at {
                    GuestAt::PausedOnSource => {
                        // The run fails with the error itself; the client hears that.
                        reply(Err(MigrateRefusal::Unresumed));
                        self.fatal = Some(Error::Migration(e));
                        return;
                    }
                    _ => e,
                };
                reply(Err(MigrateRefusal::Failed(e)));
                match guest_at {
                    // It never left, or it was resumed here.
                    GuestAt::Source => {
                        if matches!(
                            self.state,
                            RunState::Paused(PauseCause::SwitchOver) | RunState::Migrating
                        ) {
                            self.state = RunState::Running;
                        }
                    }
                    // The destination runs it: this copy must never run again.
                    GuestAt::Destination => {
                        self.handed_over = true;
                        self.state = RunState::Migrated;
                    }
                    GuestAt::PausedOnSource => {}
                }
            }
        }
    }

    /// A destination's guest is here: run it (the end of the downtime).
    pub(super) fn on_arrival(&mut self, arrival: Arrival) {
        let restored = matches!(self.cfg.guest, crate::config::GuestSource::Restore { .. });
        // A restore is a new run of the guest: its --duration counts from here.
        self.source_elapsed_ns = if restored { 0 } else { arrival.run.elapsed_ns };
        self.workload = arrival.run.workload.clone();
        if self.cfg.limit == RunLimit::FromSource {
            self.limits.duration = arrival.run.duration_ns.map(Duration::from_nanos);
        }
        // The guest says where its mailbox is (a guest hugevisor did not build has none).
        self.mailbox = arrival.run.mailbox.map_or_else(Mailbox::none, Mailbox::new);
        let how = if restored {
            "restored from a snapshot"
        } else {
            "arrived by migration"
        };
        self.entry = format!("{} ({how})", arrival.run.entry);
        self.receiving_on = None;
        let answer = self
            .start_guest(arrival.vcpus)
            .map_err(|e| Error::GuestStart(e.to_string()));
        if answer.is_ok() {
            self.incoming_phase = Some(if arrival.postcopy {
                IncomingPhase::Postcopy
            } else {
                IncomingPhase::Completing
            });
        }
        self.arrived = Some(arrival.run);
        let _ = arrival.started.send(answer);
    }

    /// A destination's post-copy broke: its vCPUs stop in place until the source is back
    /// (a vCPU that touched an absent page would only wait for it, or spin on it).
    pub(super) fn on_incoming_paused(&mut self, why: &str, lacking: u64) {
        eprintln!("hugevisor: warning: the migration's connection broke after the hand-over ({why}); {lacking} pages still lacking; waiting for the source to resume");
        self.lacking_pages = Some(lacking);
        // Pre-copy: the guest has all it needs (or has not started); it runs on.
        if lacking == 0 || self.state == RunState::PostcopyPaused {
            return;
        }
        self.paused_from = Some(self.state);
        self.state = RunState::PostcopyPaused;
        if let Some(v) = &self.vcpus {
            if let Err(e) = v.pause() {
                eprintln!("hugevisor: warning: pausing the vCPUs while post-copy waits: {e}");
            }
        }
    }

    pub(super) fn on_incoming_resumed(&mut self) {
        self.lacking_pages = None;
        let Some(from) = self.paused_from.take() else {
            return;
        };
        if let Some(v) = &self.vcpus {
            if let Err(e) = v.resume() {
                eprintln!("hugevisor: warning: resuming the vCPUs after post-copy resumed: {e}");
            }
        }
        self.state = from;
    }

    /// A guest that will never get its missing pages: the vCPUs waiting for one are let
    /// go so that they can stop (see `GuestMemory::abandon_postcopy`).
    pub(super) fn release_blocked_vcpus(&self) {
        if let Err(e) = self.memory.abandon_postcopy() {
            eprintln!("hugevisor: warning: releasing the vCPUs waiting for pages: {e}");
        }
    }

    pub(super) fn on_incoming_end(
        &mut self,
        result: std::result::Result<IncomingReport, migration::Error>,
    ) -> Result<()> {
        let phase = self.incoming_phase.replace(IncomingPhase::Complete);
        // vm.receive-migration hears how it ended: received, or the error the run ends with.
        let receive_reply = self.receive_reply.take();
        let answer = |a| {
            if let Some(r) = &receive_reply {
                let _ = r.send(a);
            }
        };
        match &result {
            Ok(_) => answer(Ok(())),
            Err(e) if self.vcpus.is_none() || phase != Some(IncomingPhase::Completing) => {
                answer(Err(ReceiveRefusal::Failed(e.to_string())))
            }
            // Pre-copy: every page is here; only the source's last word is missing.
            Err(_) => answer(Ok(())),
        }
        let mut report = match result {
            Ok(report) => report,
            // Before the guest started here: nothing runs; the run fails now.
            Err(e) if self.vcpus.is_none() => return Err(e.into()),
            // Pre-copy: the guest has all its memory, only the source's last word went
            // missing; it runs on.
            Err(e) if phase == Some(IncomingPhase::Completing) => {
                eprintln!(
                    "hugevisor: warning: the source did not complete the hand-over cleanly: {e}"
                );
                return Ok(());
            }
            // A lazy restore that cannot serve a page (the snapshot changed): no page will
            // come, so the vCPUs waiting for one cannot finish their pass; the run ends
            // now (the vCPUs are kicked), naming the page.
            // The vCPUs blocked on pages are released when they are stopped (the guest is
            // discarded: `abandoned`).
            Err(e) if matches!(self.cfg.guest, crate::config::GuestSource::Restore { .. }) => {
                self.abandoned = true;
                self.fatal = Some(e.into());
                return Ok(());
            }
            // Post-copy: pages are missing. Stop the guest, fail the run at its end.
            Err(e) => {
                self.abandoned = true;
                self.fatal = Some(e.into());
                self.request_stop(monotonic_ns());
                return Ok(());
            }
        };
        if let Some(run) = &self.arrived {
            report.source_elapsed_ms = run.elapsed_ns as f64 / 1e6;
            report.passes_at_switch = run.passes;
        }
        self.incoming = Some(report);
        Ok(())
    }
}
