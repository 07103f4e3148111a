//! The destination against scripted sources that send garbage, the wrong message for
//! the state, pages outside guest RAM, or nothing at all — at each step. Each asserts
//! the typed error and its step, and that the guest was never started before the
//! switch-over.

use std::io::Write;
use std::time::{Duration, Instant};

use guest_mm::Gpa;

use super::fakes::{FakeDestination, FakeSource};
use super::{hello, pair, quick, request, timeouts, Peer, MIB};
use crate::bitmap::PageBitmap;
use crate::error::{Error, GuestAt, HostCall, PeerError, Step, WireError};
use crate::host::VmState;
use crate::wire::auth::Session;
use crate::wire::frame::{Frame, FrameKind, FrameWriter, HEADER_LEN, MAGIC};
use crate::wire::message::{Joining, Layout, Message, SwitchOver};
use crate::wire::transport::{Connector, MemoryNet};
use crate::{destination, Mode, Timeouts};

/// 16 pages: small enough to script a post-copy by hand.
const SMALL: Layout = Layout {
    memory_bytes: 64 << 10,
    page_size: 4096,
};

fn small() -> FakeDestination {
    FakeDestination::new(SMALL.memory_bytes, 4096, "shmem")
}

/// Runs the destination against a source scripted by `script` (given the network, to
/// open the urgent connection, and the main connection); the destination's result and
/// how long it took.
fn against(
    dst: &FakeDestination,
    t: &Timeouts,
    script: impl FnOnce(&MemoryNet, Peer) + Send,
) -> (Result<crate::IncomingReport, Error>, Duration) {
    let net = MemoryNet::new();
    std::thread::scope(|scope| {
        let net = &net;
        scope.spawn(move || {
            let c = net
                .connect(Duration::from_secs(1), Duration::from_secs(5))
                .unwrap();
            script(net, Peer::new(c, SMALL));
        });
        let t0 = Instant::now();
        let r = destination::receive(net, dst, t);
        (r, t0.elapsed())
    })
}

/// Hello and HelloAck; the session the destination named.
fn handshake(peer: &mut Peer, mode: Mode) -> Session {
    peer.send(&Message::Hello(hello(&SMALL, mode)));
    match peer.recv() {
        Message::HelloAck(h) => h.session.expect("a HelloAck names the session"),
        other => panic!("{other:?}"),
    }
}

/// After the switch-over: the destination's Ready, the source's Start, its Resumed.
fn hand_over(peer: &mut Peer) {
    assert_eq!(peer.recv(), Message::Ready);
    peer.send(&Message::Start);
    assert!(matches!(peer.recv(), Message::Resumed { .. }));
}

fn raw(bytes: &[u8]) -> impl FnOnce(&mut Peer) + '_ {
    move |peer: &mut Peer| {
        peer.w.get_mut().write_all(bytes).unwrap();
        peer.w.flush().unwrap();
    }
}

fn frame_bytes(f: &Frame) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    w.send(f).unwrap();
    w.get_mut().clone()
}

fn page_frame(gpa: u64, len: usize) -> Frame {
    let mut p = gpa.to_le_bytes().to_vec();
    p.resize(8 + len, 0xab);
    Frame::new(FrameKind::Page, p)
}

fn huge_header(kind: FrameKind) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = kind as u8;
    h[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    h
}

/// What a case expects of the destination's error.
type Check = fn(&Error) -> bool;

fn nothing_happened(dst: &FakeDestination) {
    assert!(dst.calls().is_empty(), "{:?}", dst.calls());
}

