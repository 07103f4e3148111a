//! Transports: `tcp:HOST:PORT` and `unix:PATH`, with bounded waits, behind a seam.
//!
//! The state machines see a connection as a [`Channel`] (bytes both ways, clonable so one
//! thread reads while another writes, shut down from either), opened by a [`Connector`]
//! (the source) or an [`Acceptor`] (the destination). [`Uri`] and [`Listener`] are the
//! real ones; [`MemoryNet`] connects the two ends inside one process (socket pairs), and
//! tests wrap its channels to inject faults.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{ParseError, WireError};

/// A connection of a migration.
pub trait Channel: Read + Write + Send {
    /// Another handle on the same connection.
    fn try_clone(&self) -> std::io::Result<Box<dyn Channel>>;
    /// How long a read or write may wait before it fails as [`WireError::Silent`].
    fn set_io_timeout(&self, t: Duration) -> std::io::Result<()>;
    /// Ends the connection both ways, for every handle: a blocked read returns.
    fn shutdown(&self);
    /// Bytes written but still in this end's socket buffer (not yet taken by the peer):
    /// a sender that times its writes adds them to what is left, or it would count a
    /// full buffer as sent. 0 where the transport cannot tell.
    fn unsent_bytes(&self) -> u64 {
        0
    }
}

/// Opens connections to a destination (the source's side).
pub trait Connector: Sync {
    /// One connection, retrying for up to `wait` (the peer may still be starting).
    fn connect(&self, wait: Duration, io_timeout: Duration) -> Result<Box<dyn Channel>, WireError>;
    /// The name TLS checks the destination's certificate against.
    fn server_name(&self) -> String {
        "localhost".into()
    }
}

/// Takes connections from a source (the destination's side).
pub trait Acceptor: Sync {
    /// One connection within `wait`, else [`WireError::AcceptTimeout`].
    fn accept(&self, wait: Duration, io_timeout: Duration) -> Result<Box<dyn Channel>, WireError>;
    /// Wakes an `accept` that is waiting (now or next): it returns `AcceptTimeout` at
    /// once, and its caller looks again at why it waits. Acceptors whose waits are short
    /// anyway need not.
    fn interrupt(&self) {}
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Uri {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Uri {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Uri, ParseError> {
        let bad = |why: String| ParseError::Uri {
            text: s.to_string(),
            why,
        };
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT".into()))?;
            port.parse::<u16>()
                .map_err(|_| bad(format!("{port:?} is not a port number")))?;
            if host.is_empty() {
                return Err(bad("missing host (e.g. tcp:127.0.0.1:4444)".into()));
            }
            return Ok(Uri::Tcp(rest.to_string()));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("missing path".into()));
            }
            return Ok(Uri::Unix(PathBuf::from(path)));
        }
        Err(bad("a migration URI is tcp:HOST:PORT or unix:PATH".into()))
    }
}

impl TryFrom<String> for Uri {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Uri, ParseError> {
        s.parse()
    }
}

impl From<Uri> for String {
    fn from(u: Uri) -> String {
        u.to_string()
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Uri {
    fn connect_once(&self) -> std::io::Result<Stream> {
        match self {
            Uri::Tcp(addr) => {
                let first = addr.to_socket_addrs()?.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr}: no address"))
                })?;
                let s = TcpStream::connect_timeout(&first, Duration::from_secs(2))?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Uri::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
        }
    }
}

impl Connector for Uri {
    fn server_name(&self) -> String {
        match self {
            Uri::Tcp(addr) => addr
                .rsplit_once(':')
                .map_or(addr.as_str(), |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            Uri::Unix(_) => "localhost".into(),
        }
    }

    fn connect(&self, wait: Duration, io_timeout: Duration) -> Result<Box<dyn Channel>, WireError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.connect_once() {
                Ok(s) => {
                    s.set_io_timeout(io_timeout)?;
                    s.set_buffers();
                    return Ok(Box::new(s));
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(WireError::Connect {
                        to: self.to_string(),
                        source,
                    })
                }
            }
        }
    }
}

/// A connected tcp or unix socket.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Socket buffers asked for each way (the kernel caps them at `net.core.wmem_max` and
/// `rmem_max`, 4 MiB here). With the default ~200 KiB, a sender blocks and wakes every
/// ~50 page frames, and on a host whose cores are busy with vCPU threads each wake-up
/// waits for the scheduler: the stream then moves at a fraction of what the copies cost.
pub const SOCKET_BUFFER: usize = 4 << 20;

