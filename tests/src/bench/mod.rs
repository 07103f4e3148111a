//! `hugevisor-bench`: benchmarks that run the real `hugevisor` binary, with their baselines
//! measured in the same run (see docs/benchmarks.md). It lives beside the end-to-end tests,
//! not in the VMM: it drives the binary from outside, exactly as a user would, so the
//! binary it measures can be any build (`--hugevisor PATH`) and two builds can be compared
//! in one sitting.
//!
//! - `memory`: start-up, random-access throughput per backing, the VMM's own memory
//!   ([`memory`]);
//! - `numa`: balancing on emulated nodes ([`numa`]);
//! - `migration`: every mode on shmem and hugetlb-2m, beside loopback, userfaultfd and
//!   QEMU baselines ([`migration`], [`qemu`]);
//! - `restore`: snapshot restores (copy, lazy, lazy with the hot set) per backing ([`restore`]).

mod baselines;
mod error;
mod memory;
mod migration;
mod numa;
mod plot;
mod qemu;
mod restore;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Parser, Subcommand};

pub use error::BenchError;
pub use qemu::QemuError;

use guest_image::clock::monotonic_ns;

#[derive(Parser, Debug)]
#[command(
    name = "hugevisor-bench",
    about = "Benchmarks of the hugevisor binary, with same-run baselines (docs/benchmarks.md)"
)]
struct Cli {
    /// The hugevisor binary to measure (default: `hugevisor` next to this program, in
    /// target/<profile>/).
    #[arg(long, global = true)]
    hugevisor: Option<PathBuf>,
    #[command(subcommand)]
    which: BenchKind,
}

#[derive(Subcommand, Debug)]
enum BenchKind {
    /// Start-up latency, random-access throughput per backing, VMM memory overhead.
    Memory(memory::MemoryBenchArgs),
    /// NUMA balancing on emulated nodes: locality over time, hint-fault cost, throughput.
    Numa(numa::NumaBenchArgs),
    /// Live migration per mode and backing, beside raw loopback and userfaultfd baselines.
    Migration(migration::MigrationBenchArgs),
    /// Snapshot restores per backing: copy, lazy, lazy with the hot set.
    Restore(restore::RestoreBenchArgs),
}

/// Whether every measurement of a bench produced its figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Completion {
    AllMeasured,
    /// Some rows carry an `error` instead of figures (the bench exits 1).
    SomeFailed,
}

/// The `hugevisor` binary under measurement.
#[derive(Clone, Debug)]
struct Hugevisor {
    path: PathBuf,
}

impl Hugevisor {
    /// `explicit`, or `hugevisor` in the directory of this program (target/<profile>/).
    fn locate(explicit: Option<&Path>) -> Result<Hugevisor, BenchError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let me = std::env::current_exe().map_err(BenchError::OwnPath)?;
                me.with_file_name("hugevisor")
            }
        };
        if !path.is_file() {
            return Err(BenchError::HugevisorMissing { path });
        }
        Ok(Hugevisor { path })
    }

    fn command(&self) -> Command {
        Command::new(&self.path)
    }
}

/// What one `hugevisor run --json` child reported, and when it ran.
struct ChildRun {
    json: serde_json::Value,
    /// From the spawn to the child's exit, as the bench saw it.
    exit_ms: f64,
    /// CLOCK_MONOTONIC just before the spawn.
    fork_ns: u64,
}

/// Runs `hugevisor run --json --console off --memory MEMORY EXTRA…` to its end.
fn run_child(hv: &Hugevisor, memory: &str, extra: &[&str]) -> Result<ChildRun, BenchError> {
    let what = format!("hugevisor run --memory {memory} {}", extra.join(" "));
    let fork_ns = monotonic_ns();
    let out = hv
        .command()
        .args(["run", "--json", "--console", "off", "--memory", memory])
        .args(extra)
        .output()
        .map_err(|source| BenchError::Spawn {
            what: what.clone(),
            source,
        })?;
    let exit_ms = (monotonic_ns() - fork_ns) as f64 / 1e6;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(BenchError::ChildFailed {
            message: err.lines().last().unwrap_or("failed").trim().to_string(),
            what,
        });
    }
    let json = serde_json::from_slice(&out.stdout)
        .map_err(|source| BenchError::ChildJson { what, source })?;
    Ok(ChildRun {
        json,
        exit_ms,
        fork_ns,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), BenchError> {
    std::fs::write(path, contents).map_err(|source| BenchError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs the bench the command line names; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = Hugevisor::locate(cli.hugevisor.as_deref()).and_then(|hv| match &cli.which {
        BenchKind::Memory(a) => memory::bench_memory(&hv, a),
        BenchKind::Numa(a) => numa::bench_numa(&hv, a),
        BenchKind::Migration(a) => migration::bench_migration(&hv, a),
        BenchKind::Restore(a) => restore::bench_restore(&hv, a),
    });
    match result {
        Ok(Completion::AllMeasured) => 0,
        Ok(Completion::SomeFailed) => 1,
        Err(e) => {
            eprintln!("hugevisor-bench: error: {e}");
            1
        }
    }
}
