//! The control API: HTTP/1.1 + JSON over a unix socket (mode 0600), as Cloud Hypervisor
//! and Firecracker do. Hand-written: two endpoints, one connection at a time, and no async
//! runtime to pull in for it.
//!
//! - `GET /api/v1/vm.info` — the running VM: workload, vCPUs, memory, counters.
//! - `PUT /api/v1/vm.shutdown` — ends the run as `--duration` would; answers 204.
//! - `PUT /api/v1/vm.migrate` `{"to": URI, "mode": "precopy"|"postcopy"|"hybrid",
//!   "downtime_ms": N}` — migrates and answers when the migration has ended.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};

/// A request the API thread hands to the VMM's monitor loop, with where to answer.
pub enum ApiCall {
    Info(Sender<serde_json::Value>),
    /// End the run as `--duration` would: the guest finishes its pass, the report follows.
    Shutdown(Sender<()>),
    Migrate(
        migration::MigrationRequest,
        Sender<std::result::Result<migration::MigrationReport, MigrateRefusal>>,
    ),
}

/// Why `vm.migrate` did not hand the guest over (answered 409 with this message).
#[derive(Debug, thiserror::Error)]
pub enum MigrateRefusal {
    #[error("a migration is already running")]
    AlreadyMigrating,
    #[error("the VM is {0}; only a running guest migrates")]
    NotRunning(&'static str),
    #[error("the guest finished before the migration could complete")]
    GuestFinished,
    #[error("starting the migration: {0}")]
    Start(#[source] Error),
    #[error(transparent)]
    Failed(#[from] migration::Error),
    #[error("the migration failed after pausing the guest and could not resume it: the guest runs nowhere, and the source's run ends with the error")]
    Unresumed,
    #[error("no migration to resume: the VM is {0} (only a postcopy-paused migration resumes)")]
    NothingToResume(&'static str),
    #[error("the migration is paused after the hand-over ({0}): the guest is the destination's and stays stopped here; resume it with `hugevisor migrate --resume --to URI`")]
    Paused(String),
}

pub struct ApiServer {
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` (mode 0600); calls arrive on the returned receiver.
    pub fn start(path: &Path) -> Result<(ApiServer, Receiver<ApiCall>)> {
        if path.exists() {
            return Err(Error::ApiSocketExists(path.to_path_buf()));
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Io {
            what: format!("binding the API socket {}", path.display()),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| Error::Io {
                what: "setting the API socket's mode".into(),
                source,
            },
        )?;
        listener.set_nonblocking(true).map_err(|source| Error::Io {
            what: "API socket".into(),
            source,
        })?;
        let (tx, rx) = channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Each connection on its own thread: `vm.migrate` answers only when the
                // migration ends, and `vm.info` must answer meanwhile. A bounded number
                // at once, so a local flood of connections cannot exhaust threads.
                let active = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
                while !s.load(std::sync::atomic::Ordering::Acquire) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            serve_on_thread(conn, &tx, &active);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .map_err(|source| Error::Io {
                what: "starting the API thread".into(),
                source,
            })?;
        Ok((
            ApiServer {
                path: path.to_path_buf(),
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn respond(mut conn: &UnixStream, status: u16, body: &serde_json::Value) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let text = if status == 204 {
        String::new()
    } else {
        body.to_string()
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    conn.flush()
}

/// Connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 16;

fn serve_on_thread(
    conn: UnixStream,
    tx: &Sender<ApiCall>,
    active: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::AcqRel);
        let body = serde_json::json!({ "error": "too many API connections at once; retry" });
        let _ = respond(&conn, 503, &body);
        return;
    }
    let (tx, active_conn) = (tx.clone(), active.clone());
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            let _ = serve(conn, &tx);
            active_conn.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve(conn: UnixStream, tx: &Sender<ApiCall>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(&conn);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let err = |m: String| serde_json::json!({ "error": m });
    match (method, path) {
        ("GET", "/api/v1/vm.info") => {
            let (rtx, rrx) = channel();
            if tx.send(ApiCall::Info(rtx)).is_err() {
                return respond(&conn, 500, &err("the VM is shutting down".into()));
            }
            match rrx.recv_timeout(Duration::from_secs(10)) {
                Ok(v) => respond(&conn, 200, &v),
                Err(_) => respond(&conn, 500, &err("the VM did not answer".into())),
            }
        }
        ("PUT", "/api/v1/vm.shutdown") => {
            let (rtx, rrx) = channel();
            if tx.send(ApiCall::Shutdown(rtx)).is_err() {
                return respond(&conn, 500, &err("the VM is shutting down".into()));
            }
            match rrx.recv_timeout(Duration::from_secs(10)) {
                Ok(()) => respond(&conn, 204, &serde_json::Value::Null),
                Err(_) => respond(&conn, 500, &err("the VM did not answer".into())),
            }
        }
        ("PUT", "/api/v1/vm.migrate") => {
            let req: migration::MigrationRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return respond(&conn, 400, &err(format!("bad vm.migrate body: {e}"))),
            };
            let (rtx, rrx) = channel();
            if tx.send(ApiCall::Migrate(req, rtx)).is_err() {
                return respond(&conn, 500, &err("the VM is shutting down".into()));
            }
            match rrx.recv() {
                Ok(Ok(report)) => match serde_json::to_value(&report) {
                    Ok(v) => respond(&conn, 200, &v),
                    Err(e) => respond(&conn, 500, &err(format!("encoding the report: {e}"))),
                },
                Ok(Err(m)) => respond(&conn, 409, &err(m.to_string())),
                Err(_) => respond(&conn, 500, &err("the VM ended during the migration".into())),
            }
        }
        _ => respond(
            &conn,
            404,
            &err(format!(
                "no endpoint {method} {path}; see docs/architecture.md"
            )),
        ),
    }
}

/// Client side: one request to the API socket; returns (status, JSON body).
pub fn call(
    path: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| Error::Io { what, source }
    };
    let mut conn = UnixStream::connect(path).map_err(io("connecting to the API socket"))?;
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        conn,
        "{method} {endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .map_err(io("writing to"))?;
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .map_err(io("reading from"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::ApiAnswer {
            path: path.to_path_buf(),
            what: "no HTTP status line".into(),
        })?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}
