//! userfaultfd against the real kernel: shmem and hugetlb memfds mapped twice (a
//! registered view and an unregistered one, as hugevisor's guest and staging views),
//! and anonymous memory for MISSING/WP. Includes the host facts: a MINOR-only hole is
//! zero-filled without an event; MISSING|MINOR raises MISSING for it.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use uffd::{Access, Event, FaultKind, Features, Protection, RegisterMode, Uffd, Wake};

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

struct Map {
    addr: *mut u8,
    len: usize,
}
// SAFETY: test mappings are plain process memory, used from several threads on purpose.
unsafe impl Send for Map {}
// SAFETY: as above.
unsafe impl Sync for Map {}

impl Map {
    fn new(len: usize, flags: i32, fd: i32) -> Map {
        // SAFETY: a new mapping at a kernel-chosen address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Map {
            addr: addr.cast(),
            len,
        }
    }
    fn at(&self, off: usize) -> usize {
        assert!(off < self.len);
        self.addr as usize + off
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn memfd(len: usize, flags: u32) -> OwnedFd {
    // SAFETY: valid C string; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), flags | libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fd is ours.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    fd
}

fn read_u64(addr: usize) -> u64 {
    // SAFETY: tests pass addresses inside live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn write_u64(addr: usize, v: u64) {
    // SAFETY: tests pass addresses inside live writable mappings.
    unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
}

fn gettid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// Waits (bounded) for the next event.
fn next_event(u: &Uffd) -> Event {
    for _ in 0..2000 {
        if let Some(e) = u.read_event().unwrap() {
            return e;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no userfaultfd event within 2 s");
}

/// Runs `f` on a new thread; returns its tid and a receiver for its result.
fn spawn_reader(f: impl FnOnce() -> u64 + Send + 'static) -> (u32, mpsc::Receiver<u64>) {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        tx.send(f()).unwrap();
    });
    (tid_rx.recv_timeout(Duration::from_secs(2)).unwrap(), rx)
}

fn hugetlb_pages_available(pages: u64) -> bool {
    let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let n = |f: &str| {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ok = n("free_hugepages").saturating_sub(n("resv_hugepages")) >= pages;
    if !ok {
        assert!(
            std::env::var("HUGEVISOR_REQUIRE_HOST").ok().as_deref() != Some("1"),
            "HUGEVISOR_REQUIRE_HOST=1 but fewer than {pages} free 2 MiB hugetlb pages"
        );
        eprintln!("SKIP: fewer than {pages} free 2 MiB hugetlb pages");
    }
    ok
}

#[test]
fn open_negotiates_and_reports_features() {
    let avail = Uffd::available_features().unwrap();
    for f in [
        Features::MINOR_SHMEM,
        Features::MINOR_HUGETLBFS,
        Features::THREAD_ID,
    ] {
        assert!(avail.contains(f), "{f:?} missing from {:?}", avail.names());
    }
    let u = Uffd::open(Features::THREAD_ID | Features::MINOR_SHMEM).unwrap();
    assert!(u.features().contains(Features::THREAD_ID));
}

#[test]
fn shmem_minor_fault_carries_the_thread_id_and_continue_resolves_it() {
    let len = 16 * PAGE;
    let fd = memfd(len, 0);
    let guest = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    let staging = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    write_u64(staging.at(3 * PAGE), 0xabcd);
    let u = Uffd::open(Features::THREAD_ID | Features::MINOR_SHMEM).unwrap();
    u.register(guest.addr as u64, len as u64, RegisterMode::MINOR)
        .unwrap();
    let addr = guest.at(3 * PAGE);
    let (tid, rx) = spawn_reader(move || read_u64(addr));
    match next_event(&u) {
        Event::Pagefault {
            address,
            kind,
            access,
            thread_id,
        } => {
            assert_eq!(address, addr as u64);
            assert_eq!(kind, FaultKind::Minor);
            assert_eq!(access, Access::Read);
            assert_eq!(thread_id, Some(tid));
        }
        other => panic!("{other:?}"),
    }
    assert!(rx.try_recv().is_err(), "the reader waits until resolved");
    u.continue_range(addr as u64, PAGE as u64, Wake::Yes)
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), 0xabcd);
    // A second CONTINUE of a mapped page says so.
    assert!(matches!(
        u.continue_range(addr as u64, PAGE as u64, Wake::Yes),
        Err(uffd::Error::AlreadyMapped { .. })
    ));
}

