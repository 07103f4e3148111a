//! The typed messages of the migration protocol and their payloads.
//!
//! Every payload is decoded against the local guest [`Layout`] (both ends know theirs
//! before the first frame): lengths are exact where the encoding fixes them and bounded
//! where it does not, page addresses are aligned and inside guest RAM (a wrapping
//! address is outside), and nothing sized by the peer is allocated before its size was
//! checked. Encodings (all integers little-endian):
//!
//! | message | payload |
//! |---|---|
//! | Hello, HelloAck | JSON [`Hello`] |
//! | Page | gpa u64, then an extent: 1 to 64 whole backing pages inside one 2 MiB region (one huge page) |
//! | ZeroPage | gpa u64, pages u32: an extent of zero pages |
//! | PageRequest | gpa u64 |
//! | RoundEnd | round u32 |
//! | SwitchOver | state length u32, JSON of the state, missing flag u8, bitmap words u64… |
//! | Resumed | CLOCK_MONOTONIC ns u64 |
//! | Complete | nothing (source), or [`DemandStats`] as u64 + 3 × f64 (destination) |
//! | Abort | the reason, UTF-8 |
//! | Auth | step u8 (1 challenge, 2 answer, 3 proof), then nonce [32] and/or MAC [32] |
//! | Join | channel u8 (1 urgent, 2 resume, 3 pre-copy channel), session [16] |
//! | Ready, Start | nothing |
//! | Lacking | CLOCK_MONOTONIC ns the guest started here u64 (0: not started), bitmap words u64… |

use std::io::{Read, Write};

use guest_mm::{Gpa, PageContent};
use serde::{Deserialize, Serialize};

use crate::bitmap::PageBitmap;
use crate::error::{LayoutMismatch, WireError};
use crate::host::VmState;
use crate::wire::auth::{AuthStep, Session, NONCE_LEN};
use crate::wire::frame::{Frame, FrameBounds, FrameKind, FrameReader, FrameWriter};
use crate::Mode;

/// Version 5: page frames carry extents (up to 64 contiguous backing pages), and extra
/// pre-copy channels join a session. Version 4: authenticated connections, a session the
/// urgent and resumed connections join, the Ready/Start hand-over and post-copy recovery
/// (Lacking).
pub const PROTOCOL_VERSION: u32 = 5;
/// Hello, HelloAck and Abort payloads: small JSON or text.
pub const MAX_SMALL: u64 = 64 << 10;
/// The VM state in a SwitchOver (vCPU registers, devices, the run's info).
pub const MAX_VM_STATE: u64 = 16 << 20;
const DEMAND_STATS_LEN: usize = 32;

/// What both ends must agree on about guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub memory_bytes: u64,
    /// The backing page: the size of every page frame.
    pub page_size: u64,
}

impl Layout {
    /// A layout, if it is one: a power-of-two page of at least 4 KiB, RAM a non-zero
    /// multiple of it.
    pub fn new(memory_bytes: u64, page_size: u64) -> Option<Layout> {
        let ok = page_size.is_power_of_two()
            && (guest_mm::SIZE_4K..=guest_mm::SIZE_1G).contains(&page_size)
            && memory_bytes > 0
            && memory_bytes.is_multiple_of(page_size);
        ok.then_some(Layout {
            memory_bytes,
            page_size,
        })
    }

    /// Backing pages in guest RAM.
    pub fn pages(&self) -> u64 {
        self.memory_bytes / self.page_size
    }

    /// The largest payload each kind may have in a stream for this guest.
    pub fn bounds(&self) -> FrameBounds {
        let bitmap = 8 * PageBitmap::words_for(self.pages()) as u64;
        FrameBounds::from_fn(|k| match k {
            FrameKind::Hello | FrameKind::HelloAck | FrameKind::Abort => MAX_SMALL,
            FrameKind::Page => 8 + self.extent_max_pages() * self.page_size,
            FrameKind::ZeroPage => 12,
            FrameKind::PageRequest | FrameKind::Resumed => 8,
            FrameKind::RoundEnd => 4,
            FrameKind::SwitchOver => 4 + MAX_VM_STATE + 1 + bitmap,
            FrameKind::Complete => DEMAND_STATS_LEN as u64,
            FrameKind::Auth => 1 + 2 * NONCE_LEN as u64,
            FrameKind::Join => 1 + Session::LEN as u64,
            FrameKind::Ready | FrameKind::Start => 0,
            FrameKind::Lacking => 8 + bitmap,
        })
    }

