//! `hugevisor-bench restore`: for a 2-vCPU `verify` guest of `--memory` per backing, a
//! snapshot taken mid-run (one with a hot set, one without), then restores measured from
//! the bench's fork of `hugevisor run --restore` to
//! - the guest's first instruction (vCPU 0's first KVM_RUN, from the report), and
//! - the end of the guest's first full pass after the restore (every vCPU has finished
//!   the pass it was in at the snapshot and one more; polled through `vm.info`),
//! - every page in (lazy: the filler's end; copy: before the start),
//!
//! for `copy`, `lazy` and `lazy` with the hot set. Each restore runs the same snapshot.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::error::BenchError;
use super::{write_file, Completion, Hugevisor};
use crate::api;
use guest_image::clock::monotonic_ns;

#[derive(clap::Args, Debug)]
pub struct RestoreBenchArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Backings to measure.
    #[arg(
        long,
        default_value = "shmem,hugetlb-2m,hugetlb-1g",
        value_delimiter = ','
    )]
    backings: Vec<String>,
    /// Where the snapshots go (a directory per backing; removed afterwards).
    #[arg(long, default_value = "/tmp/hugevisor-bench-restore")]
    dir: PathBuf,
    /// QEMU `-microvm` saving the same image to a file and restoring it with `-incoming`
    /// beside each backing: on or off.
    #[arg(long, default_value = "on")]
    qemu: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON result to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One restore measured.
#[derive(Clone, Debug, Default, Serialize)]
struct Row {
    backing: String,
    mode: String,
    /// Fork to vCPU 0's first KVM_RUN.
    to_first_insn_ms: f64,
    /// Fork to the end of the first full pass after the restore (not measured for QEMU:
    /// its guest's counters are not readable from outside).
    to_first_full_pass_ms: Option<f64>,
    /// Fork to every page in (`vm.info` says the restore is complete).
    to_all_in_ms: f64,
    /// Bytes read back: the memory file's data pages, or QEMU's saved stream.
    file_bytes: u64,
    pages_demand: u64,
    pages_background: u64,
    hot_pages: u64,
    pmd_mapped_pct: f64,
    integrity_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

const VCPUS: &str = "2";
/// How long a step may take before the bench gives up on its row.
const BOUND: Duration = Duration::from_secs(300);

fn spawn(hv: &Hugevisor, args: &[&str]) -> Result<Child, BenchError> {
    hv.command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: format!("hugevisor {}", args.join(" ")),
            source,
        })
}

fn failed(what: &str, message: String) -> BenchError {
    BenchError::ChildFailed {
        what: what.to_string(),
        message,
    }
}

