//! Authentication before trust: every connection of a migration (main, urgent, resumed)
//! proves it holds the migration key before any of its frames is taken for a page or a
//! state, and the connections that join a migration in progress name its [`Session`].
//!
//! With a key ([`Auth::Key`], `--migration-key FILE` on both ends), a challenge–response
//! on the first frames, HMAC-SHA256 over both ends' fresh nonces:
//!
//! ```text
//! → Auth(Challenge{nc})
//! ← Auth(Answer{nd, HMAC(K, "…destination" ‖ nc ‖ nd)})   the source checks it
//! → Auth(Proof{HMAC(K, "…source" ‖ nd ‖ nc)})              the destination checks it
//! ```
//!
//! Each end's MAC has its own label and covers the other end's fresh nonce, so neither a
//! recorded exchange (replay) nor the destination's own answers (reflection) can stand
//! in for the key. This authenticates each connection's peer; it does not encrypt or
//! sign the frames after it (the CRC-32 of each frame is no MAC): on a network where
//! someone can rewrite packets in flight, use TLS.
//!
//! Without a key ([`Auth::None`]) only the session protects a migration in progress: a
//! third process that connects does not know it, and is refused.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;

use crate::error::{AuthError, Error, PeerError, Step};
use crate::wire::conn::Conn;
use crate::wire::message::Message;

/// Bytes of a nonce and of a MAC.
pub const NONCE_LEN: usize = 32;
/// The shortest key accepted.
pub const MIN_KEY_LEN: usize = 16;

const DESTINATION_LABEL: &[u8] = b"hugevisor migration v4: destination";
const SOURCE_LABEL: &[u8] = b"hugevisor migration v4: source";

/// `N` bytes from the kernel's random number generator.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut out = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: getrandom writes at most `N - got` bytes into the rest of `out`, which
        // we own for the whole call.
        let n =
            unsafe { libc::getrandom(out[got..].as_mut_ptr().cast::<libc::c_void>(), N - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(AuthError::Random(e));
            }
        } else {
            got += n as usize;
        }
    }
    Ok(out)
}

/// One migration between two ends: a random name the destination gives it in its
/// HelloAck. Connections that join it later (urgent, resumed) must name it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Session(pub [u8; Session::LEN]);

impl Session {
    pub const LEN: usize = 16;

    pub fn random() -> Result<Session, AuthError> {
        random_bytes().map(Session)
    }
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Session({self})")
    }
}

impl Serialize for Session {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Session {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Session, D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("session {text:?} is not 32 hex digits"));
        if text.len() != 2 * Session::LEN || !text.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; Session::LEN];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Session(out))
    }
}

/// One step of the challenge–response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// Source: its nonce.
    Challenge { nonce: [u8; NONCE_LEN] },
    /// Destination: its nonce and its MAC over both.
    Answer {
        nonce: [u8; NONCE_LEN],
        mac: [u8; NONCE_LEN],
    },
    /// Source: its MAC over both.
    Proof { mac: [u8; NONCE_LEN] },
}

impl AuthStep {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 2 * NONCE_LEN);
        match self {
            AuthStep::Challenge { nonce } => {
                out.push(1);
                out.extend_from_slice(nonce);
            }
            AuthStep::Answer { nonce, mac } => {
                out.push(2);
                out.extend_from_slice(nonce);
                out.extend_from_slice(mac);
            }
            AuthStep::Proof { mac } => {
                out.push(3);
                out.extend_from_slice(mac);
            }
        }
        out
    }

    /// The step, if `p` is exactly one.
    pub(crate) fn decode(p: &[u8]) -> Option<AuthStep> {
        let block =
            |at: usize| -> Option<[u8; NONCE_LEN]> { p.get(at..at + NONCE_LEN)?.try_into().ok() };
        match (p.first()?, p.len()) {
            (1, n) if n == 1 + NONCE_LEN => Some(AuthStep::Challenge { nonce: block(1)? }),
            (2, n) if n == 1 + 2 * NONCE_LEN => Some(AuthStep::Answer {
                nonce: block(1)?,
                mac: block(1 + NONCE_LEN)?,
            }),
            (3, n) if n == 1 + NONCE_LEN => Some(AuthStep::Proof { mac: block(1)? }),
            _ => None,
        }
    }
}