    /// The most backing pages of one extent (one page frame) for this guest.
    pub fn extent_max_pages(&self) -> u64 {
        guest_mm::extent_max_pages(self.page_size)
    }

    /// `gpa` if it starts an extent of `pages` backing pages: 1 to the most, inside one
    /// 2 MiB region (or one huge page), inside guest RAM.
    fn extent_at(&self, gpa: u64, pages: u64) -> Result<Gpa, Refused> {
        let start = self.page_at(gpa)?;
        let len = pages.saturating_mul(self.page_size);
        let last = gpa.saturating_add(len.saturating_sub(1));
        let one_region = pages == 1 || gpa / guest_mm::SIZE_2M == last / guest_mm::SIZE_2M;
        if pages == 0 || pages > self.extent_max_pages() || !one_region {
            return Err(Refused::Malformed(format!(
                "an extent of {pages} pages at GPA {gpa:#x}: 1 to {} pages of {:#x} inside one 2 MiB region",
                self.extent_max_pages(),
                self.page_size
            )));
        }
        if last >= self.memory_bytes {
            return Err(Refused::Malformed(format!(
                "an extent of {pages} pages at GPA {gpa:#x} ends outside guest RAM ({:#x} bytes)",
                self.memory_bytes
            )));
        }
        Ok(start)
    }

    /// `gpa` if it starts a backing page inside guest RAM.
    fn page_at(&self, gpa: u64) -> Result<Gpa, Refused> {
        let inside = gpa
            .checked_add(self.page_size)
            .is_some_and(|end| end <= self.memory_bytes);
        if !gpa.is_multiple_of(self.page_size) || !inside {
            return Err(Refused::Malformed(format!(
                "page at GPA {gpa:#x} is outside guest RAM ({:#x} bytes in pages of {:#x})",
                self.memory_bytes, self.page_size
            )));
        }
        Ok(Gpa(gpa))
    }
}

/// The first frame each way: who is talking and what guest it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub memory_bytes: u64,
    /// "shmem", "hugetlb-2m", ...
    pub backing: String,
    pub page_size: u64,
    pub vcpus: u32,
    pub mode: Mode,
    /// The destination's HelloAck: the migration's session, which its urgent connection
    /// and any resumed connection name when they join (the source sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    /// Pre-copy channels (`--channels`): connections the rounds' pages travel on, the main
    /// one included; the others join the session after the HelloAck.
    #[serde(default = "one_channel")]
    pub channels: u32,
    /// The sender's host boot (`/proc/sys/kernel/random/boot_id`): two ends on one boot
    /// of one host share CLOCK_MONOTONIC, so the destination's resume time can be set
    /// against the source's pause time (the downtime); elsewhere the source times it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

fn one_channel() -> u32 {
    1
}

impl Hello {
    /// Checks `theirs` against this end's guest; the error names every difference.
    /// (The protocol version was checked when the Hello was decoded.)
    pub fn check_compatible(&self, theirs: &Hello) -> Result<(), LayoutMismatch> {
        let mut diffs = Vec::new();
        if theirs.memory_bytes != self.memory_bytes {
            diffs.push(format!(
                "memory {} vs {} bytes",
                theirs.memory_bytes, self.memory_bytes
            ));
        }
        if theirs.backing != self.backing {
            diffs.push(format!("backing {} vs {}", theirs.backing, self.backing));
        }
        if theirs.page_size != self.page_size {
            diffs.push(format!(
                "page size {} vs {}",
                theirs.page_size, self.page_size
            ));
        }
        if theirs.vcpus != self.vcpus {
            diffs.push(format!("vCPUs {} vs {}", theirs.vcpus, self.vcpus));
        }
        if !(1..=crate::MAX_CHANNELS).contains(&theirs.channels) {
            diffs.push(format!(
                "{} pre-copy channels (1 to {} are possible)",
                theirs.channels,
                crate::MAX_CHANNELS
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(LayoutMismatch {
                diffs: diffs.join(", "),
            })
        }
    }
}

/// The hand-over: the VM state, when the source stopped, and what is still missing.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchOver {
    pub state: VmState,
    /// CLOCK_MONOTONIC when the source vCPUs stopped (same host: comparable).
    pub paused_at_ns: u64,
    /// CRC-32 of all guest RAM at the switch-over, when the migration was asked to verify.
    pub memory_hash: Option<u32>,
    /// Post-copy: the backing pages the destination does not have yet; they arrive on
    /// demand (urgent channel) or by background push.
    pub missing: Option<PageBitmap>,
}

#[derive(Serialize, Deserialize)]
struct SwitchOverHead {
    state: VmState,
    paused_at_ns: u64,
    memory_hash: Option<u32>,
}

/// Demand-fault figures the destination reports back when post-copy completes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandStats {
    pub pages: u64,
    pub us_p50: f64,
    pub us_p99: f64,
    pub us_max: f64,
}

