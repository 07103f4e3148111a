//! The destination's door: every connection that reaches its listener is authenticated,
//! then taken by its first message — the main connection (a `Hello`, while there is
//! none yet), or one that joins this migration's session (urgent, resumed). Anything
//! else is refused (told why, closed) and counted, and the migration goes on: a garbage
//! connection, an unauthenticated one, or a third process that connects in the middle of
//! a migration can neither end it nor become part of it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread::Scope;
use std::time::{Duration, Instant};

use crate::error::{AuthError, Error, PeerError, Step, WireError};
use crate::host::{DestinationVm, IncomingEvent};
use crate::wire::auth::{Auth, AuthStep, Session};
use crate::wire::conn::Conn;
use crate::wire::frame::FrameKind;
use crate::wire::message::{Hello, Joining, Layout, Message};
use crate::wire::transport::{Acceptor, Channel};
use crate::Timeouts;

/// What a connection that is not a migration source does before the migration began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strangers {
    /// It is refused and counted; the destination waits on for its source (the VMM).
    #[default]
    Refuse,
    /// It fails the migration with what was wrong with it (tests of the decoder).
    Fail,
}

/// Connections being authenticated at once; more are refused at the door.
const MAX_ADMITTING: usize = 8;
/// How often the door looks up from `accept` to see whether the migration ended.
const LOOK_UP: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's first message after authentication, owned.
enum Opening {
    Auth(AuthStep),
    Hello(Hello),
    Join { session: Session, channel: Joining },
    Other(FrameKind),
}

impl Opening {
    fn of(m: Message<'_>) -> Result<Opening, String> {
        Ok(match m {
            Message::Auth(step) => Opening::Auth(step),
            Message::Hello(h) => Opening::Hello(h),
            Message::Join { session, channel } => Opening::Join { session, channel },
            Message::Abort { reason } => return Err(reason),
            other => Opening::Other(other.kind()),
        })
    }
}

pub(crate) struct Door<'a> {
    acceptor: &'a dyn Acceptor,
    auth: &'a Auth,
    vm: &'a dyn DestinationVm,
    layout: Layout,
    timeouts: Timeouts,
    pub(crate) session: Session,
    refused: AtomicU64,
    stop: AtomicBool,
    admitting: AtomicUsize,
    /// Connections being authenticated, to end them when the migration ends.
    pending: Mutex<Vec<Box<dyn Channel>>>,
    joined_tx: Mutex<mpsc::Sender<(Joining, Conn)>>,
    joined_rx: Mutex<mpsc::Receiver<(Joining, Conn)>>,
}

