//! The VM's vCPU threads as one set: start them, pause and resume them in place, save
//! their state, finish them.
//!
//! Each vCPU thread runs [`Vcpu::thread_main`]; the set talks to it through a channel of
//! [`VcpuEvent`]s and one of answers. A running vCPU sits in `KVM_RUN` and sees an event
//! only when `KVM_RUN` returns, so every event to a running vCPU is followed by kicks
//! ([`kick_signal`]) until it answers — a kick that lands just before the thread enters
//! `KVM_RUN` is lost, the next one is not.
//!
//! The set is shared by the controller (which finishes it) and a migration source (which
//! pauses, resumes and throttles it); one lock orders their calls.
//!
//! Throttling (a pre-copy's auto-converge, as QEMU's `cpu_throttle`): a thread of the
//! set's sends every vCPU, once a period, a `Throttle` event that keeps it out of the
//! guest for `percent` % of the period, and kicks it; the vCPU runs the rest of the
//! period ([`RUN_SLICE`]). A vCPU that is paused ignores it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use crate::console::Console;
use crate::error::{Error, Result};
use crate::vstate::vcpu::{
    install_kick_handler, kick_signal, Vcpu, VcpuAnswer, VcpuEndResult, VcpuEvent, VcpuFailure,
    VcpuFault, VcpuOutcome, VcpuState,
};

/// How often an unanswered event is followed by another kick.
const KICK_EVERY: Duration = Duration::from_millis(2);
/// How long a vCPU may take to answer before the set gives up on it. A vCPU answers as
/// soon as `KVM_RUN` returns (microseconds); this bounds a stuck kernel, not a slow host.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// A throttled vCPU runs this long each period (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
const RUN_SLICE: Duration = Duration::from_millis(10);

/// Called on each vCPU thread before it first enters the guest, with the vCPU's index
/// (the fault path maps fault thread ids to vCPUs).
pub type OnThreadStart = Arc<dyn Fn(usize) + Send + Sync>;
/// Called on a vCPU thread when its guest ends, with the vCPU's index and how.
pub type OnGuestEnd = Arc<dyn Fn(usize, VcpuEndResult) + Send + Sync>;

struct VcpuThread {
    index: usize,
    handle: JoinHandle<VcpuOutcome>,
    events: Sender<VcpuEvent>,
    answers: Receiver<VcpuAnswer>,
}

impl VcpuThread {
    /// Sends `event` and kicks the vCPU until it answers.
    fn ask(&self, event: VcpuEvent) -> Result<VcpuAnswer> {
        self.events
            .send(event)
            .map_err(|_| Error::VcpuGone { index: self.index })?;
        let deadline = Instant::now() + ANSWER_WITHIN;
        loop {
            match self.answers.recv_timeout(KICK_EVERY) {
                Ok(answer) => return Ok(answer),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::VcpuGone { index: self.index })
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    return Err(Error::VcpuUnresponsive {
                        index: self.index,
                        waited: ANSWER_WITHIN,
                    })
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Makes KVM_RUN return EINTR; harmless if the thread is not in it.
                    let _ = self.handle.kill(kick_signal());
                }
            }
        }
    }
}

type Threads = Arc<Mutex<Vec<VcpuThread>>>;

fn lock(threads: &Mutex<Vec<VcpuThread>>) -> MutexGuard<'_, Vec<VcpuThread>> {
    // The vector is only pushed to and drained; a panic elsewhere leaves it usable.
    threads.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread that throttles the vCPUs, while one runs.
struct Throttler {
    /// The share of each period the vCPUs stay out of the guest; 0 ends the thread.
    percent: Arc<AtomicU32>,
    handle: JoinHandle<()>,
}

impl Throttler {
    fn start(threads: Threads, percent: u32) -> Result<Throttler> {
        let share = Arc::new(AtomicU32::new(percent));
        let percent = share.clone();
        let handle = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || loop {
                let p = percent.load(Ordering::Acquire).min(99);
                if p == 0 {
                    return;
                }
                // Run RUN_SLICE, stay out p % of the period.
                let period = RUN_SLICE * 100 / (100 - p);
                let out = period - RUN_SLICE;
                {
                    let threads = lock(&threads);
                    if threads.is_empty() {
                        return;
                    }
                    for t in threads.iter() {
                        // Under the lock: no thread is joined while it is kicked.
                        if t.events.send(VcpuEvent::Throttle(out)).is_ok() {
                            let _ = t.handle.kill(kick_signal());
                        }
                    }
                }
                std::thread::park_timeout(period);
            })
            .map_err(|source| Error::ThrottleThread { source })?;
        Ok(Throttler {
            percent: share,
            handle,
        })
    }

    fn stop(self) {
        self.percent.store(0, Ordering::Release);
        self.handle.thread().unpark();
        let _ = self.handle.join();
    }
}