/// One protocol message. Page data is borrowed: from the sender's buffer when encoding,
/// from the received frame when decoding.
#[derive(Clone, Debug, PartialEq)]
pub enum Message<'a> {
    Hello(Hello),
    HelloAck(Hello),
    /// An extent of backing pages at `gpa` (`data` is whole pages).
    Page {
        gpa: Gpa,
        data: &'a [u8],
    },
    /// An extent of `pages` zero pages at `gpa`.
    ZeroPage {
        gpa: Gpa,
        pages: u32,
    },
    /// The end of pre-copy round `round`.
    RoundEnd {
        round: u32,
    },
    SwitchOver(Box<SwitchOver>),
    /// The destination runs the guest, since `at_ns` (its CLOCK_MONOTONIC).
    Resumed {
        at_ns: u64,
    },
    /// Post-copy, urgent channel: the destination needs the page at `gpa` now.
    PageRequest {
        gpa: Gpa,
    },
    /// The end: from the source, every page was sent; from the destination (urgent
    /// channel, post-copy), every page is in, with what the demand faults cost.
    Complete {
        demand: Option<DemandStats>,
    },
    Abort {
        reason: String,
    },
    /// Authenticating the connection with the migration key ([`crate::wire::auth`]).
    Auth(AuthStep),
    /// The first message of a connection that joins the migration `session` in progress.
    Join {
        session: Session,
        channel: Joining,
    },
    /// Destination: restored (and, in post-copy, paging) and ready to run the guest.
    Ready,
    /// Source: run it. From here the guest is the destination's, and the source never
    /// runs it again, whatever fails.
    Start,
    /// Destination, on a resumed connection: when it started the guest (if it did) and
    /// the backing pages it still lacks.
    Lacking {
        started_at_ns: Option<u64>,
        pages: PageBitmap,
    },
}

/// Which connection a [`Message::Join`] opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joining {
    /// Post-copy's urgent connection.
    Urgent,
    /// A new main connection after the old one broke (post-copy recovery).
    Resume,
    /// One more pre-copy channel (`--channels`).
    Channel,
}

