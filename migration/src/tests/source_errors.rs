//! Failures at each step, seen from the source (with what they did to the destination):
//! the typed error and its step, `resume` exactly when the source had paused and the
//! destination never ran the guest, and no `start` on the destination before the
//! switch-over.

use std::time::{Duration, Instant};

use guest_mm::Gpa;

use super::fakes::{FakeDestination, FakeSource};
use super::net::{At, Fault, TestNet};
use super::{pair, quick, request, timeouts, Peer, MIB};
use crate::error::{Error, GuestAt, HostCall, PeerError, Step, WireError};
use crate::wire::frame::{Frame, FrameKind, HEADER_LEN, MAGIC};
use crate::wire::message::{Layout, Message};
use crate::wire::transport::{Acceptor, MemoryNet};
use crate::{source, Mode, NoProgress, Timeouts};

const LAYOUT: Layout = Layout {
    memory_bytes: 4 * MIB,
    page_size: 4096,
};

fn fakes() -> (FakeSource, FakeDestination) {
    (
        FakeSource::new(4 * MIB, 4096, "shmem"),
        FakeDestination::new(4 * MIB, 4096, "shmem"),
    )
}

fn never_started(dst: &FakeDestination) {
    assert!(!dst.calls().contains(&"start"), "{:?}", dst.calls());
}

fn resumed_once(src: &FakeSource) {
    assert_eq!(src.ram.calls.count("resume"), 1, "{:?}", src.calls());
}

fn not_resumed(src: &FakeSource) {
    assert_eq!(src.ram.calls.count("resume"), 0, "{:?}", src.calls());
}

/// Runs the source against a destination scripted by `dest` (given the accepted
/// connection after it read the Hello); returns the source's error.
fn against(dest: impl FnOnce(Peer) + Send, t: &Timeouts) -> (FakeSource, Error, Duration) {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let net = MemoryNet::new();
    let e = std::thread::scope(|scope| {
        scope.spawn(|| {
            let c = net.accept(Duration::from_secs(5), t.io).unwrap();
            let mut peer = Peer::new(c, LAYOUT);
            assert!(matches!(peer.recv(), Message::Hello(_)));
            dest(peer);
        });
        let t0 = Instant::now();
        let e = source::migrate_over(&src, &request(Mode::Precopy), &net, t, &NoProgress);
        (e.unwrap_err(), t0.elapsed())
    });
    (src, e.0, e.1)
}

#[test]
fn the_destination_refuses_another_layout_and_the_guest_stays() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(8 * MIB, 4096, "shmem");
    let (s, d) = pair(
        &src,
        &dst,
        &request(Mode::Precopy),
        &TestNet::new(),
        &timeouts(),
    );
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    match &s {
        Error::Peer {
            step: Step::Handshake,
            source: PeerError::Aborted { reason },
        } => assert!(
            reason.contains("memory") && reason.contains("--memory"),
            "{reason}"
        ),
        other => panic!("{other}"),
    }
    assert!(
        matches!(
            d,
            Error::Layout {
                step: Step::Handshake,
                ..
            }
        ),
        "{d}"
    );
    assert_eq!(s.guest_at(), GuestAt::Source);
    assert!(src.calls().is_empty() && dst.calls().is_empty());
}

