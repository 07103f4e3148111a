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

use serde::Serialize;
use serde_json::Value;

use super::baselines::raw_minor_round_trip_us;
use super::error::BenchError;
use super::plot::{percent_chart, Series};
use super::{median, write_file, Completion, Hugevisor};
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
    /// On/off pairs per configuration (alternating; the tables give medians).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
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

/// One on/off pair of runs.
struct Pair {
    on: Watched,
    off: Watched,
}

/// The numbers of one pair (MiB/s, ms, counts).
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Figures {
    whole_on: f64,
    whole_off: f64,
    whole_ratio: f64,
    steady_on: f64,
    steady_off: f64,
    steady_ratio: f64,
    last_pass_on: f64,
    last_pass_off: f64,
    time_to_95_ms: Option<f64>,
    scans_to_95: Option<f64>,
    steady_hint_faults_per_s: f64,
    regions_moved: f64,
    hint_faults: f64,
    full_scans: f64,
    scan_period_end_ms: f64,
    locality_on_pct: f64,
    locality_off_pct: f64,
    pmd_mapped_on_mib: f64,
    pmd_mapped_off_mib: f64,
    hint_fault_us_p50: f64,
    hint_fault_us_p99: f64,
}

impl Pair {
    fn figures(&self) -> Figures {
        let (on, off) = (&self.on, &self.off);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let num = |j: &Value, k: &str| j[k].as_f64().unwrap_or(0.0);
        let n = &on.json["numa"];
        Figures {
            whole_on: mib_whole(&on.json),
            whole_off: mib_whole(&off.json),
            whole_ratio: ratio(mib_whole(&on.json), mib_whole(&off.json)),
            steady_on: on.mib_steady(),
            steady_off: off.mib_steady(),
            steady_ratio: ratio(on.mib_steady(), off.mib_steady()),
            last_pass_on: mib_last_pass(&on.json),
            last_pass_off: mib_last_pass(&off.json),
            time_to_95_ms: n["time_to_95_ms"].as_f64(),
            scans_to_95: n["scans_to_95"].as_f64(),
            steady_hint_faults_per_s: on.steady_hint_faults_per_sec(),
            regions_moved: num(n, "regions_moved"),
            hint_faults: num(n, "numa_hint_faults"),
            full_scans: num(n, "full_scans"),
            scan_period_end_ms: num(n, "scan_period_ms"),
            locality_on_pct: num(&on.json, "locality_pct"),
            locality_off_pct: num(&off.json, "locality_pct"),
            pmd_mapped_on_mib: num(&on.json, "pmd_mapped_bytes") / MIB,
            pmd_mapped_off_mib: num(&off.json, "pmd_mapped_bytes") / MIB,
            hint_fault_us_p50: num(&on.json, "fault_us_p50"),
            hint_fault_us_p99: num(&on.json, "fault_us_p99"),
        }
    }
}

/// Median, smallest and largest of one figure over the repeats.
fn spread(all: &[Figures], f: impl Fn(&Figures) -> f64) -> (f64, f64, f64) {
    let v: Vec<f64> = all.iter().map(f).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(v), lo, hi)
}

/// `--repeat` pairs of one configuration, alternating on and off so that a host whose
/// load changes weighs on both alike; the first pair is kept for the plot.
fn run_pairs(
    hv: &Hugevisor,
    args: &NumaBenchArgs,
    (collapse_on, collapse_off): (&str, &str),
    dir: &Path,
) -> Result<(Pair, Vec<Figures>), BenchError> {
    let mut on_args = vec!["--numa-balancing", "on", "--collapse", collapse_on];
    if let Some(s) = &args.scan {
        on_args.extend(["--numa-scan", s]);
    }
    let off_args = ["--numa-balancing", "off", "--collapse", collapse_off];
    let mut first = None;
    let mut all = Vec::new();
    for i in 1..=args.repeat.max(1) {
        eprintln!(
            "bench: numa02 {i}/{}, balancing on, --collapse {collapse_on} ...",
            args.repeat
        );
        let on = numa_child(hv, args, &on_args, dir)?;
        eprintln!(
            "bench: numa02 {i}/{}, balancing off, --collapse {collapse_off} ...",
            args.repeat
        );
        let off = numa_child(hv, args, &off_args, dir)?;
        let pair = Pair { on, off };
        all.push(pair.figures());
        first.get_or_insert(pair);
    }
    let first = first.ok_or(BenchError::ThreadPanicked("numa pair"))?;
    Ok((first, all))
}