impl<'a> Message<'a> {
    /// A page frame for `content` at `gpa`.
    pub fn page(gpa: Gpa, content: PageContent<'a>) -> Message<'a> {
        match content {
            PageContent::Bytes(data) => Message::Page { gpa, data },
            PageContent::Zero => Message::ZeroPage { gpa, pages: 1 },
        }
    }

    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Hello(_) => FrameKind::Hello,
            Message::HelloAck(_) => FrameKind::HelloAck,
            Message::Page { .. } => FrameKind::Page,
            Message::ZeroPage { .. } => FrameKind::ZeroPage,
            Message::RoundEnd { .. } => FrameKind::RoundEnd,
            Message::SwitchOver(_) => FrameKind::SwitchOver,
            Message::Resumed { .. } => FrameKind::Resumed,
            Message::PageRequest { .. } => FrameKind::PageRequest,
            Message::Complete { .. } => FrameKind::Complete,
            Message::Abort { .. } => FrameKind::Abort,
            Message::Auth(_) => FrameKind::Auth,
            Message::Join { .. } => FrameKind::Join,
            Message::Ready => FrameKind::Ready,
            Message::Start => FrameKind::Start,
            Message::Lacking { .. } => FrameKind::Lacking,
        }
    }

    /// The payload, except a page's data (sent from where it is).
    fn encode_head(&self) -> Result<Vec<u8>, WireError> {
        let kind = self.kind();
        Ok(match self {
            Message::Hello(h) | Message::HelloAck(h) => to_json(kind, h)?,
            Message::Page { gpa, .. } | Message::PageRequest { gpa } => {
                gpa.0.to_le_bytes().to_vec()
            }
            Message::ZeroPage { gpa, pages } => {
                let mut out = gpa.0.to_le_bytes().to_vec();
                out.extend_from_slice(&pages.to_le_bytes());
                out
            }
            Message::RoundEnd { round } => round.to_le_bytes().to_vec(),
            Message::Resumed { at_ns } => at_ns.to_le_bytes().to_vec(),
            Message::SwitchOver(s) => {
                let head = to_json(
                    kind,
                    &SwitchOverHead {
                        state: s.state.clone(),
                        paused_at_ns: s.paused_at_ns,
                        memory_hash: s.memory_hash,
                    },
                )?;
                if head.len() as u64 > MAX_VM_STATE {
                    return Err(WireError::StateTooLarge {
                        len: head.len() as u64,
                        max: MAX_VM_STATE,
                    });
                }
                let head_len = head.len() as u32;
                let mut out = Vec::with_capacity(head.len() + 5);
                out.extend_from_slice(&head_len.to_le_bytes());
                out.extend_from_slice(&head);
                match &s.missing {
                    None => out.push(0),
                    Some(b) => {
                        out.push(1);
                        b.words()
                            .iter()
                            .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
                    }
                }
                out
            }
            Message::Complete { demand: None } => Vec::new(),
            Message::Complete { demand: Some(d) } => {
                let mut out = Vec::with_capacity(DEMAND_STATS_LEN);
                out.extend_from_slice(&d.pages.to_le_bytes());
                for f in [d.us_p50, d.us_p99, d.us_max] {
                    out.extend_from_slice(&f.to_bits().to_le_bytes());
                }
                out
            }
            Message::Abort { reason } => {
                let mut end = reason.len().min(MAX_SMALL as usize);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.as_bytes()[..end].to_vec()
            }
            Message::Auth(step) => step.encode(),
            Message::Join { session, channel } => {
                let mut out = vec![match channel {
                    Joining::Urgent => 1,
                    Joining::Resume => 2,
                    Joining::Channel => 3,
                }];
                out.extend_from_slice(&session.0);
                out
            }
            Message::Ready | Message::Start => Vec::new(),
            Message::Lacking {
                started_at_ns,
                pages,
            } => {
                let mut out = started_at_ns.unwrap_or(0).to_le_bytes().to_vec();
                pages
                    .words()
                    .iter()
                    .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
                out
            }
        })
    }

    /// Writes the message as one frame (page frames are batched; see [`FrameWriter`]).
    pub fn send<W: Write>(&self, w: &mut FrameWriter<W>) -> Result<(), WireError> {
        let head = self.encode_head()?;
        match self {
            Message::Page { data, .. } => w.send_parts(FrameKind::Page, &[&head, data]),
            _ => w.send_parts(self.kind(), &[&head]),
        }
    }

    /// The message as a raw frame.
    pub fn to_frame(&self) -> Result<Frame, WireError> {
        let mut payload = self.encode_head()?;
        if let Message::Page { data, .. } = self {
            payload.extend_from_slice(data);
        }
        Ok(Frame::new(self.kind(), payload))
    }

    /// Decodes frame number `index` of a stream for a guest of `layout`.
    pub fn decode(frame: &'a Frame, index: u64, layout: &Layout) -> Result<Message<'a>, WireError> {
        decode(frame, layout).map_err(|what| match what {
            Refused::Version(theirs) => WireError::Version {
                ours: PROTOCOL_VERSION,
                theirs,
            },
            Refused::Malformed(what) => WireError::Malformed {
                index,
                kind: frame.kind,
                what,
            },
        })
    }
}

/// Why a payload was refused (the caller adds the frame's index and kind).
enum Refused {
    Version(u32),
    Malformed(String),
}

impl From<crate::bitmap::BitmapError> for Refused {
    fn from(e: crate::bitmap::BitmapError) -> Refused {
        Refused::Malformed(e.to_string())
    }
}

fn malformed<T>(what: String) -> Result<T, Refused> {
    Err(Refused::Malformed(what))
}

fn exact<const N: usize>(p: &[u8]) -> Result<[u8; N], Refused> {
    p.try_into()
        .or_else(|_| malformed(format!("a payload of {} bytes, expected {N}", p.len())))
}