#[test]
fn a_destination_that_never_answers_times_out_in_the_handshake() {
    // The peer never answers and never closes: only the source's own timeout ends this.
    let (src, e, _) = against(|mut peer| peer.silent_until_closed(), &quick());
    assert!(
        matches!(
            e,
            Error::Peer {
                step: Step::Handshake,
                source: PeerError::Timeout { .. }
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("did not answer"), "{e}");
    assert!(src.calls().is_empty());
}

#[test]
fn a_destination_answering_garbage_or_out_of_turn_is_refused() {
    let mut huge = [0u8; HEADER_LEN];
    huge[0..4].copy_from_slice(&MAGIC);
    huge[4] = FrameKind::HelloAck as u8;
    huge[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let other_version = Frame::new(
        FrameKind::HelloAck,
        br#"{"version":99,"memory_bytes":1}"#.to_vec(),
    );
    type Check = fn(&Error) -> bool;
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(), |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Handshake,
                    source: WireError::BadMagic { .. }
                }
            )
        }),
        (
            frame_bytes(&Message::Resumed { at_ns: 1 }.to_frame().unwrap()),
            |e| {
                matches!(
                    e,
                    Error::Peer {
                        step: Step::Handshake,
                        source: PeerError::Unexpected {
                            got: FrameKind::Resumed,
                            index: 0,
                            ..
                        }
                    }
                )
            },
        ),
        (frame_bytes(&other_version), |e| {
            matches!(
                e,
                Error::Wire {
                    source: WireError::Version { theirs: 99, .. },
                    ..
                }
            )
        }),
        (
            {
                let mut b = frame_bytes(
                    &Message::HelloAck(super::hello(&LAYOUT, Mode::Precopy))
                        .to_frame()
                        .unwrap(),
                );
                let n = b.len();
                b[n - 2] ^= 4;
                b
            },
            |e| {
                matches!(
                    e,
                    Error::Wire {
                        source: WireError::Checksum { index: 0, .. },
                        ..
                    }
                )
            },
        ),
        (huge.to_vec(), |e| {
            matches!(
                e,
                Error::Wire {
                    source: WireError::TooLarge {
                        len: 1073741824,
                        ..
                    },
                    ..
                }
            )
        }),
    ];
    for (reply, check) in cases {
        let (src, e, _) = against(
            move |mut peer| {
                use std::io::Write;
                peer.w.get_mut().write_all(&reply).unwrap();
                // The source says why it gives up.
                let rest = peer.rest();
                assert!(rest.contains(&FrameKind::Abort), "{rest:?}");
            },
            &quick(),
        );
        assert!(check(&e), "{e}");
        assert!(src.calls().is_empty(), "{:?}", src.calls());
    }
}

fn frame_bytes(f: &Frame) -> Vec<u8> {
    let mut w = crate::FrameWriter::new(Vec::new());
    w.send(f).unwrap();
    w.get_mut().clone()
}

#[test]
fn the_destination_dying_during_round_0_leaves_the_guest_running() {
    let (src, e, _) = against(
        |mut peer| {
            peer.send(&Message::HelloAck(super::hello_ack(&LAYOUT, Mode::Precopy)));
            for _ in 0..10 {
                peer.recv();
            }
            peer.w.get_mut().shutdown();
        },
        &timeouts(),
    );
    assert_eq!(e.step(), Step::Round(0), "{e}");
    assert!(matches!(e, Error::Wire { .. } | Error::Peer { .. }), "{e}");
    assert_eq!(src.calls(), ["start_dirty_log", "stop_dirty_log"]);
}

#[test]
fn failing_source_host_calls_before_the_pause_leave_the_guest_running() {
    for (call, after, step, host) in [
        (
            "start_dirty_log",
            0,
            Step::DirtyLog,
            HostCall::StartDirtyLog,
        ),
        ("take_dirty_log", 1, Step::Round(0), HostCall::TakeDirtyLog),
        ("pause", 0, Step::Pause, HostCall::Pause),
    ] {
        let (src, dst) = fakes();
        src.ram.faults.fail(call, after);
        let (s, d) = pair(
            &src,
            &dst,
            &request(Mode::Precopy),
            &TestNet::new(),
            &timeouts(),
        );
        let (s, d) = (s.unwrap_err(), d.unwrap_err());
        assert!(
            matches!(&s, Error::Host { step: st, call: c, .. } if *st == step && *c == host),
            "{call}: {s}"
        );
        assert!(s.to_string().contains("injected failure"), "{s}");
        not_resumed(&src);
        assert_eq!(s.guest_at(), GuestAt::Source);
        assert_eq!(
            src.calls().contains(&"stop_dirty_log"),
            call != "start_dirty_log",
            "{call}: {:?}",
            src.calls()
        );
        assert!(
            matches!(
                d,
                Error::Peer {
                    source: PeerError::Aborted { .. },
                    ..
                }
            ),
            "{d}"
        );
        never_started(&dst);
    }
}

