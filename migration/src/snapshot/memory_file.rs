//! The snapshot's memory file: guest RAM at its own offsets (byte `gpa` of the file is
//! guest-physical `gpa`), so any backing page is one `pread` at its GPA, whatever the
//! page size; pages that are all zeros are not written and stay holes of a sparse file,
//! found again with `SEEK_DATA`/`SEEK_HOLE`. Every page read back is checked against the
//! CRC-32 the state file recorded for it before anyone may use it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use guest_mm::{Gpa, PageContent};

use super::error::SnapshotError;
use super::format::SnapshotState;
use crate::host::GuestPages;
use crate::wire::frame::is_zero;
use crate::PageBitmap;

/// What writing the memory file recorded.
pub struct Written {
    pub page_crcs: Vec<u32>,
    pub memory_hash: u32,
    pub data_pages: u64,
}

/// Writes all of `pages`' guest RAM to a new memory file at `path` (zero pages as holes).
pub fn write_memory(pages: &dyn GuestPages, path: &Path) -> Result<Written, SnapshotError> {
    let io = |what| move |source| SnapshotError::io(what, path, source);
    let f = File::create(path).map_err(io("creating"))?;
    f.set_len(pages.size()).map_err(io("sizing"))?;
    let page_size = pages.page_size();
    let mut buf = vec![0u8; page_size as usize];
    let mut hash = crc32fast::Hasher::new();
    let n = pages.size() / page_size;
    let mut out = Written {
        page_crcs: Vec::with_capacity(n as usize),
        memory_hash: 0,
        data_pages: 0,
    };
    for p in 0..n {
        let gpa = Gpa(p * page_size);
        pages
            .read_page(gpa, &mut buf)
            .map_err(SnapshotError::host("reading guest RAM"))?;
        out.page_crcs.push(crc32fast::hash(&buf));
        hash.update(&buf);
        if !is_zero(&buf) {
            f.write_all_at(&buf, gpa.0).map_err(io("writing"))?;
            out.data_pages += 1;
        }
    }
    f.sync_all().map_err(io("writing"))?;
    out.memory_hash = hash.finalize();
    Ok(out)
}

/// A memory file opened for restoring, checked against its state file.
pub struct MemoryFile {
    file: File,
    path: PathBuf,
    page_size: u64,
    crcs: Vec<u32>,
    /// Pages that hold data in the file (the others are holes: zeros).
    data: PageBitmap,
    /// CRC-32 of a page of zeros.
    zero_crc: u32,
}

impl MemoryFile {
    pub fn open(path: &Path, state: &SnapshotState) -> Result<MemoryFile, SnapshotError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => SnapshotError::Missing {
                path: path.to_path_buf(),
            },
            _ => SnapshotError::io("opening", path, source),
        })?;
        let len = file
            .metadata()
            .map_err(|source| SnapshotError::io("reading", path, source))?
            .len();
        if len != state.memory_bytes {
            return Err(SnapshotError::MemorySize {
                path: path.to_path_buf(),
                found: len,
                expected: state.memory_bytes,
            });
        }
        let data = data_pages(&file, path, state)?;
        Ok(MemoryFile {
            file,
            path: path.to_path_buf(),
            page_size: state.page_size,
            crcs: state.page_crcs.clone(),
            data,
            zero_crc: zero_crc(state.page_size),
        })
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    pub fn pages(&self) -> u64 {
        self.crcs.len() as u64
    }

    /// Whether page `page` is a hole (all zeros) in the file.
    pub fn is_hole(&self, page: u64) -> bool {
        !self.data.get(page)
    }

    /// Reads backing page `page` into `buf` (one page long) and checks it; a hole is
    /// `Zero` without a read. Never returns content that does not match the state file.
    pub fn read<'b>(&self, page: u64, buf: &'b mut [u8]) -> Result<PageContent<'b>, SnapshotError> {
        let gpa = Gpa(page * self.page_size);
        let expected = self.crcs.get(page as usize).copied().unwrap_or(0);
        let mismatch = |computed| SnapshotError::PageChecksum {
            path: self.path.clone(),
            gpa,
            expected,
            computed,
        };
        if self.is_hole(page) {
            if expected != self.zero_crc {
                return Err(mismatch(self.zero_crc));
            }
            return Ok(PageContent::Zero);
        }
        self.file
            .read_exact_at(buf, gpa.0)
            .map_err(|source| SnapshotError::io("reading", &self.path, source))?;
        let computed = crc32fast::hash(buf);
        if computed != expected {
            return Err(mismatch(computed));
        }
        Ok(PageContent::Bytes(buf))
    }
}

/// CRC-32 of `len` zero bytes, from a small buffer: a 1 GiB page of zeros allocated and
/// read to hash it cost a quarter of a second of page faults before the guest started.
fn zero_crc(len: u64) -> u32 {
    static ZEROS: [u8; 65536] = [0; 65536];
    let mut h = crc32fast::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        h.update(&ZEROS[..n as usize]);
        left -= n;
    }
    h.finalize()
}

/// The pages of `file` that hold data, by `SEEK_DATA`/`SEEK_HOLE` (a page partly data is
/// data). A file system without them reports all data, which is only slower.
fn data_pages(
    file: &File,
    path: &Path,
    state: &SnapshotState,
) -> Result<PageBitmap, SnapshotError> {
    let pages = state.pages();
    let mut map = PageBitmap::empty(pages);
    let fd = file.as_raw_fd();
    let len = state.memory_bytes as i64;
    let mut at: i64 = 0;
    while at < len {
        // SAFETY: lseek on a file descriptor we own; it changes only the file offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Err(SnapshotError::io("seeking data in", path, e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { len } else { hole.min(len) };
        let (first, end) = (
            data as u64 / state.page_size,
            (hole as u64).div_ceil(state.page_size),
        );
        for p in first..end.min(pages) {
            map.set(p);
        }
        at = hole;
    }
    Ok(map)
}
