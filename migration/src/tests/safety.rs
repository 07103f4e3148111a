//! Trust: connections authenticate with the migration key before anything they send is
//! read as a page or a state; a waiting destination outlives garbage and strangers; a
//! third connection during a migration is refused and counted, and the migration
//! completes.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use guest_mm::Gpa;

use super::fakes::{FakeDestination, FakeSource};
use super::{hello, request, timeouts, Peer, MIB};
use crate::destination::{self, Options as Incoming, Strangers};
use crate::error::{AuthError, Error, PeerError, Step};
use crate::source::{self, Options as Outgoing};
use crate::wire::auth::{Auth, AuthStep, Key, Session};
use crate::wire::frame::FrameKind;
use crate::wire::message::{Joining, Layout, Message};
use crate::wire::transport::{Connector, MemoryNet};
use crate::{IncomingReport, MigrationReport, Mode, NoProgress, Timeouts};

const LAYOUT: Layout = Layout {
    memory_bytes: 2 * MIB,
    page_size: 4096,
};

fn key(byte: u8) -> Auth {
    Auth::Key(Arc::new(Key::from_bytes(&[byte; 32]).unwrap()))
}

fn fakes() -> (FakeSource, FakeDestination) {
    (
        FakeSource::new(LAYOUT.memory_bytes, 4096, "shmem"),
        FakeDestination::new(LAYOUT.memory_bytes, 4096, "shmem"),
    )
}

fn incoming(auth: Auth, strangers: Strangers, t: Timeouts) -> Incoming {
    Incoming {
        timeouts: t,
        auth,
        strangers,
    }
}

/// A source with `src_auth` against a destination with `dst`; `meanwhile` runs beside
/// them on the same network (strangers, intruders) once the destination listens.
fn run(
    src: &FakeSource,
    dst: &FakeDestination,
    mode: Mode,
    src_auth: Auth,
    dst_opts: &Incoming,
    meanwhile: impl FnOnce(&MemoryNet) + Send,
) -> (
    Result<MigrationReport, Error>,
    Result<IncomingReport, Error>,
) {
    let net = MemoryNet::new();
    let out = Outgoing {
        timeouts: timeouts(),
        auth: src_auth,
    };
    std::thread::scope(|scope| {
        let d = scope.spawn(|| destination::receive_with(&net, dst, dst_opts));
        meanwhile(&net);
        let s = source::migrate_with(src, &request(mode), &net, &out, &NoProgress);
        (s, d.join().unwrap())
    })
}

fn same_memory(src: &FakeSource, dst: &FakeDestination) {
    assert!(
        src.ram.snapshot() == dst.ram.snapshot(),
        "guest RAM differs"
    );
}

#[test]
fn a_shared_key_authenticates_every_connection_of_every_mode() {
    for mode in [Mode::Precopy, Mode::Postcopy, Mode::Hybrid] {
        let (src, dst) = fakes();
        let opts = incoming(key(7), Strangers::Refuse, timeouts());
        let (s, d) = run(&src, &dst, mode, key(7), &opts, |_| {});
        let (s, d) = (s.unwrap(), d.unwrap());
        same_memory(&src, &dst);
        assert_eq!(d.refused_connections, 0, "{mode}: {d:?}");
        assert_eq!(s.mode, mode.name());
    }
}

#[test]
fn a_wrong_or_missing_key_is_refused_and_named() {
    // Different keys: the source finds the destination's answer wrong and stops.
    let (src, dst) = fakes();
    let opts = incoming(key(1), Strangers::Fail, timeouts());
    let (s, d) = run(&src, &dst, Mode::Precopy, key(2), &opts, |_| {});
    let s = s.unwrap_err();
    assert!(
        matches!(
            s,
            Error::Auth {
                step: Step::Connect,
                source: AuthError::WrongKey {
                    peer: "destination"
                }
            }
        ),
        "{s}"
    );
    assert!(s.to_string().contains("--migration-key"), "{s}");
    assert!(d.is_err());
    assert!(src.calls().is_empty() && dst.calls().is_empty());

    // A key on the source only, and on the destination only: each is told.
    let (src, dst) = fakes();
    let opts = incoming(Auth::None, Strangers::Fail, timeouts());
    let (s, d) = run(&src, &dst, Mode::Precopy, key(2), &opts, |_| {});
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    assert!(
        matches!(&s, Error::Peer { source: PeerError::Aborted { reason }, .. } if reason.contains("has none")),
        "{s}"
    );
    assert!(
        matches!(
            d,
            Error::Auth {
                source: AuthError::KeyNotExpected,
                ..
            }
        ),
        "{d}"
    );
    let (src, dst) = fakes();
    let opts = incoming(key(2), Strangers::Fail, timeouts());
    let (s, d) = run(&src, &dst, Mode::Precopy, Auth::None, &opts, |_| {});
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    assert!(
        matches!(&s, Error::Peer { source: PeerError::Aborted { reason }, .. } if reason.contains("requires authentication")),
        "{s}"
    );
    assert!(
        matches!(
            d,
            Error::Auth {
                source: AuthError::Unauthenticated {
                    got: FrameKind::Hello
                },
                ..
            }
        ),
        "{d}"
    );
    assert!(dst.calls().is_empty());
}