#[test]
fn a_failure_after_the_pause_resumes_the_guest_on_the_source() {
    // Round 0 reads 1024 pages, round 1 the 8 dirtied meanwhile; the stop-and-copy's
    // third read fails.
    let (src, dst) = fakes();
    src.ram.faults.fail("read_page", 1024 + 8 + 2);
    let (s, d) = pair(
        &src,
        &dst,
        &request(Mode::Precopy),
        &TestNet::new(),
        &timeouts(),
    );
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    assert!(
        matches!(
            s,
            Error::Host {
                step: Step::StopAndCopy,
                call: HostCall::ReadPage(_),
                ..
            }
        ),
        "{s}"
    );
    resumed_once(&src);
    assert_eq!(s.guest_at(), GuestAt::Source);
    // The destination is past rounds 0 and 1, waiting for round 2 or the switch-over.
    assert!(
        matches!(
            d,
            Error::Peer {
                step: Step::Round(2),
                source: PeerError::Aborted { .. }
            }
        ),
        "{d}"
    );
    never_started(&dst);

    // And when resuming fails too, the error says the guest is stuck.
    let (src, dst) = fakes();
    src.ram.faults.fail("read_page", 1024 + 8 + 2);
    src.ram.faults.fail("resume", 0);
    let (s, _) = pair(
        &src,
        &dst,
        &request(Mode::Precopy),
        &TestNet::new(),
        &timeouts(),
    );
    let s = s.unwrap_err();
    assert!(matches!(s, Error::ResumeFailed { .. }), "{s}");
    assert_eq!(s.guest_at(), GuestAt::PausedOnSource);
    assert_eq!(s.step(), Step::StopAndCopy);
}

#[test]
fn a_destination_failing_at_the_switch_over_sends_the_guest_back() {
    for (call, step, host) in [
        ("restore", Step::Restore, HostCall::Restore),
        ("start", Step::Start, HostCall::Start),
    ] {
        let (src, dst) = fakes();
        dst.ram.faults.fail(call, 0);
        let (s, d) = pair(
            &src,
            &dst,
            &request(Mode::Precopy),
            &TestNet::new(),
            &timeouts(),
        );
        let (s, d) = (s.unwrap_err(), d.unwrap_err());
        assert!(
            matches!(&d, Error::Host { step: st, call: c, .. } if *st == step && *c == host),
            "{d}"
        );
        assert_eq!(
            d.guest_at(),
            GuestAt::Source,
            "start failed: nothing runs there"
        );
        match &s {
            Error::Peer {
                step: Step::Resumed,
                source: PeerError::Aborted { reason },
            } => assert!(reason.contains("injected failure"), "{reason}"),
            other => panic!("{other}"),
        }
        resumed_once(&src);
    }
}

/// The destination started the guest and its `Resumed` was lost, stalled or garbled.
/// (Before the Ready/Start hand-over this test asserted that the source resumed its
/// guest here — a second running copy; now the source keeps it paused.)
#[test]
fn a_lost_or_garbled_resumed_never_runs_the_guest_twice() {
    let resumed = At::Frame(FrameKind::Resumed, 0);
    for (fault, check) in [
        (
            Fault::Stall(resumed),
            (|e: &Error| {
                // Whichever end gives up waiting first: silence, or the destination's end.
                matches!(
                    e,
                    Error::Peer {
                        step: Step::Resumed,
                        source: PeerError::Timeout { .. } | PeerError::Closed
                    }
                )
            }) as fn(&Error) -> bool,
        ),
        (Fault::FlipBit(resumed), |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Resumed,
                    source: WireError::Checksum { .. }
                }
            )
        }),
        (Fault::Close(resumed), |e| {
            matches!(
                e,
                Error::Peer {
                    step: Step::Resumed,
                    source: PeerError::Closed
                }
            )
        }),
    ] {
        let (src, dst) = fakes();
        let net = TestNet::new().destination_fault(0, fault);
        let (s, d) = pair(&src, &dst, &request(Mode::Precopy), &net, &quick());
        let (s, d) = (s.unwrap_err(), d.unwrap_err());
        assert!(check(s.root()), "{fault:?}: {s}");
        assert!(matches!(s, Error::AfterSwitchOver { .. }), "{fault:?}: {s}");
        assert_eq!(s.guest_at(), GuestAt::Destination);
        not_resumed(&src);
        // The destination had started the guest: its error says so.
        assert!(matches!(d, Error::AfterSwitchOver { .. }), "{fault:?}: {d}");
    }
}