#[test]
fn minor_only_zero_fills_holes_and_missing_minor_reports_them() {
    let len = 16 * PAGE;
    let fd = memfd(len, 0);
    let guest = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    let staging = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    let u =
        Uffd::open(Features::THREAD_ID | Features::MINOR_SHMEM | Features::MISSING_SHMEM).unwrap();
    // MINOR only: a hole (page never written) reads as zero, no event.
    u.register(guest.addr as u64, len as u64, RegisterMode::MINOR)
        .unwrap();
    assert_eq!(read_u64(guest.at(5 * PAGE)), 0);
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        u.read_event().unwrap().is_none(),
        "MINOR-only: no event for a hole"
    );
    u.unregister(guest.addr as u64, len as u64).unwrap();

    // MISSING|MINOR: a hole raises MISSING; resolve by writing through the staging view
    // and CONTINUE.
    u.register(
        guest.addr as u64,
        len as u64,
        RegisterMode::MISSING | RegisterMode::MINOR,
    )
    .unwrap();
    let addr = guest.at(9 * PAGE);
    let (_tid, rx) = spawn_reader(move || read_u64(addr));
    match next_event(&u) {
        Event::Pagefault { kind, address, .. } => {
            assert_eq!(kind, FaultKind::Missing);
            assert_eq!(address, addr as u64);
        }
        other => panic!("{other:?}"),
    }
    write_u64(staging.at(9 * PAGE), 0x5151);
    u.continue_range(addr as u64, PAGE as u64, Wake::Yes)
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), 0x5151);
}

#[test]
fn hugetlb_minor_and_continue_at_huge_page_granularity() {
    if !hugetlb_pages_available(4) {
        return;
    }
    let len = 2 * HUGE;
    let fd = memfd(len, libc::MFD_HUGETLB | libc::MFD_HUGE_2MB);
    let guest = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    let staging = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    write_u64(staging.at(HUGE + 12345 * 8), 77);
    let u = Uffd::open(Features::THREAD_ID | Features::MINOR_HUGETLBFS).unwrap();
    u.register(guest.addr as u64, len as u64, RegisterMode::MINOR)
        .unwrap();
    let addr = guest.at(HUGE + 12345 * 8);
    let (_tid, rx) = spawn_reader(move || read_u64(addr));
    match next_event(&u) {
        Event::Pagefault { kind, address, .. } => {
            assert_eq!(kind, FaultKind::Minor);
            assert_eq!(address & !(HUGE as u64 - 1), guest.at(HUGE) as u64);
        }
        other => panic!("{other:?}"),
    }
    // CONTINUE of a 4 KiB piece of a hugetlb page is refused; the whole 2 MiB works.
    assert!(u
        .continue_range(guest.at(HUGE) as u64, PAGE as u64, Wake::Yes)
        .is_err());
    u.continue_range(guest.at(HUGE) as u64, HUGE as u64, Wake::Yes)
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), 77);
}

