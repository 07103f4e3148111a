//! The snapshot's state file: what it says (guest layout, the VM state, the memory
//! file's page checksums and hash, the hot set) and how it is laid out on disk — a
//! fixed header (magic, format version, body length, CRC-32 of the body) followed by the
//! body as JSON. The content is the migration's (`VmState`, opaque here); this module is
//! only its container, as Firecracker keeps `Persist` apart from its snapshot format.

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::SnapshotError;
use crate::host::VmState;

/// The state file's first eight bytes.
pub const MAGIC: [u8; 8] = *b"HVSNAPST";
/// The state file format this hugevisor writes and reads. Bump on any change of the body.
pub const FORMAT_VERSION: u32 = 1;
/// Magic, version, reserved word, body length, CRC-32.
pub const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 4;
/// A state file body larger than this is refused before it is read (a 64 GiB guest in
/// 4 KiB pages has 16 Mi page checksums, ~180 MiB of JSON).
pub const MAX_BODY_BYTES: u64 = 512 << 20;

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// What a snapshot holds besides guest RAM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Guest RAM size in bytes; the memory file is exactly this long.
    pub memory_bytes: u64,
    /// Backing page size: the unit the memory file is served in.
    pub page_size: u64,
    /// "shmem", "hugetlb-2m", "hugetlb-1g".
    pub backing: String,
    pub vcpus: u32,
    /// CRC-32 of each backing page, in address order: a page read back from the memory
    /// file is checked against it before the guest may see it.
    pub page_crcs: Vec<u32>,
    /// CRC-32 of all guest RAM (the migration's memory hash).
    pub memory_hash: u32,
    /// Backing pages with content (the others are holes in the memory file).
    pub data_pages: u64,
    /// The hot set: backing pages the guest wrote in the last `hot_period_ms` before the
    /// snapshot, as `[first, end)` page ranges. A lazy restore fetches them first.
    pub hot_set: Vec<(u64, u64)>,
    pub hot_period_ms: u64,
    /// The VM state (vCPUs, devices, run info), as a migration carries it.
    pub vm: VmState,
}

impl SnapshotState {
    pub fn pages(&self) -> u64 {
        self.memory_bytes / self.page_size
    }

    /// Pages in the hot set.
    pub fn hot_pages(&self) -> u64 {
        self.hot_set.iter().map(|(a, b)| b - a).sum()
    }

    /// Refuses a body whose parts do not fit together (it comes from a file).
    fn check(&self, path: &Path) -> Result<(), SnapshotError> {
        let bad = |what: String| SnapshotError::Malformed {
            path: path.to_path_buf(),
            what,
        };
        if self.page_size == 0
            || !self.page_size.is_power_of_two()
            || self.memory_bytes == 0
            || !self.memory_bytes.is_multiple_of(self.page_size)
        {
            return Err(bad(format!(
                "memory of {:#x} bytes in pages of {:#x} is not a guest layout",
                self.memory_bytes, self.page_size
            )));
        }
        if self.page_crcs.len() as u64 != self.pages() {
            return Err(bad(format!(
                "{} page checksums for {} pages",
                self.page_crcs.len(),
                self.pages()
            )));
        }
        if let Some(&(a, b)) = self
            .hot_set
            .iter()
            .find(|&&(a, b)| a >= b || b > self.pages())
        {
            return Err(bad(format!(
                "hot-set range [{a}, {b}) is empty or beyond page {}",
                self.pages()
            )));
        }
        Ok(())
    }
}

/// Writes `state` to `path` (header, then body), through a temporary file renamed into
/// place: a reader never sees half a state file under the final name.
pub fn write_state(path: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let body = serde_json::to_vec(state).map_err(|source| SnapshotError::Encode { source })?;
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(body.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let tmp = path.with_extension("tmp");
    let io = |source| SnapshotError::io("writing", &tmp, source);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&header).map_err(io)?;
    f.write_all(&body).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|source| SnapshotError::io("renaming", &tmp, source))
}

/// Reads and checks the state file at `path`: magic, version, length, checksum, then the
/// body's own consistency. Nothing in it is trusted before these checks.
pub fn read_state(path: &Path) -> Result<SnapshotState, SnapshotError> {
    let mut f = std::fs::File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing {
            path: path.to_path_buf(),
        },
        _ => SnapshotError::io("opening", path, source),
    })?;
    let len = f
        .metadata()
        .map_err(|source| SnapshotError::io("reading", path, source))?
        .len();
    let truncated = |what: String| SnapshotError::Truncated {
        path: path.to_path_buf(),
        what,
    };
    if len < HEADER_BYTES as u64 {
        return Err(truncated(format!(
            "{len} bytes, shorter than the {HEADER_BYTES}-byte header"
        )));
    }
    let mut header = [0u8; HEADER_BYTES];
    f.read_exact(&mut header)
        .map_err(|source| SnapshotError::io("reading", path, source))?;
    if header[..8] != MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
            ours: FORMAT_VERSION,
        });
    }
    let mut body_len = [0u8; 8];
    body_len.copy_from_slice(&header[16..24]);
    let body_len = u64::from_le_bytes(body_len);
    let crc = word(24);
    if body_len > MAX_BODY_BYTES {
        return Err(SnapshotError::Malformed {
            path: path.to_path_buf(),
            what: format!("a body of {body_len} bytes exceeds the {MAX_BODY_BYTES}-byte limit"),
        });
    }
    let have = len - HEADER_BYTES as u64;
    if have < body_len {
        return Err(truncated(format!(
            "the header announces a body of {body_len} bytes, the file holds {have}"
        )));
    }
    if have > body_len {
        return Err(SnapshotError::Malformed {
            path: path.to_path_buf(),
            what: format!("{} bytes follow the {body_len}-byte body", have - body_len),
        });
    }
    let mut body = vec![0u8; body_len as usize];
    f.read_exact(&mut body)
        .map_err(|source| SnapshotError::io("reading", path, source))?;
    let computed = crc32fast::hash(&body);
    if computed != crc {
        return Err(SnapshotError::Checksum {
            path: path.to_path_buf(),
            expected: crc,
            computed,
        });
    }
    let state: SnapshotState =
        serde_json::from_slice(&body).map_err(|source| SnapshotError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    state.check(path)?;
    Ok(state)
}

/// Backing-page ranges `[first, end)` of the set bits of `pages` (in order).
pub fn ranges_of(pages: &crate::PageBitmap) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pages.iter() {
        match out.last_mut() {
            Some((_, end)) if *end == p => *end = p + 1,
            _ => out.push((p, p + 1)),
        }
    }
    out
}
