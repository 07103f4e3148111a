//! The errors of a migration, by who is to blame: the bytes on the wire ([`WireError`]),
//! the peer's behaviour ([`PeerError`]), the VMM's own calls ([`Error::Host`]), or two
//! guests that cannot be the same one ([`LayoutMismatch`]). [`Error`] names the
//! [`Step`] each happened in, so a message reads "pre-copy round 3: …".

use std::time::Duration;

use guest_mm::Gpa;

use crate::host::HostError;
use crate::wire::frame::FrameKind;

/// Where in the migration something went wrong (both ends use the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Source: connecting to the destination. Destination: waiting for the source.
    Connect,
    /// Hello / HelloAck: protocol version and guest layout.
    Handshake,
    /// Source: turning KVM dirty logging on.
    DirtyLog,
    /// A pre-copy round (0 sends every page).
    Round(u32),
    /// Pre-copy channel `k` (`--channels`; 0 is the main connection): its set-up and the
    /// pages it carries.
    Channel(u32),
    /// Source: stopping the vCPUs.
    Pause,
    /// Source: the last dirty pages and the VMM-written pages, after the pause.
    StopAndCopy,
    /// Both: the CRC-32 of guest RAM (`verify: memory-hash`).
    Verify,
    /// The vCPU/device state and, in post-copy, what the destination still lacks.
    SwitchOver,
    /// Destination: building the vCPUs and devices from the state.
    Restore,
    /// Post-copy: the second connection, for demand requests and their pages.
    UrgentConnect,
    /// Destination: marking the missing pages absent and paging them in on demand.
    BeginPostcopy,
    /// Destination: starting the guest.
    Start,
    /// The destination's confirmation that the guest runs there (end of the downtime).
    Resumed,
    /// Post-copy: the background push of the pages nobody asked for (main connection).
    Push,
    /// Post-copy: demand requests and their pages (urgent connection).
    Urgent,
    /// Destination: leaving post-copy once every page is in.
    EndPostcopy,
    /// The explicit end of the migration.
    Complete,
    /// After a break once the guest was handed over: reconnecting and learning what the
    /// destination still lacks.
    Recover,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Connect => f.write_str("migration connect"),
            Step::Handshake => f.write_str("migration handshake"),
            Step::DirtyLog => f.write_str("migration dirty logging"),
            Step::Round(n) => write!(f, "pre-copy round {n}"),
            Step::Channel(k) => write!(f, "pre-copy channel {k}"),
            Step::Pause => f.write_str("migration pause"),
            Step::StopAndCopy => f.write_str("migration stop-and-copy"),
            Step::Verify => f.write_str("migration memory-hash check"),
            Step::SwitchOver => f.write_str("migration switch-over"),
            Step::Restore => f.write_str("migration restore"),
            Step::UrgentConnect => f.write_str("post-copy urgent channel set-up"),
            Step::BeginPostcopy => f.write_str("post-copy set-up"),
            Step::Start => f.write_str("migration start"),
            Step::Resumed => f.write_str("migration resume confirmation"),
            Step::Push => f.write_str("post-copy push"),
            Step::Urgent => f.write_str("post-copy urgent channel"),
            Step::EndPostcopy => f.write_str("post-copy end"),
            Step::Complete => f.write_str("migration completion"),
            Step::Recover => f.write_str("migration recovery"),
        }
    }
}

/// The VMM call that failed (see [`crate::host`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCall {
    /// The guest's size and backing page (they do not form a layout).
    Layout,
    /// Destination: getting guest RAM ready before the source connects.
    PrepareIncoming,
    StartDirtyLog,
    TakeDirtyLog,
    Pause,
    Resume,
    /// Throttling the vCPUs to the percentage (auto-converge).
    Throttle(u32),
    ReadPage(Gpa),
    WritePage(Gpa),
    InstallPage(Gpa),
    BeginPostcopy,
    EndPostcopy,
    Restore,
    Start,
}

