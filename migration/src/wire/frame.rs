//! Checksummed frames: what the migration stream is made of.
//!
//! Each frame is a 16-byte header — magic `HVMF`, kind (u8), 3 reserved bytes, payload
//! length (u32 LE), CRC-32 of kind, length and payload (u32 LE) — then the payload. What a
//! payload means is [`super::message`]'s business; this layer checks the magic, the kind,
//! the length against a bound for the kind *before* it allocates, and the checksum, and
//! names every failure by the frame's index in the stream.
//!
//! [`FrameWriter`] batches page frames (two syscalls per 4 KiB page made the stream ~5x
//! slower than the wire); every other frame writes out the batch before it, so a peer
//! never waits on a page that sits in our buffer.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::WireError;

pub const MAGIC: [u8; 4] = *b"HVMF";
pub const HEADER_LEN: usize = 16;
/// The largest payload of any frame: a 1 GiB hugetlb page plus its address.
pub const MAX_PAYLOAD: u64 = guest_mm::SIZE_1G + 8;
/// Page frames are gathered up to this many bytes before they are written.
pub const WRITE_BATCH: usize = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    HelloAck = 2,
    Page = 3,
    RoundEnd = 4,
    SwitchOver = 5,
    PageRequest = 6,
    Complete = 7,
    Abort = 8,
    Resumed = 9,
    ZeroPage = 10,
    Auth = 11,
    Join = 12,
    Ready = 13,
    Start = 14,
    Lacking = 15,
}

impl FrameKind {
    pub const ALL: [FrameKind; 15] = [
        FrameKind::Hello,
        FrameKind::HelloAck,
        FrameKind::Page,
        FrameKind::RoundEnd,
        FrameKind::SwitchOver,
        FrameKind::PageRequest,
        FrameKind::Complete,
        FrameKind::Abort,
        FrameKind::Resumed,
        FrameKind::ZeroPage,
        FrameKind::Auth,
        FrameKind::Join,
        FrameKind::Ready,
        FrameKind::Start,
        FrameKind::Lacking,
    ];

    pub fn from_u8(v: u8) -> Option<FrameKind> {
        FrameKind::ALL.into_iter().find(|k| *k as u8 == v)
    }

    /// Frames that carry guest pages: batched by the writer.
    pub fn is_page(self) -> bool {
        matches!(self, FrameKind::Page | FrameKind::ZeroPage)
    }
}

/// One frame as it travels: a kind and an uninterpreted payload. Build one by hand to
/// send raw (or deliberately wrong) bytes; [`super::message::Message`] gives it meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, payload: Vec<u8>) -> Frame {
        Frame { kind, payload }
    }
}

fn crc(kind: u8, len: u32, parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Whether `data` is all zeros (the sender then sends a `ZeroPage` frame).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the
        // aligned middle of the slice.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn timeout_or_io(e: std::io::Error) -> WireError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => WireError::Silent,
        _ => WireError::Io(e),
    }
}

/// `write_all` over several slices (std's `write_all_vectored` is not stable).
fn write_all_vectored<W: Write>(
    w: &mut W,
    mut slices: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes frames, counting them and their bytes.
pub struct FrameWriter<W: Write> {
    inner: W,
    batch: Vec<u8>,
    pub frames: u64,
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            batch: Vec::with_capacity(WRITE_BATCH),
            frames: 0,
            bytes: 0,
        }
    }

    fn write_batch(&mut self) -> Result<(), WireError> {
        if !self.batch.is_empty() {
            self.inner.write_all(&self.batch).map_err(timeout_or_io)?;
            self.batch.clear();
        }
        Ok(())
    }

    /// Sends one frame whose payload is the concatenation of `parts` (so a page is
    /// copied once, into the batch, and a huge page not at all).
    pub fn send_parts(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<(), WireError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(total).map_err(|_| WireError::TooLarge {
            index: self.frames,
            kind,
            len: total as u64,
            max: u32::MAX as u64,
        })?;
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4] = kind as u8;
        header[8..12].copy_from_slice(&len.to_le_bytes());
        header[12..16].copy_from_slice(&crc(kind as u8, len, parts).to_le_bytes());
        if total < WRITE_BATCH {
            self.batch.extend_from_slice(&header);
            for p in parts {
                self.batch.extend_from_slice(p);
            }
            if !kind.is_page() || self.batch.len() >= WRITE_BATCH {
                self.write_batch()?;
            }
        } else {
            // A large extent or a huge page: the batch, the header and the data in one
            // vectored write, the data from where it is.
            let mut slices: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(parts.len() + 2);
            if !self.batch.is_empty() {
                slices.push(std::io::IoSlice::new(&self.batch));
            }
            slices.push(std::io::IoSlice::new(&header));
            slices.extend(parts.iter().map(|p| std::io::IoSlice::new(p)));
            write_all_vectored(&mut self.inner, &mut slices).map_err(timeout_or_io)?;
            self.batch.clear();
        }
        self.frames += 1;
        self.bytes += (HEADER_LEN + total) as u64;
        Ok(())
    }

    /// Sends a frame as it is (raw: tests use this to send what a broken peer would).
    pub fn send(&mut self, f: &Frame) -> Result<(), WireError> {
        self.send_parts(f.kind, &[&f.payload])
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        self.write_batch()?;
        self.inner.flush().map_err(timeout_or_io)
    }

    /// The underlying writer, after the batched pages were written to it (best effort:
    /// a write error shows on the next send or flush). For raw bytes.
    pub fn get_mut(&mut self) -> &mut W {
        let _ = self.write_batch();
        &mut self.inner
    }
}