impl Stream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Asks for [`SOCKET_BUFFER`] each way; best effort (a smaller buffer is slower,
    /// not wrong).
    fn set_buffers(&self) {
        self.buffers(SOCKET_BUFFER);
    }

    /// Asks for `bytes` of socket buffer each way (the kernel doubles it for its own
    /// bookkeeping, and caps it at `wmem_max`/`rmem_max`); best effort.
    fn buffers(&self, bytes: usize) {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        let size = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt on a socket we own, with a c_int option value that
            // lives across the call and its exact size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

impl Channel for Stream {
    fn try_clone(&self) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        }))
    }

    fn set_io_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn unsent_bytes(&self) -> u64 {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) on a socket we own writes one c_int, to a local
        // that outlives the call.
        let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued as *mut libc::c_int) };
        match r {
            0 => queued.max(0) as u64,
            _ => 0,
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A bound tcp or unix listener (a unix socket file is removed when it is dropped).
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(uri: &Uri) -> Result<Listener, WireError> {
        let listen = |source| WireError::Listen {
            at: uri.to_string(),
            source,
        };
        Ok(match uri {
            Uri::Tcp(a) => Listener::Tcp(TcpListener::bind(a.as_str()).map_err(listen)?),
            Uri::Unix(p) => {
                let l = bind_unix(p).map_err(listen)?;
                // Only its owner may connect (root, for a VMM): a local user cannot even
                // knock. (A connection in the instant before this still meets the door.)
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                    .map_err(listen)?;
                Listener::Unix(l, p.clone())
            }
        })
    }

    /// Where it listens (a tcp port of 0 resolved).
    pub fn uri(&self) -> Result<Uri, WireError> {
        Ok(match self {
            Listener::Tcp(t) => Uri::Tcp(t.local_addr()?.to_string()),
            Listener::Unix(_, p) => Uri::Unix(p.clone()),
        })
    }
}

impl Acceptor for Listener {
    fn accept(&self, wait: Duration, io_timeout: Duration) -> Result<Box<dyn Channel>, WireError> {
        let deadline = Instant::now() + wait;
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l, _) => l.set_nonblocking(true)?,
        }
        loop {
            let r = match self {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match r {
                Ok(s) => {
                    s.set_nonblocking(false)?;
                    s.set_io_timeout(io_timeout)?;
                    s.set_buffers();
                    return Ok(Box::new(s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(WireError::AcceptTimeout(wait));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(WireError::Io(e)),
            }
        }
    }
}

/// Binds a unix socket at `p`, replacing a stale socket file a dead listener left behind
/// (nothing accepts on it: connecting is refused). A live listener's path is refused.
fn bind_unix(p: &std::path::Path) -> std::io::Result<UnixListener> {
    match UnixListener::bind(p) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(p)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if !is_socket {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{} exists and is not a socket; remove it", p.display()),
                ));
            }
            match UnixStream::connect(p) {
                Err(c) if c.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(p)?;
                    UnixListener::bind(p)
                }
                Ok(_) => Err(std::io::Error::new(
                    e.kind(),
                    format!("another process listens on {}", p.display()),
                )),
                Err(c) => Err(std::io::Error::new(
                    e.kind(),
                    format!("{} is in use ({c})", p.display()),
                )),
            }
        }
        other => other,
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Both ends in one process: each `connect` makes a unix socket pair and queues one end
/// for the next `accept`.
pub struct MemoryNet {
    queue: Mutex<(Sender<Stream>, Receiver<Stream>)>,
}

impl Default for MemoryNet {
    fn default() -> Self {
        MemoryNet {
            queue: Mutex::new(channel()),
        }
    }
}

impl MemoryNet {
    pub fn new() -> MemoryNet {
        MemoryNet::default()
    }
}

impl Connector for MemoryNet {
    fn connect(
        &self,
        _wait: Duration,
        io_timeout: Duration,
    ) -> Result<Box<dyn Channel>, WireError> {
        let (ours, theirs) = UnixStream::pair()?;
        let ours = Stream::Unix(ours);
        ours.set_io_timeout(io_timeout)?;
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue
            .0
            .send(Stream::Unix(theirs))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::ConnectionRefused))?;
        Ok(Box::new(ours))
    }
}