impl std::fmt::Display for HostCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostCall::Layout => f.write_str("reading the guest layout"),
            HostCall::PrepareIncoming => f.write_str("getting guest RAM ready for the pages"),
            HostCall::StartDirtyLog => f.write_str("starting the dirty log"),
            HostCall::TakeDirtyLog => f.write_str("taking the dirty log"),
            HostCall::Pause => f.write_str("pausing the vCPUs"),
            HostCall::Resume => f.write_str("resuming the vCPUs"),
            HostCall::Throttle(p) => write!(f, "throttling the vCPUs to {p} % held back"),
            HostCall::ReadPage(gpa) => write!(f, "reading the page at GPA {gpa}"),
            HostCall::WritePage(gpa) => write!(f, "writing the page at GPA {gpa}"),
            HostCall::InstallPage(gpa) => write!(f, "installing the page at GPA {gpa}"),
            HostCall::BeginPostcopy => f.write_str("marking the missing pages absent"),
            HostCall::EndPostcopy => f.write_str("leaving post-copy"),
            HostCall::Restore => f.write_str("restoring the VM state"),
            HostCall::Start => f.write_str("starting the guest"),
        }
    }
}

/// The byte stream is not a well-formed migration stream, or the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("migration stream: frame {index}: bad magic {found:02x?} (not a hugevisor migration stream, or corrupted)")]
    BadMagic { index: u64, found: [u8; 4] },
    #[error("migration stream: frame {index} ({kind:?}): checksum mismatch (expected {expected:#010x}, computed {computed:#010x}); the data was corrupted in transit")]
    Checksum {
        index: u64,
        kind: FrameKind,
        expected: u32,
        computed: u32,
    },
    #[error("migration stream: frame {index}: unknown frame kind {kind}")]
    UnknownKind { index: u64, kind: u8 },
    #[error("migration stream: frame {index} ({kind:?}): a payload of {len} bytes exceeds the {max}-byte limit for this kind")]
    TooLarge {
        index: u64,
        kind: FrameKind,
        len: u64,
        max: u64,
    },
    #[error("migration stream: frame {index}: truncated ({what}); the peer closed the connection mid-frame")]
    Truncated { index: u64, what: &'static str },
    #[error("migration stream: frame {index}: the peer stopped sending mid-frame ({what}) (is it alive? network down?)")]
    Stalled { index: u64, what: &'static str },
    #[error("migration stream: the peer closed the connection before frame {index}")]
    Closed { index: u64 },
    #[error("migration stream: frame {index} ({kind:?}): {what}")]
    Malformed {
        index: u64,
        kind: FrameKind,
        what: String,
    },
    #[error("migration stream: encoding a {kind:?} frame: {source}")]
    Encode {
        kind: FrameKind,
        #[source]
        source: serde_json::Error,
    },
    #[error("the VM state is {len} bytes, more than the protocol's {max}")]
    StateTooLarge { len: u64, max: u64 },
    #[error("the peer speaks migration protocol version {theirs}, this hugevisor speaks {ours}; use the same hugevisor on both ends")]
    Version { ours: u32, theirs: u32 },
    #[error("migration peer did not answer within the stream's I/O timeout (is it alive? network down?)")]
    Silent,
    #[error(
        "migration peer did not connect within {0:?} (is the source running? is the URI right?)"
    )]
    AcceptTimeout(Duration),
    #[error("connecting to {to}: {source}")]
    Connect {
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {at}: {source}")]
    Listen {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("migration transport: {0}")]
    Io(#[from] std::io::Error),
}

/// The peer did something other than the protocol's next step.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("the peer aborted the migration: {reason}")]
    Aborted { reason: String },
    #[error("migration peer did not answer within {waited:?} (is it alive? network down?)")]
    Timeout { waited: Duration },
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame {index}: expected {expected}, got {got:?}")]
    Unexpected {
        index: u64,
        expected: &'static str,
        got: FrameKind,
    },
    #[error("the destination did not confirm the last page within {waited:?} of the push's end")]
    Unconfirmed { waited: Duration },
}