fn decode_hello(p: &[u8]) -> Result<Hello, Refused> {
    #[derive(Deserialize)]
    struct Probe {
        version: u32,
    }
    // The version first: a peer of another version may send another Hello.
    let not_hello = |e: serde_json::Error| Refused::Malformed(format!("not a Hello: {e}"));
    let probe: Probe = serde_json::from_slice(p).map_err(not_hello)?;
    if probe.version != PROTOCOL_VERSION {
        return Err(Refused::Version(probe.version));
    }
    serde_json::from_slice(p).map_err(not_hello)
}

fn decode_switch_over(p: &[u8], layout: &Layout) -> Result<SwitchOver, Refused> {
    let head_len = u32::from_le_bytes(exact::<4>(p.get(..4).unwrap_or(p))?) as usize;
    if head_len as u64 > MAX_VM_STATE || 4 + head_len >= p.len() {
        return malformed(format!(
            "a VM state of {head_len} bytes in a payload of {}",
            p.len()
        ));
    }
    let head: SwitchOverHead = serde_json::from_slice(&p[4..4 + head_len])
        .map_err(|e| Refused::Malformed(format!("the VM state is not valid JSON: {e}")))?;
    let rest = &p[4 + head_len..];
    let missing = match rest[0] {
        0 if rest.len() == 1 => None,
        1 => {
            let words = &rest[1..];
            if !words.len().is_multiple_of(8) {
                return malformed(format!("a bitmap of {} bytes", words.len()));
            }
            Some(bitmap_of(words, layout)?)
        }
        flag => {
            return malformed(format!(
                "missing-pages flag {flag} with {} bytes",
                rest.len()
            ))
        }
    };
    Ok(SwitchOver {
        state: head.state,
        paused_at_ns: head.paused_at_ns,
        memory_hash: head.memory_hash,
        missing,
    })
}

fn decode_complete(p: &[u8]) -> Result<Option<DemandStats>, Refused> {
    if p.is_empty() {
        return Ok(None);
    }
    let b = exact::<DEMAND_STATS_LEN>(p)?;
    let word = |i: usize| u64::from_le_bytes(exact::<8>(&b[i * 8..i * 8 + 8]).unwrap_or_default());
    Ok(Some(DemandStats {
        pages: word(0),
        us_p50: f64::from_bits(word(1)),
        us_p99: f64::from_bits(word(2)),
        us_max: f64::from_bits(word(3)),
    }))
}

fn decode<'a>(frame: &'a Frame, layout: &Layout) -> Result<Message<'a>, Refused> {
    let p = frame.payload.as_slice();
    let u64_of = |p: &[u8]| exact::<8>(p).map(u64::from_le_bytes);
    Ok(match frame.kind {
        FrameKind::Hello => Message::Hello(decode_hello(p)?),
        FrameKind::HelloAck => Message::HelloAck(decode_hello(p)?),
        FrameKind::Page => {
            let data = p.get(8..).unwrap_or_default();
            if data.is_empty() || !(data.len() as u64).is_multiple_of(layout.page_size) {
                return malformed(format!(
                    "a page frame of {} bytes, expected 8 + a multiple of {}",
                    p.len(),
                    layout.page_size
                ));
            }
            let pages = data.len() as u64 / layout.page_size;
            Message::Page {
                gpa: layout.extent_at(u64_of(&p[..8])?, pages)?,
                data,
            }
        }
        FrameKind::ZeroPage => {
            let b = exact::<12>(p)?;
            let gpa = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
            let pages = u32::from_le_bytes(b[8..].try_into().unwrap_or_default());
            Message::ZeroPage {
                gpa: layout.extent_at(gpa, pages.into())?,
                pages,
            }
        }
        FrameKind::PageRequest => Message::PageRequest {
            gpa: layout.page_at(u64_of(p)?)?,
        },
        FrameKind::RoundEnd => Message::RoundEnd {
            round: u32::from_le_bytes(exact::<4>(p)?),
        },
        FrameKind::Resumed => Message::Resumed { at_ns: u64_of(p)? },
        FrameKind::SwitchOver => Message::SwitchOver(Box::new(decode_switch_over(p, layout)?)),
        FrameKind::Complete => Message::Complete {
            demand: decode_complete(p)?,
        },
        FrameKind::Abort => Message::Abort {
            reason: String::from_utf8_lossy(p).into_owned(),
        },
        FrameKind::Auth => Message::Auth(AuthStep::decode(p).ok_or_else(|| {
            Refused::Malformed(format!("an authentication step of {} bytes", p.len()))
        })?),
        FrameKind::Join => {
            let b = exact::<{ 1 + Session::LEN }>(p)?;
            let channel = match b[0] {
                1 => Joining::Urgent,
                2 => Joining::Resume,
                3 => Joining::Channel,
                other => return malformed(format!("join of unknown channel {other}")),
            };
            let mut session = [0u8; Session::LEN];
            session.copy_from_slice(&b[1..]);
            Message::Join {
                session: Session(session),
                channel,
            }
        }
        FrameKind::Ready | FrameKind::Start => {
            exact::<0>(p)?;
            if frame.kind == FrameKind::Ready {
                Message::Ready
            } else {
                Message::Start
            }
        }
        FrameKind::Lacking => {
            let at = u64_of(p.get(..8).unwrap_or(p))?;
            Message::Lacking {
                started_at_ns: (at != 0).then_some(at),
                pages: bitmap_of(&p[8..], layout)?,
            }
        }
    })
}

