//! The VM as a live migration sees it: what the controller does for a migration source
//! (pause in place at the switch-over, resume when it fails) and for a destination
//! (receive on a thread of its own, build the vCPUs from the arriving state, start them
//! through the controller, keep installing post-copy pages while the guest runs).
//!
//! (Transitional: the state machines are moving into the `migration` crate, which will
//! call this module through its `SourceVm` / `DestinationVm` traits.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::monotonic_ns;
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::migrate::{Incoming, PostcopyLink, RunInfo, Silence};
use crate::report::IncomingReport;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// A destination's guest, ready to run: the controller starts it.
pub struct Arrival {
    pub vcpus: Vec<Vcpu>,
    pub run: RunInfo,
    pub report: IncomingReport,
    /// The controller's answer: the vCPUs run (the end of the downtime), or why not.
    pub started: Sender<Result<()>>,
}

/// How a destination's migration ended.
pub struct IncomingEnd {
    /// Post-copy: switch-over to the last page, and what the demand faults cost.
    pub postcopy: Option<PostcopyFigures>,
}

pub struct PostcopyFigures {
    pub postcopy_ms: f64,
    pub pages_demand: u64,
    pub pages_pushed: u64,
    pub demand_fault_us_p50: f64,
    pub demand_fault_us_p99: f64,
    pub demand_fault_us_max: f64,
}

/// What the receiving thread tells the controller.
pub enum IncomingEvent {
    /// The guest's state is here; start it.
    Arrived(Box<Arrival>),
    /// The migration ended (every page in), or failed.
    Ended(Result<IncomingEnd>),
}

/// Receives the guest on `uri` into `memory`/`vm` on a thread of its own, telling the
/// controller through `events`.
pub fn start_receiving(
    uri: migration::Uri,
    memory: Arc<Memory>,
    vm: Arc<Vm>,
    vcpus: u32,
    wait: Duration,
    events: impl Fn(IncomingEvent) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let r = receive(&uri, &memory, &vm, vcpus, wait, &events);
            events(IncomingEvent::Ended(r));
        })
        .map_err(|source| Error::Io {
            what: "starting the incoming migration thread".into(),
            source,
        })
}

fn receive(
    uri: &migration::Uri,
    memory: &Memory,
    vm: &Vm,
    vcpus: u32,
    wait: Duration,
    events: &dyn Fn(IncomingEvent),
) -> Result<IncomingEnd> {
    let t = monotonic_ns();
    let inc = crate::migrate::receive(uri, &memory.ram, vcpus, wait).map_err(Error::Incoming)?;
    // Each vCPU's worst pass was cleared by the source when it paused (and that mailbox
    // page sent after the pause), so from here on it is the guest's own view of the
    // stall. Writing it here instead would, in post-copy, put a page into the page cache
    // before the source's copy arrives.
    let report = IncomingReport {
        mode: inc.hello.mode.clone(),
        pages: inc.pages,
        bytes: inc.bytes,
        source_elapsed_ms: inc.switch.run.elapsed_ns as f64 / 1e6,
        receive_ms: (monotonic_ns() - t) as f64 / 1e6,
        pages_demand: 0,
        pages_pushed: 0,
        demand_fault_us_p50: 0.0,
        demand_fault_us_p99: 0.0,
        demand_fault_us_max: 0.0,
        postcopy_ms: None,
        passes_at_switch: inc.switch.run.passes,
        passes_after_switch: 0,
    };
    let postcopy = match inc.switch.postcopy_missing.clone() {
        Some(missing) => {
            let urgent = inc.accept_urgent().map_err(Error::Incoming)?;
            let urgent_reader = urgent
                .try_clone()
                .map_err(|e| Error::Incoming(e.to_string()))?;
            let link = Arc::new(
                crate::migrate::postcopy_begin(&memory.stage, &memory.ram, &missing, urgent)
                    .map_err(Error::Incoming)?,
            );
            let uffd = memory.start_postcopy_fault_path(link.clone())?;
            memory.start_collapse(true, Some(uffd.clone()))?;
            Some((link, urgent_reader, uffd))
        }
        None => {
            memory.start_collapse(true, None)?;
            None
        }
    };
    let built = (0..vcpus as usize)
        .map(|i| Vcpu::restore(vm, i, &inc.switch.vcpus[i]))
        .collect::<Result<Vec<_>>>()?;
    let (started_tx, started_rx) = channel();
    events(IncomingEvent::Arrived(Box::new(Arrival {
        vcpus: built,
        run: inc.switch.run.clone(),
        report,
        started: started_tx,
    })));
    started_rx
        .recv()
        .map_err(|_| Error::Incoming("the VM ended before the guest could start".into()))??;
    match postcopy {
        Some((link, urgent_reader, uffd)) => {
            let figures = run_postcopy(inc, memory, link, urgent_reader, uffd)?;
            Ok(IncomingEnd {
                postcopy: Some(figures),
            })
        }
        None => {
            // The end of the downtime: tell the source, which then completes.
            if let Err(e) = inc.confirm_resumed() {
                eprintln!(
                    "hugevisor: warning: the source did not complete the hand-over cleanly: {e}"
                );
            }
            // Every region arrived complete by pre-copy.
            memory.resumed_after_migration();
            Ok(IncomingEnd { postcopy: None })
        }
    }
}

/// Post-copy: pages keep arriving on both channels while the guest runs.
fn run_postcopy(
    inc: Incoming,
    memory: &Memory,
    link: Arc<PostcopyLink>,
    urgent_reader: migration::Stream,
    uffd: Arc<uffd::Uffd>,
) -> Result<PostcopyFigures> {
    let main = inc.resumed_postcopy().map_err(Error::Postcopy)?;
    let switched = monotonic_ns();
    // Regions that pre-copy rounds (hybrid) completed before the switch.
    memory.resumed_after_migration();
    let collapse = memory.collapse().cloned();
    let filled = AtomicU64::new(0);
    let receive = |reader, silence| {
        crate::migrate::postcopy_receive(
            &link,
            &memory.stage,
            &memory.ram,
            &uffd,
            reader,
            &filled,
            collapse.as_deref(),
            silence,
        )
    };
    let r = std::thread::scope(|sc| {
        let urgent =
            sc.spawn(|| receive(migration::FrameReader::new(urgent_reader), Silence::Idle));
        let m = receive(main, Silence::PeerGone);
        let u = urgent
            .join()
            .unwrap_or_else(|_| Err("urgent receiver panicked".into()));
        m.and(u)
    });
    r.map_err(Error::Postcopy)?;
    let installed = filled.load(Ordering::Relaxed);
    if installed != link.missing {
        return Err(Error::Postcopy(format!(
            "post-copy ended with {installed} of {} pages",
            link.missing
        )));
    }
    // Every page arrived: the guest view needs no userfaultfd anymore.
    let _ = uffd.unregister(memory.ram.guest_view_addr() as u64, memory.ram.size());
    // Regions whose collapse failed on fill get one more try.
    memory.resumed_after_migration();
    let lat = link.latency.lock().unwrap_or_else(|e| e.into_inner());
    Ok(PostcopyFigures {
        postcopy_ms: (monotonic_ns() - switched) as f64 / 1e6,
        pages_demand: link.demand_pages.load(Ordering::Relaxed),
        pages_pushed: link.pushed_pages.load(Ordering::Relaxed),
        demand_fault_us_p50: lat.percentile_us(50.0),
        demand_fault_us_p99: lat.percentile_us(99.0),
        demand_fault_us_max: lat.max_us(),
    })
}