/// A connection that did not authenticate, or a key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the {peer} does not hold this migration key (give both ends the same --migration-key file)")]
    WrongKey { peer: &'static str },
    #[error("this end requires authentication (--migration-key) and the peer sent {got:?} first; give the source the same --migration-key")]
    Unauthenticated { got: FrameKind },
    #[error("the peer answered the key challenge with {got:?}; give the destination the same --migration-key")]
    NoAnswer { got: FrameKind },
    #[error("the peer authenticates with a migration key and this destination has none; give both ends the same --migration-key, or neither")]
    KeyNotExpected,
    #[error("the connection broke during authentication: {0}")]
    Broken(#[source] Box<Error>),
    #[error("reading the migration key {path}: {source}", path = .path.display())]
    KeyFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the migration key {path} is {len} bytes; use at least 16 random bytes (e.g. `head -c 32 /dev/urandom > FILE; chmod 600 FILE`)", path = .path.display())]
    KeyTooShort {
        path: std::path::PathBuf,
        len: usize,
    },
    #[error("the migration key {path} can be read by other users (mode {mode:o}); chmod 600 it", path = .path.display())]
    KeyMode { path: std::path::PathBuf, mode: u32 },
    #[error("no random numbers from the kernel: {0}")]
    Random(#[source] std::io::Error),
    #[error(
        "TLS handshake: {0} (each end needs a --tls-cert/--tls-key signed by the other's --tls-ca)"
    )]
    Tls(String),
    #[error("TLS set-up: {0}")]
    TlsSetup(String),
    #[error("{path}: {what} (expected PEM)", path = .path.display())]
    TlsFile {
        path: std::path::PathBuf,
        what: String,
    },
}

/// The two ends do not hold the same guest (memory, backing, vCPUs).
#[derive(Debug, thiserror::Error)]
#[error("guest layouts differ: source has {diffs}, destination expects otherwise; start the destination with the same --memory/--backing/--vcpus")]
pub struct LayoutMismatch {
    /// Each difference, e.g. "memory 67108864 vs 33554432 bytes".
    pub diffs: String,
}

/// Why a migration failed, and in which step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{step}: {source}")]
    Wire {
        step: Step,
        #[source]
        source: WireError,
    },
    #[error("{step}: {source}")]
    Peer {
        step: Step,
        #[source]
        source: PeerError,
    },
    #[error("{step}: {call} failed: {source}")]
    Host {
        step: Step,
        call: HostCall,
        #[source]
        source: HostError,
    },
    #[error("{step}: authentication: {source}")]
    Auth {
        step: Step,
        #[source]
        source: AuthError,
    },
    #[error("{step}: {source}")]
    Layout {
        step: Step,
        #[source]
        source: LayoutMismatch,
    },
    #[error("{step}: guest memory differs after the transfer: CRC-32 {here:#010x} here, {there:#010x} on the source")]
    MemoryHash { step: Step, here: u32, there: u32 },
    #[error("{step}: post-copy ended with {installed} of {absent} pages installed")]
    PostcopyIncomplete {
        step: Step,
        installed: u64,
        absent: u64,
    },
    #[error("{step}: the {what} thread panicked")]
    Panicked { step: Step, what: &'static str },
    /// The failure came after the destination started the guest: the guest's state is
    /// there now, so the source keeps its copy paused (running both would be two guests).
    #[error("after the switch-over (the guest runs on the destination): {source}")]
    AfterSwitchOver {
        #[source]
        source: Box<Error>,
    },
    /// Post-copy broke and did not recover: the pages the destination never received
    /// (the guest never reads them as zeros: it stops instead).
    #[error("the source did not come back within {waited:?}: {lacking} of {absent} post-copy pages never arrived, and the guest never runs on pages it lacks ({source})")]
    Unrecovered {
        lacking: u64,
        absent: u64,
        waited: Duration,
        #[source]
        source: Box<Error>,
    },
    /// The migration failed after the pause, and the source could not run its guest again.
    #[error("{source}; resuming the guest on the source failed too: {resume}")]
    ResumeFailed {
        #[source]
        source: Box<Error>,
        resume: HostError,
    },
    /// A restore from a snapshot (a migration whose source is a directory) failed.
    #[error(transparent)]
    Snapshot(Box<crate::snapshot::SnapshotError>),
}