#[test]
fn garbage_or_another_guest_instead_of_a_hello_is_refused() {
    let mut other_version = hello(&SMALL, Mode::Precopy);
    other_version.version = 99;
    let mut other_layout = hello(&SMALL, Mode::Precopy);
    other_layout.memory_bytes = 8 * MIB;
    let mut unknown = frame_bytes(&Frame::new(FrameKind::Hello, vec![]));
    unknown[4] = 77;
    let cases: Vec<(Vec<u8>, Option<&str>, Check)> = vec![
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), None, |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Handshake,
                    source: WireError::BadMagic { index: 0, .. }
                }
            )
        }),
        (unknown, None, |e| {
            matches!(
                e,
                Error::Wire {
                    source: WireError::UnknownKind { kind: 77, .. },
                    ..
                }
            )
        }),
        (frame_bytes(&page_frame(0, 4096)), None, |e| {
            matches!(
                e,
                Error::Peer {
                    step: Step::Handshake,
                    source: PeerError::Unexpected {
                        got: FrameKind::Page,
                        index: 0,
                        ..
                    }
                }
            )
        }),
        (
            frame_bytes(&Message::Hello(other_version).to_frame().unwrap()),
            Some("version 99"),
            |e| {
                matches!(
                    e,
                    Error::Wire {
                        step: Step::Handshake,
                        source: WireError::Version { theirs: 99, .. }
                    }
                )
            },
        ),
        (
            frame_bytes(&Message::Hello(other_layout).to_frame().unwrap()),
            Some("--memory"),
            |e| {
                matches!(
                    e,
                    Error::Layout {
                        step: Step::Handshake,
                        ..
                    }
                )
            },
        ),
        (huge_header(FrameKind::Hello), None, |e| {
            matches!(
                e,
                Error::Wire {
                    source: WireError::TooLarge {
                        kind: FrameKind::Hello,
                        ..
                    },
                    ..
                }
            )
        }),
    ];
    for (bytes, told, check) in cases {
        let dst = small();
        let (r, _) = against(&dst, &timeouts(), |_, mut peer| {
            raw(&bytes)(&mut peer);
            if let Some(text) = told {
                // The source is told what differs.
                match peer.recv() {
                    Message::Abort { reason } => assert!(reason.contains(text), "{reason}"),
                    other => panic!("{other:?}"),
                }
            }
        });
        let e = r.unwrap_err();
        assert!(check(&e), "{e}");
        if told == Some("version 99") {
            assert_eq!(e.to_string().lines().count(), 1, "{e}");
        }
        nothing_happened(&dst);
    }
}

#[test]
fn garbage_during_pre_copy_names_the_frame_and_never_starts_the_guest() {
    let at_end = SMALL.memory_bytes;
    let wrapping = u64::MAX - 0xfff;
    let mut bad_crc = frame_bytes(&page_frame(0x4000, 4096));
    let n = bad_crc.len();
    bad_crc[n - 7] ^= 0x10;
    let truncated = frame_bytes(&page_frame(0x4000, 4096))[..100].to_vec();
    let msg = |m: Message| frame_bytes(&m.to_frame().unwrap());
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (bad_crc, |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Round(0),
                    source: WireError::Checksum { index: 1, .. }
                }
            ) && e.to_string().contains("checksum")
                && e.to_string().contains("frame 1")
        }),
        (frame_bytes(&page_frame(at_end, 4096)), |e| {
            matches!(
                e,
                Error::Wire {
                    source: WireError::Malformed { index: 1, .. },
                    ..
                }
            ) && e.to_string().contains("outside guest RAM")
        }),
        (frame_bytes(&page_frame(wrapping, 4096)), |e| {
            e.to_string().contains("outside guest RAM")
        }),
        (
            msg(Message::ZeroPage {
                gpa: Gpa(wrapping),
                pages: 1,
            }),
            |e| e.to_string().contains("outside guest RAM"),
        ),
        (frame_bytes(&page_frame(0, 100)), |e| {
            matches!(
                e,
                Error::Wire {
                    source: WireError::Malformed { .. },
                    ..
                }
            )
        }),
        (huge_header(FrameKind::Page), |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Round(0),
                    source: WireError::TooLarge { max: 262_152, .. }
                }
            )
        }),
        (truncated, |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Round(0),
                    source: WireError::Truncated {
                        what: "payload",
                        ..
                    }
                }
            )
        }),
    ];
    after_handshake(cases);
}

/// After the handshake, the source sends `bytes` and closes; the destination's error
/// must pass `check`, and it must not have started anything.
fn after_handshake(cases: Vec<(Vec<u8>, Check)>) {
    for (bytes, check) in cases {
        let dst = small();
        let (r, _) = against(&dst, &timeouts(), |_, mut peer| {
            handshake(&mut peer, Mode::Precopy);
            raw(&bytes)(&mut peer);
            peer.w.get_mut().shutdown();
        });
        let e = r.unwrap_err();
        assert!(check(&e), "{e}");
        assert_eq!(e.guest_at(), GuestAt::Source);
        nothing_happened(&dst);
    }
}

