//! The migration wire protocol.
//!
//! A stream of frames. Each frame: a 16-byte header — magic `HVMF`, kind (u8), 3 reserved
//! bytes, payload length (u32), CRC-32 of kind, length and payload (u32) — then the payload.
//! Control frames carry JSON; page frames carry the guest-physical address (u64) and the
//! page bytes. The stream starts with a versioned handshake (`Hello` → `HelloAck`) and ends
//! with an explicit `Complete`; anything else (garbage, truncation, a checksum mismatch, a
//! frame out of order) is an error that names the frame by its index.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"HVMF";
pub const PROTOCOL_VERSION: u32 = 2;
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted: a 1 GiB hugetlb page plus its address.
pub const MAX_PAYLOAD: u32 = (1 << 30) + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    HelloAck = 2,
    /// Page data: gpa (u64 LE) then the page.
    Page = 3,
    /// End of one pre-copy round (JSON: round number, pages).
    RoundEnd = 4,
    /// vCPU and device state at the switch-over (JSON).
    SwitchOver = 5,
    /// Post-copy: the destination asks for the page at gpa (u64 LE) — urgent channel.
    PageRequest = 6,
    /// Every page has been sent.
    Complete = 7,
    /// The sender gives up (JSON reason).
    Abort = 8,
    /// The destination confirms it runs the guest.
    Resumed = 9,
    /// A page that is all zeros: gpa (u64 LE) only (since version 2).
    ZeroPage = 10,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        use FrameKind::*;
        [
            Hello,
            HelloAck,
            Page,
            RoundEnd,
            SwitchOver,
            PageRequest,
            Complete,
            Abort,
            Resumed,
            ZeroPage,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

/// What a page frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageData<'a> {
    Bytes(&'a [u8]),
    /// The page is all zeros.
    Zero,
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("migration stream: frame {index}: payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge { index: u64, len: u32 },
    #[error("migration stream: frame {index}: truncated ({what}); the peer closed the connection mid-frame")]
    Truncated { index: u64, what: &'static str },
    #[error("migration stream: the peer closed the connection before frame {index}")]
    Closed { index: u64 },
    #[error("migration stream: frame {index} ({kind:?}): {what}")]
    Malformed {
        index: u64,
        kind: FrameKind,
        what: String,
    },
    #[error("migration stream: frame {index}: expected {expected}, got {got:?}")]
    Unexpected {
        index: u64,
        expected: &'static str,
        got: FrameKind,
    },
    #[error("peer speaks migration protocol version {theirs}, this hugevisor speaks {ours}; use the same hugevisor on both ends")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("guest layouts differ: {0}")]
    LayoutMismatch(String),
    #[error("migration peer did not answer within {0:?} (is it alive? network down?)")]
    Timeout(std::time::Duration),
    #[error("migration peer did not answer within the stream's I/O timeout (is it alive? network down?)")]
    Silent,
    #[error("migration transport: {0}")]
    Io(#[from] std::io::Error),
    #[error("migration peer aborted: {0}")]
    PeerAborted(String),
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn json<T: Serialize>(kind: FrameKind, v: &T) -> Frame {
        Frame {
            kind,
            payload: serde_json::to_vec(v).unwrap_or_default(),
        }
    }

    pub fn page(gpa: u64, data: &[u8]) -> Frame {
        let mut payload = Vec::with_capacity(8 + data.len());
        payload.extend_from_slice(&gpa.to_le_bytes());
        payload.extend_from_slice(data);
        Frame {
            kind: FrameKind::Page,
            payload,
        }
    }

    /// A page the sender found all zeros: no data on the wire.
    pub fn zero_page(gpa: u64) -> Frame {
        Frame::u64(FrameKind::ZeroPage, gpa)
    }

    pub fn u64(kind: FrameKind, v: u64) -> Frame {
        Frame {
            kind,
            payload: v.to_le_bytes().to_vec(),
        }
    }
}

fn crc(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The first frame: who is talking and what guest it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub memory_bytes: u64,
    pub backing: String,
    pub page_size: u64,
    pub vcpus: u32,
    pub mode: String,
}

impl Hello {
    /// Checks `theirs` against what this end expects; the error names every difference.
    pub fn check_compatible(&self, theirs: &Hello) -> Result<(), Error> {
        if theirs.version != self.version {
            return Err(Error::VersionMismatch {
                ours: self.version,
                theirs: theirs.version,
            });
        }
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
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(Error::LayoutMismatch(format!(
                "source has {}, destination expects otherwise; start the destination with the same --memory/--backing/--vcpus",
                diffs.join(", ")
            )))
        }
    }
}

/// Writes frames; counts them and their bytes.
/// Page frames are gathered up to this many bytes before they are written: two syscalls
/// per 4 KiB page made the stream ~5x slower than the wire.
const WRITE_BATCH: usize = 256 << 10;

/// Writes frames. Page frames are batched; every other frame (the ones a peer may wait
/// for, and the ones that order the stream) writes out everything before it at once.
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

    fn write_batch(&mut self) -> Result<(), Error> {
        if !self.batch.is_empty() {
            self.inner.write_all(&self.batch).map_err(timeout_or_io)?;
            self.batch.clear();
        }
        Ok(())
    }

    pub fn send(&mut self, f: &Frame) -> Result<(), Error> {
        let len = u32::try_from(f.payload.len()).map_err(|_| Error::TooLarge {
            index: self.frames,
            len: u32::MAX,
        })?;
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4] = f.kind as u8;
        header[8..12].copy_from_slice(&len.to_le_bytes());
        header[12..16].copy_from_slice(&crc(f.kind as u8, len, &f.payload).to_le_bytes());
        let is_page = matches!(f.kind, FrameKind::Page | FrameKind::ZeroPage);
        if is_page && f.payload.len() < WRITE_BATCH {
            self.batch.extend_from_slice(&header);
            self.batch.extend_from_slice(&f.payload);
            if self.batch.len() >= WRITE_BATCH {
                self.write_batch()?;
            }
        } else {
            self.write_batch()?;
            self.inner.write_all(&header).map_err(timeout_or_io)?;
            self.inner.write_all(&f.payload).map_err(timeout_or_io)?;
        }
        self.frames += 1;
        self.bytes += (HEADER_LEN + f.payload.len()) as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        self.write_batch()?;
        self.inner.flush().map_err(timeout_or_io)
    }

    /// The underlying writer, after the batched pages were written to it (best effort:
    /// a write error shows on the next send or flush).
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

fn timeout_or_io(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Silent,
        _ => Error::Io(e),
    }
}

/// Reads and checks frames.
pub struct FrameReader<R: Read> {
    inner: std::io::BufReader<R>,
    pub frames: u64,
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner: std::io::BufReader::with_capacity(WRITE_BATCH, inner),
            frames: 0,
            bytes: 0,
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str, at_start: bool) -> Result<(), Error> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 && at_start => return Err(Error::Closed { index: self.frames }),
                Ok(0) => {
                    return Err(Error::Truncated {
                        index: self.frames,
                        what,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timeout_or_io(e)),
            }
        }
        Ok(())
    }

    pub fn recv(&mut self) -> Result<Frame, Error> {
        let index = self.frames;
        let mut header = [0u8; HEADER_LEN];
        self.fill(&mut header, "header", true)?;
        if header[0..4] != MAGIC {
            let mut found = [0u8; 4];
            found.copy_from_slice(&header[0..4]);
            return Err(Error::BadMagic { index, found });
        }
        let kind = FrameKind::from_u8(header[4]).ok_or(Error::UnknownKind {
            index,
            kind: header[4],
        })?;
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if len > MAX_PAYLOAD {
            return Err(Error::TooLarge { index, len });
        }
        let expected = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let mut payload = vec![0u8; len as usize];
        self.fill(&mut payload, "payload", false)?;
        let computed = crc(header[4], len, &payload);
        if computed != expected {
            return Err(Error::Checksum {
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

    /// Receives a frame of `kind` (an `Abort` from the peer becomes an error).
    pub fn expect(&mut self, kind: FrameKind, expected: &'static str) -> Result<Frame, Error> {
        let f = self.recv()?;
        if f.kind == FrameKind::Abort {
            return Err(Error::PeerAborted(
                String::from_utf8_lossy(&f.payload).into_owned(),
            ));
        }
        if f.kind != kind {
            return Err(Error::Unexpected {
                index: self.frames - 1,
                expected,
                got: f.kind,
            });
        }
        Ok(f)
    }
}

impl Frame {
    /// Parses a JSON payload.
    pub fn parse_json<T: for<'de> Deserialize<'de>>(&self, index: u64) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Malformed {
            index,
            kind: self.kind,
            what: e.to_string(),
        })
    }

    /// Splits a page frame into (gpa, data), checking the size.
    /// The GPA and content of a `Page` or `ZeroPage` frame.
    pub fn as_page(&self, index: u64, page_size: u64) -> Result<(u64, PageData<'_>), Error> {
        if self.kind == FrameKind::ZeroPage {
            return Ok((self.as_u64(index)?, PageData::Zero));
        }
        if self.payload.len() as u64 != 8 + page_size {
            return Err(Error::Malformed {
                index,
                kind: self.kind,
                what: format!(
                    "page frame of {} bytes, expected 8 + {page_size}",
                    self.payload.len()
                ),
            });
        }
        let gpa = u64::from_le_bytes(self.payload[0..8].try_into().unwrap_or([0; 8]));
        Ok((gpa, PageData::Bytes(&self.payload[8..])))
    }

    pub fn as_u64(&self, index: u64) -> Result<u64, Error> {
        let b: [u8; 8] = self
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| Error::Malformed {
                index,
                kind: self.kind,
                what: "expected 8 bytes".into(),
            })?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            memory_bytes: 64 << 20,
            backing: "shmem".into(),
            page_size: 4096,
            vcpus: 2,
            mode: "precopy".into(),
        }
    }

    #[test]
    fn zero_pages_travel_as_their_address_only() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        assert!(is_zero(&page[3..4093]), "unaligned slices too");
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[0] = 1;
        assert!(!is_zero(&page[..17]));

        let mut w = FrameWriter::new(Vec::new());
        w.send(&Frame::zero_page(0x7000)).unwrap();
        let bytes = w.get_mut().clone();
        assert!(
            bytes.len() < 64,
            "no page data on the wire: {} bytes",
            bytes.len()
        );
        let mut r = FrameReader::new(bytes.as_slice());
        let f = r.recv().unwrap();
        assert_eq!(f.kind, FrameKind::ZeroPage);
        assert_eq!(f.as_page(0, 4096).unwrap(), (0x7000, PageData::Zero));
    }

    #[test]
    fn frames_round_trip() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(&Frame::json(FrameKind::Hello, &hello())).unwrap();
        w.send(&Frame::page(0x5000, &[7u8; 4096])).unwrap();
        w.send(&Frame {
            kind: FrameKind::Complete,
            payload: vec![],
        })
        .unwrap();
        let bytes = w.get_mut().clone();
        let mut r = FrameReader::new(bytes.as_slice());
        let h: Hello = r
            .expect(FrameKind::Hello, "hello")
            .unwrap()
            .parse_json(0)
            .unwrap();
        assert_eq!(h, hello());
        let p = r.recv().unwrap();
        let (gpa, data) = p.as_page(1, 4096).unwrap();
        assert_eq!((gpa, data), (0x5000, PageData::Bytes(&[7u8; 4096])));
        assert_eq!(r.recv().unwrap().kind, FrameKind::Complete);
        assert!(matches!(r.recv(), Err(Error::Closed { index: 3 })));
    }

    #[test]
    fn corruption_garbage_and_truncation_name_the_frame() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(&Frame::json(FrameKind::Hello, &hello())).unwrap();
        w.send(&Frame::page(0x5000, &[7u8; 4096])).unwrap();
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
                Error::Checksum {
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
        assert!(matches!(r.recv(), Err(Error::BadMagic { index: 0, .. })));
        // Truncation mid-payload.
        let mut r = FrameReader::new(&good[..good.len() - 10]);
        r.recv().unwrap();
        assert!(matches!(
            r.recv(),
            Err(Error::Truncated {
                index: 1,
                what: "payload"
            })
        ));
        // A frame of the wrong kind, an abort.
        let mut r = FrameReader::new(good.as_slice());
        assert!(matches!(
            r.expect(FrameKind::SwitchOver, "switch-over"),
            Err(Error::Unexpected { .. })
        ));
        let mut w = FrameWriter::new(Vec::new());
        w.send(&Frame {
            kind: FrameKind::Abort,
            payload: b"disk full".to_vec(),
        })
        .unwrap();
        let mut r = FrameReader::new(w.get_mut().as_slice());
        assert!(r
            .expect(FrameKind::Page, "page")
            .unwrap_err()
            .to_string()
            .contains("disk full"));
        // Page frames of the wrong size.
        let f = Frame::page(0, &[0u8; 100]);
        assert!(f
            .as_page(3, 4096)
            .unwrap_err()
            .to_string()
            .contains("frame 3"));
    }

    #[test]
    fn handshake_refuses_other_versions_and_layouts() {
        let ours = hello();
        let mut theirs = hello();
        theirs.version = 99;
        let e = ours.check_compatible(&theirs).unwrap_err().to_string();
        assert!(e.contains("99") && e.contains("version"), "{e}");
        let mut theirs = hello();
        theirs.memory_bytes = 128 << 20;
        theirs.backing = "hugetlb-2m".into();
        let e = ours.check_compatible(&theirs).unwrap_err().to_string();
        assert!(
            e.contains("memory") && e.contains("backing") && e.contains("--memory"),
            "{e}"
        );
        assert!(ours.check_compatible(&hello()).is_ok());
    }
}
