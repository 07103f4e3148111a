//! Post-copy on the destination: set-up at the switch-over (restore, urgent connection,
//! absent pages, `Ready`, the source's `Start`, start), then one receiver per connection
//! installing arriving pages until every absent page is in.
//!
//! The main connection carries the push and ends with the source's `Complete`; silence
//! there is a dead source. The urgent connection carries only the pages the guest asked
//! for; silence there is normal, until the push has ended and pages are still missing.
//! When either breaks, both are closed and the source is waited for ([`super::recover`]):
//! it comes back with new connections, is told which pages are still lacking, and the
//! receivers start again on them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_mm::{Gpa, Installed, PageContent};

use super::{Receiver, UrgentPager};
use crate::bitmap::PageBitmap;
use crate::error::{Error, HostCall, PeerError, Step};
use crate::host::GuestPages;
use crate::wire::conn::Conn;
use crate::wire::message::{Joining, Message, MessageReader, SwitchOver};
use crate::wire::transport::Channel;
use crate::Timeouts;

/// Where and when an extent arrived: the step its errors name, and when its frame was
/// read and checked (a demand fault's "page arrived").
#[derive(Clone, Copy)]
struct Got {
    step: Step,
    at: Instant,
}

/// What both receivers share.
struct Install<'a> {
    pages: &'a dyn GuestPages,
    pager: &'a UrgentPager,
    /// Pages absent at the start.
    target: u64,
    installed: AtomicU64,
    /// The pages still lacking (told to a source that resumes).
    lacking: Mutex<PageBitmap>,
    page_size: u64,
    /// Set when either receiver failed: the other stops.
    stop: AtomicBool,
    /// When the source's Complete arrived on the main connection.
    push_ended: Mutex<Option<Instant>>,
    /// `verify`: the post-copy memory hash of what is here, added up as pages arrive.
    digest: Option<AtomicU32>,
    /// The source's hash.
    expected: Option<u32>,
    zero_page: Vec<u8>,
}

