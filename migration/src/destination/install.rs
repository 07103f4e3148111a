//! Post-copy on the destination: set-up at the switch-over (restore, urgent connection,
//! absent pages, start), then one receiver per connection installing arriving pages
//! until every absent page is in.
//!
//! The main connection carries the push and ends with the source's `Complete`; silence
//! there is a dead source. The urgent connection carries only the pages the guest asked
//! for; silence there is normal, until the push has ended and pages are still missing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_mm::{Gpa, Installed, PageContent};

use super::{Receiver, UrgentPager};
use crate::error::{Error, HostCall, PeerError, Step, WireError};
use crate::host::GuestPages;
use crate::wire::message::{Message, MessageReader, SwitchOver};
use crate::wire::transport::Channel;
use crate::Timeouts;

/// What both receivers share.
struct Install<'a> {
    pages: &'a dyn GuestPages,
    pager: &'a UrgentPager,
    /// Pages absent at the start.
    target: u64,
    installed: AtomicU64,
    /// Set when either receiver failed: the other stops.
    stop: AtomicBool,
    /// When the source's Complete arrived on the main connection.
    push_ended: Mutex<Option<Instant>>,
}

impl Install<'_> {
    fn install(&self, gpa: Gpa, page: PageContent<'_>, step: Step) -> Result<(), Error> {
        let done = self
            .pages
            .install_page(gpa, page)
            .map_err(Error::host(step, HostCall::InstallPage(gpa)))?;
        if done == Installed::New {
            self.pager.installed(gpa);
            if self.installed.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
                self.pager.complete();
            }
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.installed.load(Ordering::Acquire) >= self.target
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn incomplete(&self, step: Step) -> Error {
        Error::PostcopyIncomplete {
            step,
            installed: self.installed.load(Ordering::Acquire),
            absent: self.target,
        }
    }
}

/// Which connection a receiver reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Connection {
    Main,
    Urgent,
}

impl Receiver<'_> {
    /// Post-copy from the switch-over to the last page.
    pub(super) fn postcopy(&mut self, sw: SwitchOver) -> Result<(), Error> {
        let io = self.timeouts.io;
        let missing = sw.missing.unwrap_or_else(|| crate::PageBitmap::empty(0));
        self.vm
            .restore(sw.state)
            .map_err(Error::host(Step::Restore, HostCall::Restore))?;
        let urgent = self
            .acceptor
            .accept(self.timeouts.urgent_accept, io)
            .map_err(Error::wire(Step::UrgentConnect, io))?;
        let clone = |c: &dyn Channel| {
            c.try_clone()
                .map_err(|e| Error::wire(Step::UrgentConnect, io)(WireError::Io(e)))
        };
        let urgent_reader = MessageReader::new(clone(urgent.as_ref())?, self.layout);
        let pager = Arc::new(UrgentPager::new(clone(urgent.as_ref())?, self.layout));
        self.urgent = Some(urgent);
        let absent = self
            .vm
            .pages()
            .begin_postcopy(&missing.ranges(self.layout.page_size), pager.clone())
            .map_err(Error::host(Step::BeginPostcopy, HostCall::BeginPostcopy))?;
        let switched = Instant::now();
        self.start()?;
        self.vm.pages().resumed_after_migration();
        let ctx = Install {
            pages: self.vm.pages(),
            pager: &pager,
            target: absent,
            installed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            push_ended: Mutex::new(None),
        };
        if absent == 0 {
            pager.complete();
        }
        let main = clone(self.main.as_ref())?;
        let timeouts = *self.timeouts;
        let (m, u) = std::thread::scope(|scope| {
            let (ctx, timeouts) = (&ctx, &timeouts);
            let urgent = scope.spawn(move || {
                let mut reader = urgent_reader;
                let r = receive(ctx, &mut reader, Connection::Urgent, timeouts);
                if r.is_err() {
                    ctx.stop.store(true, Ordering::Relaxed);
                    main.shutdown();
                }
                r
            });
            let m = receive(ctx, &mut self.reader, Connection::Main, timeouts);
            if m.is_err() {
                ctx.stop.store(true, Ordering::Relaxed);
                pager.shutdown();
            }
            let u = urgent.join().unwrap_or_else(|_| {
                Err(Error::Panicked {
                    step: Step::Urgent,
                    what: "urgent receiver",
                })
            });
            (m, u)
        });
        m?;
        u?;
        if !ctx.done() {
            return Err(ctx.incomplete(Step::Push));
        }
        self.vm
            .pages()
            .end_postcopy()
            .map_err(Error::host(Step::EndPostcopy, HostCall::EndPostcopy))?;
        let stats = pager.stats();
        self.report.pages_demand = stats.pages;
        self.report.pages_pushed = pager.pushed();
        self.report.demand_fault_us_p50 = stats.us_p50;
        self.report.demand_fault_us_p99 = stats.us_p99;
        self.report.demand_fault_us_max = stats.us_max;
        self.report.postcopy_ms = Some(switched.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }
}

/// Installs the pages arriving on one connection until it is done with.
fn receive<R: std::io::Read>(
    ctx: &Install,
    r: &mut MessageReader<R>,
    conn: Connection,
    timeouts: &Timeouts,
) -> Result<(), Error> {
    let step = match conn {
        Connection::Main => Step::Push,
        Connection::Urgent => Step::Urgent,
    };
    let wire = |e| Error::wire(step, timeouts.io)(e);
    loop {
        if conn == Connection::Urgent && ctx.done() {
            return Ok(());
        }
        let frame = match r.recv() {
            Ok(f) => f,
            Err(_) if ctx.stopped() => return Ok(()),
            Err(WireError::Closed { .. }) if conn == Connection::Urgent && ctx.done() => {
                return Ok(())
            }
            Err(WireError::Silent) if conn == Connection::Urgent => {
                if push_ended_long_ago(ctx, timeouts.confirm) {
                    return Err(ctx.incomplete(Step::Urgent));
                }
                continue;
            }
            Err(e) => return Err(wire(e)),
        };
        match r.decode(&frame).map_err(wire)? {
            Message::Page { gpa, data } => ctx.install(gpa, PageContent::Bytes(data), step)?,
            Message::ZeroPage { gpa } => ctx.install(gpa, PageContent::Zero, step)?,
            Message::Complete { demand: None } if conn == Connection::Main => {
                *ctx.push_ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                return Ok(());
            }
            Message::Abort { reason } => {
                return Err(Error::peer(step, PeerError::Aborted { reason }))
            }
            other => {
                return Err(Error::peer(
                    step,
                    PeerError::Unexpected {
                        index: r.last_index(),
                        expected: match conn {
                            Connection::Main => "a page or the source's Complete",
                            Connection::Urgent => "a demanded page",
                        },
                        got: other.kind(),
                    },
                ))
            }
        }
    }
}

fn push_ended_long_ago(ctx: &Install, wait: Duration) -> bool {
    ctx.push_ended
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some_and(|t| t.elapsed() >= wait)
}