/// The load average when a bench starts and ends (the host is shared).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
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
    let load_before = loadavg();
    eprintln!("bench: raw userfaultfd MINOR round trip ...");
    let raw = raw_minor_round_trip_us(2000)?;
    let (huge, huge_all) = run_pairs(hv, args, ("on-fill", "background"), &dir)?;
    let (_, pages_all) = run_pairs(hv, args, ("off", "off"), &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    let png_path = args.out_dir.join("numa-locality.png");
    write_file(&png_path, plot(&huge)?)?;
    let load = format!("{load_before} .. {}", loadavg());
    let result = serde_json::json!({
        "memory": args.memory, "vcpus": args.vcpus, "duration": args.duration,
        "scan": args.scan.as_deref().unwrap_or("default"), "repeat": args.repeat,
        "load_average": load,
        "backend": huge.on.json["numa"]["backend"],
        "raw_minor_round_trip_us": raw,
        "huge": huge_all, "pages": pages_all,
        "scan_log": huge.on.json["numa"]["scan_log"],
        "locality_over_time": locality_series(&huge.on.json),
    });
    write_file(&args.out_dir.join("numa.json"), result.to_string())?;
    print_tables(args, raw, &load, &huge_all, &pages_all);
    println!();
    println!(
        "plot: {} (first pair; blue: locality, balancing on; grey: off; green: balancing-on \
         throughput over each second as % of balancing off's steady state; red dashes: 95%)",
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

fn print_tables(args: &NumaBenchArgs, raw: f64, load: &str, huge: &[Figures], pages: &[Figures]) {
    println!(
        "numa02 on 2 emulated nodes, {} vCPUs, {} guest RAM, {} per run, scan {}, {} pair(s) \
         per configuration (median [min, max]), load average {load}",
        args.vcpus,
        args.memory,
        args.duration,
        args.scan
            .as_deref()
            .unwrap_or("default (256M windows, 1 s .. 60 s per full scan)"),
        args.repeat,
    );
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| raw userfaultfd MINOR round trip (median) | {raw:.1} µs |");
    let row = |what: &str, all: &[Figures], f: &dyn Fn(&Figures) -> f64, unit: &str| {
        let (m, lo, hi) = spread(all, f);
        println!("| {what} | {m:.2}{unit} [{lo:.2}, {hi:.2}] |");
    };
    for (label, all) in [
        ("on-fill, off with --collapse background", huge),
        ("--collapse off (4 KiB mappings), on / off", pages),
    ] {
        let reached = all.iter().filter(|f| f.scans_to_95.is_some()).count();
        if reached == all.len() {
            row(
                &format!("{label}: time to 95% locality, full scans"),
                all,
                &|f| f.scans_to_95.unwrap_or(0.0),
                "",
            );
            row(
                &format!("{label}: time to 95% locality, s"),
                all,
                &|f| f.time_to_95_ms.unwrap_or(0.0) / 1000.0,
                " s",
            );
        } else {
            println!(
                "| {label}: time to 95% locality | reached in {reached} of {} runs |",
                all.len()
            );
        }
        row(
            &format!("{label}: throughput whole run, on ÷ off"),
            all,
            &|f| f.whole_ratio,
            "×",
        );
        row(
            &format!("{label}: throughput steady state (2nd half), on ÷ off"),
            all,
            &|f| f.steady_ratio,
            "×",
        );
        row(
            &format!("{label}: throughput whole run, on (MiB/s)"),
            all,
            &|f| f.whole_on,
            "",
        );
        row(
            &format!("{label}: throughput whole run, off (MiB/s)"),
            all,
            &|f| f.whole_off,
            "",
        );
        row(
            &format!("{label}: throughput steady, on (MiB/s)"),
            all,
            &|f| f.steady_on,
            "",
        );
        row(
            &format!("{label}: throughput steady, off (MiB/s)"),
            all,
            &|f| f.steady_off,
            "",
        );
        row(
            &format!("{label}: hint faults per second, steady state"),
            all,
            &|f| f.steady_hint_faults_per_s,
            "",
        );
        row(
            &format!("{label}: regions moved"),
            all,
            &|f| f.regions_moved,
            "",
        );
        row(
            &format!("{label}: hint faults"),
            all,
            &|f| f.hint_faults,
            "",
        );
        row(&format!("{label}: full scans"), all, &|f| f.full_scans, "");
        row(
            &format!("{label}: scan period at the end (ms)"),
            all,
            &|f| f.scan_period_end_ms,
            "",
        );
        row(
            &format!("{label}: hint fault p50 (µs)"),
            all,
            &|f| f.hint_fault_us_p50,
            "",
        );
        row(
            &format!("{label}: PMD-mapped at the end, on (MiB)"),
            all,
            &|f| f.pmd_mapped_on_mib,
            "",
        );
        row(
            &format!("{label}: PMD-mapped at the end, off (MiB)"),
            all,
            &|f| f.pmd_mapped_off_mib,
            "",
        );
        row(
            &format!("{label}: final locality on (%)"),
            all,
            &|f| f.locality_on_pct,
            "",
        );
    }
}
