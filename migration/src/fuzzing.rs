//! The fuzzing harnesses (`fuzz/`, driven by `cargo fuzz`; the inputs that once failed
//! are replayed by `cargo test`): [`wire`] over the frame reader and the message decoder,
//! [`destination`] over the destination's state machine with an in-memory transport.
//!
//! [`destination`] reads its input as records, so that the fuzzer spends its time on
//! what the destination does with well-formed frames rather than on guessing CRC-32s:
//!
//! ```text
//! flags u8 (bit 0: 2 MiB pages, bit 1: an urgent connection too), then records:
//!   stream u8 (bit 0: urgent) │ kind u8 │ …
//!     kind 0xFD: a page — gpa u64, fill u8 (the harness makes the whole page)
//!     kind 0xFE: Join{session, urgent} with the destination's real session
//!     kind 0xFF: raw — len u8, bytes (garbage on the stream as it is)
//!     any other kind: len u16, payload, framed with a correct checksum
//! ```
//!
//! Both harnesses assert what must hold whatever the input: re-encoding a decoded
//! message decodes to the same frame; the destination never starts the guest twice,
//! never writes a pre-copy page once it runs, installs post-copy pages only while
//! paging, and ends post-copy only with every page in.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use guest_mm::{Gpa, GpaRange, Installed, PageContent, Pager, SIZE_2M, SIZE_4K};

use crate::bitmap::PageBitmap;
use crate::destination::{receive_with, Options, Strangers};
use crate::error::WireError;
use crate::host::{DestinationVm, GuestPages, HostError, VmState};
use crate::wire::auth::{Auth, Session};
use crate::wire::frame::{Frame, FrameKind, FrameReader, FrameWriter};
use crate::wire::message::{Hello, Joining, Layout, Message, MessageReader, SwitchOver};
use crate::wire::transport::{Acceptor, Channel};
use crate::{Mode, Timeouts, PROTOCOL_VERSION};

/// The guests the harnesses use: 16 pages of 4 KiB, or 2 pages of 2 MiB.
pub fn layouts() -> [Layout; 2] {
    [
        Layout {
            memory_bytes: 16 * SIZE_4K,
            page_size: SIZE_4K,
        },
        Layout {
            memory_bytes: 2 * SIZE_2M,
            page_size: SIZE_2M,
        },
    ]
}

/// The frame reader over raw bytes, then each kind's decoder over a raw payload.
pub fn wire(data: &[u8]) {
    for layout in layouts() {
        let mut r = MessageReader::new(data, layout);
        for _ in 0..64 {
            let Ok(frame) = r.recv() else { break };
            if let Ok(m) = r.decode(&frame) {
                same_after_round_trip(&m, &layout);
            }
        }
    }
    // No checksum to guess: the first byte is the kind, the rest the payload.
    if let Some((&kind, payload)) = data.split_first() {
        let Some(kind) = FrameKind::from_u8(kind) else {
            return;
        };
        let frame = Frame::new(kind, payload.to_vec());
        for layout in layouts() {
            if let Ok(m) = Message::decode(&frame, 0, &layout) {
                same_after_round_trip(&m, &layout);
            }
        }
    }
}

