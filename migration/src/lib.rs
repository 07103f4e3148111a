//! Live migration for hugevisor: the protocol, its transports, and both ends' state
//! machines. The VMM implements the traits in [`host`] and calls [`source::migrate`] or
//! [`destination::receive`] on a thread of its own; nothing here touches KVM.
//!
//! # The protocol
//!
//! A stream of checksummed frames ([`wire::frame`]) carrying typed messages
//! ([`wire::message`]) over a main connection and, in post-copy, a second "urgent"
//! connection. Source → destination is `→`, the other way `←`.
//!
//! **Handshake** (every mode): `→ Hello` (protocol version, guest memory size, backing,
//! backing page size, vCPUs, mode). The destination checks it against its own guest: on a
//! different version or layout it answers `← Abort` naming every difference and stops;
//! otherwise `← HelloAck` (its own Hello).
//!
//! **Pre-copy**: the source turns KVM dirty logging on. Round 0 sends every backing page
//! as extents (`→ Page` carrying up to 64 contiguous pages inside one region, or one huge
//! page; `→ ZeroPage{gpa, pages}` for a stretch of zero pages), then `→ RoundEnd{0}`.
//! With `channels` > 1 the source opens that many more connections after the HelloAck
//! (`→ Join{session, channel}`), sends region `r`'s pages on channel `r % channels` on a
//! thread each, and ends each of them with `→ Complete` before the SwitchOver; the
//! destination writes what each channel brings on a thread of its own and acts on the
//! SwitchOver only once every channel has ended. Each next
//! round sends the pages written since the last, then `→ RoundEnd{n}`, until what is left
//! fits the downtime budget at the rate the last round measured. Rounds that stop
//! converging (the dirty set did not shrink for two rounds, or 20 rounds) throttle the
//! vCPUs through [`SourceVm::throttle`] until what is left fits, or switch to post-copy
//! (`Mode::Auto`, as hybrid from there), or — where neither helps — end over budget, as
//! the report says ([`Converged`]). Then the source pauses its vCPUs,
//! sends the last dirty pages and the pages the VMM itself wrote (the mailbox, not in the
//! dirty log), optionally hashes guest RAM (CRC-32), and sends `→ SwitchOver` (the VM
//! state, its CLOCK_MONOTONIC pause time, the hash). The destination checks the hash (a
//! mismatch is `← Abort`), restores the VM, starts it and answers `← Resumed` (its
//! CLOCK_MONOTONIC: downtime = resumed − paused, one host). The source ends with
//! `→ Complete`.
//!
//! **Post-copy**: the source pauses at once and sends `→ SwitchOver` with a bitmap of
//! every backing page as missing, then opens the urgent connection. The destination
//! restores the VM, accepts the urgent connection, marks the missing pages absent, starts
//! the guest and answers `← Resumed`. A vCPU touching an absent page becomes
//! `← PageRequest` on the urgent connection and its `→ Page` comes back there; the source
//! pushes every other missing page on the main connection (in address order from the
//! last request, or region by region with the fewest pages missing first) and ends it
//! with `→ Complete`. Each page is sent once, on one of the two; a demanded 4 KiB page
//! brings the next 15 pages of its region behind it (prefetch). When every page is in,
//! the destination sends `← Complete{demand-fault figures}` on the urgent connection and
//! leaves post-copy; the source waits up to 60 s after its last push for that. The urgent
//! connection may be silent as long as the guest asks for nothing; the main one may not.
//!
//! **Hybrid**: three pre-copy rounds, then post-copy with only the pages dirtied since
//! they were sent (and the VMM-written ones) missing.
//!
//! **Authentication** ([`wire::auth`]): with a migration key, every connection opens with
//! a challenge–response (`→ Auth`, `← Auth`, `→ Auth`) before anything else is read; a
//! connection that fails it, or sends anything else first, is refused. The destination's
//! `HelloAck` names the migration's [`Session`]; the urgent connection and any resumed
//! one open with `→ Join{session, urgent|resume}`. The destination's door refuses and
//! counts every other connection, before and during the migration.
//!
//! **Hand-over**: at the switch-over the destination restores the guest (and, in
//! post-copy, accepts the urgent connection and marks the missing pages absent) and says
//! `← Ready`; the source answers `→ Start` — from that moment it never runs the guest
//! again — and the destination starts it and answers `← Resumed`.
//!
//! **Failure**: either end may send `Abort{reason}` and close. A failure before `Start`
//! leaves the guest on the source (resumed there if it was paused); an `Abort` from the
//! destination before `Resumed` means it did not start the guest, and the source resumes
//! it too. Any other failure after `Start` — a connection that broke, stalled or was
//! corrupted — pauses both ends (`postcopy-paused`): the destination keeps every page it
//! has, its vCPUs wait for the ones they lack; the source keeps what it could still have
//! to send and never runs the guest. The source's VMM resumes it (`hugevisor migrate
//! --resume`): `→ Join{session, resume}` on a new main connection, `← Lacking{started,
//! pages}` — the pages the destination still lacks, which the source sends again —, a
//! new urgent connection, `→ Start` if the guest had not started yet, and the migration
//! goes on. A destination whose source does not come back within its recovery time ends
//! with an error naming the pages that never arrived; it never runs the guest on zeros
//! (see [`GuestAt`]).
//!
//! # Modules
//!
//! - [`wire`]: frames, messages, transports (and an in-memory one for tests).
//! - [`host`]: the traits the VMM implements.
//! - [`source`], [`destination`]: the two state machines.
//! - [`report`]: what each end reports.
//! - [`snapshot`]: a migration to a file and restores from it (copy, lazy).

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod bitmap;
pub mod clock;
pub mod destination;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod host;
mod pages;
pub mod report;
pub mod snapshot;
pub mod source;
pub mod wire;