impl Install<'_> {
    fn install(&self, gpa: Gpa, page: PageContent<'_>, got: Got) -> Result<(), Error> {
        let step = got.step;
        let done = self
            .pages
            .install_page(gpa, page)
            .map_err(Error::host(step, HostCall::InstallPage(gpa)))?;
        self.lacking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear(gpa.0 / self.page_size);
        if done == Installed::New {
            let bytes = match page {
                PageContent::Bytes(b) => b,
                PageContent::Zero => &self.zero_page,
            };
            self.installed_new(gpa, bytes, got)?;
        }
        Ok(())
    }

    /// An arriving extent: each page still absent is installed (one CONTINUE per stretch
    /// of them), duplicates are left alone.
    fn install_extent(&self, gpa: Gpa, data: &[u8], got: Got) -> Result<(), Error> {
        let step = got.step;
        let ps = self.page_size as usize;
        if data.len() == ps {
            return self.install(gpa, PageContent::Bytes(data), got);
        }
        let new = self
            .pages
            .install_pages(gpa, data)
            .map_err(Error::host(step, HostCall::InstallPage(gpa)))?;
        {
            let mut lacking = self.lacking.lock().unwrap_or_else(|e| e.into_inner());
            let first = gpa.0 / self.page_size;
            (0..(data.len() / ps) as u64).for_each(|i| {
                lacking.clear(first + i);
            });
        }
        for (i, page) in data.chunks(ps).enumerate() {
            if new.is_new(i as u64) {
                self.installed_new(gpa.add((i * ps) as u64), page, got)?;
            }
        }
        Ok(())
    }

    /// An extent of `pages` zero pages: a single page as [`Install::install`] does, more
    /// from a buffer of zeros (only 4 KiB pages come more than one to an extent).
    fn install_zeros(&self, gpa: Gpa, pages: u64, got: Got) -> Result<(), Error> {
        let len = pages * self.page_size;
        match pages {
            1 => self.install(gpa, PageContent::Zero, got),
            _ => match guest_mm::ZERO_EXTENT.get(..len as usize) {
                Some(zeros) => self.install_extent(gpa, zeros, got),
                None => (0..pages).try_for_each(|i| {
                    self.install(gpa.add(i * self.page_size), PageContent::Zero, got)
                }),
            },
        }
    }

    /// Books a page that was absent and is installed now: the hash, the pager's record,
    /// the count (the last page checks the hash and completes).
    fn installed_new(&self, gpa: Gpa, bytes: &[u8], got: Got) -> Result<(), Error> {
        if let Some(d) = &self.digest {
            d.fetch_add(crate::pages::page_digest(gpa, bytes), Ordering::AcqRel);
        }
        self.pager.installed(gpa, got.at);
        if self.installed.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            // The last page: the hash is checked before the source hears it is done.
            self.check_hash()?;
            self.pager.complete();
        }
        Ok(())
    }

    /// `verify`: what arrived (and was here) against the source's hash.
    fn check_hash(&self) -> Result<Option<u32>, Error> {
        let (Some(there), Some(d)) = (self.expected, &self.digest) else {
            return Ok(None);
        };
        let here = d.load(Ordering::Acquire);
        if here != there {
            return Err(Error::MemoryHash {
                step: Step::Verify,
                here,
                there,
            });
        }
        Ok(Some(here))
    }

    fn done(&self) -> bool {
        self.installed.load(Ordering::Acquire) >= self.target
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn lacking(&self) -> PageBitmap {
        self.lacking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
    /// The urgent connection: the next one that joins this session as such.
    fn urgent_joined(&mut self) -> Result<MessageReader<Box<dyn Channel>>, Error> {
        let wait = self.timeouts.urgent_accept;
        let conn = self.door.joined(Joining::Urgent, wait).ok_or(Error::Peer {
            step: Step::UrgentConnect,
            source: PeerError::Timeout { waited: wait },
        })?;
        let Conn {
            channel, reader, ..
        } = conn;
        self.urgent = Some(channel);
        Ok(reader)
    }

    fn urgent_handle(&self) -> Result<Box<dyn Channel>, Error> {
        let io = self.timeouts.io;
        let urgent = self.urgent.as_deref().ok_or(Error::Peer {
            step: Step::UrgentConnect,
            source: PeerError::Closed,
        })?;
        urgent
            .try_clone()
            .map_err(|e| Error::wire(Step::UrgentConnect, io)(crate::error::WireError::Io(e)))
    }

    /// Post-copy from the switch-over to the last page.
    pub(super) fn postcopy(&mut self, sw: SwitchOver) -> Result<(), Error> {
        let missing = sw
            .missing
            .unwrap_or_else(|| PageBitmap::empty(self.layout.pages()));
        self.vm
            .restore(sw.state)
            .map_err(Error::host(Step::Restore, HostCall::Restore))?;
        let mut urgent_reader = self.urgent_joined()?;
        let pager = Arc::new(UrgentPager::new(self.urgent_handle()?, self.layout));
        let absent = self
            .vm
            .pages()
            .begin_postcopy(&missing.ranges(self.layout.page_size), pager.clone())
            .map_err(Error::host(Step::BeginPostcopy, HostCall::BeginPostcopy))?;
        // `verify`: the pages here already (hybrid), before the guest may change them.
        let digest = match sw.memory_hash {
            Some(_) => Some(AtomicU32::new(crate::pages::digest_pages(
                self.vm.pages(),
                &self.layout,
                (0..self.layout.pages()).filter(|&p| !missing.get(p)),
            )?)),
            None => None,
        };
        let zero_page = match digest {
            Some(_) => vec![0u8; self.layout.page_size as usize],
            None => Vec::new(),
        };
        let ctx = Install {
            digest,
            expected: sw.memory_hash,
            zero_page,
            pages: self.vm.pages(),
            pager: &pager,
            target: absent,
            installed: AtomicU64::new(0),
            lacking: Mutex::new(missing),
            page_size: self.layout.page_size,
            stop: AtomicBool::new(false),
            push_ended: Mutex::new(None),
        };
        self.offer()?;
        let mut switched = Instant::now();
        loop {
            let attempt = self.attempt(&ctx, &pager, &mut urgent_reader, &mut switched);
            match attempt {
                Ok(()) => break,
                // Every page is in: only the source's last word went missing.
                Err(e) if ctx.done() && self.started_at_ns.is_some() && e.is_recoverable() => break,
                Err(e) if e.is_recoverable() => {
                    self.recover(e, &ctx.lacking(), absent)?;
                    urgent_reader = self.urgent_joined()?;
                    pager.reconnect(self.urgent_handle()?);
                }
                Err(e) => return Err(e),
            }
        }
        if !ctx.done() {
            return Err(ctx.incomplete(Step::Push));
        }
        self.report.memory_hash = ctx.check_hash()?;
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
        self.report.demand_breakdown = Some(Box::new(pager.breakdown()));
        self.report.postcopy_ms = Some(switched.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }

    /// One run of both receivers over the connections in place (the guest started on
    /// the source's `Start` first, if it was not yet).
    fn attempt(
        &mut self,
        ctx: &Install,
        pager: &Arc<UrgentPager>,
        urgent_reader: &mut MessageReader<Box<dyn Channel>>,
        switched: &mut Instant,
    ) -> Result<(), Error> {
        if self.started_at_ns.is_none() {
            self.await_start()?;
            *switched = Instant::now();
            self.start()?;
            self.vm.pages().resumed_after_migration();
            if ctx.target == 0 {
                ctx.check_hash()?;
                pager.complete();
            }
        }
        ctx.stop.store(false, Ordering::Relaxed);
        *ctx.push_ended.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let main = self.main.try_clone().map_err(|e| {
            Error::wire(Step::Push, self.timeouts.io)(crate::error::WireError::Io(e))
        })?;
        let timeouts = *self.timeouts;
        let (m, u) = std::thread::scope(|scope| {
            let timeouts = &timeouts;
            let urgent = scope.spawn(move || {
                // Faulting vCPUs wait on it: it wins the CPU over them when a page lands.
                let _ = guest_mm::host::favour_this_thread();
                let r = receive(ctx, urgent_reader, Connection::Urgent, timeouts);
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
        // The first failure is the cause; the other end's is its consequence.
        m.and(u)
    }

    /// The source's `Start`: the guest is this end's from here.
    fn await_start(&mut self) -> Result<(), Error> {
        let step = Step::Start;
        let frame = self
            .reader
            .recv()
            .map_err(Error::wire(step, self.timeouts.io))?;
        match self
            .reader
            .decode(&frame)
            .map_err(Error::wire(step, self.timeouts.io))?
        {
            Message::Start => Ok(()),
            Message::Abort { reason } => Err(Error::peer(step, PeerError::Aborted { reason })),
            other => Err(Error::peer(
                step,
                PeerError::Unexpected {
                    index: self.reader.last_index(),
                    expected: "the source's Start",
                    got: other.kind(),
                },
            )),
        }
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
            Err(crate::error::WireError::Closed { .. })
                if conn == Connection::Urgent && ctx.done() =>
            {
                return Ok(())
            }
            Err(crate::error::WireError::Silent) if conn == Connection::Urgent => {
                if push_ended_long_ago(ctx, timeouts.confirm) {
                    return Err(ctx.incomplete(Step::Urgent));
                }
                continue;
            }
            Err(e) => return Err(wire(e)),
        };
        let got = Got {
            step,
            at: Instant::now(),
        };
        match r.decode(&frame).map_err(wire)? {
            Message::Page { gpa, data } => ctx.install_extent(gpa, data, got)?,
            Message::ZeroPage { gpa, pages } => ctx.install_zeros(gpa, pages.into(), got)?,
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
        r.recycle(frame);
    }
}

fn push_ended_long_ago(ctx: &Install, wait: Duration) -> bool {
    ctx.push_ended
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some_and(|t| t.elapsed() >= wait)
}
