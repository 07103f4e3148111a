//! Post-copy recovery: a connection that breaks after the hand-over pauses both ends;
//! the source resumes on new connections, the destination says what it still lacks,
//! and the migration completes with nothing lost — or, with the source gone for good,
//! the destination ends naming the pages it never received. The guest never runs twice.

use std::time::{Duration, Instant};

use guest_mm::Gpa;

use super::fakes::{FakeDestination, FakeSource};
use super::net::{At, Fault, TestNet};
use super::{pair, request, timeouts, MIB};
use crate::error::{Error, GuestAt, Step};
use crate::wire::frame::FrameKind;
use crate::{IncomingReport, MigrationReport, Mode};

/// A post-copy (or `mode`) pair over `net` whose guest asks for page 100 once it runs;
/// the source resumes `resumes` times when asked.
fn broken_pair(
    net: &TestNet,
    mode: Mode,
    resumes: usize,
) -> (
    FakeSource,
    FakeDestination,
    Result<MigrationReport, Error>,
    Result<IncomingReport, Error>,
) {
    let mut src = FakeSource::new(MIB, 4096, "shmem");
    src.read_delay_after_pause = Duration::from_millis(1);
    *src.resumes.lock().unwrap() = vec!["unix:/nowhere".parse().unwrap(); resumes];
    let dst = FakeDestination::new(MIB, 4096, "shmem");
    let (s, d) = std::thread::scope(|scope| {
        scope.spawn(|| {
            if dst.wait_started(Duration::from_secs(10)) {
                if let Some(p) = dst.ram.pager() {
                    p.request(Gpa(100 * 4096));
                }
            }
        });
        // Every case checks the memory hash too: what was resent counts once.
        let mut req = request(mode);
        req.verify = Some(crate::Verify::MemoryHash);
        pair(&src, &dst, &req, net, &timeouts())
    });
    (src, dst, s, d)
}

fn same_guest(src: &FakeSource, dst: &FakeDestination) {
    let (a, b) = (src.ram.snapshot(), dst.ram.snapshot());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(first_diff.is_none(), "RAM differs at {first_diff:x?}");
}

fn never_resumed_here(src: &FakeSource) {
    assert_eq!(src.ram.calls.count("resume"), 0, "{:?}", src.calls());
}

#[test]
fn post_copy_resumes_after_both_connections_are_cut() {
    // The main connection dies mid-push; the source closes the urgent one with it.
    let net = TestNet::new().source_fault(0, Fault::Close(At::Frame(FrameKind::Page, 40)));
    let (src, dst, s, d) = broken_pair(&net, Mode::Postcopy, 1);
    let (s, d) = (s.unwrap(), d.unwrap());
    same_guest(&src, &dst);
    assert_eq!((s.recoveries, d.recoveries), (1, 1));
    assert!(s.memory_hash.is_some());
    assert_eq!(s.memory_hash, d.memory_hash, "equal memory hashes");
    never_resumed_here(&src);
    assert_eq!(src.ram.calls.count("handover_paused"), 1);
    assert_eq!(src.ram.calls.count("handover_resumed"), 1);
    let events = dst.events.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events[0].starts_with("paused ") && events[1] == "resumed",
        "{events:?}"
    );
    let lacking: u64 = events[0]["paused ".len()..].parse().unwrap();
    assert!(lacking > 0 && lacking < 256, "{events:?}");
    assert!(dst.calls().contains(&"end_postcopy"));
    assert_eq!(dst.ram.calls.count("start"), 1, "started once");
}

#[test]
fn post_copy_resumes_after_only_the_urgent_connection_is_cut() {
    // The demanded page (the first on the urgent connection) never gets out: after the
    // resume the destination asks for it again.
    let net = TestNet::new().source_fault(1, Fault::Close(At::Frame(FrameKind::Page, 0)));
    let (src, dst, s, d) = broken_pair(&net, Mode::Postcopy, 1);
    let (s, d) = (s.unwrap(), d.unwrap());
    same_guest(&src, &dst);
    assert_eq!((s.recoveries, d.recoveries), (1, 1));
    assert!(dst.ram.installs.lock().unwrap().contains(&100));
    never_resumed_here(&src);
}

#[test]
fn hybrid_resumes_too_and_a_resume_that_fails_is_tried_again() {
    // The first resumed main connection dies as well (connection 2): the source asks its
    // VMM again and the second resume completes.
    let net = TestNet::new()
        .source_fault(0, Fault::Close(At::Frame(FrameKind::Page, 40)))
        .source_fault(2, Fault::Close(At::Frame(FrameKind::Join, 0)));
    let (src, dst, s, d) = broken_pair(&net, Mode::Postcopy, 2);
    let (s, _) = (s.unwrap(), d.unwrap());
    same_guest(&src, &dst);
    assert_eq!(src.ram.calls.count("handover_paused"), 2);
    assert_eq!(s.recoveries, 1);

    // Hybrid, and the break on the destination's side: its Resumed never gets out.
    let net = TestNet::new().destination_fault(0, Fault::Close(At::Frame(FrameKind::Resumed, 0)));
    let (src, dst, s, d) = broken_pair(&net, Mode::Hybrid, 1);
    let (s, _) = (s.unwrap(), d.unwrap());
    same_guest(&src, &dst);
    assert_eq!((s.precopy_rounds, s.recoveries), (3, 1), "{s:?}");
    never_resumed_here(&src);
}