#[test]
fn the_source_dying_around_the_switch_over() {
    // At the SwitchOver: the guest is resumed here, the destination never starts.
    let (src, dst) = fakes();
    let net = TestNet::new().source_fault(0, Fault::Close(At::Frame(FrameKind::SwitchOver, 0)));
    let (s, d) = pair(&src, &dst, &request(Mode::Precopy), &net, &timeouts());
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    assert!(
        matches!(
            s,
            Error::Wire {
                step: Step::SwitchOver,
                ..
            }
        ),
        "{s}"
    );
    resumed_once(&src);
    assert!(
        matches!(
            d,
            Error::Peer {
                step: Step::Round(2),
                source: PeerError::Closed
            }
        ),
        "{d}"
    );
    never_started(&dst);

    // Stalling there: both ends wait for the other, and whichever gives up first ends it
    // (the destination sees the silence or the source's end).
    let (src, dst) = fakes();
    let net = TestNet::new().source_fault(0, Fault::Stall(At::Frame(FrameKind::SwitchOver, 0)));
    let (s, d) = pair(&src, &dst, &request(Mode::Precopy), &net, &quick());
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    assert!(
        matches!(
            d,
            Error::Peer {
                step: Step::Round(2),
                source: PeerError::Timeout { .. } | PeerError::Closed
            }
        ),
        "{d}"
    );
    assert_eq!(s.step(), Step::Resumed, "{s}");
    resumed_once(&src);
    never_started(&dst);

    // At the Complete, after Resumed: the guest is the destination's now.
    let (src, dst) = fakes();
    let net = TestNet::new().source_fault(0, Fault::Close(At::Frame(FrameKind::Complete, 0)));
    let (s, d) = pair(&src, &dst, &request(Mode::Precopy), &net, &timeouts());
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    assert!(matches!(s, Error::AfterSwitchOver { .. }), "{s}");
    assert_eq!(
        (s.step(), s.guest_at()),
        (Step::Complete, GuestAt::Destination)
    );
    not_resumed(&src);
    assert!(
        matches!(
            d.root(),
            Error::Peer {
                step: Step::Complete,
                source: PeerError::Closed
            }
        ),
        "{d}"
    );
    assert_eq!(d.guest_at(), GuestAt::Destination);
    assert_eq!(dst.calls(), ["restore", "start", "resumed_after_migration"]);
}