impl Error {
    /// The step the failure happened in (of the inner error, for the wrapping variants).
    pub fn step(&self) -> Step {
        match self {
            Error::Wire { step, .. }
            | Error::Peer { step, .. }
            | Error::Host { step, .. }
            | Error::Layout { step, .. }
            | Error::Auth { step, .. }
            | Error::MemoryHash { step, .. }
            | Error::PostcopyIncomplete { step, .. }
            | Error::Panicked { step, .. } => *step,
            Error::Snapshot(_) => Step::Restore,
            Error::AfterSwitchOver { source }
            | Error::ResumeFailed { source, .. }
            | Error::Unrecovered { source, .. } => source.step(),
        }
    }

    /// Whether the failure is the network's (a connection that broke, stalled or
    /// corrupted bytes) rather than a peer that refused or broke the protocol, or a host
    /// call: what a resumed connection can get past.
    pub fn is_recoverable(&self) -> bool {
        match self.root() {
            Error::Wire { source, .. } => matches!(
                source,
                WireError::BadMagic { .. }
                    | WireError::Checksum { .. }
                    | WireError::UnknownKind { .. }
                    | WireError::TooLarge { .. }
                    | WireError::Truncated { .. }
                    | WireError::Stalled { .. }
                    | WireError::Closed { .. }
                    | WireError::Silent
                    | WireError::AcceptTimeout(_)
                    | WireError::Connect { .. }
                    | WireError::Io(_)
            ),
            Error::Peer { source, .. } => matches!(
                source,
                PeerError::Timeout { .. } | PeerError::Closed | PeerError::Unconfirmed { .. }
            ),
            _ => false,
        }
    }

    /// Where the guest is after this failure (see [`GuestAt`]).
    pub fn guest_at(&self) -> GuestAt {
        match self {
            Error::AfterSwitchOver { .. } => GuestAt::Destination,
            Error::ResumeFailed { .. } => GuestAt::PausedOnSource,
            Error::Snapshot(e)
                if matches!(**e, crate::snapshot::SnapshotError::AfterStart { .. }) =>
            {
                GuestAt::Destination
            }
            _ => GuestAt::Source,
        }
    }

    /// The innermost error, past [`Error::AfterSwitchOver`], [`Error::ResumeFailed`] and
    /// [`Error::Unrecovered`].
    pub fn root(&self) -> &Error {
        match self {
            Error::AfterSwitchOver { source }
            | Error::ResumeFailed { source, .. }
            | Error::Unrecovered { source, .. } => source.root(),
            other => other,
        }
    }

    /// A `WireError` in `step`, with the transport's silence and end of stream seen for
    /// what they say about the peer.
    pub(crate) fn wire(step: Step, io_timeout: Duration) -> impl FnOnce(WireError) -> Error {
        move |source| match source {
            WireError::Silent => Error::Peer {
                step,
                source: PeerError::Timeout { waited: io_timeout },
            },
            WireError::AcceptTimeout(waited) => Error::Peer {
                step,
                source: PeerError::Timeout { waited },
            },
            WireError::Closed { .. } => Error::Peer {
                step,
                source: PeerError::Closed,
            },
            source => Error::Wire { step, source },
        }
    }

    pub(crate) fn host(step: Step, call: HostCall) -> impl FnOnce(HostError) -> Error {
        move |source| Error::Host { step, call, source }
    }

    pub(crate) fn peer(step: Step, source: PeerError) -> Error {
        Error::Peer { step, source }
    }
}

/// Where the guest runs after a failed migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestAt {
    /// On the source: it never stopped, or it was resumed there.
    Source,
    /// On the destination, which started it (its memory may be incomplete in post-copy).
    Destination,
    /// Nowhere: the source paused it and could not resume it.
    PausedOnSource,
}

/// A string that is not a migration URI, mode, push order or check.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{text:?}: {why}")]
    Uri { text: String, why: String },
    #[error("migration mode {0:?}: choose precopy, postcopy or hybrid")]
    Mode(String),
    #[error("push order {0:?}: choose sequential or fewest-missing-first")]
    PushOrder(String),
    #[error("unknown verify {0:?}; the only check is memory-hash")]
    Verify(String),
    #[error("restore mode {0:?}: choose copy or lazy")]
    RestoreMode(String),
}
