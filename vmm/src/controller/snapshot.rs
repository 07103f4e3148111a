//! The controller's snapshots (`vm.snapshot`, `--snapshot-at`): watch the dirty log for
//! the hot-set period while the guest runs, then pause the vCPUs in place, capture the
//! whole VM state as a migration's switch-over would, write both files, and resume or
//! stop the guest. A guest `vm.pause` stopped (Cloud Hypervisor's order: pause, snapshot,
//! resume) is written at once, with no hot set (a paused guest writes nothing), and stays
//! paused unless `then` is stop. The writing runs on the controller's thread: the guest is paused for
//! it anyway, and no other call may change the run meanwhile.

use migration::snapshot::{HotSet, SnapshotReport};
use migration::{PageBitmap, VmState};
use std::sync::mpsc::Sender;

use super::{Controller, IncomingPhase, PauseCause, RunState};
use crate::error::{Error, Result};
use crate::migration_host::{MigratedState, RunInfo};
use crate::snapshot::{AfterSnapshot, SnapshotRefusal, SnapshotRequest};
use crate::vstate::vm::DirtyLogging;
use guest_image::clock::monotonic_ns;

/// Where the answer to a snapshot goes (none for `--snapshot-at`).
pub(super) type SnapshotReply =
    Option<Sender<std::result::Result<SnapshotReport, SnapshotRefusal>>>;

/// A snapshot asked for, waiting for its hot-set period to pass.
pub(super) struct PendingSnapshot {
    request: SnapshotRequest,
    reply: SnapshotReply,
    /// When to pause and write.
    due_ns: u64,
    /// Whether dirty logging was turned on for the hot set.
    logging: bool,
}