#[test]
fn a_source_gone_for_good_ends_the_destination_naming_the_missing_pages() {
    let net = TestNet::new().source_fault(0, Fault::Close(At::Frame(FrameKind::Page, 40)));
    let t0 = Instant::now();
    let (src, dst, s, d) = broken_pair(&net, Mode::Postcopy, 0);
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    assert_eq!(s.guest_at(), GuestAt::Destination, "{s}");
    never_resumed_here(&src);
    assert_eq!(d.guest_at(), GuestAt::Destination, "{d}");
    let Error::AfterSwitchOver { source } = &d else {
        panic!("{d}")
    };
    let Error::Unrecovered {
        lacking, absent, ..
    } = **source
    else {
        panic!("{d}")
    };
    assert!(lacking > 0 && absent == 256, "{d}");
    let text = d.to_string();
    assert!(
        text.contains(&format!("{lacking} of 256 post-copy pages never arrived")),
        "{text}"
    );
    // Bounded: the recovery window (2 s here) after the break.
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(!dst.calls().contains(&"end_postcopy"), "never on zeros");
}

#[test]
fn a_lost_start_is_sent_again_on_the_resumed_connection() {
    for mode in [Mode::Precopy, Mode::Postcopy] {
        // The source hands the guest over, but its Start never gets out.
        let net = TestNet::new().source_fault(0, Fault::Close(At::Frame(FrameKind::Start, 0)));
        let (src, dst, s, d) = broken_pair(&net, mode, 1);
        let (s, d) = (s.unwrap(), d.unwrap());
        same_guest(&src, &dst);
        assert_eq!((s.recoveries, d.recoveries), (1, 1), "{mode}");
        assert_eq!(dst.ram.calls.count("start"), 1, "{mode}");
        never_resumed_here(&src);
        assert!(s.downtime_ms > 0.0);
    }
    // Without a resume the guest stays paused on the source: it may not run twice.
    let net = TestNet::new().source_fault(0, Fault::Close(At::Frame(FrameKind::Start, 0)));
    let (src, dst, s, d) = broken_pair(&net, Mode::Precopy, 0);
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    assert_eq!(s.guest_at(), GuestAt::Destination, "{s}");
    assert_eq!(s.step(), Step::Start, "{s}");
    never_resumed_here(&src);
    assert!(matches!(d, Error::Unrecovered { .. }), "{d}");
    assert_eq!(dst.ram.calls.count("start"), 0);
}

#[test]
fn a_post_copy_memory_hash_catches_pages_that_changed_after_the_pause() {
    let mut src = FakeSource::new(MIB, 4096, "shmem");
    src.read_delay_after_pause = Duration::from_millis(1);
    let dst = FakeDestination::new(MIB, 4096, "shmem");
    let mut req = request(Mode::Postcopy);
    req.verify = Some(crate::Verify::MemoryHash);
    let (s, d) = std::thread::scope(|scope| {
        scope.spawn(|| {
            // A broken source: its stopped guest's last page changes before it is sent.
            if dst.wait_started(Duration::from_secs(10)) {
                let mut b = src.ram.bytes.lock().unwrap();
                let n = b.len();
                b[n - 5] ^= 0xff;
            }
        });
        pair(&src, &dst, &req, &TestNet::new(), &timeouts())
    });
    let d = d.unwrap_err();
    assert!(
        matches!(
            d.root(),
            Error::MemoryHash {
                step: Step::Verify,
                ..
            }
        ),
        "{d}"
    );
    assert!(s.is_err());
    assert!(!dst.calls().contains(&"end_postcopy"));
}

#[test]
fn a_lost_resumed_is_learnt_on_the_resumed_connection() {
    // Pre-copy: the destination runs the guest, but its Resumed never reaches the
    // source; the source resumes, hears it started (Lacking), and completes.
    let net = TestNet::new().destination_fault(0, Fault::Close(At::Frame(FrameKind::Resumed, 0)));
    let (src, dst, s, d) = broken_pair(&net, Mode::Precopy, 1);
    let (s, d) = (s.unwrap(), d.unwrap());
    same_guest(&src, &dst);
    assert_eq!((s.recoveries, d.recoveries), (1, 1));
    assert!(s.downtime_ms > 0.0, "{s:?}");
    assert_eq!(dst.ram.calls.count("start"), 1);
    never_resumed_here(&src);
}
