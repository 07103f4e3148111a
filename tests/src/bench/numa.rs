//! `hugevisor-bench numa`: `numa02` on two emulated nodes with balancing on and off, beside
//! a raw userfaultfd MINOR round trip (the floor under every hint fault). Writes
//! `numa.json` and `numa-locality.png`.
//!
//! Each run is watched through its control API every 100 ms (the guest's passes), so that
//! throughput is measured over the whole run and over its **steady state**, the second
//! half of the run, where the balancer's cost is what it costs once the work is done.
//! The balancing-off baseline runs with `--collapse background`: with balancing on, the
//! regions its hint faults resolve are made huge again (a 4 KiB-mapped region costs KVM
//! 512 refaults after every hint here), so the fair baseline is a guest as huge-mapped
//! without any balancing. The same pair with `--collapse off` shows balancing over 4 KiB
//! mappings.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::baselines::raw_minor_round_trip_us;
use super::error::BenchError;
use super::plot::{percent_chart, Series};
use super::{write_file, Completion, Hugevisor};
use crate::api;

#[derive(clap::Args, Debug)]
pub struct NumaBenchArgs {
    /// Guest RAM per run.
    #[arg(long, default_value = "512M")]
    memory: String,
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Run time of each workload run.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Scanner settings for the balancing runs (`--numa-scan`); hugevisor's defaults
    /// (Linux's: 256 MB windows, a full scan every 1 s to 60 s) when not given.
    #[arg(long)]
    scan: Option<String>,
    /// Where to write numa-locality.png and numa.json.
    #[arg(long, default_value = "bench-out")]
    out_dir: PathBuf,
}

/// One run: its report and the guest's passes per vCPU as the control API saw them.
struct Watched {
    json: Value,
    /// (ms since the spawn, passes of each vCPU).
    passes: Vec<(f64, Vec<u64>)>,
}