impl Controller<'_> {
    /// A snapshot is asked for: start watching the hot set, or refuse.
    pub(super) fn on_snapshot(&mut self, request: SnapshotRequest, reply: SnapshotReply) {
        let refusal = match self.state {
            _ if self.snapshot.is_some() => Some(SnapshotRefusal::AlreadySnapshotting),
            // Absent pages read as whatever the page cache holds: never snapshot them.
            _ if self.memory_arriving() => Some(SnapshotRefusal::MemoryArriving),
            RunState::Running | RunState::Paused(PauseCause::Api) => None,
            RunState::Migrating | RunState::Paused(PauseCause::SwitchOver) => {
                Some(SnapshotRefusal::Migrating)
            }
            s => Some(SnapshotRefusal::NotRunning(s.name())),
        };
        if let Some(why) = refusal {
            if let Some(r) = reply {
                let _ = r.send(Err(why));
            }
            return;
        }
        let paused = self.state == RunState::Paused(PauseCause::Api);
        let logging = !request.hot_period.is_zero() && !paused;
        if logging {
            let slot = self.memory.memslot();
            // The first take clears what was logged before: the hot set starts now.
            let on = self
                .vm
                .set_dirty_logging(slot, DirtyLogging::On)
                .and_then(|()| self.vm.take_dirty_log(slot).map(drop));
            if let Err(e) = on {
                self.stop_hot_log();
                if let Some(r) = reply {
                    let _ = r.send(Err(SnapshotRefusal::Failed(e)));
                }
                return;
            }
        }
        let watch = if logging {
            request.hot_period
        } else {
            Default::default()
        };
        self.snapshot = Some(PendingSnapshot {
            due_ns: monotonic_ns() + watch.as_nanos() as u64,
            request,
            reply,
            logging,
        });
    }

    /// Between events: `--snapshot-at` when its time comes, a pending snapshot when its
    /// hot-set period is over.
    pub(super) fn poll_snapshot(&mut self, now: u64) -> Result<()> {
        if let Some(at) = self
            .cfg
            .snapshot_at
            .as_ref()
            .filter(|_| !self.snapshot_at_taken)
        {
            // A lazily restored guest is snapshotted once every page is in.
            if self.state == RunState::Running
                && !self.memory_arriving()
                && now >= self.launch_ns + at.after.as_nanos() as u64
            {
                self.snapshot_at_taken = true;
                let request = at.request.clone();
                self.on_snapshot(request, None);
            }
        }
        if self.snapshot.as_ref().is_none_or(|p| now < p.due_ns) {
            return Ok(());
        }
        let Some(p) = self.snapshot.take() else {
            return Ok(());
        };
        let result = match self.state {
            RunState::Running | RunState::Paused(PauseCause::Api) => self.take_snapshot(&p),
            _ => Err(SnapshotRefusal::GuestFinished),
        };
        if p.logging {
            self.stop_hot_log();
        }
        match (p.reply, result) {
            (Some(r), result) => {
                let _ = r.send(result);
            }
            // --snapshot-at: a snapshot the run was asked for and could not take fails it.
            (None, Err(SnapshotRefusal::Failed(e))) => return Err(e),
            (None, Err(e)) => eprintln!("hugevisor: warning: --snapshot-at: {e}"),
            (None, Ok(r)) => eprintln!(
                "hugevisor: snapshot written to {} ({} data pages, {} hot, {:.0} ms)",
                r.to, r.data_pages, r.hot_pages, r.write_ms
            ),
        }
        Ok(())
    }

    /// Whether pages are still absent here (a post-copy destination, a lazy restore).
    pub(super) fn memory_arriving(&self) -> bool {
        matches!(
            self.incoming_phase,
            Some(IncomingPhase::Receiving | IncomingPhase::Postcopy)
        )
    }

    fn stop_hot_log(&self) {
        // Logging left on only costs the guest some speed.
        let _ = self
            .vm
            .set_dirty_logging(self.memory.memslot(), DirtyLogging::Off);
    }

    /// The hot set's pages, as backing pages, from the dirty log (4 KiB bits).
    fn hot_set(&self, p: &PendingSnapshot) -> Result<HotSet> {
        let page_size = self.memory.page_size();
        let mut pages = PageBitmap::empty(self.memory.size() / page_size);
        if p.logging {
            let words = self.vm.take_dirty_log(self.memory.memslot())?;
            let bits = PageBitmap::empty(words.len() as u64 * 64);
            let dirty = PageBitmap::from_words(words, bits.pages()).unwrap_or(bits);
            for small in dirty.iter() {
                let page = small * guest_mm::SIZE_4K / page_size;
                if page < pages.pages() {
                    pages.set(page);
                }
            }
        }
        Ok(HotSet {
            pages,
            period_ms: if p.logging {
                p.request.hot_period.as_millis() as u64
            } else {
                0
            },
        })
    }

    /// Pauses the vCPUs, writes the snapshot, and resumes or stops the guest.
    fn take_snapshot(
        &mut self,
        p: &PendingSnapshot,
    ) -> std::result::Result<SnapshotReport, SnapshotRefusal> {
        let failed = SnapshotRefusal::Failed;
        let hot = self.hot_set(p).map_err(failed)?;
        let Some(vcpus) = &self.vcpus else {
            return Err(SnapshotRefusal::GuestFinished);
        };
        let was_running = self.state == RunState::Running;
        if was_running {
            vcpus.pause().map_err(failed)?;
        }
        let written = self.write_paused(p, hot);
        let Some(vcpus) = &self.vcpus else {
            return Err(SnapshotRefusal::GuestFinished);
        };
        // Whatever happened, the guest is as it was (a failed snapshot changed nothing);
        // `then: stop` resumes a user-paused one to finish its pass.
        if was_running {
            vcpus.resume().map_err(failed)?;
        }
        if written.is_ok() && p.request.then == AfterSnapshot::Stop {
            self.request_stop(monotonic_ns());
        }
        written.map_err(failed)
    }

    /// The paused guest's state and memory into the snapshot directory.
    fn write_paused(&mut self, p: &PendingSnapshot, hot: HotSet) -> Result<SnapshotReport> {
        let Some(vcpus) = &self.vcpus else {
            return Err(Error::GuestFinished);
        };
        let states = vcpus.save_states()?;
        let mem = self.memory.staging();
        let n = self.cfg.vcpus as usize;
        let slots: Vec<_> = (0..n).map(|i| self.mailbox.slot(mem, i)).collect();
        let max_pass: Vec<u64> = slots.iter().map(|s| s.max_pass_cycles).collect();
        let run = RunInfo {
            workload: self.workload.clone(),
            elapsed_ns: self.source_elapsed_ns + (monotonic_ns() - self.launch_ns),
            duration_ns: self.limits.duration.map(|d| d.as_nanos() as u64),
            max_pass_cycles: max_pass.clone(),
            passes: slots.iter().map(|s| s.passes).sum(),
            mailbox: self.mailbox.base(),
            entry: self.entry.clone(),
        };
        // The restored guest measures its stall from the pass that spans the snapshot:
        // each worst pass is cleared in the snapshot and put back here afterwards.
        for i in 0..n {
            self.mailbox.reset_max_pass(mem, i);
        }
        let state = MigratedState::capture(&self.vm, states, run)
            .and_then(|s| serde_json::to_value(s).map_err(Error::VmState));
        let saved = state.and_then(|state| {
            migration::snapshot::save(
                &p.request.to,
                &*self.memory,
                self.cfg.vcpus,
                VmState(state),
                hot,
            )
            .map_err(Error::from)
        });
        for (i, &before) in max_pass.iter().enumerate() {
            let now = self.mailbox.slot(mem, i).max_pass_cycles;
            self.mailbox.set_max_pass(mem, i, now.max(before));
        }
        saved
    }
}