/// A decoded message encodes to a frame that decodes to a message encoding the same, and
/// what it addresses lies inside the guest (the GPA that wrapped past the end was the
/// out-of-tree fuzzing's finding).
fn same_after_round_trip(m: &Message<'_>, layout: &Layout) {
    match m {
        Message::Page { gpa, .. }
        | Message::ZeroPage { gpa, .. }
        | Message::PageRequest { gpa } => {
            let len = match m {
                Message::Page { data, .. } => data.len() as u64,
                Message::ZeroPage { pages, .. } => u64::from(*pages) * layout.page_size,
                _ => layout.page_size,
            };
            let end = gpa.0.checked_add(len);
            let last = end.map(|e| e - 1);
            assert!(
                gpa.0.is_multiple_of(layout.page_size)
                    && len > 0
                    && len <= layout.extent_max_pages() * layout.page_size
                    && end.is_some_and(|e| e <= layout.memory_bytes)
                    && (len == layout.page_size
                        || last
                            .is_some_and(|l| l / guest_mm::SIZE_2M == gpa.0 / guest_mm::SIZE_2M)),
                "an extent of {len:#x} bytes at {gpa} passed for a guest of {layout:?}"
            );
        }
        Message::SwitchOver(sw) => {
            if let Some(b) = &sw.missing {
                assert_eq!(b.pages(), layout.pages(), "a bitmap of another guest");
            }
        }
        Message::Lacking { pages, .. } => {
            assert_eq!(pages.pages(), layout.pages(), "a bitmap of another guest")
        }
        _ => {}
    }
    let once = m.to_frame().expect("a decoded message encodes");
    let again = Message::decode(&once, 0, layout).expect("an encoded message decodes");
    assert_eq!(again.to_frame().expect("encodes"), once, "{m:?}");
}

/// The destination's state machine over the scripted connections in `data`; whether
/// the migration succeeded.
pub fn destination(data: &[u8]) -> bool {
    let Some((&flags, records)) = data.split_first() else {
        return false;
    };
    let layout = layouts()[usize::from(flags & 1)];
    let (main, urgent) = scripts(records, &layout);
    let net = ScriptNet::new(main, (flags & 2 != 0).then_some(urgent));
    let guest = FuzzGuest::new(layout);
    let options = Options {
        timeouts: Timeouts {
            connect: Duration::from_millis(10),
            io: Duration::from_millis(50),
            accept: Duration::from_millis(50),
            urgent_accept: Duration::from_millis(20),
            confirm: Duration::ZERO,
            recover: Duration::ZERO,
        },
        auth: Auth::None,
        strangers: Strangers::Fail,
    };
    let result = receive_with(&net, &guest, &options);
    let starts = guest.starts.load(Ordering::Relaxed);
    assert!(starts <= 1, "the guest started {starts} times");
    if result.is_ok() {
        assert_eq!(starts, 1, "a migration that succeeded started the guest");
        let absent = guest.absent.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(absent.count(), 0, "a migration that succeeded lacks pages");
    }
    result.is_ok()
}

/// The main and urgent streams the records describe.
fn scripts(mut records: &[u8], layout: &Layout) -> (Vec<u8>, Vec<Piece>) {
    let mut main = FrameWriter::new(Vec::new());
    let mut urgent: Vec<Piece> = Vec::new();
    let take = |n: usize, from: &mut &[u8]| -> Option<Vec<u8>> {
        let (head, rest) = (from.get(..n)?.to_vec(), from.get(n..)?);
        *from = rest;
        Some(head)
    };
    while let (Some(stream), Some(kind)) = (take(1, &mut records), take(1, &mut records)) {
        let frame = match kind[0] {
            0xFD => {
                let Some(head) = take(9, &mut records) else {
                    break;
                };
                let mut payload = head[..8].to_vec();
                payload.resize(8 + layout.page_size as usize, head[8]);
                Piece::Bytes(frame_bytes(FrameKind::Page as u8, &payload))
            }
            0xFE => Piece::Join,
            0xFF => {
                let Some(len) = take(1, &mut records) else {
                    break;
                };
                let Some(raw) = take(usize::from(len[0]), &mut records) else {
                    break;
                };
                Piece::Bytes(raw)
            }
            k => {
                let Some(len) = take(2, &mut records) else {
                    break;
                };
                let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
                let Some(payload) = take(len, &mut records) else {
                    break;
                };
                Piece::Bytes(frame_bytes(k, &payload))
            }
        };
        match (stream[0] & 1, frame) {
            (0, Piece::Bytes(b)) => {
                let _ = main.get_mut().write_all(&b);
            }
            (0, Piece::Join) => {}
            (_, piece) => urgent.push(piece),
        }
    }
    (main.get_mut().clone(), urgent)
}