#[cfg(test)]
mod tests;

pub use bitmap::PageBitmap;
pub use error::{
    AuthError, Error, GuestAt, HostCall, LayoutMismatch, ParseError, PeerError, Step, WireError,
};
pub use host::{
    DestinationVm, GuestPages, HostError, IncomingEvent, NoProgress, Paused, Phase, Progress,
    SourceVm, VmState,
};
pub use report::{Converged, IncomingReport, MigrationReport, RoundReport};
pub use wire::auth::{Auth, Key, Session};
pub use wire::frame::{is_zero, Frame, FrameKind, FrameReader, FrameWriter};
pub use wire::message::{
    DemandStats, Hello, Joining, Layout, Message, SwitchOver, PROTOCOL_VERSION,
};
pub use wire::transport::{Acceptor, Channel, Connector, Listener, MemoryNet, Stream, Uri};

/// How the guest's memory moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Copy while the guest runs, stop, copy the rest, start on the destination.
    #[default]
    Precopy,
    /// Stop at once, start on the destination, pages on demand plus a background push.
    Postcopy,
    /// Three pre-copy rounds, then post-copy.
    Hybrid,
    /// Pre-copy until the rounds stop converging, then post-copy of what is left (where
    /// pre-copy would throttle the vCPUs instead).
    Auto,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
            Mode::Auto => "auto",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Mode, ParseError> {
        [Mode::Precopy, Mode::Postcopy, Mode::Hybrid, Mode::Auto]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| ParseError::Mode(s.to_string()))
    }
}

/// The order in which a post-copy source pushes the pages nobody asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushOrder {
    /// From the last demand request onwards, in address order. The default: the other
    /// order made no measurable difference to when regions complete (docs/benchmarks.md).
    #[default]
    Sequential,
    /// The 2 MiB region with the fewest pages still missing first (the regions the guest
    /// has touched), so that regions complete, and can collapse, as early as possible.
    FewestMissingFirst,
}

impl PushOrder {
    pub fn name(self) -> &'static str {
        match self {
            PushOrder::Sequential => "sequential",
            PushOrder::FewestMissingFirst => "fewest-missing-first",
        }
    }
}

impl std::fmt::Display for PushOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PushOrder {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<PushOrder, ParseError> {
        [PushOrder::Sequential, PushOrder::FewestMissingFirst]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| ParseError::PushOrder(s.to_string()))
    }
}

/// A check at the switch-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verify {
    /// Both ends hash guest RAM (CRC-32) and the destination refuses to resume on a
    /// mismatch; costs downtime (a pass over guest RAM each side). In post-copy (and
    /// hybrid) the source hashes its stopped guest page by page and the destination adds
    /// up the pages it had at the switch-over and each page as it is installed, and
    /// fails the migration at its end on a mismatch (the guest runs meanwhile).
    MemoryHash,
}

impl std::str::FromStr for Verify {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Verify, ParseError> {
        match s {
            "memory-hash" => Ok(Verify::MemoryHash),
            other => Err(ParseError::Verify(other.to_string())),
        }
    }
}

/// What a `vm.migrate` call asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A new migration.
    #[default]
    Start,
    /// Reconnect a migration paused after the hand-over (`postcopy-paused`) to `to`.
    Resume,
}

/// A migration the source is asked for (the control API's `vm.migrate` body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRequest {
    pub to: Uri,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub mode: Mode,
    /// Pre-copy stops when what is left would take this long to send.
    #[serde(rename = "downtime_ms", with = "millis", default = "default_downtime")]
    pub downtime: Duration,
    #[serde(default)]
    pub verify: Option<Verify>,
    /// Post-copy: the order of the background push.
    #[serde(default)]
    pub push_order: PushOrder,
    /// Connections the pre-copy rounds' pages travel on, each with a thread at both ends
    /// (QEMU's multifd, Cloud Hypervisor's `connections`): 1 to [`MAX_CHANNELS`]. A
    /// region's pages always take the same one, so a page's copies arrive in order.
    #[serde(default = "one_channel")]
    pub channels: u32,
}

/// The most pre-copy channels a migration may ask for.
pub const MAX_CHANNELS: u32 = 16;

fn one_channel() -> u32 {
    1
}

impl MigrationRequest {
    /// A pre-copy to `to` with the default budget.
    pub fn new(to: Uri, mode: Mode) -> MigrationRequest {
        MigrationRequest {
            to,
            action: Action::Start,
            mode,
            downtime: default_downtime(),
            verify: None,
            push_order: PushOrder::default(),
            channels: 1,
        }
    }
}

fn default_downtime() -> Duration {
    Duration::from_millis(50)
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// How long each end waits for the other (tests shorten them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Source: how long to retry connecting (the destination may still be starting).
    pub connect: Duration,
    /// Silence on a connection that owes us something: the peer is gone.
    pub io: Duration,
    /// Destination: how long to wait for the source's first connection.
    pub accept: Duration,
    /// Destination: how long to wait for the urgent connection after the switch-over.
    pub urgent_accept: Duration,
    /// Post-copy source: how long after its last pushed page the destination may take to
    /// confirm that every page is installed (it may still be working through what is in
    /// flight on a loaded host; once seen at over 10 s in the benchmark).
    pub confirm: Duration,
    /// Destination: how long, after a connection broke once the guest may be here, it
    /// waits for the source to resume before it ends saying which pages never arrived.
    pub recover: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            io: Duration::from_secs(10),
            accept: Duration::from_secs(60),
            urgent_accept: Duration::from_secs(10),
            confirm: Duration::from_secs(60),
            recover: Duration::from_secs(60),
        }
    }
}
