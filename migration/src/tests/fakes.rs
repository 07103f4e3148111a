//! Fake VMs over a `Vec<u8>` of guest RAM: they record the calls a migration makes,
//! simulate a guest that dirties pages between rounds and a VMM that writes its mailbox
//! at the pause, and fail any host call on demand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use guest_mm::{Gpa, GpaRange, Installed, PageContent, Pager, SIZE_4K};

use crate::bitmap::PageBitmap;
use crate::host::{DestinationVm, GuestPages, HostError, IncomingEvent, Paused, SourceVm, VmState};
use crate::wire::transport::Uri;

/// The host calls made, in order (page reads and writes are not listed).
#[derive(Default)]
pub struct Calls(Mutex<Vec<&'static str>>);

impl Calls {
    pub fn record(&self, name: &'static str) {
        self.0.lock().unwrap().push(name);
    }

    pub fn list(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }

    /// The calls, without the dirty-log takes (their number depends on the rounds).
    pub fn without_takes(&self) -> Vec<&'static str> {
        self.list()
            .into_iter()
            .filter(|c| *c != "take_dirty_log")
            .collect()
    }

    pub fn count(&self, name: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == name)
            .count()
    }
}

/// Host calls that fail: the call named `name` fails once it was made `after` times.
#[derive(Default)]
pub struct HostFaults {
    fail_after: Mutex<HashMap<&'static str, u64>>,
    made: Mutex<HashMap<&'static str, u64>>,
}

impl HostFaults {
    pub fn fail(&self, name: &'static str, after: u64) {
        self.fail_after.lock().unwrap().insert(name, after);
    }

    fn check(&self, name: &'static str) -> Result<(), HostError> {
        let mut made = self.made.lock().unwrap();
        let n = made.entry(name).or_default();
        *n += 1;
        match self.fail_after.lock().unwrap().get(name) {
            Some(&after) if *n > after => Err(format!("injected failure of {name}").into()),
            _ => Ok(()),
        }
    }
}

/// Guest RAM.
pub struct FakeRam {
    page_size: u64,
    backing: String,
    pub bytes: Mutex<Vec<u8>>,
    absent: Mutex<PageBitmap>,
    /// Post-copy: the pages installed, in order.
    pub installs: Mutex<Vec<u64>>,
    installed: Condvar,
    pager: Mutex<Option<Arc<dyn Pager>>>,
    pub calls: Arc<Calls>,
    pub faults: Arc<HostFaults>,
    /// Each page read sleeps this long (to slow a push down).
    pub read_delay: Mutex<Duration>,
}

impl FakeRam {
    pub fn new(size: u64, page_size: u64, backing: &str) -> FakeRam {
        FakeRam {
            page_size,
            backing: backing.to_string(),
            bytes: Mutex::new(vec![0; size as usize]),
            absent: Mutex::new(PageBitmap::empty(size / page_size)),
            installs: Mutex::default(),
            installed: Condvar::new(),
            pager: Mutex::default(),
            calls: Arc::default(),
            faults: Arc::default(),
            read_delay: Mutex::default(),
        }
    }