#[test]
fn messages_out_of_turn_during_pre_copy_are_refused() {
    let msg = |m: Message| frame_bytes(&m.to_frame().unwrap());
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (msg(Message::Complete { demand: None }), |e| {
            matches!(
                e,
                Error::Peer {
                    step: Step::Round(0),
                    source: PeerError::Unexpected {
                        got: FrameKind::Complete,
                        ..
                    }
                }
            )
        }),
        (msg(Message::RoundEnd { round: 5 }), |e| {
            matches!(
                e,
                Error::Peer {
                    source: PeerError::Unexpected {
                        got: FrameKind::RoundEnd,
                        ..
                    },
                    ..
                }
            )
        }),
        (msg(Message::PageRequest { gpa: Gpa(0) }), |e| {
            matches!(
                e,
                Error::Peer {
                    source: PeerError::Unexpected {
                        got: FrameKind::PageRequest,
                        ..
                    },
                    ..
                }
            )
        }),
        (
            msg(Message::Abort {
                reason: "disk full".into(),
            }),
            |e| matches!(e, Error::Peer { step: Step::Round(0), source: PeerError::Aborted { reason } } if reason == "disk full"),
        ),
        (Vec::new(), |e| {
            matches!(
                e,
                Error::Peer {
                    step: Step::Round(0),
                    source: PeerError::Closed
                }
            )
        }),
    ];
    after_handshake(cases);
}

#[test]
fn a_silent_or_absent_source_is_waited_for_a_bounded_time() {
    let dst = small();
    // The source says nothing more and never closes: only the destination's timeout
    // ends this.
    let (r, _) = against(&dst, &quick(), |_, mut peer| {
        handshake(&mut peer, Mode::Precopy);
        peer.silent_until_closed();
    });
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Peer {
                step: Step::Round(0),
                source: PeerError::Timeout { .. }
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("did not answer"), "{e}");

    // Nobody connects.
    let t = Timeouts {
        accept: Duration::from_millis(200),
        ..quick()
    };
    let e = destination::receive(&MemoryNet::new(), &dst, &t).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Peer {
                step: Step::Connect,
                source: PeerError::Timeout { .. }
            }
        ),
        "{e}"
    );
    nothing_happened(&dst);
}

fn switch_over(hash: Option<u32>, missing: Option<PageBitmap>) -> Message<'static> {
    Message::SwitchOver(Box::new(SwitchOver {
        state: VmState(serde_json::json!({"vcpus": 1})),
        paused_at_ns: 1,
        memory_hash: hash,
        missing,
    }))
}

#[test]
fn the_memory_hash_is_checked_before_the_guest_is_restored() {
    let zeros = crc32fast::hash(&vec![0u8; SMALL.memory_bytes as usize]);
    let dst = small();
    let (r, _) = against(&dst, &timeouts(), |_, mut peer| {
        handshake(&mut peer, Mode::Precopy);
        peer.send(&switch_over(Some(zeros ^ 1), None));
        match peer.recv() {
            Message::Abort { reason } => assert!(reason.contains("CRC-32"), "{reason}"),
            other => panic!("{other:?}"),
        }
    });
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            Error::MemoryHash {
                step: Step::Verify,
                ..
            }
        ),
        "{e}"
    );
    nothing_happened(&dst);

    // The right hash: the guest starts, and the source's Complete ends the migration.
    let dst = small();
    let (r, _) = against(&dst, &timeouts(), |_, mut peer| {
        handshake(&mut peer, Mode::Precopy);
        peer.send(&Message::RoundEnd { round: 0 });
        peer.send(&switch_over(Some(zeros), None));
        hand_over(&mut peer);
        peer.send(&Message::Complete { demand: None });
    });
    r.unwrap();
    assert_eq!(dst.calls(), ["restore", "start", "resumed_after_migration"]);
}