/// A bitmap of guest RAM's backing pages from its little-endian words, refused unless it
/// has exactly the words the layout needs and no bit beyond the last page.
fn bitmap_of(words: &[u8], layout: &Layout) -> Result<PageBitmap, Refused> {
    let expected = PageBitmap::words_for(layout.pages());
    if words.len() != 8 * expected {
        return malformed(format!(
            "a bitmap of {} bytes ({} words), expected {expected} words for {} pages",
            words.len(),
            words.len() / 8,
            layout.pages()
        ));
    }
    let words = words
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(exact::<8>(c).unwrap_or_default()))
        .collect();
    Ok(PageBitmap::from_words(words, layout.pages())?)
}

fn to_json<T: Serialize>(kind: FrameKind, v: &T) -> Result<Vec<u8>, WireError> {
    serde_json::to_vec(v).map_err(|source| WireError::Encode { kind, source })
}

/// A frame reader that knows the guest's layout: frames are bounded for it and decoded
/// against it.
pub struct MessageReader<R: Read> {
    pub frames: FrameReader<R>,
    layout: Layout,
}

impl<R: Read> MessageReader<R> {
    pub fn new(inner: R, layout: Layout) -> Self {
        MessageReader {
            frames: FrameReader::with_bounds(inner, layout.bounds()),
            layout,
        }
    }

    pub fn recv(&mut self) -> Result<Frame, WireError> {
        self.frames.recv()
    }