/// A frame of kind byte `kind` (known or not) with a correct checksum.
fn frame_bytes(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    let mut out = crate::wire::frame::MAGIC.to_vec();
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A part of the urgent stream: bytes, or the Join only the destination's session makes.
#[derive(Clone)]
enum Piece {
    Bytes(Vec<u8>),
    Join,
}

/// Seeds for [`destination`]: a pre-copy and a post-copy that succeed.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let layout = layouts()[0];
    let hello = Hello {
        version: PROTOCOL_VERSION,
        memory_bytes: layout.memory_bytes,
        backing: "shmem".into(),
        page_size: layout.page_size,
        vcpus: 1,
        mode: Mode::Precopy,
        session: None,
        channels: 1,
        boot_id: None,
    };
    let record = |out: &mut Vec<u8>, stream: u8, m: &Message| {
        let f = m.to_frame().expect("seed messages encode");
        out.extend_from_slice(&[stream, f.kind as u8]);
        out.extend_from_slice(&(f.payload.len() as u16).to_le_bytes());
        out.extend_from_slice(&f.payload);
    };
    let page = |out: &mut Vec<u8>, stream: u8, p: u64| {
        out.extend_from_slice(&[stream, 0xFD]);
        out.extend_from_slice(&(p * layout.page_size).to_le_bytes());
        out.push(p as u8 + 1);
    };
    let switch_over = |missing| {
        Message::SwitchOver(Box::new(SwitchOver {
            state: VmState(serde_json::json!({"vcpus": [{}]})),
            paused_at_ns: 1,
            memory_hash: None,
            missing,
        }))
    };
    let mut pre = vec![0u8];
    record(&mut pre, 0, &Message::Hello(hello.clone()));
    (0..layout.pages()).for_each(|p| page(&mut pre, 0, p));
    record(&mut pre, 0, &Message::RoundEnd { round: 0 });
    record(&mut pre, 0, &switch_over(None));
    record(&mut pre, 0, &Message::Start);
    record(&mut pre, 0, &Message::Complete { demand: None });
    let mut post = vec![2u8];
    let hello = Hello {
        mode: Mode::Postcopy,
        ..hello
    };
    record(&mut post, 0, &Message::Hello(hello));
    record(
        &mut post,
        0,
        &switch_over(Some(PageBitmap::full(layout.pages()))),
    );
    record(&mut post, 0, &Message::Start);
    post.extend_from_slice(&[1, 0xFE]);
    page(&mut post, 1, 3);
    (0..layout.pages())
        .filter(|&p| p != 3)
        .for_each(|p| page(&mut post, 0, p));
    record(&mut post, 0, &Message::Complete { demand: None });
    vec![("precopy", pre), ("postcopy", post)]
}

/// Guest memory and a VM for the destination harness, checking the order of its calls.
struct FuzzGuest {
    layout: Layout,
    ram: Mutex<Vec<u8>>,
    absent: Mutex<PageBitmap>,
    paging: AtomicBool,
    starts: AtomicU32,
    pager: Mutex<Option<Arc<dyn Pager>>>,
}

impl FuzzGuest {
    fn new(layout: Layout) -> FuzzGuest {
        FuzzGuest {
            layout,
            ram: Mutex::new(vec![0; layout.memory_bytes as usize]),
            absent: Mutex::new(PageBitmap::empty(layout.pages())),
            paging: AtomicBool::new(false),
            starts: AtomicU32::new(0),
            pager: Mutex::default(),
        }
    }

    fn write(&self, gpa: Gpa, page: PageContent<'_>) {
        let mut ram = self.ram.lock().unwrap_or_else(|e| e.into_inner());
        let at = gpa.0 as usize..(gpa.0 + self.layout.page_size) as usize;
        match page {
            PageContent::Bytes(d) => ram[at].copy_from_slice(d),
            PageContent::Zero => ram[at].fill(0),
        }
    }
}