impl<W: Write> Drop for FrameWriter<W> {
    fn drop(&mut self) {
        let _ = self.write_batch();
    }
}

/// The largest payload accepted per frame kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameBounds {
    max: [u64; 256],
}

impl FrameBounds {
    /// Every kind up to [`MAX_PAYLOAD`].
    pub const LOOSE: FrameBounds = FrameBounds {
        max: [MAX_PAYLOAD; 256],
    };

    /// Bounds from a function of the kind (never above [`MAX_PAYLOAD`]).
    pub fn from_fn(f: impl Fn(FrameKind) -> u64) -> FrameBounds {
        let mut max = [0u64; 256];
        for k in FrameKind::ALL {
            max[k as usize] = f(k).min(MAX_PAYLOAD);
        }
        FrameBounds { max }
    }

    pub fn max(&self, kind: FrameKind) -> u64 {
        self.max[kind as usize]
    }
}

/// Reads and checks frames.
pub struct FrameReader<R: Read> {
    inner: std::io::BufReader<R>,
    bounds: FrameBounds,
    /// A payload buffer handed back by [`FrameReader::recycle`], for the next frame: a
    /// stream of page frames allocates nothing per frame.
    spare: Vec<u8>,
    pub frames: u64,
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    /// A reader that accepts any kind up to [`MAX_PAYLOAD`].
    pub fn new(inner: R) -> Self {
        Self::with_bounds(inner, FrameBounds::LOOSE)
    }

    pub fn with_bounds(inner: R, bounds: FrameBounds) -> Self {
        FrameReader {
            inner: std::io::BufReader::with_capacity(WRITE_BATCH, inner),
            bounds,
            spare: Vec::new(),
            frames: 0,
            bytes: 0,
        }
    }

