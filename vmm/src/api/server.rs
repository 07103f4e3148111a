//! The API's listener and connections: each connection on a thread of its own (a
//! migration call holds its connection until the migration ends, and `vm.info` must be
//! answered meanwhile), at most [`MAX_CONNECTIONS`] at once, each request read within
//! [`http::REQUEST_WITHIN`] so that a slow or silent client holds only its own thread,
//! and for that long at most.
//!
//! When the run ends the server stops accepting, cuts off clients still sending, and
//! gives the answers already decided a moment to be written before the socket is removed.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{self, Answer};
use super::{routes, ApiCall};
use crate::error::{Error, Result};

/// Connections served at once; one more is answered 503 at once. Room for 200 clients
/// at a time and a few migrations, and a bound on threads when a local process floods us.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection thread's stack: parsing a 64 KiB body (serde_json's depth limit is 128)
/// and building an answer need far less; 256 threads of 8 MiB would be 2 GiB reserved.
const CONNECTION_STACK: usize = 512 * 1024;
/// How often the listener looks whether the run has ended.
const ACCEPT_POLL_MS: i32 = 100;
/// How long the end of the run waits for answers still being written.
const DRAIN_WITHIN: Duration = Duration::from_secs(2);

/// The connections being served, to cut off readers when the run ends.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, UnixStream>>,
    next: AtomicU64,
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, UnixStream>> {
        // Only inserted into and removed from; a panic elsewhere leaves it usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `conn`; `None` when [`MAX_CONNECTIONS`] are open.
    fn admit(&self, conn: &UnixStream) -> Option<u64> {
        let mut open = self.lock();
        if open.len() >= MAX_CONNECTIONS {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // A connection whose handle cannot be kept is served all the same; it is only
        // not cut off early at the end.
        if let Ok(c) = conn.try_clone() {
            open.insert(id, c);
        }
        Some(id)
    }

    fn leave(&self, id: u64) {
        self.lock().remove(&id);
    }
}

pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    connections: Arc<Connections>,
}

impl ApiServer {
    /// Listens on `path` (mode 0600); calls arrive on the returned receiver.
    pub fn start(path: &Path) -> Result<(ApiServer, Receiver<ApiCall>)> {
        if path.exists() {
            return Err(Error::ApiSocketExists(path.to_path_buf()));
        }
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| Error::Io { what, source }
        };
        let listener = UnixListener::bind(path).map_err(io("binding the API socket"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("setting the mode of the API socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("making the API socket non-blocking"))?;
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Connections::default());
        let (s, c) = (stop.clone(), connections.clone());
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(&listener, &s, &c, &tx))
            .map_err(io("starting the API thread for"))?;
        Ok((
            ApiServer {
                path: path.to_path_buf(),
                stop,
                thread: Some(thread),
                connections,
            },
            rx,
        ))
    }
}

fn accept_loop(
    listener: &UnixListener,
    stop: &AtomicBool,
    connections: &Arc<Connections>,
    calls: &Sender<ApiCall>,
) {
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives across the call, for a descriptor we own.
        let ready = unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) };
        if ready <= 0 {
            continue;
        }
        // Everything queued, then back to waiting.
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    if conn.set_nonblocking(false).is_ok() {
                        serve_on_thread(conn, connections, calls);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of descriptors or memory: the queued client waits; do not spin.
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS as u64));
                    break;
                }
            }
        }
    }
}

fn serve_on_thread(conn: UnixStream, connections: &Arc<Connections>, calls: &Sender<ApiCall>) {
    let Some(id) = connections.admit(&conn) else {
        let busy = Answer::error(
            503,
            &format!("{MAX_CONNECTIONS} API connections are open; retry when one has closed"),
            None,
        );
        let _ = http::write_answer(&conn, &busy);
        return;
    };
    let (calls, conns) = (calls.clone(), connections.clone());
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .stack_size(CONNECTION_STACK)
        .spawn(move || {
            serve(&conn, &calls);
            conns.leave(id);
        });
    if spawned.is_err() {
        connections.leave(id);
    }
}

/// Reads one request, serves it, answers, and closes.
fn serve(conn: &UnixStream, calls: &Sender<ApiCall>) {
    let deadline = Instant::now() + http::REQUEST_WITHIN;
    let answer = match http::read_request(conn, deadline) {
        Ok(request) => match routes::find(&request.method, &request.path) {
            Ok(endpoint) => routes::serve(endpoint, &request, calls),
            Err(answer) => answer,
        },
        // Nobody left to answer.
        Err(http::HttpError::Truncated) => return,
        Err(e) => Answer::error(e.status(), &e.to_string(), None),
    };
    let _ = http::write_answer(conn, &answer);
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Clients still sending will not be served: cut them off. Calls being answered
        // have their answer by now (the controller answers everything before it ends).
        for conn in self.connections.lock().values() {
            let _ = conn.shutdown(std::net::Shutdown::Read);
        }
        let deadline = Instant::now() + DRAIN_WITHIN;
        while !self.connections.lock().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
