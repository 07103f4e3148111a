//! Mutual TLS between the two ends: a shared CA lets every mode through; a certificate of
//! another CA, no TLS at all, or a plaintext Hello is refused before anything is read.
//! (Certificates are made with the `openssl` command at test time.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::fakes::{FakeDestination, FakeSource};
use super::{hello, timeouts, Peer, MIB};
use crate::destination::{self, Options as Incoming, Strangers};
use crate::error::{AuthError, Error};
use crate::source::{self, Options as Outgoing};
use crate::wire::auth::Auth;
use crate::wire::frame::FrameKind;
use crate::wire::message::{Layout, Message};
use crate::wire::tls::{TlsConfig, TlsFiles};
use crate::wire::transport::{Connector, MemoryNet};
use crate::{Mode, NoProgress};

const LAYOUT: Layout = Layout {
    memory_bytes: 2 * MIB,
    page_size: 4096,
};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (the TLS tests make their certificates with it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`name`-ca.pem) and a certificate and key it signed (`name`-{leaf}.pem/.key),
/// for localhost and 127.0.0.1, usable as TLS server and client.
fn pki(dir: &Path, name: &str, leaves: &[&str]) {
    let ca = format!("/CN=hugevisor test CA {name}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.pem"),
            "-days",
            "2",
            "-subj",
            &ca,
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    for leaf in leaves {
        let (key, csr, pem) = (
            format!("{name}-{leaf}.key"),
            format!("{name}-{leaf}.csr"),
            format!("{name}-{leaf}.pem"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={leaf}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &format!("{name}-ca.pem"),
                "-CAkey",
                &format!("{name}-ca.key"),
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
    }
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("hv-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        pki(&dir, "good", &["source", "destination"]);
        pki(&dir, "rogue", &["source"]);
        Pki { dir }
    }

    fn auth(&self, ca: &str, leaf: &str) -> Auth {
        let (cert, key) = (
            self.dir.join(format!("{leaf}.pem")),
            self.dir.join(format!("{leaf}.key")),
        );
        let ca = self.dir.join(format!("{ca}-ca.pem"));
        let files = TlsFiles {
            cert: &cert,
            key: &key,
            ca: &ca,
        };
        Auth::Tls(Arc::new(TlsConfig::from_files(&files).unwrap()))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(
    mode: Mode,
    src_auth: Auth,
    dst_auth: Auth,
) -> (
    FakeSource,
    FakeDestination,
    Result<crate::MigrationReport, Error>,
    Result<crate::IncomingReport, Error>,
) {
    let src = FakeSource::new(LAYOUT.memory_bytes, 4096, "shmem");
    let dst = FakeDestination::new(LAYOUT.memory_bytes, 4096, "shmem");
    let net = MemoryNet::new();
    let dst_opts = Incoming {
        timeouts: timeouts(),
        auth: dst_auth,
        strangers: Strangers::Fail,
    };
    let out = Outgoing {
        timeouts: timeouts(),
        auth: src_auth,
    };
    let (s, d) = std::thread::scope(|scope| {
        let d = scope.spawn(|| destination::receive_with(&net, &dst, &dst_opts));
        let s = source::migrate_with(&src, &super::request(mode), &net, &out, &NoProgress);
        (s, d.join().unwrap())
    });
    (src, dst, s, d)
}

#[test]
fn mutual_tls_carries_every_mode_and_refuses_other_cas_and_plaintext() {
    let pki = Pki::new();
    for mode in [Mode::Precopy, Mode::Postcopy, Mode::Hybrid] {
        let (src, dst, s, d) = run(
            mode,
            pki.auth("good", "good-source"),
            pki.auth("good", "good-destination"),
        );
        let (s, d) = match (s, d) {
            (Ok(s), Ok(d)) => (s, d),
            (s, d) => panic!("{mode}: {s:?} / {d:?}"),
        };
        assert_eq!(s.mode, mode.name());
        assert!(
            src.ram.snapshot() == dst.ram.snapshot(),
            "{mode}: RAM differs"
        );
        assert_eq!(d.refused_connections, 0);
    }
    // A source whose certificate another CA signed: refused, and both ends say TLS.
    let (src, dst, s, d) = run(
        Mode::Precopy,
        pki.auth("good", "rogue-source"),
        pki.auth("good", "good-destination"),
    );
    let (s, d) = (s.unwrap_err(), d.unwrap_err());
    // TLS 1.3: the client's handshake ends before the server has checked its
    // certificate, so the source learns of the refusal from the destination's alert —
    // or, when the destination has already closed the socket (a loaded host), from the
    // reset or the broken pipe of its next write. Either way it never gets to send a
    // page; what is checked is the destination's refusal, below.
    let said = s.to_string();
    assert!(
        said.contains("UnknownCA")
            || matches!(s, Error::Auth { .. })
            || said.contains("reset")
            || said.contains("Broken pipe")
            || said.contains("closed")
            || said.contains("eof")
            || said.contains("EOF")
            || said.contains("ended"),
        "{s}"
    );
    assert!(
        matches!(
            d,
            Error::Auth {
                source: AuthError::Tls(_),
                ..
            }
        ),
        "{d}"
    );
    assert!(
        d.to_string().to_lowercase().contains("issuer") || d.to_string().contains("certificate"),
        "{d}"
    );
    assert!(src.calls().is_empty() && dst.calls().is_empty());
    // A destination the source's CA did not sign.
    let (_, _, s, _) = run(
        Mode::Precopy,
        pki.auth("rogue", "good-source"),
        pki.auth("good", "good-destination"),
    );
    assert!(matches!(
        s.unwrap_err(),
        Error::Auth {
            source: AuthError::Tls(_),
            ..
        }
    ));
    // A plaintext source, and a plaintext Hello: no HelloAck, nothing read as a frame.
    let (_, dst, s, d) = run(
        Mode::Precopy,
        Auth::None,
        pki.auth("good", "good-destination"),
    );
    assert!(s.is_err() && d.is_err());
    assert!(dst.calls().is_empty());
    let dst = FakeDestination::new(LAYOUT.memory_bytes, 4096, "shmem");
    let net = MemoryNet::new();
    let opts = Incoming {
        timeouts: super::quick(),
        auth: pki.auth("good", "good-destination"),
        strangers: Strangers::Refuse,
    };
    std::thread::scope(|scope| {
        let d = scope.spawn(|| destination::receive_with(&net, &dst, &opts));
        let c = net
            .connect(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(5),
            )
            .unwrap();
        let mut p = Peer::new(c, LAYOUT);
        p.send(&Message::Hello(hello(&LAYOUT, Mode::Precopy)));
        assert!(!p.rest().contains(&FrameKind::HelloAck));
        // Nobody else comes: the wait ends, the stranger counted.
        assert!(d.join().unwrap().is_err());
    });
    assert!(dst.events.lock().unwrap().contains(&"refused".to_string()));
}
