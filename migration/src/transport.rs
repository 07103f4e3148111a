//! Transports: `tcp:HOST:PORT` and `unix:PATH`, with bounded waits.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::protocol::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Uri {
    type Err = String;
    fn from_str(s: &str) -> Result<Uri, String> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?}: expected tcp:HOST:PORT"))?;
            port.parse::<u16>()
                .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
            if host.is_empty() {
                return Err(format!("{s:?}: missing host (e.g. tcp:127.0.0.1:4444)"));
            }
            return Ok(Uri::Tcp(rest.to_string()));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: missing path"));
            }
            return Ok(Uri::Unix(PathBuf::from(path)));
        }
        Err(format!(
            "{s:?}: a migration URI is tcp:HOST:PORT or unix:PATH"
        ))
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

/// A connected byte stream with read/write timeouts.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects, retrying until `wait` has passed (the peer may still be starting).
    pub fn connect(uri: &Uri, wait: Duration, io_timeout: Duration) -> Result<Stream, Error> {
        let deadline = Instant::now() + wait;
        loop {
            let r = match uri {
                Uri::Tcp(addr) => {
                    let addrs: Vec<_> = addr.to_socket_addrs()?.collect();
                    let first = addrs.first().copied().ok_or_else(|| {
                        Error::Io(std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("{addr}: no address"),
                        ))
                    })?;
                    TcpStream::connect_timeout(&first, Duration::from_secs(2)).map(|s| {
                        let _ = s.set_nodelay(true);
                        Stream::Tcp(s)
                    })
                }
                Uri::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            };
            match r {
                Ok(s) => {
                    s.set_timeouts(io_timeout)?;
                    return Ok(s);
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(Error::Io(std::io::Error::new(
                        e.kind(),
                        format!("connecting to {uri}: {e}"),
                    )))
                }
            }
        }
    }

    pub fn set_timeouts(&self, t: Duration) -> Result<(), Error> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
            }
        }
        Ok(())
    }

    pub fn try_clone(&self) -> Result<Stream, Error> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self) {
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

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(uri: &Uri) -> Result<Listener, Error> {
        Ok(match uri {
            Uri::Tcp(a) => Listener::Tcp(TcpListener::bind(a.as_str()).map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("listening on tcp:{a}: {e}"),
                ))
            })?),
            Uri::Unix(p) => {
                let l = UnixListener::bind(p).map_err(|e| {
                    Error::Io(std::io::Error::new(
                        e.kind(),
                        format!("listening on unix:{}: {e}", p.display()),
                    ))
                })?;
                Listener::Unix(l, p.clone())
            }
        })
    }

    /// Accepts one connection within `wait`.
    pub fn accept(&self, wait: Duration, io_timeout: Duration) -> Result<Stream, Error> {
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
                    match &s {
                        Stream::Tcp(t) => t.set_nonblocking(false)?,
                        Stream::Unix(u) => u.set_nonblocking(false)?,
                    }
                    s.set_timeouts(io_timeout)?;
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout(wait));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Frame, FrameKind, FrameReader, FrameWriter};

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
            let uri = match &l {
                Listener::Tcp(t) => Uri::Tcp(t.local_addr().unwrap().to_string()),
                Listener::Unix(..) => uri,
            };
            let client = std::thread::spawn(move || {
                let s =
                    Stream::connect(&uri, Duration::from_secs(2), Duration::from_secs(2)).unwrap();
                let mut w = FrameWriter::new(s);
                w.send(&Frame::u64(FrameKind::PageRequest, 42)).unwrap();
                // Then say nothing: the reader must time out, not hang.
                std::thread::sleep(Duration::from_millis(600));
            });
            let s = l
                .accept(Duration::from_secs(2), Duration::from_millis(200))
                .unwrap();
            let mut r = FrameReader::new(s);
            assert_eq!(r.recv().unwrap().as_u64(0).unwrap(), 42);
            let t0 = Instant::now();
            assert!(matches!(r.recv(), Err(Error::Silent)));
            assert!(t0.elapsed() < Duration::from_secs(2));
            client.join().unwrap();
        }
        // Nobody connects: accept times out.
        let l = Listener::bind(&Uri::Unix(dir.join("n.sock"))).unwrap();
        assert!(matches!(
            l.accept(Duration::from_millis(100), Duration::from_secs(1)),
            Err(Error::Timeout(_))
        ));
        drop(l);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
