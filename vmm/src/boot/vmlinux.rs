//! A bzImage's inner vmlinux: the ELF its decompressor would unpack, which carries the
//! PVH note, so the kernel can be entered through PVH without running the
//! decompressor (emulated on these hosts: ~177 s to the banner instead of ~30 s).
//!
//! The payload (setup header `payload_offset`/`payload_length`, from the start of the
//! protected-mode code) is compressed with what the kernel was built with; gzip and LZ4
//! (Debian's choice: the legacy frame format of `lz4 -l`) are understood here.

use std::io::Read;

use crate::boot::kernel::KernelError;

/// The legacy LZ4 frame: 4-byte magic, then blocks each preceded by its compressed
/// size, each decompressing to at most 8 MiB.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// A vmlinux larger than this is not a kernel (Debian's is ~60 MiB).
const MAX_VMLINUX: usize = 512 << 20;

/// Decompresses the payload into the vmlinux ELF.
pub fn unpack(payload: &[u8]) -> Result<Vec<u8>, KernelError> {
    if payload.starts_with(&LZ4_LEGACY_MAGIC) {
        unpack_lz4_legacy(&payload[4..])
    } else if payload.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(payload)
            .take(MAX_VMLINUX as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| KernelError::Payload(format!("gzip: {e}")))?;
        if out.len() > MAX_VMLINUX {
            return Err(KernelError::Payload("over 512 MiB unpacked".into()));
        }
        Ok(out)
    } else {
        Err(KernelError::PayloadFormat {
            magic: payload.iter().take(4).copied().collect(),
        })
    }
}

fn unpack_lz4_legacy(mut rest: &[u8]) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    // The stream ends at the payload's end — where the kernel's build appends the
    // unpacked size (4 bytes) — or at a block size that is another magic (concatenated
    // frames) or zero padding.
    while rest.len() > 4 {
        let size = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if size == 0 || rest[..4] == LZ4_LEGACY_MAGIC {
            break;
        }
        let data = rest
            .get(4..4 + size)
            .ok_or_else(|| KernelError::Payload("LZ4 block runs past the payload".into()))?;
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| KernelError::Payload(format!("LZ4: {e}")))?;
        out.extend_from_slice(&block[..n]);
        if out.len() > MAX_VMLINUX {
            return Err(KernelError::Payload("over 512 MiB unpacked".into()));
        }
        rest = &rest[4 + size..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_and_lz4_round_trip() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut gz = Vec::new();
        {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
            e.write_all(&data).unwrap();
            e.finish().unwrap();
        }
        assert_eq!(unpack(&gz).unwrap(), data);
        let block = lz4_flex::block::compress(&data);
        let mut lz = LZ4_LEGACY_MAGIC.to_vec();
        lz.extend_from_slice(&(block.len() as u32).to_le_bytes());
        lz.extend_from_slice(&block);
        lz.extend_from_slice(&[0; 8]);
        assert_eq!(unpack(&lz).unwrap(), data);
        assert!(matches!(
            unpack(b"BZh9...."),
            Err(KernelError::PayloadFormat { .. })
        ));
    }
}