impl GuestPages for FuzzGuest {
    fn size(&self) -> u64 {
        self.layout.memory_bytes
    }
    fn page_size(&self) -> u64 {
        self.layout.page_size
    }
    fn backing(&self) -> String {
        "shmem".into()
    }
    fn read_page(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), HostError> {
        let ram = self.ram.lock().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&ram[gpa.0 as usize..(gpa.0 + self.layout.page_size) as usize]);
        Ok(())
    }
    fn write_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<(), HostError> {
        assert_eq!(
            self.starts.load(Ordering::Relaxed),
            0,
            "a pre-copy write to a running guest"
        );
        self.write(gpa, page);
        Ok(())
    }
    fn begin_postcopy(&self, absent: &[GpaRange], pager: Arc<dyn Pager>) -> Result<u64, HostError> {
        let mut a = self.absent.lock().unwrap_or_else(|e| e.into_inner());
        for r in absent {
            r.pages(self.layout.page_size).for_each(|p| a.set(p));
        }
        *self.pager.lock().unwrap_or_else(|e| e.into_inner()) = Some(pager);
        self.paging.store(true, Ordering::Relaxed);
        Ok(a.count())
    }
    fn install_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<Installed, HostError> {
        assert!(
            self.paging.load(Ordering::Relaxed),
            "a page installed outside post-copy"
        );
        if !self
            .absent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear(gpa.0 / self.layout.page_size)
        {
            return Ok(Installed::Duplicate);
        }
        self.write(gpa, page);
        Ok(Installed::New)
    }
    fn end_postcopy(&self) -> Result<(), HostError> {
        let lacking = self
            .absent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count();
        assert_eq!(lacking, 0, "post-copy ended with {lacking} pages absent");
        self.paging.store(false, Ordering::Relaxed);
        Ok(())
    }
    fn resumed_after_migration(&self) {}
}

impl DestinationVm for FuzzGuest {
    fn pages(&self) -> &dyn GuestPages {
        self
    }
    fn vcpus(&self) -> u32 {
        1
    }
    fn restore(&self, _state: VmState) -> Result<(), HostError> {
        Ok(())
    }
    fn start(&self) -> Result<(), HostError> {
        self.starts.fetch_add(1, Ordering::Relaxed);
        // A vCPU touches an absent page at once.
        if let Some(p) = self
            .pager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            p.request(Gpa(0));
        }
        Ok(())
    }
}

/// The scripted connections: the first accept is the main one, the second (if any) the
/// urgent one; then nothing until the door is closed.
struct ScriptNet {
    shared: Arc<Shared>,
    accepted: AtomicUsize,
    urgent: bool,
}

struct Shared {
    main: Mutex<(Vec<u8>, usize)>,
    urgent: Mutex<(Option<Vec<Piece>>, Vec<u8>, usize)>,
    /// What the destination wrote on the main connection (its HelloAck names the session).
    written: Mutex<Vec<u8>>,
    closed: [AtomicBool; 2],
    signals: Mutex<Signals>,
    wake: Condvar,
}