/// A post-copy pair whose guest asks for page 100 once it runs.
fn postcopy_with_demand(
    net: &TestNet,
    t: &Timeouts,
    dst_fail: Option<(&'static str, u64)>,
) -> (
    FakeSource,
    FakeDestination,
    Error,
    Result<crate::IncomingReport, Error>,
) {
    let mut src = FakeSource::new(MIB, 4096, "shmem");
    src.read_delay_after_pause = Duration::from_millis(2);
    let dst = FakeDestination::new(MIB, 4096, "shmem");
    if let Some((call, after)) = dst_fail {
        dst.ram.faults.fail(call, after);
    }
    let (s, d) = std::thread::scope(|scope| {
        scope.spawn(|| {
            if dst.wait_started(Duration::from_secs(5)) {
                dst.ram.pager().unwrap().request(Gpa(100 * 4096));
            }
        });
        pair(&src, &dst, &request(Mode::Postcopy), net, t)
    });
    (src, dst, s.unwrap_err(), d)
}

fn never_ended_postcopy(dst: &FakeDestination) {
    assert!(!dst.calls().contains(&"end_postcopy"), "{:?}", dst.calls());
}

#[test]
fn postcopy_failures_after_the_switch_over_leave_the_guest_with_the_destination() {
    // The source dies mid-push.
    let net = TestNet::new().source_fault(0, Fault::Close(At::Frame(FrameKind::Page, 10)));
    let (src, dst, s, d) = postcopy_with_demand(&net, &timeouts(), None);
    let d = d.unwrap_err();
    assert!(matches!(s, Error::AfterSwitchOver { .. }), "{s}");
    assert!(matches!(s.step(), Step::Push | Step::Urgent), "{s}");
    not_resumed(&src);
    assert_eq!(d.guest_at(), GuestAt::Destination);
    assert!(matches!(d.step(), Step::Push | Step::Urgent), "{d}");
    never_ended_postcopy(&dst);

    // The source stalls mid-push: silence on the main connection is a dead source.
    let net = TestNet::new().source_fault(0, Fault::Stall(At::Frame(FrameKind::Page, 10)));
    let (src, dst, s, d) = postcopy_with_demand(&net, &quick(), None);
    let d = d.unwrap_err();
    assert!(
        matches!(
            d.root(),
            Error::Peer {
                step: Step::Push,
                source: PeerError::Timeout { .. }
            }
        ),
        "{d}"
    );
    assert_eq!(s.guest_at(), GuestAt::Destination, "{s}");
    not_resumed(&src);
    never_ended_postcopy(&dst);

    // The destination's urgent connection dies at its first request.
    let net =
        TestNet::new().destination_fault(1, Fault::Close(At::Frame(FrameKind::PageRequest, 0)));
    let (src, dst, s, d) = postcopy_with_demand(&net, &timeouts(), None);
    let d = d.unwrap_err();
    assert!(
        matches!(
            s.root(),
            Error::Peer {
                step: Step::Urgent,
                source: PeerError::Closed
            } | Error::Wire {
                step: Step::Push,
                ..
            }
        ),
        "{s}"
    );
    assert_eq!(s.guest_at(), GuestAt::Destination);
    assert!(matches!(d, Error::AfterSwitchOver { .. }), "{d}");
    not_resumed(&src);
    never_ended_postcopy(&dst);

    // A garbled request.
    let net =
        TestNet::new().destination_fault(1, Fault::FlipBit(At::Frame(FrameKind::PageRequest, 0)));
    let (src, _, s, d) = postcopy_with_demand(&net, &timeouts(), None);
    assert!(
        matches!(
            s.root(),
            Error::Wire {
                step: Step::Urgent,
                source: WireError::Checksum { .. }
            }
        ),
        "{s}"
    );
    assert!(d.is_err());
    not_resumed(&src);

    // Installing a page fails on the destination.
    let (src, dst, s, d) =
        postcopy_with_demand(&TestNet::new(), &timeouts(), Some(("install_page", 5)));
    let d = d.unwrap_err();
    assert!(
        matches!(
            d.root(),
            Error::Host {
                call: HostCall::InstallPage(_),
                ..
            }
        ),
        "{d}"
    );
    assert_eq!(d.guest_at(), GuestAt::Destination);
    assert_eq!(s.guest_at(), GuestAt::Destination, "{s}");
    not_resumed(&src);
    never_ended_postcopy(&dst);
}

#[test]
fn a_destination_that_never_confirms_the_last_page_times_out() {
    let net = TestNet::new().destination_fault(1, Fault::Stall(At::Frame(FrameKind::Complete, 0)));
    let t0 = Instant::now();
    let (src, _, s, d) = postcopy_with_demand(&net, &quick(), None);
    assert!(
        matches!(
            s.root(),
            Error::Peer {
                step: Step::Complete,
                source: PeerError::Unconfirmed { .. }
            }
        ),
        "{s}"
    );
    assert!(s.to_string().contains("did not confirm"), "{s}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    not_resumed(&src);
    // The destination has every page: for it, the migration is complete.
    assert!(d.is_ok(), "{d:?}");
}

#[test]
fn a_destination_failing_to_begin_postcopy_sends_the_guest_back() {
    let (src, dst, s, d) =
        postcopy_with_demand(&TestNet::new(), &timeouts(), Some(("begin_postcopy", 0)));
    let d = d.unwrap_err();
    assert!(
        matches!(
            d,
            Error::Host {
                step: Step::BeginPostcopy,
                ..
            }
        ),
        "{d}"
    );
    never_started(&dst);
    assert!(
        matches!(
            s,
            Error::Peer {
                step: Step::Resumed,
                source: PeerError::Aborted { .. }
            }
        ),
        "{s}"
    );
    resumed_once(&src);
}

#[test]
fn a_source_garbling_its_stream_is_refused_and_keeps_its_guest() {
    for (fault, check) in [
        (
            Fault::FlipBit(At::Frame(FrameKind::Page, 3)),
            (|e: &Error| {
                matches!(
                    e,
                    Error::Wire {
                        step: Step::Round(0),
                        source: WireError::Checksum {
                            kind: FrameKind::Page,
                            ..
                        }
                    }
                )
            }) as fn(&Error) -> bool,
        ),
        (Fault::BadMagic(At::Frame(FrameKind::RoundEnd, 0)), |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Round(0),
                    source: WireError::BadMagic { .. }
                }
            )
        }),
        (Fault::FlipBit(At::Frame(FrameKind::SwitchOver, 0)), |e| {
            matches!(
                e,
                Error::Wire {
                    source: WireError::Checksum {
                        kind: FrameKind::SwitchOver,
                        ..
                    },
                    ..
                }
            )
        }),
    ] {
        let (src, dst) = fakes();
        let net = TestNet::new().source_fault(0, fault);
        let (s, d) = pair(&src, &dst, &request(Mode::Precopy), &net, &timeouts());
        let (s, d) = (s.unwrap_err(), d.unwrap_err());
        assert!(check(&d), "{fault:?}: {d}");
        never_started(&dst);
        assert_eq!(s.guest_at(), GuestAt::Source, "{s}");
        assert_eq!(
            src.ram.calls.count("resume"),
            src.ram.calls.count("pause"),
            "resumed exactly when paused: {:?}",
            src.calls()
        );
    }
}