#[test]
fn anon_missing_copy_zeropage_and_write_protect() {
    let len = 8 * PAGE;
    let m = Map::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
    let u = Uffd::open(Features::THREAD_ID | Features::PAGEFAULT_FLAG_WP).unwrap();
    u.register(
        m.addr as u64,
        len as u64,
        RegisterMode::MISSING | RegisterMode::WP,
    )
    .unwrap();

    // COPY resolves a missing fault with our data.
    let a = m.at(PAGE);
    let (_t, rx) = spawn_reader(move || read_u64(a));
    assert!(matches!(
        next_event(&u),
        Event::Pagefault {
            kind: FaultKind::Missing,
            ..
        }
    ));
    let src = vec![0x42u8; PAGE];
    assert_eq!(
        u.copy(a as u64, src.as_ptr(), PAGE as u64, Wake::Yes)
            .unwrap(),
        PAGE as u64
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(2)).unwrap(),
        0x4242_4242_4242_4242
    );

    // ZEROPAGE resolves another.
    let b = m.at(2 * PAGE);
    let (_t, rx) = spawn_reader(move || read_u64(b));
    assert!(matches!(
        next_event(&u),
        Event::Pagefault {
            kind: FaultKind::Missing,
            ..
        }
    ));
    assert_eq!(
        u.zeropage(b as u64, PAGE as u64, Wake::Yes).unwrap(),
        PAGE as u64
    );
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), 0);

    // Write-protect the copied page: a write raises WP, unprotecting lets it through.
    u.write_protect(a as u64, PAGE as u64, Protection::On, Wake::Yes)
        .unwrap();
    let (_t, rx) = spawn_reader(move || {
        write_u64(a, 7);
        1
    });
    match next_event(&u) {
        Event::Pagefault { kind, access, .. } => {
            assert_eq!(kind, FaultKind::WriteProtect);
            assert_eq!(access, Access::Write);
        }
        other => panic!("{other:?}"),
    }
    u.write_protect(a as u64, PAGE as u64, Protection::Off, Wake::Yes)
        .unwrap();
    rx.recv_timeout(Duration::from_secs(2)).unwrap();
    assert_eq!(read_u64(a), 7);

    // POISON marks a missing page; WAKE on a range with no waiters is fine.
    assert_eq!(
        u.poison(m.at(5 * PAGE) as u64, PAGE as u64, Wake::Yes)
            .unwrap(),
        PAGE as u64
    );
    // The poisoned page now has a (poison) PTE: poisoning it again reports it mapped.
    assert!(matches!(
        u.poison(m.at(5 * PAGE) as u64, PAGE as u64, Wake::Yes),
        Err(uffd::Error::AlreadyMapped { .. })
    ));
    u.wake(m.addr as u64, len as u64).unwrap();
}

#[test]
fn minor_registration_of_anon_memory_says_why_it_fails() {
    let m = Map::new(4 * PAGE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
    let u = Uffd::open(Features::MINOR_SHMEM).unwrap();
    let e = u
        .register(m.addr as u64, m.len as u64, RegisterMode::MINOR)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("UFFDIO_REGISTER") && e.contains("shmem or hugetlbfs"),
        "{e}"
    );
}

#[test]
fn handler_loop_handles_events_until_stopped() {
    let len = 4 * PAGE;
    let fd = memfd(len, 0);
    let guest = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    let staging = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    for p in 0..4 {
        write_u64(staging.at(p * PAGE), p as u64 + 100);
    }
    let u = std::sync::Arc::new(Uffd::open(Features::THREAD_ID | Features::MINOR_SHMEM).unwrap());
    u.register(guest.addr as u64, len as u64, RegisterMode::MINOR)
        .unwrap();
    let stop = std::sync::Arc::new(uffd::StopFd::new().unwrap());
    let (u2, s2) = (u.clone(), stop.clone());
    let handler = std::thread::spawn(move || {
        let mut n = 0;
        uffd::run_until_stopped(&u2, &s2, |ev| {
            if let Event::Pagefault { address, .. } = ev {
                let page = address & !(PAGE as u64 - 1);
                u2.continue_range(page, PAGE as u64, Wake::Yes).unwrap();
                n += 1;
            }
        })
        .unwrap();
        n
    });
    let base = guest.at(0);
    let (_t, rx) = spawn_reader(move || (0..4).map(|p| read_u64(base + p * PAGE)).sum());
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        100 + 101 + 102 + 103
    );
    stop.stop();
    assert_eq!(handler.join().unwrap(), 4);
}

#[test]
fn features_are_the_negotiated_ones_and_thread_id_only_when_asked() {
    let len = 4 * PAGE;
    let fd = memfd(len, 0);
    let guest = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    let staging = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
    write_u64(staging.at(PAGE), 9);
    let u = Uffd::open(Features::MINOR_SHMEM).unwrap();
    assert_eq!(u.features(), Features::MINOR_SHMEM);
    u.register(guest.addr as u64, len as u64, RegisterMode::MINOR)
        .unwrap();
    let addr = guest.at(PAGE);
    let (_tid, rx) = spawn_reader(move || read_u64(addr));
    match next_event(&u) {
        Event::Pagefault { thread_id, .. } => assert_eq!(thread_id, None),
        other => panic!("{other:?}"),
    }
    u.continue_range(addr as u64, PAGE as u64, Wake::Yes)
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), 9);
}
