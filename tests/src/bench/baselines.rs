//! Host baselines measured in the same run as the VMM, so a figure has something to be
//! compared with: a raw userfaultfd MINOR round trip (the floor under every fault the VMM
//! resolves) and loopback TCP throughput (the floor under a migration's wire time).

use std::io::{Read, Write};
use std::sync::Arc;

use guest_mm::{BackingKind, GuestRam, RamConfig};

use super::clock::monotonic_ns;
use super::error::BenchError;
use super::median;

/// Median time of a raw userfaultfd MINOR round trip on shmem, in µs: a thread touches a
/// zapped page of a registered view, a handler thread CONTINUEs it. The floor under every
/// hint fault the VMM takes.
pub fn raw_minor_round_trip_us(samples: usize) -> Result<f64, BenchError> {
    let ram = GuestRam::create(&RamConfig {
        size: 16 << 20,
        backing: BackingKind::Shmem,
        ..Default::default()
    })
    .map_err(BenchError::BaselineRam)?;
    let base = ram.guest_view_addr() as u64;
    let page = 4096u64;
    // Populate the page cache through the staging view.
    for p in 0..samples.min(4096) as u64 {
        vm_memory::Bytes::write_obj(ram.staging(), p, vm_memory::GuestAddress(p * page))
            .map_err(BenchError::BaselineWrite)?;
    }
    let u =
        Arc::new(uffd::Uffd::open(uffd::Features::MINOR_SHMEM).map_err(BenchError::BaselineUffd)?);
    u.register(base, 16 << 20, uffd::RegisterMode::MINOR)
        .map_err(BenchError::BaselineUffd)?;
    let stop = Arc::new(uffd::StopFd::new().map_err(BenchError::BaselineUffd)?);
    let (u2, s2) = (u.clone(), stop.clone());
    let handler = std::thread::spawn(move || {
        uffd::run_until_stopped(&u2, &s2, |ev| {
            if let uffd::Event::Pagefault { address, .. } = ev {
                let _ = u2.continue_range(address & !(page - 1), page, uffd::Wake::Yes);
            }
        })
    });
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        let addr = base + (i % 4096) * page;
        // SAFETY: zaps one page of our own shared guest view; the page cache keeps it.
        unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                page as usize,
                libc::MADV_DONTNEED,
            )
        };
        let t = monotonic_ns();
        // SAFETY: reads a u64 inside the 16 MiB guest view.
        let _ = unsafe { std::ptr::read_volatile(addr as *const u64) };
        times.push((monotonic_ns() - t) as f64 / 1000.0);
    }
    stop.stop();
    let _ = handler.join();
    Ok(median(times))
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