#[test]
fn a_source_gone_after_resumed_leaves_the_guest_running_here() {
    let dst = small();
    let (r, _) = against(&dst, &quick(), |_, mut peer| {
        handshake(&mut peer, Mode::Precopy);
        peer.send(&switch_over(None, None));
        hand_over(&mut peer);
        std::thread::sleep(Duration::from_millis(2500));
    });
    let e = r.unwrap_err();
    assert!(matches!(e, Error::AfterSwitchOver { .. }), "{e}");
    assert!(
        matches!(
            e.root(),
            Error::Peer {
                step: Step::Complete,
                source: PeerError::Timeout { .. }
            }
        ),
        "{e}"
    );
    assert_eq!(e.guest_at(), GuestAt::Destination);
    assert_eq!(dst.calls(), ["restore", "start", "resumed_after_migration"]);
}

#[test]
fn a_failing_page_write_aborts_the_migration_on_both_ends() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    dst.ram.faults.fail("write_page", 3);
    let (s, d) = pair(
        &src,
        &dst,
        &request(Mode::Precopy),
        &super::net::TestNet::new(),
        &timeouts(),
    );
    let d = d.unwrap_err();
    assert!(
        matches!(
            d,
            Error::Host {
                step: Step::Round(0),
                call: HostCall::WritePage(Gpa(0x3000)),
                ..
            }
        ),
        "{d}"
    );
    let s = s.unwrap_err();
    assert!(
        matches!(
            s,
            Error::Wire {
                step: Step::Round(0),
                ..
            } | Error::Peer {
                step: Step::Round(0),
                ..
            }
        ),
        "{s}"
    );
    assert_eq!(src.calls(), ["start_dirty_log", "stop_dirty_log"]);
    assert!(dst.calls().is_empty());
}

/// Hello, the post-copy SwitchOver with every page missing, the urgent connection,
/// Resumed; returns the urgent connection.
fn into_postcopy(net: &MemoryNet, peer: &mut Peer) -> Peer {
    let session = handshake(peer, Mode::Postcopy);
    peer.send(&switch_over(None, Some(PageBitmap::full(SMALL.pages()))));
    let u = net
        .connect(Duration::from_secs(1), Duration::from_secs(5))
        .unwrap();
    let mut urgent = Peer::new(u, SMALL);
    urgent.send(&Message::Join {
        session,
        channel: Joining::Urgent,
    });
    hand_over(peer);
    urgent
}

fn page(byte: u8) -> Vec<u8> {
    vec![byte; 4096]
}

#[test]
fn post_copy_without_an_urgent_connection_never_starts() {
    let dst = small();
    let (r, _) = against(&dst, &quick(), |_, mut peer| {
        handshake(&mut peer, Mode::Postcopy);
        peer.send(&switch_over(None, Some(PageBitmap::full(SMALL.pages()))));
        let _ = peer.rest();
    });
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Peer {
                step: Step::UrgentConnect,
                source: PeerError::Timeout { .. }
            }
        ),
        "{e}"
    );
    assert_eq!(dst.calls(), ["restore"]);

    // A missing-pages bitmap that does not fit guest RAM.
    let dst = small();
    let (r, _) = against(&dst, &quick(), |_, mut peer| {
        handshake(&mut peer, Mode::Postcopy);
        peer.send(&switch_over(
            None,
            Some(PageBitmap::full(SMALL.pages() + 64)),
        ));
    });
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Wire {
                source: WireError::Malformed {
                    kind: FrameKind::SwitchOver,
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    nothing_happened(&dst);
}

#[test]
fn garbage_during_post_copy_fails_after_the_switch_over_without_ending_it() {
    let cases: Vec<(bool, Frame, Check)> = vec![
        (false, page_frame(SMALL.memory_bytes, 4096), |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Push,
                    source: WireError::Malformed { .. }
                }
            )
        }),
        (
            false,
            Message::Hello(hello(&SMALL, Mode::Postcopy))
                .to_frame()
                .unwrap(),
            |e| {
                matches!(
                    e,
                    Error::Peer {
                        step: Step::Push,
                        source: PeerError::Unexpected {
                            got: FrameKind::Hello,
                            ..
                        }
                    }
                )
            },
        ),
        (
            true,
            Message::RoundEnd { round: 0 }.to_frame().unwrap(),
            |e| {
                matches!(
                    e,
                    Error::Peer {
                        step: Step::Urgent,
                        source: PeerError::Unexpected {
                            got: FrameKind::RoundEnd,
                            ..
                        }
                    }
                )
            },
        ),
        (true, page_frame(u64::MAX - 0xfff, 4096), |e| {
            matches!(
                e,
                Error::Wire {
                    step: Step::Urgent,
                    source: WireError::Malformed { .. }
                }
            )
        }),
    ];
    for (on_urgent, frame, check) in cases {
        let dst = small();
        let (r, _) = against(&dst, &timeouts(), |net, mut peer| {
            let mut urgent = into_postcopy(net, &mut peer);
            let p = page(1);
            peer.send(&Message::Page {
                gpa: Gpa(0),
                data: &p,
            });
            if on_urgent {
                urgent.send_raw(&frame);
            } else {
                peer.send_raw(&frame);
            }
            // The destination ends both connections.
            let _ = urgent.rest();
            let _ = peer.rest();
        });
        let e = r.unwrap_err();
        assert_eq!(e.guest_at(), GuestAt::Destination);
        assert!(check(e.root()), "{e}");
        assert_eq!(
            dst.calls(),
            [
                "restore",
                "begin_postcopy",
                "start",
                "resumed_after_migration"
            ]
        );
    }
}