/// A destination on another host: its resume time is on a clock of its own, and the
/// source times the downtime itself (a same-host pair compares the two clocks).
#[test]
fn a_destination_on_another_boot_leaves_the_downtime_to_the_source_clock() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let net = MemoryNet::new();
    let report = std::thread::scope(|scope| {
        scope.spawn(|| {
            let c = net.accept(Duration::from_secs(5), timeouts().io).unwrap();
            let mut peer = Peer::new(c, LAYOUT);
            assert!(matches!(peer.recv(), Message::Hello(_)));
            peer.send(&Message::HelloAck(crate::wire::message::Hello {
                boot_id: Some("another host's boot".into()),
                ..super::hello_ack(&LAYOUT, Mode::Precopy)
            }));
            while !matches!(peer.recv(), Message::SwitchOver(_)) {}
            peer.send(&Message::Ready);
            assert!(matches!(peer.recv(), Message::Start));
            // 1 ns after that host booted: meaningless against the source's clock.
            peer.send(&Message::Resumed { at_ns: 1 });
            assert!(matches!(peer.recv(), Message::Complete { .. }));
        });
        source::migrate_over(
            &src,
            &request(Mode::Precopy),
            &net,
            &timeouts(),
            &NoProgress,
        )
    })
    .unwrap();
    assert!(report.downtime_ms > 0.0, "{report:?}");
    assert!(report.downtime_ms <= report.total_ms, "{report:?}");
    let steps = report.downtime_steps;
    assert!(
        steps.last_pages_ms + steps.restore_ms + steps.start_ms <= report.downtime_ms + 1.0,
        "{report:?}"
    );
}
