//! Host baselines measured in the same run as the VMM, so a figure has something to be
//! compared with: a raw userfaultfd MINOR round trip (the floor under every fault the VMM
//! resolves), loopback TCP throughput (the floor under a migration's wire time) and how
//! fast a fresh guest RAM of a backing can be populated (the floor under a destination's
//! receive).

use std::io::{Read, Write};

use super::error::BenchError;
use guest_image::clock::monotonic_ns;

/// Median time of a raw userfaultfd MINOR round trip on shmem, in µs: the floor under
/// every hint fault the VMM takes (guest-mm's probe: only guest-mm maps and zaps).
pub fn raw_minor_round_trip_us(samples: usize) -> Result<f64, BenchError> {
    guest_mm::probe::raw_minor_round_trip_us(samples).map_err(BenchError::BaselineRam)
}

/// Loopback TCP throughput in bytes/s: one connection, 256 MiB in 1 MiB writes.
pub fn loopback_tcp_bytes_per_sec() -> Result<f64, BenchError> {
    let io = |what| move |source| BenchError::Loopback { what, source };
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding 127.0.0.1:0"))?;
    let addr = l.local_addr().map_err(io("reading the bound address"))?;
    let total = 256u64 << 20;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut c, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = c.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok(got)
    });
    let mut c = std::net::TcpStream::connect(addr).map_err(io("connecting"))?;
    let buf = vec![0x5au8; 1 << 20];
    let t = monotonic_ns();
    for _ in 0..(total >> 20) {
        c.write_all(&buf).map_err(io("writing"))?;
    }
    drop(c);
    let got = reader
        .join()
        .map_err(|_| BenchError::ThreadPanicked("loopback reader"))?
        .map_err(io("reading"))?;
    Ok(got as f64 * 1e9 / (monotonic_ns() - t) as f64)
}

/// Bytes/s at which a fresh guest RAM of `backing` (as `hugevisor run --backing` names
/// it) and `size` takes a non-zero pattern through its staging view (guest-mm's probe).
pub fn populate_bytes_per_sec(backing: &str, size: &str) -> Result<f64, BenchError> {
    let backing = backing
        .parse::<guest_mm::BackingKind>()
        .map_err(BenchError::BaselineRam)?;
    let size = guest_mm::size::parse_size(size).map_err(BenchError::BaselineRam)?;
    guest_mm::probe::populate_bytes_per_sec(backing, size).map_err(BenchError::BaselineRam)
}

/// Touches `bytes` of anonymous host memory once, all of it held at the same time (so
/// that each page is a different one), then frees it: the host pages the measured runs
/// get next have been used once already.
pub fn warm_host_memory(bytes: u64) {
    const CHUNK: usize = 1 << 30;
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut left = bytes as usize;
    while left > 0 {
        let n = left.min(CHUNK);
        held.push(vec![1u8; n]);
        left -= n;
    }
    std::hint::black_box(&held);
    drop(held);
}