#[test]
fn post_copy_ends_when_every_page_is_in_and_a_duplicate_changes_nothing() {
    let dst = small();
    let (r, _) = against(&dst, &timeouts(), |net, mut peer| {
        let mut urgent = into_postcopy(net, &mut peer);
        // The guest asks for page 3; it comes on the urgent connection, then once more
        // (a duplicate) in the push, with other content.
        dst.wait_started(Duration::from_secs(5));
        dst.ram.pager().unwrap().request(Gpa(3 * 4096 + 5));
        assert_eq!(urgent.recv(), Message::PageRequest { gpa: Gpa(3 * 4096) });
        let first = page(3);
        urgent.send(&Message::Page {
            gpa: Gpa(3 * 4096),
            data: &first,
        });
        dst.ram.wait_installed(3, Duration::from_secs(5)).unwrap();
        let other = page(9);
        peer.send(&Message::Page {
            gpa: Gpa(3 * 4096),
            data: &other,
        });
        for p in (0..SMALL.pages()).filter(|&p| p != 3) {
            let data = page(p as u8 + 1);
            let content = if p % 2 == 0 {
                Message::ZeroPage {
                    gpa: Gpa(p * 4096),
                    pages: 1,
                }
            } else {
                Message::Page {
                    gpa: Gpa(p * 4096),
                    data: &data,
                }
            };
            peer.send(&content);
        }
        peer.send(&Message::Complete { demand: None });
        match urgent.recv() {
            Message::Complete { demand: Some(d) } => assert_eq!(d.pages, 1),
            other => panic!("{other:?}"),
        }
    });
    let report = r.unwrap();
    assert_eq!((report.pages_demand, report.pages_pushed), (1, 15));
    let ram = dst.ram.snapshot();
    assert!(
        ram[3 * 4096..4 * 4096].iter().all(|&b| b == 3),
        "the duplicate was ignored"
    );
    assert!(ram[4096..2 * 4096].iter().all(|&b| b == 2));
    assert_eq!(
        dst.calls(),
        [
            "restore",
            "begin_postcopy",
            "start",
            "resumed_after_migration",
            "end_postcopy"
        ]
    );

    // The source claims it pushed everything, but pages are missing.
    let dst = small();
    let (r, _) = against(&dst, &quick(), |net, mut peer| {
        let mut urgent = into_postcopy(net, &mut peer);
        peer.send(&Message::Complete { demand: None });
        std::thread::sleep(Duration::from_millis(3500));
        drop(urgent.rest());
    });
    let e = r.unwrap_err();
    assert!(
        matches!(
            e.root(),
            Error::PostcopyIncomplete {
                installed: 0,
                absent: 16,
                ..
            }
        ),
        "{e}"
    );
    assert!(!dst.calls().contains(&"end_postcopy"));
}
