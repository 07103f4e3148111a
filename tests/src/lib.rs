//! Helpers for hugevisor's end-to-end tests: find the real `hugevisor` binary, check the
//! host capabilities a test needs, keep heavy tests from running at once, run the binary
//! and parse its JSON. The crate also holds the benchmark harness ([`bench`], the
//! `hugevisor-bench` binary), which drives the same binary from outside.
//!
//! A test whose capability is missing prints why and skips — unless
//! `HUGEVISOR_REQUIRE_HOST=1` (set by `.ci/run` on machines with /dev/kvm), where a
//! skip is a failure.

pub mod api;
pub mod bench;
pub mod guests;
pub mod initramfs;
pub mod peers;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The lock file behind [`heavy`]. A fixed path under /tmp, not `$TMPDIR`: every test
/// binary, and every cargo-nextest process, must find the same file.
pub const HEAVY_LOCK: &str = "/tmp/hugevisor-tests-heavy.lock";

/// Held while a heavy test runs (see [`heavy`]); dropping it lets the next one start.
#[must_use = "the heavy-test lock is released when this guard is dropped"]
pub struct Heavy {
    _file: std::fs::File,
}

/// Waits until no other heavy test runs on this host, then holds the host until the
/// returned guard is dropped: `let _heavy = tests::heavy();` first thing in the test.
///
/// **Heavy** are the tests that
/// - start a guest pair (any live migration): two VMMs with 2 vCPUs each, plus migration
///   and fault threads, already oversubscribe a 2-core host;
/// - start a guest of 512 MiB or more: first touches alone take seconds per GiB here;
/// - take hugetlb pool pages, or check that a pool is untouched: a pool is host-wide, so
///   two such tests (in one binary or in two) would take each other's pages.
///
/// Everything else — bad input, small single guests of up to 128 MiB, the QEMU boot —
/// stays parallel. The lock is an `flock(2)` on [`HEAVY_LOCK`], so it holds across test
/// binaries and under cargo-nextest (one process per test) as well as across the threads
/// of one binary; the kernel drops it if a test process dies. It is not re-entrant: a
/// test takes it once, helpers never do.
pub fn heavy() -> Heavy {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .open(HEAVY_LOCK)
        .unwrap_or_else(|e| panic!("opening the heavy-test lock {HEAVY_LOCK}: {e}"));
    loop {
        // SAFETY: flock on a file descriptor we own for the whole call; it touches no memory.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            return Heavy { _file: file };
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            panic!("locking the heavy-test lock {HEAVY_LOCK}: {e}");
        }
    }
}

/// Path of the `hugevisor` binary built alongside the tests (`target/<profile>/hugevisor`),
/// or `$HUGEVISOR_BIN`.
pub fn hugevisor_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HUGEVISOR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/hugevisor
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile> directory");
    let bin = profile_dir.join("hugevisor");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (which builds it) or set HUGEVISOR_BIN",
        bin.display()
    );
    bin
}

/// A `hugevisor` command whose process is killed when the test thread that spawned it
/// ends — a test that panics leaves no VMM running (one left running for its whole
/// `--duration` would starve the tests after it on a 2-core machine).
pub fn hugevisor() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(hugevisor_path());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only the child's
    // own state between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn require_host() -> bool {
    std::env::var("HUGEVISOR_REQUIRE_HOST").is_ok_and(|v| v == "1")
}

/// Skips (returns false) when the host lacks `what`, or panics under HUGEVISOR_REQUIRE_HOST=1.
pub fn host_has(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if require_host() {
        panic!("HUGEVISOR_REQUIRE_HOST=1 but this host lacks {what}");
    }
    eprintln!("SKIP: this host lacks {what}");
    false
}

pub fn have_kvm() -> bool {
    host_has(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm")
}

fn read_num(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Free (unreserved) pages in the hugetlb pool of `page_kib` KiB pages.
pub fn hugetlb_free_pages(page_kib: u64) -> u64 {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{page_kib}kB");
    read_num(&format!("{dir}/free_hugepages"))
        .saturating_sub(read_num(&format!("{dir}/resv_hugepages")))
}

pub fn have_hugetlb(page_kib: u64, pages: u64) -> bool {
    host_has(
        hugetlb_free_pages(page_kib) >= pages,
        &format!("{pages} free {page_kib} KiB hugetlb pages (.ci/run reserves them)"),
    )
}

/// Result of one `hugevisor` invocation.
pub struct Run {
    pub output: Output,
    pub json: Option<serde_json::Value>,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn json(&self) -> &serde_json::Value {
        self.json.as_ref().unwrap_or_else(|| {
            panic!(
                "no JSON on stdout; exit {}; stderr:\n{}",
                self.code(),
                self.stderr()
            )
        })
    }
    pub fn u64(&self, key: &str) -> u64 {
        self.json()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing in {}", self.json()))
    }
}

/// Runs `hugevisor` with `args`, parsing stdout as JSON when it is JSON.
pub fn run(args: &[&str]) -> Run {
    let output = hugevisor().args(args).output().expect("spawning hugevisor");
    let json = serde_json::from_slice(&output.stdout).ok();
    Run { output, json }
}