/// What wakes a waiting `accept`.
#[derive(Default)]
struct Signals {
    /// Set by `interrupt`, taken by the `accept` it wakes.
    woken: bool,
    /// Writes on the main connection so far.
    writes: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ScriptNet {
    fn new(main: Vec<u8>, urgent: Option<Vec<Piece>>) -> ScriptNet {
        ScriptNet {
            urgent: urgent.is_some(),
            shared: Arc::new(Shared {
                main: Mutex::new((main, 0)),
                urgent: Mutex::new((urgent, Vec::new(), 0)),
                written: Mutex::default(),
                closed: [AtomicBool::new(false), AtomicBool::new(false)],
                signals: Mutex::default(),
                wake: Condvar::new(),
            }),
            accepted: AtomicUsize::new(0),
        }
    }
}

impl Acceptor for ScriptNet {
    fn accept(&self, wait: Duration, _io: Duration) -> Result<Box<dyn Channel>, WireError> {
        let channel = |which| -> Box<dyn Channel> {
            Box::new(ScriptChannel {
                shared: self.shared.clone(),
                which,
            })
        };
        if self
            .accepted
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Ok(channel(0));
        }
        // The urgent connection comes as a real source's would: once the HelloAck went.
        let deadline = std::time::Instant::now() + wait;
        let mut signals = lock(&self.shared.signals);
        loop {
            if std::mem::take(&mut signals.woken) {
                return Err(WireError::AcceptTimeout(wait));
            }
            if self.urgent && self.accepted.load(Ordering::Acquire) == 1 {
                drop(signals);
                if self.shared.session().is_some()
                    && self
                        .accepted
                        .compare_exchange(1, 2, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    return Ok(channel(1));
                }
                signals = lock(&self.shared.signals);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(WireError::AcceptTimeout(wait));
            }
            // Woken by `interrupt` or by a write on the main connection (the HelloAck).
            let writes = signals.writes;
            signals = self
                .shared
                .wake
                .wait_timeout_while(signals, left, |s| !s.woken && s.writes == writes)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn interrupt(&self) {
        lock(&self.shared.signals).woken = true;
        self.shared.wake.notify_all();
    }
}

struct ScriptChannel {
    shared: Arc<Shared>,
    which: usize,
}

impl Shared {
    /// The session the destination's HelloAck named, if it was written yet.
    fn session(&self) -> Option<Session> {
        let written = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut r = FrameReader::new(written.as_slice());
        while let Ok(f) = r.recv() {
            if f.kind == FrameKind::HelloAck {
                let h: Hello = serde_json::from_slice(&f.payload).ok()?;
                return h.session;
            }
        }
        None
    }

    /// The urgent stream, made on its first read (a Join needs the session).
    fn urgent_bytes(&self, out: &mut Vec<u8>, pieces: Vec<Piece>) {
        let mut session = None;
        for _ in 0..50 {
            session = self.session();
            if session.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for piece in pieces {
            match (piece, session) {
                (Piece::Bytes(b), _) => out.extend_from_slice(&b),
                (Piece::Join, Some(session)) => {
                    let join = Message::Join {
                        session,
                        channel: Joining::Urgent,
                    };
                    if let Ok(f) = join.to_frame() {
                        out.extend_from_slice(&frame_bytes(f.kind as u8, &f.payload));
                    }
                }
                (Piece::Join, None) => {}
            }
        }
    }
}

impl Read for ScriptChannel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.shared.closed[self.which].load(Ordering::Acquire) {
            return Ok(0);
        }
        let copy = |bytes: &[u8], at: &mut usize, buf: &mut [u8]| {
            let n = buf.len().min(bytes.len() - *at);
            buf[..n].copy_from_slice(&bytes[*at..*at + n]);
            *at += n;
            n
        };
        if self.which == 0 {
            let mut m = self.shared.main.lock().unwrap_or_else(|e| e.into_inner());
            let (bytes, at) = &mut *m;
            return Ok(copy(bytes, at, buf));
        }
        let mut u = self.shared.urgent.lock().unwrap_or_else(|e| e.into_inner());
        let (pieces, bytes, at) = &mut *u;
        if let Some(pieces) = pieces.take() {
            self.shared.urgent_bytes(bytes, pieces);
        }
        Ok(copy(bytes, at, buf))
    }
}

impl Write for ScriptChannel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.shared.closed[self.which].load(Ordering::Acquire) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        if self.which == 0 {
            let mut w = self
                .shared
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // The HelloAck is in the first bytes; the rest need not be kept.
            if w.len() < 64 << 10 {
                w.extend_from_slice(buf);
            }
            drop(w);
            lock(&self.shared.signals).writes += 1;
            self.shared.wake.notify_all();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Channel for ScriptChannel {
    fn try_clone(&self) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(ScriptChannel {
            shared: self.shared.clone(),
            which: self.which,
        }))
    }
    fn set_io_timeout(&self, _t: Duration) -> std::io::Result<()> {
        Ok(())
    }
    fn shutdown(&self) {
        self.shared.closed[self.which].store(true, Ordering::Release);
    }
}