    fn fill(
        &mut self,
        buf: &mut [u8],
        what: &'static str,
        at_start: bool,
    ) -> Result<(), WireError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 && at_start => {
                    return Err(WireError::Closed { index: self.frames })
                }
                Ok(0) => {
                    return Err(WireError::Truncated {
                        index: self.frames,
                        what,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(match timeout_or_io(e) {
                        // Part of the frame was consumed: the stream cannot be resumed.
                        WireError::Silent if got > 0 || !at_start => WireError::Stalled {
                            index: self.frames,
                            what,
                        },
                        other => other,
                    });
                }
            }
        }
        Ok(())
    }

    /// The next frame. A timeout before its first byte is [`WireError::Silent`], and the
    /// reader may be used again after it; a timeout inside a frame is
    /// [`WireError::Stalled`], and it may not.
    pub fn recv(&mut self) -> Result<Frame, WireError> {
        let index = self.frames;
        let mut header = [0u8; HEADER_LEN];
        self.fill(&mut header, "header", true)?;
        if header[0..4] != MAGIC {
            let mut found = [0u8; 4];
            found.copy_from_slice(&header[0..4]);
            return Err(WireError::BadMagic { index, found });
        }
        let kind = FrameKind::from_u8(header[4]).ok_or(WireError::UnknownKind {
            index,
            kind: header[4],
        })?;
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let max = self.bounds.max(kind);
        if u64::from(len) > max {
            return Err(WireError::TooLarge {
                index,
                kind,
                len: len.into(),
                max,
            });
        }
        let expected = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let mut payload = std::mem::take(&mut self.spare);
        // Only what the last frame did not cover is zeroed (then overwritten): zeroing a
        // recycled 2 MiB buffer before each huge page was one more pass over the data.
        match payload.len() >= len as usize {
            true => payload.truncate(len as usize),
            false => payload.resize(len as usize, 0),
        }
        self.fill(&mut payload, "payload", false)?;
        let computed = crc(header[4], len, &[&payload]);
        if computed != expected {
            return Err(WireError::Checksum {
                index,
                kind,
                expected,
                computed,
            });
        }
        self.frames += 1;
        self.bytes += (HEADER_LEN + payload.len()) as u64;
        Ok(Frame { kind, payload })
    }

    /// Hands a received frame's buffer back, for the next frame's payload.
    pub fn recycle(&mut self, frame: Frame) {
        if frame.payload.capacity() > self.spare.capacity() {
            self.spare = frame.payload;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(gpa: u64, data: &[u8]) -> Frame {
        let mut payload = gpa.to_le_bytes().to_vec();
        payload.extend_from_slice(data);
        Frame::new(FrameKind::Page, payload)
    }

    #[test]
    fn zero_pages_are_recognised() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        assert!(is_zero(&page[3..4093]), "unaligned slices too");
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[0] = 1;
        assert!(!is_zero(&page[..17]));
    }

    #[test]
    fn frames_round_trip_and_pages_are_batched() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(&Frame::new(FrameKind::Hello, b"{}".to_vec()))
            .unwrap();
        assert_eq!(
            w.inner.len(),
            HEADER_LEN + 2,
            "a control frame is written at once"
        );
        w.send(&page(0x5000, &[7u8; 4096])).unwrap();
        assert_eq!(
            w.inner.len(),
            HEADER_LEN + 2,
            "a page frame waits in the batch"
        );
        w.send(&Frame::new(FrameKind::Complete, vec![])).unwrap();
        let bytes = w.get_mut().clone();
        assert_eq!(bytes.len(), 3 * HEADER_LEN + 2 + 8 + 4096);
        let mut r = FrameReader::new(bytes.as_slice());
        assert_eq!(r.recv().unwrap().kind, FrameKind::Hello);
        assert_eq!(r.recv().unwrap(), page(0x5000, &[7u8; 4096]));
        assert_eq!(r.recv().unwrap().kind, FrameKind::Complete);
        assert!(matches!(r.recv(), Err(WireError::Closed { index: 3 })));
        assert_eq!((r.frames, r.bytes), (3, bytes.len() as u64));
    }

    #[test]
    fn corruption_garbage_and_truncation_name_the_frame() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(&Frame::new(FrameKind::Hello, b"{}".to_vec()))
            .unwrap();
        w.send(&page(0x5000, &[7u8; 4096])).unwrap();
        let good = w.get_mut().clone();
        // A flipped bit in the page data.
        let mut bad = good.clone();
        let at = bad.len() - 100;
        bad[at] ^= 1;
        let mut r = FrameReader::new(bad.as_slice());
        r.recv().unwrap();
        let e = r.recv().unwrap_err();
        assert!(
            matches!(
                e,
                WireError::Checksum {
                    index: 1,
                    kind: FrameKind::Page,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("frame 1"));
        // Garbage.
        let mut r = FrameReader::new(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(
            r.recv(),
            Err(WireError::BadMagic { index: 0, .. })
        ));
        // An unknown kind.
        let mut unknown = good.clone();
        unknown[4] = 99;
        let mut r = FrameReader::new(unknown.as_slice());
        assert!(matches!(
            r.recv(),
            Err(WireError::UnknownKind { index: 0, kind: 99 })
        ));
        // Truncation mid-payload and mid-header.
        let mut r = FrameReader::new(&good[..good.len() - 10]);
        r.recv().unwrap();
        assert!(matches!(
            r.recv(),
            Err(WireError::Truncated {
                index: 1,
                what: "payload"
            })
        ));
        let mut r = FrameReader::new(&good[..5]);
        assert!(matches!(
            r.recv(),
            Err(WireError::Truncated {
                index: 0,
                what: "header"
            })
        ));
    }

    #[test]
    fn a_length_over_the_kinds_bound_is_refused_before_anything_is_allocated() {
        // A header claiming a 4 GiB - 1 payload, with nothing behind it.
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4] = FrameKind::Page as u8;
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&header[..]);
        assert!(matches!(
            r.recv(),
            Err(WireError::TooLarge {
                index: 0,
                kind: FrameKind::Page,
                max: MAX_PAYLOAD,
                ..
            })
        ));
        // A tighter bound per kind.
        header[4] = FrameKind::Resumed as u8;
        header[8..12].copy_from_slice(&9u32.to_le_bytes());
        let bounds = FrameBounds::from_fn(|k| if k == FrameKind::Resumed { 8 } else { 100 });
        let mut r = FrameReader::with_bounds(&header[..], bounds);
        let e = r.recv().unwrap_err();
        assert!(
            matches!(e, WireError::TooLarge { len: 9, max: 8, .. }),
            "{e}"
        );
    }

    #[test]
    fn silence_between_frames_can_be_waited_out_but_not_inside_one() {
        use std::os::unix::net::UnixStream;
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(r.recv(), Err(WireError::Silent)));
        let mut w = FrameWriter::new(Vec::new());
        w.send(&page(0, &[1u8; 64])).unwrap();
        let bytes = w.get_mut().clone();
        a.write_all(&bytes).unwrap();
        assert_eq!(r.recv().unwrap(), page(0, &[1u8; 64]), "after a silence");
        a.write_all(&bytes[..HEADER_LEN + 3]).unwrap();
        assert!(matches!(
            r.recv(),
            Err(WireError::Stalled {
                index: 1,
                what: "payload"
            })
        ));
    }

    #[test]
    fn huge_pages_bypass_the_batch() {
        let data = vec![3u8; 2 << 20];
        let mut w = FrameWriter::new(Vec::new());
        w.send_parts(FrameKind::Page, &[&0u64.to_le_bytes(), &data])
            .unwrap();
        assert_eq!(w.batch.len(), 0);
        assert_eq!(w.inner.len(), HEADER_LEN + 8 + data.len());
        let mut r = FrameReader::new(w.inner.as_slice());
        assert_eq!(r.recv().unwrap().payload.len(), 8 + data.len());
    }
}