/// The running vCPUs of a VM.
pub struct VcpuSet {
    threads: Threads,
    throttler: Mutex<Option<Throttler>>,
}

impl VcpuSet {
    /// Starts one thread per vCPU, running the guest at once. On error, the threads
    /// already started are finished before returning.
    pub fn start(
        vcpus: Vec<Vcpu>,
        console: &Arc<Console>,
        on_start: OnThreadStart,
        on_end: OnGuestEnd,
    ) -> Result<VcpuSet> {
        // Every kick below needs the (empty) handler: without it the signal kills the
        // process.
        install_kick_handler()?;
        let set = VcpuSet {
            threads: Arc::new(Mutex::new(Vec::with_capacity(vcpus.len()))),
            throttler: Mutex::new(None),
        };
        for vcpu in vcpus {
            let index = vcpu.index();
            let (events_tx, events_rx) = channel();
            let (answers_tx, answers_rx) = channel();
            let (console, on_end, on_start) = (console.clone(), on_end.clone(), on_start.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    on_start(index);
                    vcpu.thread_main(events_rx, answers_tx, on_end, console)
                });
            match spawned {
                Ok(handle) => set.lock().push(VcpuThread {
                    index,
                    handle,
                    events: events_tx,
                    answers: answers_rx,
                }),
                Err(source) => {
                    set.finish();
                    return Err(Error::Thread { index, source });
                }
            }
        }
        Ok(set)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<VcpuThread>> {
        lock(&self.threads)
    }

    /// Keeps every running vCPU out of the guest `percent` % of the time (at most 99);
    /// 0 lets them run at full speed again.
    pub fn throttle(&self, percent: u32) -> Result<()> {
        let mut throttler = self.throttler.lock().unwrap_or_else(|e| e.into_inner());
        match (throttler.as_ref(), percent) {
            (Some(t), p) if p > 0 => {
                t.percent.store(p, Ordering::Release);
                t.handle.thread().unpark();
            }
            (None, 0) => {}
            (None, p) => *throttler = Some(Throttler::start(self.threads.clone(), p)?),
            (Some(_), _) => {
                if let Some(t) = throttler.take() {
                    t.stop();
                }
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every vCPU in place. If one does not answer, those already paused run
    /// again and the error is returned: the guest keeps running here.
    pub fn pause(&self) -> Result<()> {
        let threads = self.lock();
        for (i, t) in threads.iter().enumerate() {
            if let Err(e) = t.ask(VcpuEvent::Pause) {
                for done in &threads[..i] {
                    let _ = done.ask(VcpuEvent::Resume);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Runs every paused vCPU again (one whose guest ended stays stopped).
    pub fn resume(&self) -> Result<()> {
        let threads = self.lock();
        let mut first_error = None;
        for t in threads.iter() {
            if let Err(e) = t.ask(VcpuEvent::Resume) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The architectural state of every vCPU, in index order. The vCPUs must be paused.
    pub fn save_states(&self) -> Result<Vec<VcpuState>> {
        let threads = self.lock();
        threads
            .iter()
            .map(|t| match t.ask(VcpuEvent::SaveState)? {
                VcpuAnswer::State(s) => *s,
                _ => Err(Error::VcpuRunning { index: t.index }),
            })
            .collect()
    }

    /// Ends every vCPU thread and returns how each ended, in index order. Idempotent:
    /// a second call returns nothing.
    pub fn finish(&self) -> Vec<VcpuOutcome> {
        let _ = self.throttle(0);
        let threads: Vec<VcpuThread> = self.lock().drain(..).collect();
        for t in &threads {
            // A vCPU that does not answer is still joined below: closing its channel and
            // the kicks in `ask` make it leave KVM_RUN and see the disconnect.
            let _ = t.ask(VcpuEvent::Finish);
        }
        threads
            .into_iter()
            .map(|t| {
                let index = t.index;
                drop(t.events);
                t.handle.join().unwrap_or(VcpuOutcome {
                    end: Err(VcpuFailure {
                        fault: VcpuFault::Panicked,
                        registers: format!("vCPU {index}"),
                    }),
                    exits: 0,
                    dirty_ring_full_exits: 0,
                    exit_kinds: Default::default(),
                    cpu_ns: 0,
                    first_run_ns: 0,
                })
            })
            .collect()
    }
}

impl Drop for VcpuSet {
    /// No vCPU thread outlives its set (on an error path, the set is dropped unfinished).
    fn drop(&mut self) {
        self.finish();
    }
}
