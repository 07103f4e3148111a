//! Mutual TLS for migration connections (rustls with ring): both ends hold a certificate
//! and key signed by a CA both trust (`--tls-cert`, `--tls-key`, `--tls-ca`, as Cloud
//! Hypervisor has them); the destination refuses a peer without a certificate of that
//! CA, and the source a destination without one. Unlike the migration key it also
//! encrypts and authenticates every byte after the handshake.
//!
//! A [`TlsChannel`] is a [`Channel`] like any other: one thread reads while another
//! writes. Reads take the raw socket without holding the TLS state, so a reader blocked
//! on the network never holds up a writer; writes take the socket's write side first and
//! the TLS state second (as does a reader that has TLS records to send), so records leave
//! in the order they were sealed.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::error::AuthError;
use crate::wire::transport::Channel;

/// The three files of a TLS identity.
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

/// Both ends' TLS configuration from one identity (the source is the TLS client, the
/// destination the server; each verifies the other against the CA).
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

fn tls(what: &str) -> impl FnOnce(rustls::Error) -> AuthError + '_ {
    move |e| AuthError::TlsSetup(format!("{what}: {e}"))
}

impl TlsConfig {
    pub fn from_files(files: &TlsFiles<'_>) -> Result<TlsConfig, AuthError> {
        let pem = |path: &Path| {
            let path = path.to_path_buf();
            move |e: rustls::pki_types::pem::Error| AuthError::TlsFile {
                path,
                what: e.to_string(),
            }
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(files.cert)
            .map_err(pem(files.cert))?
            .collect::<Result<_, _>>()
            .map_err(pem(files.cert))?;
        let key = PrivateKeyDer::from_pem_file(files.key).map_err(pem(files.key))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(files.ca).map_err(pem(files.ca))? {
            roots
                .add(ca.map_err(pem(files.ca))?)
                .map_err(tls("--tls-ca"))?;
        }
        if certs.is_empty() || roots.is_empty() {
            return Err(AuthError::TlsSetup(
                "--tls-cert and --tls-ca must each hold at least one PEM certificate".into(),
            ));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls("TLS versions"))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(tls("--tls-cert/--tls-key"))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| AuthError::TlsSetup(format!("--tls-ca: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls("TLS versions"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(tls("--tls-cert/--tls-key"))?;
        // Nothing resumes a TLS session here; tickets would only be writes to interleave.
        server.send_tls13_tickets = 0;
        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The source's side of `raw`, to the destination named `host`, handshake done.
    pub(crate) fn client(
        &self,
        raw: Box<dyn Channel>,
        host: &str,
    ) -> Result<Box<dyn Channel>, AuthError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| AuthError::TlsSetup(format!("{host:?} is no TLS server name: {e}")))?;
        let conn = ClientConnection::new(self.client.clone(), name).map_err(tls("starting TLS"))?;
        TlsChannel::open(rustls::Connection::Client(conn), raw)
    }

    /// The destination's side of `raw`, handshake done (the peer's certificate checked).
    pub(crate) fn server(&self, raw: Box<dyn Channel>) -> Result<Box<dyn Channel>, AuthError> {
        let conn = ServerConnection::new(self.server.clone()).map_err(tls("starting TLS"))?;
        TlsChannel::open(rustls::Connection::Server(conn), raw)
    }
}

/// The TLS state and the raw bytes read but not yet taken by it (it takes at most 16 KiB
/// of plaintext ahead of its reader).
struct State {
    tls: rustls::Connection,
    pending: Vec<u8>,
}

impl State {
    /// Hands the pending raw bytes to TLS, as far as it takes them.
    fn feed(&mut self) -> std::io::Result<()> {
        while !self.pending.is_empty() {
            let mut rest = &self.pending[..];
            match self.tls.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(used) => {
                    self.pending.drain(..used);
                    self.tls.process_new_packets().map_err(io_error)?;
                }
                // Its plaintext buffer is full: the reader takes some first.
                Err(e) if e.kind() == std::io::ErrorKind::Other => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

struct Shared {
    tls: Mutex<State>,
    /// The raw socket's read side (one reader at a time).
    read: Mutex<Box<dyn Channel>>,
    /// The raw socket's write side, taken before `tls` by whoever sends records.
    write: Mutex<Box<dyn Channel>>,
    /// For timeouts and shutdown (behind a lock only because a `Channel` is not `Sync`;
    /// shutting down takes no time).
    raw: Mutex<Box<dyn Channel>>,
}

/// A TLS connection over a raw channel.
pub struct TlsChannel(Arc<Shared>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_error(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl TlsChannel {
    /// Completes the handshake over `raw` and wraps it.
    fn open(
        mut tls: rustls::Connection,
        mut raw: Box<dyn Channel>,
    ) -> Result<Box<dyn Channel>, AuthError> {
        while tls.is_handshaking() {
            tls.complete_io(&mut raw)
                .map_err(|e| AuthError::Tls(e.to_string()))?;
        }
        while tls.wants_write() {
            tls.write_tls(&mut raw)
                .map_err(|e| AuthError::Tls(e.to_string()))?;
        }
        // Page frames of 2 MiB go through whole: no plaintext limit.
        tls.set_buffer_limit(None);
        let read = raw.try_clone().map_err(|e| AuthError::Tls(e.to_string()))?;
        let write = raw.try_clone().map_err(|e| AuthError::Tls(e.to_string()))?;
        Ok(Box::new(TlsChannel(Arc::new(Shared {
            tls: Mutex::new(State {
                tls,
                pending: Vec::new(),
            }),
            read: Mutex::new(read),
            write: Mutex::new(write),
            raw: Mutex::new(raw),
        }))))
    }

    /// Seals what is pending and sends it (the write side taken first).
    fn send_pending(&self, plaintext: &[u8]) -> std::io::Result<()> {
        let mut raw = lock(&self.0.write);
        let mut sealed = Vec::new();
        {
            let mut state = lock(&self.0.tls);
            if !plaintext.is_empty() {
                state.tls.writer().write_all(plaintext)?;
            }
            while state.tls.wants_write() {
                state.tls.write_tls(&mut sealed)?;
            }
        }
        raw.write_all(&sealed)
    }
}

impl Read for TlsChannel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut record = vec![0u8; 18 << 10];
        loop {
            let reply = {
                let mut state = lock(&self.0.tls);
                state.feed()?;
                match state.tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    // The peer closed without close_notify: the connection ended.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                state.tls.wants_write()
            };
            if reply {
                self.send_pending(&[])?;
            }
            // Not under the TLS state's lock: a writer goes on meanwhile.
            let n = lock(&self.0.read).read(&mut record)?;
            if n == 0 {
                return Ok(0);
            }
            lock(&self.0.tls).pending.extend_from_slice(&record[..n]);
        }
    }
}

impl Write for TlsChannel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send_pending(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0.write).flush()
    }
}

impl Channel for TlsChannel {
    fn try_clone(&self) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(TlsChannel(self.0.clone())))
    }

    fn set_io_timeout(&self, t: Duration) -> std::io::Result<()> {
        lock(&self.0.raw).set_io_timeout(t)
    }

    fn shutdown(&self) {
        lock(&self.0.raw).shutdown();
    }

    /// What the socket holds (TLS records: a little more than the plaintext).
    fn unsent_bytes(&self) -> u64 {
        lock(&self.0.raw).unsent_bytes()
    }
}