/// Polls `vm.info` until `done` holds for it (or the VM exits, or [`BOUND`] passes).
fn poll(
    child: &mut Child,
    sock: &Path,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<Value, BenchError> {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(what, format!("the VMM exited first ({status})")));
        }
        if let Ok(info) = api::info(sock) {
            if done(&info) {
                return Ok(info);
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(failed(what, format!("not within {BOUND:?}")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn finish(child: Child, what: &str) -> Result<Value, BenchError> {
    let out = child
        .wait_with_output()
        .map_err(|source| BenchError::Spawn {
            what: what.to_string(),
            source,
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(failed(
            what,
            err.lines().last().unwrap_or("failed").to_string(),
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|source| BenchError::ChildJson {
        what: what.to_string(),
        source,
    })
}

fn passes(info: &Value) -> Vec<u64> {
    info["per_vcpu_passes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Takes two snapshots of one running guest: `hot` (with a hot set), then `cold` (none;
/// the guest stops).
fn take_snapshots(
    hv: &Hugevisor,
    a: &RestoreBenchArgs,
    backing: &str,
    dir: &Path,
) -> Result<(), BenchError> {
    let sock = dir.join("src.sock");
    let s = sock.to_str().unwrap_or_default();
    let mut child = spawn(
        hv,
        &[
            "run",
            "--json",
            "--console",
            "off",
            "--memory",
            &a.memory,
            "--backing",
            backing,
            "--vcpus",
            VCPUS,
            "--workload",
            "verify",
            "--duration",
            "600s",
            "--api-socket",
            s,
        ],
    )?;
    poll(&mut child, &sock, "the guest's first passes", |i| {
        passes(i).iter().all(|&p| p >= 2)
    })?;
    for (name, hot_ms, then) in [("hot", "200", "resume"), ("cold", "0", "stop")] {
        let to = dir.join(name);
        let out = hv
            .command()
            .args([
                "snapshot",
                "--json",
                "--api-socket",
                s,
                "--hot-set-ms",
                hot_ms,
                "--then",
                then,
                "--to",
            ])
            .arg(&to)
            .output()
            .map_err(|source| BenchError::Spawn {
                what: "hugevisor snapshot".into(),
                source,
            })?;
        if !out.status.success() {
            let _ = child.kill();
            return Err(failed(
                "hugevisor snapshot",
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
    }
    finish(child, "the snapshotted run").map(drop)
}

/// One restore of `snap` with `mode`, measured.
fn restore(
    hv: &Hugevisor,
    a: &RestoreBenchArgs,
    backing: &str,
    dir: &Path,
    snap: &str,
    mode: &str,
) -> Result<Row, BenchError> {
    let sock = dir.join("dst.sock");
    let s = sock.to_str().unwrap_or_default();
    let from = dir.join(snap);
    let from = from.to_str().unwrap_or_default();
    let fork_ns = monotonic_ns();
    let mut child = spawn(
        hv,
        &[
            "run",
            "--json",
            "--console",
            "off",
            "--memory",
            &a.memory,
            "--backing",
            backing,
            "--vcpus",
            VCPUS,
            "--duration",
            "600s",
            "--restore",
            from,
            "--restore-mode",
            mode,
            "--api-socket",
            s,
        ],
    )?;
    let since = |t: u64| t.saturating_sub(fork_ns) as f64 / 1e6;
    // The counters at the snapshot are the first a restored guest shows (a lazy restore's
    // mailbox reads as zeros until its page is in).
    let first = poll(&mut child, &sock, "the restored guest", |i| {
        i["run_state"] == "running" && i["passes"].as_u64().unwrap_or(0) > 0
    })?;
    let base = passes(&first);
    poll(&mut child, &sock, "a full pass after the restore", |i| {
        passes(i).iter().zip(&base).all(|(now, at)| *now >= at + 2)
    })?;
    let full_pass = since(monotonic_ns());
    poll(&mut child, &sock, "every page in", |i| {
        i["incoming"]["phase"] == "complete"
    })?;
    let all_in = since(monotonic_ns());
    api::shutdown(&sock)?;
    let j = finish(child, "the restored run")?;
    let inc = &j["incoming"];
    let memory = j["memory_bytes"].as_u64().unwrap_or(1).max(1);
    Ok(Row {
        backing: backing.to_string(),
        mode: if snap == "hot" {
            "lazy+hot set".into()
        } else {
            mode.to_string()
        },
        // The report counts from the VMM's own start; the fork is a fraction of a ms before.
        to_first_insn_ms: j["startup"]["to_vcpu_start_ms"].as_f64().unwrap_or(0.0)
            + since(
                j["startup"]["process_start_monotonic_ns"]
                    .as_u64()
                    .unwrap_or(fork_ns),
            ),
        to_first_full_pass_ms: Some(full_pass),
        to_all_in_ms: all_in,
        file_bytes: inc["bytes"].as_u64().unwrap_or(0),
        pages_demand: inc["pages_demand"].as_u64().unwrap_or(0),
        pages_background: inc["pages_pushed"].as_u64().unwrap_or(0),
        hot_pages: 0,
        pmd_mapped_pct: j["pmd_mapped_bytes"].as_u64().unwrap_or(0) as f64 * 100.0 / memory as f64,
        integrity_errors: j["integrity_errors"].as_u64().unwrap_or(0),
        error: None,
    })
}

/// QEMU saving the same image to a file and restoring it (`-incoming exec:cat FILE`):
/// its guest runs once all of RAM is loaded, so its first instruction is every page in.
fn qemu_row(hv: &Hugevisor, a: &RestoreBenchArgs, backing: &str, dir: &Path) -> Row {
    let mut row = Row {
        backing: backing.to_string(),
        mode: "qemu -incoming".into(),
        ..Row::default()
    };
    let image = dir.join("image.elf");
    let measured = super::migration::write_guest_image(hv, &image).and_then(|()| {
        let case = super::qemu::QemuCase {
            memory: &a.memory,
            vcpus: 2,
            backing,
            workload: "verify",
            mode: super::qemu::QemuMode::Precopy,
            warmup: Duration::from_secs(1),
            after: Duration::ZERO,
            image: &image,
            dir,
        };
        super::qemu::save_and_restore(&case).map_err(BenchError::from)
    });
    match measured {
        Ok(r) => {
            row.to_first_insn_ms = r.to_running_ms;
            row.to_all_in_ms = r.to_running_ms;
            row.file_bytes = r.file_bytes;
        }
        Err(e) => row.error = Some(e.row_message()),
    }
    row
}

fn hot_pages(dir: &Path) -> u64 {
    migration::snapshot::format::read_state(&dir.join("hot").join("state"))
        .map(|s| s.hot_pages())
        .unwrap_or(0)
}

pub fn bench_restore(hv: &Hugevisor, a: &RestoreBenchArgs) -> Result<Completion, BenchError> {
    let mut rows = Vec::new();
    for backing in &a.backings {
        let dir = a.dir.join(backing);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| BenchError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let cases = [("copy", "cold"), ("lazy", "cold"), ("lazy", "hot")];
        match take_snapshots(hv, a, backing, &dir) {
            Err(e) => rows.extend(cases.iter().map(|(mode, _)| Row {
                backing: backing.clone(),
                mode: mode.to_string(),
                error: Some(e.row_message()),
                ..Row::default()
            })),
            Ok(()) => {
                let hot = hot_pages(&dir);
                for (mode, snap) in cases {
                    let row = restore(hv, a, backing, &dir, snap, mode).unwrap_or_else(|e| Row {
                        backing: backing.clone(),
                        mode: mode.to_string(),
                        error: Some(e.row_message()),
                        ..Row::default()
                    });
                    rows.push(Row {
                        hot_pages: if snap == "hot" { hot } else { 0 },
                        ..row
                    });
                }
            }
        }
        if a.qemu == "on" {
            rows.push(qemu_row(hv, a, backing, &dir));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let json = serde_json::json!({ "memory": a.memory, "vcpus": 2, "rows": rows });
    if let Some(out) = &a.out {
        write_file(out, serde_json::to_string_pretty(&json).unwrap_or_default())?;
    }
    if a.json {
        println!("{json}");
    } else {
        println!(
            "restore of a {} 2-vCPU verify guest (ms from the fork of `hugevisor run --restore`)",
            a.memory
        );
        println!(
            "{:<11} {:<15} {:>11} {:>11} {:>9} {:>7} {:>8} {:>8} {:>7} {:>6}",
            "backing",
            "mode",
            "first insn",
            "full pass",
            "all in",
            "MiB",
            "demand",
            "bg",
            "hot",
            "pmd%"
        );
        for r in &rows {
            match &r.error {
                Some(e) => println!("{:<11} {:<15} error: {e}", r.backing, r.mode),
                None => println!(
                    "{:<11} {:<15} {:>11.1} {:>11} {:>9.1} {:>7} {:>8} {:>8} {:>7} {:>6.1}",
                    r.backing,
                    r.mode,
                    r.to_first_insn_ms,
                    r.to_first_full_pass_ms
                        .map_or_else(|| "-".to_string(), |v| format!("{v:.1}")),
                    r.to_all_in_ms,
                    r.file_bytes >> 20,
                    r.pages_demand,
                    r.pages_background,
                    r.hot_pages,
                    r.pmd_mapped_pct
                ),
            }
        }
    }
    Ok(
        if rows
            .iter()
            .any(|r| r.error.is_some() || r.integrity_errors > 0)
        {
            Completion::SomeFailed
        } else {
            Completion::AllMeasured
        },
    )
}
