//! Host probes: what the host's own mechanisms cost, measured without our policy on top
//! (for `hugevisor bench`). They live here because they touch the guest view directly.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use crate::addr::{Gpa, GpaRange, SIZE_4K};
use crate::config::{BackingKind, RamConfig};
use crate::error::Error;
use crate::ram::GuestRam;

fn uffd_error(what: &'static str) -> impl FnOnce(uffd::Error) -> Error {
    move |source| Error::Uffd { what, source }
}

/// Median time of a raw userfaultfd MINOR round trip on shmem, in µs: a thread touches a
/// zapped page of a registered view, a handler thread CONTINUEs it. The floor under every
/// hint fault the VMM takes.
pub fn raw_minor_round_trip_us(samples: usize) -> Result<f64, Error> {
    let ram = GuestRam::create(&RamConfig {
        size: 16 << 20,
        backing: BackingKind::Shmem,
        ..Default::default()
    })?;
    let base = ram.guest_view_addr();
    let pages = (samples.min(4096) as u64).max(1);
    // Populate the page cache through the staging view.
    for p in 0..pages {
        let gpa = p * SIZE_4K;
        ram.staging()
            .write_obj(p, GuestAddress(gpa))
            .map_err(|source| Error::Staging {
                what: "populating",
                gpa: Gpa(gpa),
                source,
            })?;
    }
    let u =
        Arc::new(uffd::Uffd::open(uffd::Features::MINOR_SHMEM).map_err(uffd_error("opening it"))?);
    u.register(base, ram.size(), uffd::RegisterMode::MINOR)
        .map_err(uffd_error("registering the probe view"))?;
    let stop = Arc::new(uffd::StopFd::new().map_err(uffd_error("a stop eventfd"))?);
    let (u2, s2) = (u.clone(), stop.clone());
    let handler = std::thread::spawn(move || {
        uffd::run_until_stopped(&u2, &s2, |ev| {
            if let uffd::Event::Pagefault { address, .. } = ev {
                let _ = u2.continue_range(address & !(SIZE_4K - 1), SIZE_4K, uffd::Wake::Yes);
            }
        })
    });
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        let gpa = (i % pages) * SIZE_4K;
        ram.zap_guest_view(GpaRange::new(Gpa(gpa), Gpa(gpa + SIZE_4K)))?;
        let t = Instant::now();
        // SAFETY: reads a u64 inside the 16 MiB guest view; the handler thread resolves
        // the MINOR fault it raises.
        let _ = unsafe { std::ptr::read_volatile((base + gpa) as *const u64) };
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    stop.stop();
    let _ = handler.join();
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times.get(times.len() / 2).copied().unwrap_or(0.0))
}

/// How fast a fresh guest RAM of `backing` can be populated, in bytes/s: `size` bytes of
/// a non-zero pattern written in 1 MiB chunks the way a migration destination writes what
/// it receives ([`GuestRam::write_bytes`]: `pwrite` into a shmem memfd, which spares the
/// kernel zeroing each page first; a copy through the staging view otherwise) — the floor
/// under a destination's receive, beside the wire's.
pub fn populate_bytes_per_sec(backing: BackingKind, size: u64) -> Result<f64, Error> {
    let ram = GuestRam::create(&RamConfig {
        size,
        backing,
        ..Default::default()
    })?;
    const CHUNK: u64 = 1 << 20;
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8 + 1).collect();
    let t = Instant::now();
    for at in (0..ram.size()).step_by(CHUNK as usize) {
        let n = CHUNK.min(ram.size() - at) as usize;
        ram.write_bytes(Gpa(at), &chunk[..n])?;
    }
    Ok(ram.size() as f64 / t.elapsed().as_secs_f64().max(1e-9))
}