impl Acceptor for MemoryNet {
    fn accept(&self, wait: Duration, io_timeout: Duration) -> Result<Box<dyn Channel>, WireError> {
        let deadline = Instant::now() + wait;
        loop {
            // Short waits, not one long one under the lock: a connect must get through.
            let got = {
                let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                queue.1.recv_timeout(Duration::from_millis(5))
            };
            match got {
                Ok(s) => {
                    s.set_io_timeout(io_timeout)?;
                    return Ok(Box::new(s));
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => return Err(WireError::AcceptTimeout(wait)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{Frame, FrameKind, FrameReader, FrameWriter};

    #[test]
    fn a_stale_socket_file_is_replaced_but_a_live_listener_is_not() {
        let dir = std::env::temp_dir().join(format!("hv-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uri = Uri::Unix(dir.join("mig.sock"));
        // A listener that went away without unlinking its path (its process exited).
        std::mem::forget(UnixListener::bind(dir.join("mig.sock")).unwrap());
        // Forgotten, but still open in this process: a live listener, refused.
        assert!(Listener::bind(&uri).is_err());
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists(), "a dropped std listener leaves its file");
        let l = Listener::bind(&Uri::Unix(stale.clone())).unwrap();
        assert!(UnixStream::connect(&stale).is_ok());
        let mode = std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a migration socket only its owner may open");
        drop(l);
        // Not a socket: never removed.
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(Listener::bind(&Uri::Unix(file.clone())).is_err());
        assert!(file.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_uris() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Uri>().unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse::<Uri>().unwrap(),
            Uri::Unix("/tmp/x.sock".into())
        );
        for bad in [
            "tcp:127.0.0.1",
            "tcp::80",
            "udp:1.2.3.4:5",
            "unix:",
            "tcp:h:99999",
        ] {
            assert!(bad.parse::<Uri>().is_err(), "{bad}");
        }
        let e = "tcp:h:99999".parse::<Uri>().unwrap_err().to_string();
        assert!(e.contains("not a port number"), "{e}");
        let u: Uri = serde_json::from_str("\"unix:/a\"").unwrap();
        assert_eq!(serde_json::to_string(&u).unwrap(), "\"unix:/a\"");
        assert!(serde_json::from_str::<Uri>("\"ftp:/a\"").is_err());
    }

    fn request(gpa: u64) -> Frame {
        Frame::new(FrameKind::PageRequest, gpa.to_le_bytes().to_vec())
    }

    #[test]
    fn frames_over_unix_and_tcp_and_a_silent_peer_times_out() {
        let dir = std::env::temp_dir().join(format!("hv-mig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for uri in [
            Uri::Unix(dir.join("m.sock")),
            Uri::Tcp("127.0.0.1:0".into()),
        ] {
            let l = Listener::bind(&uri).unwrap();
            let uri = l.uri().unwrap();
            let client = std::thread::spawn(move || {
                let s = uri
                    .connect(Duration::from_secs(2), Duration::from_secs(2))
                    .unwrap();
                let mut w = FrameWriter::new(s);
                w.send(&request(42)).unwrap();
                // Then say nothing: the reader must time out, not hang.
                std::thread::sleep(Duration::from_millis(600));
            });
            let s = l
                .accept(Duration::from_secs(2), Duration::from_millis(200))
                .unwrap();
            let mut r = FrameReader::new(s);
            assert_eq!(r.recv().unwrap(), request(42));
            let t0 = Instant::now();
            assert!(matches!(r.recv(), Err(WireError::Silent)));
            assert!(t0.elapsed() < Duration::from_secs(2));
            client.join().unwrap();
        }
        // Nobody connects: accept times out.
        let l = Listener::bind(&Uri::Unix(dir.join("n.sock"))).unwrap();
        assert!(matches!(
            l.accept(Duration::from_millis(100), Duration::from_secs(1)),
            Err(WireError::AcceptTimeout(_))
        ));
        // Nobody listens: connect gives up after its wait and names the peer.
        let gone = Uri::Unix(dir.join("gone.sock"));
        let e = gone
            .connect(Duration::from_millis(50), Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(matches!(e, WireError::Connect { .. }) && e.to_string().contains("gone.sock"));
        drop(l);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_memory_net_connects_in_order_and_shutdown_ends_a_blocked_read() {
        let net = MemoryNet::new();
        let t = Duration::from_secs(2);
        let mut a = net.connect(t, t).unwrap();
        let mut b = net.connect(t, t).unwrap();
        let a2 = net.accept(t, t).unwrap();
        let b2 = net.accept(t, t).unwrap();
        a.write_all(b"a").unwrap();
        b.write_all(b"b").unwrap();
        let mut buf = [0u8; 1];
        let mut a2r = a2.try_clone().unwrap();
        a2r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"a");
        let mut b2r = b2;
        b2r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"b");
        let reader = std::thread::spawn(move || a2r.read(&mut buf).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        a2.shutdown();
        assert_eq!(reader.join().unwrap(), 0);
        assert!(matches!(
            net.accept(Duration::from_millis(20), t),
            Err(WireError::AcceptTimeout(_))
        ));
    }
}