/// Connects to `net` and hands the connection to `script`.
fn stranger(net: &MemoryNet, script: impl FnOnce(&mut Peer)) {
    let c = net
        .connect(Duration::from_secs(1), Duration::from_secs(5))
        .unwrap();
    script(&mut Peer::new(c, LAYOUT));
}

/// What a refused stranger hears: an Abort (never a HelloAck), then the end.
fn refused(peer: &mut Peer) -> String {
    let kinds = peer.rest();
    assert!(!kinds.contains(&FrameKind::HelloAck), "{kinds:?}");
    assert_eq!(kinds, [FrameKind::Abort], "{kinds:?}");
    "refused".into()
}

#[test]
fn an_unauthenticated_or_replayed_stream_gets_no_hello_ack_and_the_source_still_migrates() {
    let (src, dst) = fakes();
    let opts = incoming(key(5), Strangers::Refuse, timeouts());
    let (s, d) = run(&src, &dst, Mode::Precopy, key(5), &opts, |net| {
        // A Hello with no authentication: refused, no HelloAck.
        stranger(net, |p| {
            p.send(&Message::Hello(hello(&LAYOUT, Mode::Precopy)));
            refused(p);
        });
        // A replayed exchange: a challenge, then a proof recorded from another session
        // (it covers the other session's nonces): refused.
        stranger(net, |p| {
            p.send(&Message::Auth(AuthStep::Challenge { nonce: [9; 32] }));
            assert!(matches!(p.recv(), Message::Auth(AuthStep::Answer { .. })));
            p.send(&Message::Auth(AuthStep::Proof { mac: [3; 32] }));
            refused(p);
        });
    });
    let (_, d) = (s.unwrap(), d.unwrap());
    same_memory(&src, &dst);
    assert_eq!(d.refused_connections, 2, "{d:?}");
    let events = dst.events.lock().unwrap().clone();
    assert_eq!(events, ["refused", "refused"]);
}

#[test]
fn garbage_does_not_end_a_waiting_destination() {
    let (src, dst) = fakes();
    let opts = incoming(Auth::None, Strangers::Refuse, timeouts());
    let (s, d) = run(&src, &dst, Mode::Postcopy, Auth::None, &opts, |net| {
        stranger(net, |p| {
            p.w.get_mut().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            refused(p);
        });
        stranger(net, |p| {
            let page = vec![0xee; 4096];
            p.send(&Message::Page {
                gpa: Gpa(0),
                data: &page,
            });
            refused(p);
        });
        // Connects and leaves at once.
        stranger(net, |p| p.w.get_mut().shutdown());
        // Joins a session that is not in progress.
        stranger(net, |p| {
            p.send(&Message::Join {
                session: Session::random().unwrap(),
                channel: Joining::Urgent,
            });
            refused(p);
        });
    });
    let (_, d) = (s.unwrap(), d.unwrap());
    same_memory(&src, &dst);
    assert_eq!(d.refused_connections, 4, "{d:?}");
}

#[test]
fn a_third_connection_during_a_migration_is_refused_and_the_migration_completes() {
    let (mut src, dst) = fakes();
    // A slow push: the intruders arrive while it runs.
    src.read_delay_after_pause = Duration::from_millis(3);
    let opts = incoming(Auth::None, Strangers::Refuse, timeouts());
    let net = MemoryNet::new();
    let out = Outgoing {
        timeouts: timeouts(),
        auth: Auth::None,
    };
    let (s, d) = std::thread::scope(|scope| {
        let d = scope.spawn(|| destination::receive_with(&net, &dst, &opts));
        scope.spawn(|| {
            assert!(dst.wait_started(Duration::from_secs(10)));
            // Another Hello (a second source), an urgent channel of a guessed session,
            // and a resumed one: none may join.
            stranger(&net, |p| {
                p.send(&Message::Hello(hello(&LAYOUT, Mode::Postcopy)));
                refused(p);
            });
            for channel in [Joining::Urgent, Joining::Resume] {
                stranger(&net, |p| {
                    p.send(&Message::Join {
                        session: Session::random().unwrap(),
                        channel,
                    });
                    refused(p);
                });
            }
            dst.ram.pager().unwrap().request(Gpa(300 * 4096));
        });
        let s = source::migrate_with(&src, &request(Mode::Postcopy), &net, &out, &NoProgress);
        (s, d.join().unwrap())
    });
    let (s, d) = (s.unwrap(), d.unwrap());
    same_memory(&src, &dst);
    assert_eq!(d.refused_connections, 3, "{d:?}");
    assert_eq!(
        s.pages_pushed + s.pages_demand + s.pages_prefetched,
        LAYOUT.pages()
    );
    assert_eq!(src.ram.calls.count("resume"), 0);
}