/// Runs `numa02` with `extra`, polling `vm.info` every 100 ms until it exits.
fn numa_child(
    hv: &Hugevisor,
    args: &NumaBenchArgs,
    extra: &[&str],
    dir: &Path,
) -> Result<Watched, BenchError> {
    let sock = dir.join("api.sock");
    let out_path = dir.join("report.json");
    let _ = std::fs::remove_file(&sock);
    let what = format!("hugevisor run --workload numa02 {}", extra.join(" "));
    let out = std::fs::File::create(&out_path).map_err(|source| BenchError::Write {
        path: out_path.clone(),
        source,
    })?;
    let vcpus = args.vcpus.to_string();
    let mut child = hv
        .command()
        .args([
            "run",
            "--json",
            "--console",
            "off",
            "--memory",
            &args.memory,
        ])
        .args(["--vcpus", &vcpus, "--workload", "numa02"])
        .args(["--duration", &args.duration, "--numa", "nodes=2"])
        .args(extra)
        .arg("--api-socket")
        .arg(&sock)
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: what.clone(),
            source,
        })?;
    let t0 = Instant::now();
    let mut passes = Vec::new();
    while matches!(child.try_wait(), Ok(None)) {
        if let Ok(info) = api::info(&sock) {
            if let Some(p) = info["per_vcpu_passes"].as_array() {
                let p = p.iter().map(|v| v.as_u64().unwrap_or(0)).collect();
                passes.push((t0.elapsed().as_secs_f64() * 1000.0, p));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child
        .wait_with_output()
        .map_err(|source| BenchError::Spawn {
            what: what.clone(),
            source,
        })?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        return Err(BenchError::ChildFailed {
            message: err.lines().last().unwrap_or("failed").trim().to_string(),
            what,
        });
    }
    let text = std::fs::read(&out_path).map_err(|source| BenchError::Write {
        path: out_path.clone(),
        source,
    })?;
    let json =
        serde_json::from_slice(&text).map_err(|source| BenchError::ChildJson { what, source })?;
    Ok(Watched { json, passes })
}

/// (ms, locality %) points of a run's NUMA report.
fn locality_series(run: &Value) -> Vec<(f64, f64)> {
    pairs(&run["numa"]["locality_over_time"])
}

fn pairs(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

const MIB: f64 = (1 << 20) as f64;

fn mib_whole(j: &Value) -> f64 {
    j["bytes_per_sec"].as_f64().unwrap_or(0.0) / MIB
}

fn mib_last_pass(j: &Value) -> f64 {
    j["steady_bytes_per_sec"].as_f64().unwrap_or(0.0) / MIB
}

impl Watched {
    /// Bytes one pass of vCPU `v` moves (numa02's passes are all alike).
    fn bytes_per_pass(&self, v: usize) -> f64 {
        let r = &self.json["per_vcpu"][v];
        let passes = r["passes"].as_u64().unwrap_or(0).max(1);
        r["bytes"].as_f64().unwrap_or(0.0) / passes as f64
    }

    /// The steady state: the second half of the watched run, as (from, to) ms.
    fn steady_window(&self) -> Option<(f64, f64)> {
        let end = self.passes.last()?.0;
        Some((end / 2.0, end))
    }

    /// Throughput over the steady state (MiB/s), from the passes polled.
    fn mib_steady(&self) -> f64 {
        let Some((from, _)) = self.steady_window() else {
            return 0.0;
        };
        let (Some(a), Some(b)) = (self.passes.iter().find(|p| p.0 >= from), self.passes.last())
        else {
            return 0.0;
        };
        let secs = (b.0 - a.0) / 1000.0;
        if secs <= 0.0 {
            return 0.0;
        }
        let bytes: f64 = (0..a.1.len().min(b.1.len()))
            .map(|v| b.1[v].saturating_sub(a.1[v]) as f64 * self.bytes_per_pass(v))
            .sum();
        bytes / secs / MIB
    }

    /// Hint faults per second over the steady state (the engine's own samples).
    fn steady_hint_faults_per_sec(&self) -> f64 {
        let series = pairs(&self.json["numa"]["hint_faults_over_time"]);
        let (Some(last), Some(_)) = (series.last(), self.steady_window()) else {
            return 0.0;
        };
        let from = last.0 / 2.0;
        let Some(first) = series.iter().find(|p| p.0 >= from) else {
            return 0.0;
        };
        let secs = (last.0 - first.0) / 1000.0;
        if secs <= 0.0 {
            return 0.0;
        }
        (last.1 - first.1) / secs
    }
}

/// The figures of one on/off pair.
struct Pair {
    on: Watched,
    off: Watched,
}

impl Pair {
    fn figures(&self) -> Value {
        let (on, off) = (&self.on, &self.off);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        serde_json::json!({
            "throughput_whole_on_mib_s": mib_whole(&on.json),
            "throughput_whole_off_mib_s": mib_whole(&off.json),
            "whole_ratio": ratio(mib_whole(&on.json), mib_whole(&off.json)),
            "throughput_steady_on_mib_s": on.mib_steady(),
            "throughput_steady_off_mib_s": off.mib_steady(),
            "steady_ratio": ratio(on.mib_steady(), off.mib_steady()),
            "throughput_last_pass_on_mib_s": mib_last_pass(&on.json),
            "throughput_last_pass_off_mib_s": mib_last_pass(&off.json),
            "time_to_95_ms": on.json["numa"]["time_to_95_ms"],
            "scans_to_95": on.json["numa"]["scans_to_95"],
            "steady_hint_faults_per_s": on.steady_hint_faults_per_sec(),
            "locality_final_on_pct": on.json["locality_pct"],
            "locality_final_off_pct": off.json["locality_pct"],
            "regions_moved": on.json["numa"]["regions_moved"],
            "hint_faults": on.json["numa_hint_faults"],
            "scan_period_end_ms": on.json["numa"]["scan_period_ms"],
            "full_scans": on.json["numa"]["full_scans"],
            "pmd_mapped_on_mib": on.json["pmd_mapped_bytes"].as_f64().unwrap_or(0.0) / MIB,
            "pmd_mapped_off_mib": off.json["pmd_mapped_bytes"].as_f64().unwrap_or(0.0) / MIB,
            "hint_fault_us_p50": on.json["fault_us_p50"],
            "hint_fault_us_p99": on.json["fault_us_p99"],
            "scan_log": on.json["numa"]["scan_log"],
        })
    }
}

fn run_pair(
    hv: &Hugevisor,
    args: &NumaBenchArgs,
    collapse_on: &str,
    collapse_off: &str,
    dir: &Path,
) -> Result<Pair, BenchError> {
    let mut on_args = vec!["--numa-balancing", "on", "--collapse", collapse_on];
    if let Some(s) = &args.scan {
        on_args.extend(["--numa-scan", s]);
    }
    eprintln!("bench: numa02, balancing on, --collapse {collapse_on} ...");
    let on = numa_child(hv, args, &on_args, dir)?;
    eprintln!("bench: numa02, balancing off, --collapse {collapse_off} ...");
    let off_args = ["--numa-balancing", "off", "--collapse", collapse_off];
    let off = numa_child(hv, args, &off_args, dir)?;
    Ok(Pair { on, off })
}

pub fn bench_numa(hv: &Hugevisor, args: &NumaBenchArgs) -> Result<Completion, BenchError> {
    std::fs::create_dir_all(&args.out_dir).map_err(|source| BenchError::CreateDir {
        path: args.out_dir.clone(),
        source,
    })?;
    let dir = std::env::temp_dir().join(format!("hv-bench-numa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    eprintln!("bench: raw userfaultfd MINOR round trip ...");
    let raw = raw_minor_round_trip_us(2000)?;
    let huge = run_pair(hv, args, "on-fill", "background", &dir)?;
    let pages = run_pair(hv, args, "off", "off", &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    let png_path = args.out_dir.join("numa-locality.png");
    write_file(&png_path, plot(&huge)?)?;
    let result = serde_json::json!({
        "memory": args.memory, "vcpus": args.vcpus, "duration": args.duration,
        "scan": args.scan.as_deref().unwrap_or("default"),
        "backend": huge.on.json["numa"]["backend"],
        "raw_minor_round_trip_us": raw,
        "huge": huge.figures(),
        "pages": pages.figures(),
        "locality_over_time": locality_series(&huge.on.json),
    });
    write_file(&args.out_dir.join("numa.json"), result.to_string())?;
    print_tables(args, raw, &huge, &pages);
    println!();
    println!(
        "plot: {} (blue: locality, balancing on; grey: off; green: balancing-on throughput \
         over each second as % of balancing off's steady state; red dashes: 95%)",
        png_path.display()
    );
    Ok(Completion::AllMeasured)
}

/// Locality on and off over time, and the balancing run's throughput over each second
/// (ten polls: a pass of a large guest can take longer than one) as a share of the
/// balancing-off run's steady state.
fn plot(pair: &Pair) -> Result<Vec<u8>, BenchError> {
    let on = locality_series(&pair.on.json);
    let off = locality_series(&pair.off.json);
    let base = pair.off.mib_steady().max(1.0);
    let tput: Vec<(f64, f64)> = pair
        .on
        .passes
        .windows(11)
        .map(|w| {
            let (a, b) = (&w[0], &w[10]);
            let secs = ((b.0 - a.0) / 1000.0).max(1e-3);
            let bytes: f64 = (0..a.1.len().min(b.1.len()))
                .map(|v| b.1[v].saturating_sub(a.1[v]) as f64 * pair.on.bytes_per_pass(v))
                .sum();
            (b.0, (bytes / secs / MIB * 100.0 / base).min(100.0))
        })
        .collect();
    let x_max = on.last().map(|p| p.0).unwrap_or(1.0);
    percent_chart(
        &[
            Series {
                points: &off,
                rgb: [150, 150, 150],
            },
            Series {
                points: &tput,
                rgb: [40, 160, 60],
            },
            Series {
                points: &on,
                rgb: [30, 90, 200],
            },
        ],
        x_max,
        95.0,
    )
    .map_err(BenchError::Plot)
}

fn print_tables(args: &NumaBenchArgs, raw: f64, huge: &Pair, pages: &Pair) {
    let on = &huge.on.json;
    let n = &on["numa"];
    println!(
        "numa02 on 2 {} nodes, {} vCPUs, {} guest RAM, {} per run, scan {}",
        n["backend"].as_str().unwrap_or("?"),
        args.vcpus,
        args.memory,
        args.duration,
        args.scan
            .as_deref()
            .unwrap_or("default (256M windows, 1 s .. 60 s per full scan)")
    );
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| raw userfaultfd MINOR round trip (median) | {raw:.1} µs |");
    println!(
        "| hint fault handled by the VMM p50 / p99 | {} / {} µs |",
        on["fault_us_p50"], on["fault_us_p99"]
    );
    match (n["time_to_95_ms"].as_f64(), n["scans_to_95"].as_f64()) {
        (Some(t), Some(s)) => println!(
            "| time to 95% locality | {t:.0} ms = {s:.1} full scans ({} windows each) |",
            n["scan_windows"]
        ),
        _ => println!("| time to 95% locality | not reached |"),
    }
    println!(
        "| final locality, balancing on / off | {:.1}% / {:.1}% |",
        on["locality_pct"].as_f64().unwrap_or(0.0),
        huge.off.json["locality_pct"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| regions moved / hint faults / full scans | {} / {} / {} |",
        n["regions_moved"], n["numa_hint_faults"], n["full_scans"]
    );
    println!("| scan period at the end | {} ms |", n["scan_period_ms"]);
    println!(
        "| hint faults per second, steady state | {:.1} |",
        huge.on.steady_hint_faults_per_sec()
    );
    for (label, pair) in [
        ("huge (on-fill) vs off + background collapse", huge),
        ("4 KiB (--collapse off), on vs off", pages),
    ] {
        print_pair(label, pair);
    }
}

fn print_pair(label: &str, pair: &Pair) {
    let (on, off) = (&pair.on, &pair.off);
    let row = |what: &str, a: f64, b: f64| {
        let r = if b > 0.0 { a / b } else { 0.0 };
        println!("| {label}: {what}, on / off | {a:.0} / {b:.0} MiB/s = {r:.2}× |");
    };
    row(
        "throughput, whole run",
        mib_whole(&on.json),
        mib_whole(&off.json),
    );
    row(
        "throughput, steady state (2nd half)",
        on.mib_steady(),
        off.mib_steady(),
    );
    row(
        "throughput, last pass",
        mib_last_pass(&on.json),
        mib_last_pass(&off.json),
    );
    println!(
        "| {label}: PMD-mapped at the end, on / off | {:.0} / {:.0} MiB |",
        on.json["pmd_mapped_bytes"].as_f64().unwrap_or(0.0) / MIB,
        off.json["pmd_mapped_bytes"].as_f64().unwrap_or(0.0) / MIB
    );
}