/// A pre-shared migration key.
pub struct Key(Vec<u8>);

impl Key {
    /// The key in `path`: at least [`MIN_KEY_LEN`] bytes, readable by its owner only.
    pub fn from_file(path: &Path) -> Result<Key, AuthError> {
        use std::os::unix::fs::PermissionsExt;
        let file = |source| AuthError::KeyFile {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(file)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(AuthError::KeyMode {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let bytes = std::fs::read(path).map_err(file)?;
        if bytes.len() < MIN_KEY_LEN {
            return Err(AuthError::KeyTooShort {
                path: path.to_path_buf(),
                len: bytes.len(),
            });
        }
        Ok(Key(bytes))
    }

    /// A key from bytes (tests, and callers that hold the key themselves).
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, AuthError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(AuthError::KeyTooShort {
                path: "(given bytes)".into(),
                len: bytes.len(),
            });
        }
        Ok(Key(bytes.to_vec()))
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length: new_from_slice cannot fail.
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        m.update(label);
        m.update(first);
        m.update(second);
        m
    }

    fn tag(&self, label: &[u8], first: &[u8], second: &[u8]) -> [u8; NONCE_LEN] {
        let mut out = [0u8; NONCE_LEN];
        out.copy_from_slice(&self.mac(label, first, second).finalize().into_bytes());
        out
    }

    /// Checks `tag` in constant time.
    fn check(&self, label: &[u8], first: &[u8], second: &[u8], tag: &[u8]) -> bool {
        self.mac(label, first, second).verify_slice(tag).is_ok()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

/// How the connections of a migration are authenticated.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// Not at all: a unix socket only its owner may open, or `--insecure`.
    #[default]
    None,
    /// A pre-shared key, challenge–response.
    Key(Arc<Key>),
    /// Mutual TLS ([`crate::wire::tls`]): every byte of every connection.
    Tls(Arc<crate::wire::tls::TlsConfig>),
}

impl Auth {
    /// Source side: proves this end holds the key and checks that the destination does.
    pub(crate) fn client(&self, conn: &mut Conn, step: Step) -> Result<(), Error> {
        let Auth::Key(key) = self else {
            // Tls: the channel was wrapped (and the peer checked) when it was opened.
            return Ok(());
        };
        let auth = |source| Error::Auth { step, source };
        let ours: [u8; NONCE_LEN] = random_bytes().map_err(auth)?;
        conn.send(step, &Message::Auth(AuthStep::Challenge { nonce: ours }))?;
        let (theirs, mac) = conn.recv(step, |m| match m {
            Message::Auth(AuthStep::Answer { nonce, mac }) => Ok((nonce, mac)),
            Message::Abort { reason } => Err(Error::peer(step, PeerError::Aborted { reason })),
            other => Err(auth(AuthError::NoAnswer { got: other.kind() })),
        })??;
        if !key.check(DESTINATION_LABEL, &ours, &theirs, &mac) {
            return Err(auth(AuthError::WrongKey {
                peer: "destination",
            }));
        }
        let mac = key.tag(SOURCE_LABEL, &theirs, &ours);
        conn.send(step, &Message::Auth(AuthStep::Proof { mac }))
    }

    /// Destination side: answers the source's `first` step (its challenge) and checks
    /// its proof. A connection that fails is told why (an `Abort`) by the caller, which
    /// closes it.
    pub(crate) fn server(&self, conn: &mut Conn, first: &AuthStep) -> Result<(), AuthError> {
        let (Auth::Key(key), AuthStep::Challenge { nonce: theirs }) = (self, first) else {
            return match self {
                Auth::None | Auth::Tls(_) => Err(AuthError::KeyNotExpected),
                Auth::Key(_) => Err(AuthError::Unauthenticated {
                    got: crate::FrameKind::Auth,
                }),
            };
        };
        let theirs = *theirs;
        let ours: [u8; NONCE_LEN] = random_bytes()?;
        let mac = key.tag(DESTINATION_LABEL, &theirs, &ours);
        conn.send(
            Step::Connect,
            &Message::Auth(AuthStep::Answer { nonce: ours, mac }),
        )
        .map_err(|e| AuthError::Broken(Box::new(e)))?;
        let proof = conn
            .recv(Step::Connect, |m| match m {
                Message::Auth(AuthStep::Proof { mac }) => Ok(mac),
                other => Err(other.kind()),
            })
            .map_err(|e| AuthError::Broken(Box::new(e)))?;
        match proof {
            Ok(mac) if key.check(SOURCE_LABEL, &ours, &theirs, &mac) => Ok(()),
            Ok(_) => Err(AuthError::WrongKey { peer: "source" }),
            Err(got) => Err(AuthError::Unauthenticated { got }),
        }
    }

    /// Whether connections are authenticated at all.
    pub fn is_some(&self) -> bool {
        !matches!(self, Auth::None)
    }

    /// The source's side of a raw connection to `host`: TLS wraps it.
    pub(crate) fn wrap_client(
        &self,
        raw: Box<dyn crate::wire::transport::Channel>,
        host: &str,
    ) -> Result<Box<dyn crate::wire::transport::Channel>, AuthError> {
        match self {
            Auth::Tls(tls) => tls.client(raw, host),
            _ => Ok(raw),
        }
    }

    /// The destination's side of a raw connection: TLS wraps it (and checks the peer).
    pub(crate) fn wrap_server(
        &self,
        raw: Box<dyn crate::wire::transport::Channel>,
    ) -> Result<Box<dyn crate::wire::transport::Channel>, AuthError> {
        match self {
            Auth::Tls(tls) => tls.server(raw),
            _ => Ok(raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_sessions_round_trip_and_bad_lengths_are_refused() {
        for step in [
            AuthStep::Challenge { nonce: [1; 32] },
            AuthStep::Answer {
                nonce: [2; 32],
                mac: [3; 32],
            },
            AuthStep::Proof { mac: [4; 32] },
        ] {
            assert_eq!(AuthStep::decode(&step.encode()), Some(step.clone()));
            let mut long = step.encode();
            long.push(0);
            assert_eq!(AuthStep::decode(&long), None);
        }
        assert_eq!(AuthStep::decode(&[]), None);
        assert_eq!(AuthStep::decode(&[9; 33]), None);
        let s = Session::random().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Session>(&json).unwrap(), s);
        assert!(serde_json::from_str::<Session>("\"xyz\"").is_err());
        assert!(serde_json::from_str::<Session>(&format!("\"{}\"", "é".repeat(16))).is_err());
        assert_ne!(Session::random().unwrap(), s, "fresh every time");
    }

    #[test]
    fn keys_are_checked_when_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hv-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key");
        std::fs::write(&p, [7u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Key::from_file(&p).is_ok());
        std::fs::write(&p, b"short").unwrap();
        let e = Key::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        let e = Key::from_file(&dir.join("none")).unwrap_err().to_string();
        assert!(e.contains("none"), "{e}");
        let k = Key::from_bytes(&[1; 16]).unwrap();
        let tag = k.tag(SOURCE_LABEL, &[1], &[2]);
        assert!(k.check(SOURCE_LABEL, &[1], &[2], &tag));
        assert!(
            !k.check(DESTINATION_LABEL, &[1], &[2], &tag),
            "labels differ"
        );
        assert!(!Key::from_bytes(&[2; 16])
            .unwrap()
            .check(SOURCE_LABEL, &[1], &[2], &tag));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