    /// Fills every other 4 KiB page with a pattern (the rest stays zero: zero pages).
    pub fn fill_pattern(&self, seed: u8) {
        let mut b = self.bytes.lock().unwrap();
        for (i, chunk) in b.chunks_mut(SIZE_4K as usize).enumerate() {
            if i % 2 == 0 {
                for (j, byte) in chunk.iter_mut().enumerate() {
                    *byte = (i as u8).wrapping_mul(31) ^ (j as u8) ^ seed;
                }
            }
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    pub fn pager(&self) -> Option<Arc<dyn Pager>> {
        self.pager.lock().unwrap().clone()
    }

    /// Waits until page `p` was installed; its position in the install order.
    pub fn wait_installed(&self, p: u64, timeout: Duration) -> Option<usize> {
        let installs = self.installs.lock().unwrap();
        let (installs, _) = self
            .installed
            .wait_timeout_while(installs, timeout, |i| !i.contains(&p))
            .unwrap();
        installs.iter().position(|&q| q == p)
    }

    fn write(&self, gpa: Gpa, page: PageContent<'_>) {
        let mut b = self.bytes.lock().unwrap();
        let at = gpa.0 as usize..(gpa.0 + self.page_size) as usize;
        match page {
            PageContent::Bytes(data) => b[at].copy_from_slice(data),
            PageContent::Zero => b[at].fill(0),
        }
    }
}

impl GuestPages for FakeRam {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn page_size(&self) -> u64 {
        self.page_size
    }
    fn backing(&self) -> String {
        self.backing.clone()
    }
    fn read_page(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), HostError> {
        self.faults.check("read_page")?;
        let delay = *self.read_delay.lock().unwrap();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let b = self.bytes.lock().unwrap();
        buf.copy_from_slice(&b[gpa.0 as usize..(gpa.0 + self.page_size) as usize]);
        Ok(())
    }
    fn write_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<(), HostError> {
        self.faults.check("write_page")?;
        self.write(gpa, page);
        Ok(())
    }
    fn begin_postcopy(&self, absent: &[GpaRange], pager: Arc<dyn Pager>) -> Result<u64, HostError> {
        self.calls.record("begin_postcopy");
        self.faults.check("begin_postcopy")?;
        let mut a = self.absent.lock().unwrap();
        for r in absent {
            for p in r.pages(self.page_size) {
                a.set(p);
            }
        }
        *self.pager.lock().unwrap() = Some(pager);
        Ok(a.count())
    }
    fn install_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<Installed, HostError> {
        self.faults.check("install_page")?;
        let p = gpa.0 / self.page_size;
        if !self.absent.lock().unwrap().clear(p) {
            return Ok(Installed::Duplicate);
        }
        self.write(gpa, page);
        self.installs.lock().unwrap().push(p);
        self.installed.notify_all();
        Ok(Installed::New)
    }
    fn end_postcopy(&self) -> Result<(), HostError> {
        self.calls.record("end_postcopy");
        self.faults.check("end_postcopy")?;
        assert_eq!(
            self.absent.lock().unwrap().count(),
            0,
            "post-copy ended early"
        );
        Ok(())
    }
    fn resumed_after_migration(&self) {
        self.calls.record("resumed_after_migration");
    }
}

/// A source VM whose guest writes `dirty_per_take` 4 KiB pages between rounds.
pub struct FakeSource {
    pub ram: FakeRam,
    pub state: VmState,
    vcpus: u32,
    dirty: Mutex<PageBitmap>,
    pub dirty_per_take: u64,
    paused: AtomicBool,
    tick: AtomicU64,
    /// The mailbox the "VMM" writes at the pause (not in the dirty log).
    pub mailbox: GpaRange,
    /// Page reads after the pause sleep this long.
    pub read_delay_after_pause: Duration,
    /// Where each call of `handover_paused` says to resume (none left: give up).
    pub resumes: Mutex<Vec<Uri>>,
    /// What each `handover_paused` was told.
    pub paused_by: Mutex<Vec<String>>,
    /// Whether `throttle` works; a throttled guest writes that much less per burst.
    pub throttleable: bool,
    /// Every `throttle` call's percentage, in order.
    pub throttles: Mutex<Vec<u32>>,
}

impl FakeSource {
    pub fn new(size: u64, page_size: u64, backing: &str) -> FakeSource {
        let ram = FakeRam::new(size, page_size, backing);
        ram.fill_pattern(0x5a);
        FakeSource {
            ram,
            state: VmState(serde_json::json!({"vcpus": [{"rip": 4096}], "workload": "fake"})),
            vcpus: 1,
            dirty: Mutex::new(PageBitmap::empty(size / SIZE_4K)),
            dirty_per_take: 8,
            paused: AtomicBool::new(false),
            tick: AtomicU64::new(0),
            mailbox: GpaRange::new(Gpa(0x1000), Gpa(0x1800)),
            read_delay_after_pause: Duration::ZERO,
            resumes: Mutex::default(),
            paused_by: Mutex::default(),
            throttleable: false,
            throttles: Mutex::default(),
        }
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.ram.calls.without_takes()
    }

    /// The guest writes some pages (marked dirty).
    fn burst(&self) {
        let pages = self.ram.size() / SIZE_4K;
        let mut dirty = self.dirty.lock().unwrap();
        let mut b = self.ram.bytes.lock().unwrap();
        let held_back = u64::from(self.throttles.lock().unwrap().last().copied().unwrap_or(0));
        for _ in 0..self.dirty_per_take * (100 - held_back) / 100 {
            let t = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
            let page = (t * 37) % pages;
            let at = (page * SIZE_4K + (t * 8) % SIZE_4K) as usize;
            b[at..at + 8].copy_from_slice(&t.to_le_bytes());
            dirty.set(page);
        }
    }
}

impl SourceVm for FakeSource {
    fn pages(&self) -> &dyn GuestPages {
        &self.ram
    }
    fn vcpus(&self) -> u32 {
        self.vcpus
    }
    fn start_dirty_log(&self) -> Result<(), HostError> {
        self.ram.calls.record("start_dirty_log");
        self.ram.faults.check("start_dirty_log")
    }
    fn take_dirty_log(&self) -> Result<Vec<u64>, HostError> {
        self.ram.calls.record("take_dirty_log");
        self.ram.faults.check("take_dirty_log")?;
        let taken = {
            let mut d = self.dirty.lock().unwrap();
            let words = d.words().to_vec();
            *d = PageBitmap::empty(d.pages());
            words
        };
        if !self.paused.load(Ordering::Relaxed) {
            self.burst();
        }
        Ok(taken)
    }
    fn stop_dirty_log(&self) {
        self.ram.calls.record("stop_dirty_log");
    }
    fn pause(&self) -> Result<Paused, HostError> {
        self.ram.calls.record("pause");
        self.ram.faults.check("pause")?;
        self.burst();
        self.paused.store(true, Ordering::Relaxed);
        {
            let mut b = self.ram.bytes.lock().unwrap();
            let m = self.mailbox;
            b[m.start.0 as usize..m.end.0 as usize].fill(0xee);
        }
        *self.ram.read_delay.lock().unwrap() = self.read_delay_after_pause;
        Ok(Paused {
            state: self.state.clone(),
            vmm_written: vec![self.mailbox],
        })
    }
    fn resume(&self) -> Result<(), HostError> {
        self.ram.calls.record("resume");
        self.ram.faults.check("resume")?;
        *self.ram.read_delay.lock().unwrap() = Duration::ZERO;
        self.paused.store(false, Ordering::Relaxed);
        Ok(())
    }
    fn can_throttle(&self) -> bool {
        self.throttleable
    }
    fn throttle(&self, percent: u32) -> Result<(), HostError> {
        self.ram.faults.check("throttle")?;
        self.throttles.lock().unwrap().push(percent);
        Ok(())
    }
    fn handover_paused(&self, why: &crate::Error) -> Option<Uri> {
        self.ram.calls.record("handover_paused");
        self.paused_by.lock().unwrap().push(why.to_string());
        self.resumes.lock().unwrap().pop()
    }
    fn handover_resumed(&self) {
        self.ram.calls.record("handover_resumed");
    }
}

/// A destination VM.
pub struct FakeDestination {
    pub ram: FakeRam,
    vcpus: u32,
    pub restored: Mutex<Option<VmState>>,
    /// What `note` was told: "refused", "paused N", "resumed".
    pub events: Mutex<Vec<String>>,
    started: Mutex<bool>,
    started_cv: Condvar,
}

impl FakeDestination {
    pub fn new(size: u64, page_size: u64, backing: &str) -> FakeDestination {
        FakeDestination {
            ram: FakeRam::new(size, page_size, backing),
            vcpus: 1,
            restored: Mutex::default(),
            events: Mutex::default(),
            started: Mutex::new(false),
            started_cv: Condvar::new(),
        }
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.ram.calls.list()
    }

    pub fn wait_started(&self, timeout: Duration) -> bool {
        let s = self.started.lock().unwrap();
        *self
            .started_cv
            .wait_timeout_while(s, timeout, |s| !*s)
            .unwrap()
            .0
    }
}

impl DestinationVm for FakeDestination {
    fn pages(&self) -> &dyn GuestPages {
        &self.ram
    }
    fn vcpus(&self) -> u32 {
        self.vcpus
    }
    fn restore(&self, state: VmState) -> Result<(), HostError> {
        self.ram.calls.record("restore");
        self.ram.faults.check("restore")?;
        *self.restored.lock().unwrap() = Some(state);
        Ok(())
    }
    fn start(&self) -> Result<(), HostError> {
        self.ram.calls.record("start");
        self.ram.faults.check("start")?;
        *self.started.lock().unwrap() = true;
        self.started_cv.notify_all();
        Ok(())
    }
    fn note(&self, event: IncomingEvent<'_>) {
        self.events.lock().unwrap().push(match event {
            IncomingEvent::Refused { .. } => "refused".to_string(),
            IncomingEvent::Paused { lacking, .. } => format!("paused {lacking}"),
            IncomingEvent::Resumed => "resumed".to_string(),
        });
    }
}