    /// Decodes `frame`, the last one received.
    pub fn decode<'f>(&self, frame: &'f Frame) -> Result<Message<'f>, WireError> {
        Message::decode(frame, self.frames.frames.saturating_sub(1), &self.layout)
    }

    /// Hands a received frame's buffer back (see [`FrameReader::recycle`]).
    pub fn recycle(&mut self, frame: Frame) {
        self.frames.recycle(frame)
    }

    /// Index of the last frame received.
    pub fn last_index(&self) -> u64 {
        self.frames.frames.saturating_sub(1)
    }

    pub fn bytes(&self) -> u64 {
        self.frames.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: Layout = Layout {
        memory_bytes: 64 << 20,
        page_size: 4096,
    };

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            memory_bytes: 64 << 20,
            backing: "shmem".into(),
            page_size: 4096,
            vcpus: 2,
            mode: Mode::Precopy,
            session: None,
            channels: 1,
            boot_id: None,
        }
    }

    fn round_trip(m: &Message) -> Message<'static> {
        let mut w = FrameWriter::new(Vec::new());
        m.send(&mut w).unwrap();
        w.flush().unwrap();
        let bytes: &'static [u8] = Box::leak(w.get_mut().clone().into_boxed_slice());
        let mut r = MessageReader::new(bytes, LAYOUT);
        let f: &'static Frame = Box::leak(Box::new(r.recv().unwrap()));
        assert_eq!(f, &m.to_frame().unwrap(), "send and to_frame agree");
        r.decode(f).unwrap()
    }

    #[test]
    fn every_message_round_trips() {
        let page = vec![7u8; 4096];
        let extent = vec![9u8; 4 * 4096];
        let mut missing = PageBitmap::empty(LAYOUT.pages());
        missing.set(3);
        missing.set(LAYOUT.pages() - 1);
        let messages = [
            Message::Hello(hello()),
            Message::HelloAck(hello()),
            Message::Page {
                gpa: Gpa(0x5000),
                data: &page,
            },
            Message::ZeroPage {
                gpa: Gpa(0x7000),
                pages: 1,
            },
            Message::ZeroPage {
                gpa: Gpa(0x8000),
                pages: 8,
            },
            Message::Page {
                gpa: Gpa(0x1000),
                data: &extent,
            },
            Message::RoundEnd { round: 4 },
            Message::SwitchOver(Box::new(SwitchOver {
                state: VmState(serde_json::json!({"vcpus": [1, 2]})),
                paused_at_ns: 99,
                memory_hash: Some(0xdead_beef),
                missing: Some(missing),
            })),
            Message::SwitchOver(Box::new(SwitchOver {
                state: VmState(serde_json::Value::Null),
                paused_at_ns: 1,
                memory_hash: None,
                missing: None,
            })),
            Message::Resumed { at_ns: 12345 },
            Message::PageRequest { gpa: Gpa(0x3000) },
            Message::Complete { demand: None },
            Message::Complete {
                demand: Some(DemandStats {
                    pages: 3,
                    us_p50: 27.0,
                    us_p99: 80.5,
                    us_max: 100.25,
                }),
            },
            Message::Abort {
                reason: "disk full".into(),
            },
        ];
        for m in &messages {
            assert_eq!(&round_trip(m), m);
        }
        // A zero page travels as its address and count only.
        let f = Message::page(Gpa(0x7000), PageContent::Zero)
            .to_frame()
            .unwrap();
        assert_eq!(f.payload.len(), 12);
    }

    fn refused(kind: FrameKind, payload: Vec<u8>) -> String {
        let f = Frame::new(kind, payload);
        match Message::decode(&f, 3, &LAYOUT) {
            Err(e @ WireError::Malformed { index: 3, .. }) => e.to_string(),
            other => panic!("{kind:?}: {other:?}"),
        }
    }

    #[test]
    fn decode_refuses_wrong_lengths_and_addresses_outside_guest_ram() {
        let page = |gpa: u64, len: usize| {
            let mut p = gpa.to_le_bytes().to_vec();
            p.resize(8 + len, 1);
            p
        };
        assert!(refused(FrameKind::Page, page(0, 100)).contains("8 + a multiple of 4096"));
        assert!(refused(FrameKind::Page, page(0, 65 * 4096)).contains("1 to 64 pages"));
        assert!(
            refused(FrameKind::Page, page((2 << 20) - 4096, 2 * 4096)).contains("one 2 MiB region"),
            "an extent across a region"
        );
        assert!(refused(FrameKind::Page, page(64 << 20, 4096)).contains("outside guest RAM"));
        assert!(refused(FrameKind::Page, page(0x1001, 4096)).contains("outside"));
        // A GPA that wraps when the page is added.
        let wrap = u64::MAX - 0xfff;
        assert!(refused(FrameKind::Page, page(wrap, 4096)).contains("outside"));
        let zeros = |gpa: u64, pages: u32| {
            [gpa.to_le_bytes().to_vec(), pages.to_le_bytes().to_vec()].concat()
        };
        assert!(refused(FrameKind::ZeroPage, zeros(wrap, 1)).contains("outside"));
        assert!(refused(FrameKind::ZeroPage, zeros(0, 0)).contains("1 to 64 pages"));
        assert!(refused(FrameKind::ZeroPage, zeros(0, 513)).contains("1 to 64 pages"));
        assert!(
            refused(FrameKind::PageRequest, (64u64 << 20).to_le_bytes().to_vec())
                .contains("outside")
        );
        assert!(refused(FrameKind::ZeroPage, vec![0; 7]).contains("expected 12"));
        assert!(refused(FrameKind::Resumed, vec![0; 9]).contains("expected 8"));
        assert!(refused(FrameKind::RoundEnd, vec![]).contains("expected 4"));
        assert!(refused(FrameKind::Complete, vec![0; 31]).contains("expected 32"));
        assert!(refused(FrameKind::Hello, b"{\"version\":3".to_vec()).contains("not a Hello"));
        // SwitchOver: a state length beyond the payload, a bad flag, a bitmap of the
        // wrong size or with bits beyond the last page.
        let mut s = u32::MAX.to_le_bytes().to_vec();
        s.extend_from_slice(b"null\0");
        assert!(refused(FrameKind::SwitchOver, s).contains("VM state of"));
        assert!(refused(FrameKind::SwitchOver, vec![1, 0]).contains("expected 4"));
        let head = |tail: &[u8]| {
            let json = br#"{"state":null,"paused_at_ns":1,"memory_hash":null}"#;
            let mut p = (json.len() as u32).to_le_bytes().to_vec();
            p.extend_from_slice(json);
            p.extend_from_slice(tail);
            p
        };
        assert!(refused(FrameKind::SwitchOver, head(&[])).contains("VM state of"));
        assert!(refused(FrameKind::SwitchOver, head(&[2])).contains("flag 2"));
        assert!(refused(FrameKind::SwitchOver, head(&[1, 0, 0])).contains("bitmap of 2 bytes"));
        assert!(refused(FrameKind::SwitchOver, head(&[1; 9])).contains("words"));
        let mut tail = vec![1u8];
        tail.resize(1 + 8 * PageBitmap::words_for(LAYOUT.pages()), 0);
        assert!(matches!(
            Message::decode(&Frame::new(FrameKind::SwitchOver, head(&tail)), 0, &LAYOUT),
            Ok(Message::SwitchOver(_))
        ));
        // 2 MiB pages: 32 of them, a 1-word bitmap with bit 40 set is beyond the end.
        let huge = Layout::new(64 << 20, 2 << 20).unwrap();
        let mut tail = vec![1u8];
        tail.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let f = Frame::new(FrameKind::SwitchOver, head(&tail));
        let e = Message::decode(&f, 0, &huge).unwrap_err().to_string();
        assert!(e.contains("beyond page 32"), "{e}");
    }

    #[test]
    fn handshake_refuses_other_versions_and_layouts() {
        let mut theirs = hello();
        theirs.version = 99;
        let f = Message::Hello(theirs).to_frame().unwrap();
        let e = Message::decode(&f, 0, &LAYOUT).unwrap_err();
        assert!(matches!(
            e,
            WireError::Version {
                ours: PROTOCOL_VERSION,
                theirs: 99
            }
        ));
        let e = e.to_string();
        assert!(e.contains("version 99") && e.contains("version"), "{e}");
        // Another version may well have another Hello: the version still decides.
        let f = Frame::new(FrameKind::Hello, br#"{"version":2,"mode":[]}"#.to_vec());
        assert!(matches!(
            Message::decode(&f, 0, &LAYOUT),
            Err(WireError::Version { theirs: 2, .. })
        ));
        let ours = hello();
        let mut theirs = hello();
        theirs.memory_bytes = 128 << 20;
        theirs.backing = "hugetlb-2m".into();
        let e = ours.check_compatible(&theirs).unwrap_err().to_string();
        assert!(
            e.contains("memory") && e.contains("backing") && e.contains("--memory"),
            "{e}"
        );
        assert!(ours.check_compatible(&hello()).is_ok());
        let e = ours
            .check_compatible(&Hello {
                channels: 17,
                ..hello()
            })
            .unwrap_err();
        assert!(
            e.to_string().contains("17 pre-copy channels (1 to 16"),
            "{e}"
        );
    }

    #[test]
    fn layouts_are_checked_and_bound_each_kind() {
        assert!(Layout::new(0, 4096).is_none());
        assert!(Layout::new(4096 * 3, 8192).is_none());
        assert!(Layout::new(1 << 20, 3000).is_none());
        let b = LAYOUT.bounds();
        assert_eq!(
            b.max(FrameKind::Page),
            8 + 64 * 4096,
            "an extent of 64 pages"
        );
        assert_eq!(b.max(FrameKind::ZeroPage), 12);
        let huge = Layout::new(1 << 30, 2 << 20).unwrap();
        assert_eq!(
            huge.bounds().max(FrameKind::Page),
            8 + (2 << 20),
            "one huge page"
        );
        assert_eq!(b.max(FrameKind::PageRequest), 8);
        assert_eq!(b.max(FrameKind::SwitchOver), 4 + MAX_VM_STATE + 1 + 8 * 256);
    }
}