impl<'a> Door<'a> {
    pub(crate) fn new(
        acceptor: &'a dyn Acceptor,
        auth: &'a Auth,
        vm: &'a dyn DestinationVm,
        layout: Layout,
        timeouts: Timeouts,
    ) -> Result<Door<'a>, Error> {
        let (tx, rx) = mpsc::channel();
        Ok(Door {
            acceptor,
            auth,
            vm,
            layout,
            timeouts,
            session: Session::random().map_err(|source| Error::Auth {
                step: Step::Connect,
                source,
            })?,
            refused: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            admitting: AtomicUsize::new(0),
            pending: Mutex::default(),
            joined_tx: Mutex::new(tx),
            joined_rx: Mutex::new(rx),
        })
    }

    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn refuse(&self, conn: Conn, why: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.vm.note(IncomingEvent::Refused { why });
        conn.refuse(why);
    }

    /// A connection as this door takes it: TLS wraps it first (a peer that fails the
    /// handshake is refused and counted here).
    fn conn(&self, channel: Box<dyn Channel>) -> Result<Conn, Error> {
        let channel = match self.auth.wrap_server(
            channel
                .try_clone()
                .map_err(|e| Error::wire(Step::Connect, self.timeouts.io)(WireError::Io(e)))?,
        ) {
            Ok(c) => c,
            Err(source) => {
                let why = source.to_string();
                self.refused.fetch_add(1, Ordering::Relaxed);
                self.vm.note(IncomingEvent::Refused { why: &why });
                channel.shutdown();
                return Err(Error::Auth {
                    step: Step::Connect,
                    source,
                });
            }
        };
        Conn::new(channel, self.layout, self.timeouts.io)
            .map_err(|e| Error::wire(Step::Connect, self.timeouts.io)(WireError::Io(e)))
    }

    /// The first message after authentication, or why the connection is refused.
    fn opening(&self, conn: &mut Conn, step: Step) -> Result<Opening, Error> {
        let first = conn
            .recv(step, Opening::of)?
            .map_err(|reason| Error::peer(step, PeerError::Aborted { reason }))?;
        let auth = |source| Error::Auth { step, source };
        match (self.auth, first) {
            (Auth::None | Auth::Tls(_), Opening::Auth(_)) => Err(auth(AuthError::KeyNotExpected)),
            (Auth::None | Auth::Tls(_), opening) => Ok(opening),
            (Auth::Key(_), Opening::Auth(challenge)) => {
                self.auth.server(conn, &challenge).map_err(auth)?;
                conn.recv(step, Opening::of)?
                    .map_err(|reason| Error::peer(step, PeerError::Aborted { reason }))
            }
            (Auth::Key(_), other) => Err(auth(AuthError::Unauthenticated { got: other.kind() })),
        }
    }

    /// The main connection: the first one that authenticates and says Hello, within the
    /// accept timeout. Candidates are heard at once, each on a thread of its own, so a
    /// stranger that connects and says nothing holds up no one. The others are refused
    /// (or, with [`Strangers::Fail`], the first of them ends the wait with its error). A
    /// Hello of another protocol version ends it either way: that is this migration's
    /// source, misconfigured.
    pub(crate) fn main(&self, strangers: Strangers) -> Result<(Conn, Hello), Error> {
        let io = self.timeouts.io;
        let deadline = Instant::now() + self.timeouts.accept;
        let (tx, rx) = mpsc::channel::<(usize, Option<Conn>, Result<Hello, Error>)>();
        let candidates: Mutex<Vec<(usize, Box<dyn Channel>)>> = Mutex::default();
        let chosen = std::thread::scope(|scope| {
            let mut next = 0usize;
            let chosen = loop {
                if let Ok((id, conn, verdict)) = rx.try_recv() {
                    match (conn, verdict) {
                        (Some(conn), Ok(hello)) => break Ok((id, conn, hello)),
                        (conn, Err(error)) => {
                            let fatal = matches!(
                                error,
                                Error::Wire {
                                    source: WireError::Version { .. },
                                    ..
                                }
                            );
                            if fatal || strangers == Strangers::Fail {
                                if let Some(conn) = conn {
                                    conn.refuse(&error.to_string());
                                }
                                break Err(error);
                            }
                            if let Some(conn) = conn {
                                self.refuse(conn, &error.to_string());
                            }
                        }
                        (None, Ok(_)) => {}
                    }
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let waited = self.timeouts.accept;
                    break Err(Error::wire(Step::Connect, io)(WireError::AcceptTimeout(
                        waited,
                    )));
                }
                let channel = match self.acceptor.accept(left.min(LOOK_UP), io) {
                    Ok(c) => c,
                    Err(WireError::AcceptTimeout(_)) => continue,
                    Err(e) => break Err(Error::wire(Step::Connect, io)(e)),
                };
                if self.admitting.fetch_add(1, Ordering::AcqRel) >= MAX_ADMITTING {
                    self.admitting.fetch_sub(1, Ordering::AcqRel);
                    let why = "too many connections are authenticating at once";
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    self.vm.note(IncomingEvent::Refused { why });
                    channel.shutdown();
                    continue;
                }
                if let Ok(c) = channel.try_clone() {
                    lock(&candidates).push((next, c));
                }
                let (id, tx) = (next, tx.clone());
                next += 1;
                scope.spawn(move || {
                    let verdict = match self.conn(channel) {
                        Ok(mut conn) => {
                            let hello = self.hello(&mut conn);
                            (Some(conn), hello)
                        }
                        // Refused and counted already: no TLS peer of ours.
                        Err(e) => (None, Err(e)),
                    };
                    let _ = tx.send((id, verdict.0, verdict.1));
                    self.admitting.fetch_sub(1, Ordering::AcqRel);
                    // The wait for the next candidate ends: this one has its verdict.
                    self.acceptor.interrupt();
                });
            };
            // The others are strangers now: end them (they are refused below).
            let winner = chosen.as_ref().map(|c| c.0).ok();
            for (id, c) in lock(&candidates).iter() {
                if Some(*id) != winner {
                    c.shutdown();
                }
            }
            chosen
        });
        drop(tx);
        for (_, conn, _) in rx.try_iter() {
            if let Some(conn) = conn {
                self.refuse(conn, "another source came first");
            }
        }
        chosen.map(|(_, conn, hello)| (conn, hello))
    }

    /// A candidate's Hello, or why it is not one.
    fn hello(&self, conn: &mut Conn) -> Result<Hello, Error> {
        let step = Step::Handshake;
        match self.opening(conn, step)? {
            Opening::Hello(hello) => Ok(hello),
            other => Err(Error::peer(
                step,
                PeerError::Unexpected {
                    index: conn.reader.last_index(),
                    expected: "the source's Hello",
                    got: other.kind(),
                },
            )),
        }
    }

    /// Once the main connection is in: takes every later connection until [`Door::close`],
    /// hands those that join this session to [`Door::joined`], refuses the rest.
    pub(crate) fn serve<'s>(&'s self, scope: &'s Scope<'s, '_>) {
        while !self.stop.load(Ordering::Acquire) {
            let channel = match self.acceptor.accept(LOOK_UP, self.timeouts.io) {
                Ok(c) => c,
                Err(WireError::AcceptTimeout(_)) => continue,
                // A listener that fails keeps failing: the migration goes on without it.
                Err(_) => return,
            };
            if self.admitting.fetch_add(1, Ordering::AcqRel) >= MAX_ADMITTING {
                self.admitting.fetch_sub(1, Ordering::AcqRel);
                let why = "too many connections are authenticating at once";
                self.refused.fetch_add(1, Ordering::Relaxed);
                self.vm.note(IncomingEvent::Refused { why });
                channel.shutdown();
                continue;
            }
            if let (Ok(c), Ok(mut p)) = (channel.try_clone(), self.pending.lock()) {
                p.push(c);
            }
            // Authenticating (a TLS handshake, a challenge) takes round trips: on a
            // thread of its own, so a slow stranger holds up nobody.
            scope.spawn(move || {
                if let Ok(conn) = self.conn(channel) {
                    self.admit(conn);
                }
                self.admitting.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    fn admit(&self, mut conn: Conn) {
        let opening = self.opening(&mut conn, Step::Connect);
        match opening {
            Ok(Opening::Join { session, channel }) if session == self.session => {
                let tx = self.joined_tx.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(mpsc::SendError((_, conn))) = tx.send((channel, conn)) {
                    drop(tx);
                    self.refuse(conn, "the migration has ended");
                }
            }
            Ok(Opening::Join { .. }) => {
                self.refuse(conn, "that is not the migration in progress here")
            }
            Ok(other) => self.refuse(
                conn,
                &format!(
                    "a migration is in progress here; a connection that does not join it ({:?} first) is refused",
                    other.kind()
                ),
            ),
            Err(e) => self.refuse(conn, &e.to_string()),
        }
    }

    /// The next connection that joined as `channel`, within `wait`. One that joined as
    /// the other kind is refused (nothing expects it now).
    pub(crate) fn joined(&self, channel: Joining, wait: Duration) -> Option<Conn> {
        let deadline = Instant::now() + wait;
        let rx = self.joined_rx.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((c, conn)) if c == channel => return Some(conn),
                Ok((c, conn)) => {
                    self.refuse(conn, &format!("a {c:?} connection is not expected now"))
                }
                Err(_) => return None,
            }
        }
    }

    /// The migration is over: stop taking connections and end those being authenticated.
    pub(crate) fn close(&self) {
        self.stop.store(true, Ordering::Release);
        self.acceptor.interrupt();
        for c in self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.shutdown();
        }
    }
}

impl Opening {
    fn kind(&self) -> FrameKind {
        match self {
            Opening::Auth(_) => FrameKind::Auth,
            Opening::Hello(_) => FrameKind::Hello,
            Opening::Join { .. } => FrameKind::Join,
            Opening::Other(k) => *k,
        }
    }
}
