//! `hugevisor bench`: benchmarks that run the real binary, with their baselines measured
//! in the same run (see docs/benchmarks.md).
//!
//! `bench memory` measures, for a guest of `--memory` per backing:
//! - start-up: from the bench's fork of `hugevisor run` to the guest's first instruction
//!   (timestamped by the guest's TSC, which is the host's here) and to the end of a
//!   `touch` pass over all of guest RAM;
//! - `random` throughput on warm memory, as a ratio to the anon 4 KiB baseline;
//! - the VMM's own resident memory, guest RAM excluded.

use std::path::PathBuf;
use std::process::Command;

use serde::Serialize;

use crate::clock::monotonic_ns;

mod qemu;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: BenchKind,
}

#[derive(clap::Subcommand, Debug)]
enum BenchKind {
    /// Start-up latency, random-access throughput per backing, VMM memory overhead.
    Memory(MemoryBenchArgs),
    /// NUMA balancing on emulated nodes: locality over time, hint-fault cost, throughput.
    Numa(NumaBenchArgs),
    /// Live migration per mode and backing, beside raw loopback and userfaultfd baselines.
    Migration(MigrationBenchArgs),
}

#[derive(clap::Args, Debug)]
struct MigrationBenchArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    memory: String,
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Run time of each guest (the migration starts once every vCPU is past its first pass, plus 1 s).
    #[arg(long, default_value = "20s")]
    duration: String,
    /// Also write the JSON result here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure QEMU (`-M microvm`, same image, memory and backing) beside hugevisor.
    #[arg(long, value_enum, default_value_t = QemuBaseline::On)]
    qemu: QemuBaseline,
}

/// Whether `bench migration` measures the QEMU baseline.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum QemuBaseline {
    On,
    Off,
}

#[derive(clap::Args, Debug)]
struct NumaBenchArgs {
    /// Guest RAM per run.
    #[arg(long, default_value = "256M")]
    memory: String,
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Run time of each workload run.
    #[arg(long, default_value = "8s")]
    duration: String,
    /// Scanner settings for the balancing runs.
    #[arg(long, default_value = "window=256M,period=50ms")]
    scan: String,
    /// Where to write numa-locality.png and numa.json.
    #[arg(long, default_value = "bench-out")]
    out_dir: PathBuf,
}

#[derive(clap::Args, Debug)]
struct MemoryBenchArgs {
    /// Guest RAM per run.
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Runs per backing for start-up (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Passes of `random` (the last one is the warm measurement).
    #[arg(long, default_value_t = 4)]
    passes: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write the JSON result to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    args: &'static [&'static str],
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "anon (4K)",
        args: &["--backing", "anon", "--thp", "off"],
    },
    Variant {
        name: "anon (thp)",
        args: &["--backing", "anon", "--thp", "on"],
    },
    Variant {
        name: "shmem",
        args: &["--backing", "shmem"],
    },
    Variant {
        name: "hugetlb-2m",
        args: &["--backing", "hugetlb-2m"],
    },
    Variant {
        name: "hugetlb-1g",
        args: &["--backing", "hugetlb-1g"],
    },
];

#[derive(Serialize, Default, Clone)]
struct Row {
    variant: String,
    /// Fork of `hugevisor run` to the guest's first instruction (median).
    to_first_insn_ms: f64,
    /// Fork to the end of one touch pass over all guest RAM (median).
    to_touch_end_ms: f64,
    /// Fork to process exit (median).
    to_exit_ms: f64,
    vmm_overhead_rss_kib: u64,
    random_first_pass_ms: f64,
    random_warm_mib_s: f64,
    random_vs_anon_4k: f64,
    error: Option<String>,
}

fn run_child(memory: &str, extra: &[&str]) -> Result<(serde_json::Value, f64, u64), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the hugevisor binary: {e}"))?;
    let fork_ns = monotonic_ns();
    let out = Command::new(exe)
        .args(["run", "--json", "--console", "off", "--memory", memory])
        .args(extra)
        .output()
        .map_err(|e| format!("spawning hugevisor run: {e}"))?;
    let exit_ms = (monotonic_ns() - fork_ns) as f64 / 1e6;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("failed").trim().to_string());
    }
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("parsing run JSON: {e}"))?;
    Ok((j, exit_ms, fork_ns))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure(args: &MemoryBenchArgs, v: Variant) -> Row {
    let mut row = Row {
        variant: v.name.to_string(),
        ..Default::default()
    };
    let (mut first, mut end, mut exit) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        let mut a = v.args.to_vec();
        a.extend(["--workload", "touch", "--passes", "1"]);
        match run_child(&args.memory, &a) {
            Ok((j, exit_ms, fork_ns)) => {
                let ns = |k: &str| j["startup"][k].as_u64().unwrap_or(0);
                let first_ns = ns("first_insn_monotonic_ns");
                first.push(first_ns.saturating_sub(fork_ns) as f64 / 1e6);
                let to_end = j["startup"]["to_workload_end_ms"].as_f64().unwrap_or(0.0);
                let proc_start = ns("process_start_monotonic_ns");
                end.push(proc_start.saturating_sub(fork_ns) as f64 / 1e6 + to_end);
                exit.push(exit_ms);
                row.vmm_overhead_rss_kib = j["vmm_overhead_rss_bytes"].as_u64().unwrap_or(0) >> 10;
            }
            Err(e) => {
                row.error = Some(e);
                return row;
            }
        }
    }
    row.to_first_insn_ms = median(first);
    row.to_touch_end_ms = median(end);
    row.to_exit_ms = median(exit);
    let mut a = v.args.to_vec();
    let passes = args.passes.max(2).to_string();
    a.extend(["--workload", "random", "--passes", passes.as_str()]);
    match run_child(&args.memory, &a) {
        Ok((j, _, _)) => {
            row.random_warm_mib_s =
                j["steady_bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
            row.random_first_pass_ms = j["max_pass_ms"].as_f64().unwrap_or(0.0);
        }
        Err(e) => row.error = Some(e),
    }
    row
}

pub fn cmd_bench(args: &BenchArgs) -> i32 {
    match &args.which {
        BenchKind::Memory(a) => bench_memory(a),
        BenchKind::Numa(a) => bench_numa(a),
        BenchKind::Migration(a) => bench_migration(a),
    }
}

fn bench_memory(args: &MemoryBenchArgs) -> i32 {
    let mut rows: Vec<Row> = VARIANTS
        .iter()
        .map(|&v| {
            eprintln!("bench: {} ...", v.name);
            measure(args, v)
        })
        .collect();
    let base = rows.first().map(|r| r.random_warm_mib_s).unwrap_or(0.0);
    for r in &mut rows {
        r.random_vs_anon_4k = if base > 0.0 {
            r.random_warm_mib_s / base
        } else {
            0.0
        };
    }
    let json = serde_json::json!({ "memory": args.memory, "repeat": args.repeat, "rows": rows });
    if let Some(path) = &args.out {
        if let Err(e) = std::fs::write(path, json.to_string()) {
            return crate::cli::fail(&format!("writing {}: {e}", path.display()));
        }
    }
    if args.json {
        println!("{json}");
        return if rows.iter().any(|r| r.error.is_some()) {
            1
        } else {
            0
        };
    }
    println!(
        "guest RAM {} per run; start-up medians of {} runs; random: last of {} passes",
        args.memory, args.repeat, args.passes
    );
    println!();
    println!("| backing | fork→first insn ms | fork→touch end ms | fork→exit ms | random first pass ms | random warm MiB/s | vs anon 4K | VMM RSS KiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        match &r.error {
            Some(e) => println!("| {} | error: {e} | | | | | | |", r.variant),
            None => println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {} |",
                r.variant,
                r.to_first_insn_ms,
                r.to_touch_end_ms,
                r.to_exit_ms,
                r.random_first_pass_ms,
                r.random_warm_mib_s,
                r.random_vs_anon_4k,
                r.vmm_overhead_rss_kib
            ),
        }
    }
    if rows.iter().any(|r| r.error.is_some()) {
        1
    } else {
        0
    }
}

/// Median time of a raw userfaultfd MINOR round trip on shmem, in µs (guest-mm's probe:
/// the floor under every hint fault the VMM takes).
fn raw_minor_round_trip_us(samples: usize) -> Result<f64, String> {
    guest_mm::probe::raw_minor_round_trip_us(samples).map_err(|e| e.to_string())
}

fn numa_child(args: &NumaBenchArgs, balancing: &str) -> Result<serde_json::Value, String> {
    let vcpus = args.vcpus.to_string();
    let (j, _, _) = run_child(
        &args.memory,
        &[
            "--vcpus",
            &vcpus,
            "--workload",
            "numa02",
            "--duration",
            &args.duration,
            "--numa",
            "nodes=2",
            "--numa-balancing",
            balancing,
            "--numa-scan",
            &args.scan,
        ],
    )?;
    Ok(j)
}

/// (ms, locality %) points of a run's NUMA report.
fn locality_series(run: &serde_json::Value) -> Vec<(f64, f64)> {
    run["numa"]["locality_over_time"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn bench_numa(args: &NumaBenchArgs) -> i32 {
    eprintln!("bench: raw userfaultfd MINOR round trip ...");
    let raw = match raw_minor_round_trip_us(2000) {
        Ok(v) => v,
        Err(e) => return crate::cli::fail(&format!("raw MINOR round trip: {e}")),
    };
    eprintln!("bench: numa02, balancing on ...");
    let on = match numa_child(args, "on") {
        Ok(j) => j,
        Err(e) => return crate::cli::fail(&format!("numa02 with balancing on: {e}")),
    };
    eprintln!("bench: numa02, balancing off ...");
    let off = match numa_child(args, "off") {
        Ok(j) => j,
        Err(e) => return crate::cli::fail(&format!("numa02 with balancing off: {e}")),
    };
    let series = locality_series(&on);
    let series_off = locality_series(&off);
    let x_max = series.last().map(|p| p.0).unwrap_or(1.0);
    if let Err(e) = std::fs::create_dir_all(&args.out_dir) {
        return crate::cli::fail(&format!("creating {}: {e}", args.out_dir.display()));
    }
    let png = crate::plot::percent_chart(
        &[
            crate::plot::Series {
                points: &series,
                rgb: [30, 90, 200],
            },
            crate::plot::Series {
                points: &series_off,
                rgb: [150, 150, 150],
            },
        ],
        x_max,
        95.0,
    );
    let png_path = args.out_dir.join("numa-locality.png");
    match png {
        Ok(bytes) => {
            if let Err(e) = std::fs::write(&png_path, bytes) {
                return crate::cli::fail(&format!("writing {}: {e}", png_path.display()));
            }
        }
        Err(e) => return crate::cli::fail(&format!("rendering the plot: {e}")),
    }
    let mib = |j: &serde_json::Value| {
        j["steady_bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
    };
    let avg = |j: &serde_json::Value| j["bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    let result = serde_json::json!({
        "memory": args.memory, "vcpus": args.vcpus, "duration": args.duration, "scan": args.scan,
        "backend": on["numa"]["backend"],
        "raw_minor_round_trip_us": raw,
        "hint_fault_us_p50": on["fault_us_p50"], "hint_fault_us_p99": on["fault_us_p99"],
        "time_to_95_ms": on["numa"]["time_to_95_ms"],
        "locality_final_pct": on["locality_pct"], "locality_off_pct": off["locality_pct"],
        "numa_pages_migrated": on["numa_pages_migrated"], "numa_hint_faults": on["numa_hint_faults"],
        "throughput_on_mib_s": mib(&on), "throughput_off_mib_s": mib(&off),
        "throughput_avg_on_mib_s": avg(&on), "throughput_avg_off_mib_s": avg(&off),
        "locality_over_time": series,
    });
    let json_path = args.out_dir.join("numa.json");
    if let Err(e) = std::fs::write(&json_path, result.to_string()) {
        return crate::cli::fail(&format!("writing {}: {e}", json_path.display()));
    }
    println!(
        "numa02 on 2 {} nodes, {} vCPUs, {} guest RAM, {} per run, scan {}",
        on["numa"]["backend"].as_str().unwrap_or("?"),
        args.vcpus,
        args.memory,
        args.duration,
        args.scan
    );
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| raw userfaultfd MINOR round trip (median) | {raw:.1} µs |");
    println!(
        "| hint fault handled by the VMM p50 / p99 | {} / {} µs |",
        on["fault_us_p50"], on["fault_us_p99"]
    );
    match on["numa"]["time_to_95_ms"].as_f64() {
        Some(t) => println!("| time to 95% locality | {t:.0} ms |"),
        None => println!("| time to 95% locality | not reached |"),
    }
    println!(
        "| final locality, balancing on / off | {:.1}% / {:.1}% |",
        on["locality_pct"].as_f64().unwrap_or(0.0),
        off["locality_pct"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| pages migrated / hint faults | {} / {} |",
        on["numa_pages_migrated"], on["numa_hint_faults"]
    );
    println!(
        "| numa02 throughput, whole run, balancing on / off | {:.1} / {:.1} MiB/s |",
        avg(&on),
        avg(&off)
    );
    println!(
        "| numa02 throughput, last pass, balancing on / off | {:.1} / {:.1} MiB/s |",
        mib(&on),
        mib(&off)
    );
    println!();
    println!("locality over time (balancing on):");
    println!("| ms | locality % |");
    println!("|---:|---:|");
    let step = (series.len() / 16).max(1);
    for p in series.iter().step_by(step) {
        println!("| {:.0} | {:.1} |", p.0, p.1);
    }
    println!();
    println!(
        "plot: {} (blue: balancing on, grey: off, red dashes: 95%)",
        png_path.display()
    );
    0
}

/// Loopback TCP throughput in bytes/s: one connection, 256 MiB in 1 MiB writes.
fn loopback_tcp_bytes_per_sec() -> Result<f64, String> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
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
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let buf = vec![0x5au8; 1 << 20];
    let t = monotonic_ns();
    for _ in 0..(total >> 20) {
        c.write_all(&buf).map_err(|e| e.to_string())?;
    }
    drop(c);
    let got = reader
        .join()
        .map_err(|_| "reader panicked".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(got as f64 * 1e9 / (monotonic_ns() - t) as f64)
}

/// One hugevisor-to-hugevisor migration of a guest running `workload`, as a result row.
fn hugevisor_migration_row(
    exe: &std::path::Path,
    args: &MigrationBenchArgs,
    case: (&str, &str, &str),
    (collapse, push_order): (&str, &str),
    dir: &std::path::Path,
) -> serde_json::Value {
    let (backing, workload, mode) = case;
    let api = dir.join(format!("api-{backing}-{workload}-{mode}.sock"));
    let mig = format!(
        "unix:{}",
        dir.join(format!("mig-{backing}-{workload}-{mode}.sock"))
            .display()
    );
    let vcpus = args.vcpus.to_string();
    let common = [
        "run",
        "--memory",
        &args.memory,
        "--backing",
        backing,
        "--vcpus",
        &vcpus,
        "--workload",
        workload,
        "--duration",
        &args.duration,
        "--console",
        "off",
        "--json",
    ];
    let spawn = |extra: &[&str]| {
        Command::new(exe)
            .args(common)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let id = serde_json::json!({ "vmm": "hugevisor", "backing": backing, "workload": workload, "mode": mode, "collapse": collapse, "push_order": push_order });
    let (dst, src) = match (
        spawn(&["--incoming", &mig, "--collapse", collapse]),
        spawn(&["--api-socket", &api.to_string_lossy()]),
    ) {
        (Ok(d), Ok(s)) => (d, s),
        _ => return with_error(id, "spawning the migration peers".into()),
    };
    // Migrate a warm guest: every vCPU past its first pass (4 KiB first touches take
    // seconds per GiB here), then one more second of steady passes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        let passes = crate::api::call(&api, "GET", "/api/v1/vm.info", None)
            .ok()
            .and_then(|(_, v)| v["passes"].as_u64())
            .unwrap_or(0);
        if passes >= 2 * args.vcpus as u64 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let body =
        serde_json::json!({ "to": mig, "mode": mode, "downtime_ms": 50, "push_order": push_order });
    let report = crate::api::call(&api, "PUT", "/api/v1/vm.migrate", Some(&body));
    let (s_out, d_out) = (src.wait_with_output(), dst.wait_with_output());
    let dj: serde_json::Value = d_out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = s_out;
    match report {
        Ok((200, r)) => {
            let mut row = id;
            for k in [
                "total_ms",
                "downtime_ms",
                "bytes_sent",
                "precopy_rounds",
                "pages_demand",
                "demand_fault_us_p50",
                "demand_fault_us_p99",
                "demand_fault_us_max",
            ] {
                row[k] = r[k].clone();
            }
            row["guest_stall_ms"] = dj["guest_stall_ms"].clone();
            row["integrity_errors"] = dj["integrity_errors"].clone();
            row["collapses"] = dj["collapses"].clone();
            row["collapse_ms_total"] = dj["collapse_ms_total"].clone();
            row["pmd_mapped_pct"] = (dj["pmd_mapped_bytes"].as_f64().unwrap_or(0.0) * 100.0
                / dj["memory_bytes"].as_f64().unwrap_or(1.0))
            .into();
            // Passes the guest made on the destination: what huge pages buy after the switch.
            row["passes_after_switch"] = dj["incoming"]["passes_after_switch"].clone();
            row["postcopy_ms"] = dj["incoming"]["postcopy_ms"].clone();
            row["collapsed_50pct_ms"] = dj["collapse"]["collapsed_50pct_ms"].clone();
            row["collapsed_95pct_ms"] = dj["collapse"]["collapsed_95pct_ms"].clone();
            // The guest's last pass on the destination: warm throughput, after collapse.
            row["steady_mib_s"] =
                (dj["steady_bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64).into();
            row
        }
        Ok((code, r)) => with_error(id, format!("HTTP {code}: {r}")),
        Err(e) => with_error(id, e.to_string()),
    }
}

fn with_error(mut row: serde_json::Value, e: String) -> serde_json::Value {
    row["error"] = serde_json::Value::String(e);
    row
}

/// One QEMU-to-QEMU migration of the same image, as a result row.
fn qemu_migration_row(
    args: &MigrationBenchArgs,
    case: (&str, &str, qemu::QemuMode),
    dir: &std::path::Path,
) -> serde_json::Value {
    let (backing, workload, mode) = case;
    let id = serde_json::json!({ "vmm": "qemu", "backing": backing, "workload": workload, "mode": mode.name() });
    let c = qemu::QemuCase {
        memory: &args.memory,
        backing,
        workload,
        mode,
        warmup: std::time::Duration::from_secs(1),
        after: std::time::Duration::from_secs(3),
        dir,
    };
    match qemu::measure(&c) {
        Ok(r) => {
            let mut row = id;
            row["total_ms"] = r.total_ms.into();
            row["downtime_ms"] = r.downtime_ms.into();
            row["bytes_sent"] = r.bytes_sent.into();
            row["pages_demand"] = r.postcopy_requests.into();
            row["guest_stall_ms"] = match r.guest_stall_ms {
                Some(ms) => ms.into(),
                None => serde_json::Value::Null,
            };
            row["integrity_errors"] = r.integrity_errors.into();
            row["destination_lines"] = r.destination_lines.into();
            row
        }
        Err(e) => with_error(id, e),
    }
}

fn bench_migration(args: &MigrationBenchArgs) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return crate::cli::fail(&format!("finding the hugevisor binary: {e}")),
    };
    eprintln!("bench: baselines ...");
    let tcp = loopback_tcp_bytes_per_sec().unwrap_or(0.0);
    let minor = raw_minor_round_trip_us(2000).unwrap_or(0.0);
    let dir = std::env::temp_dir().join(format!("hv-bench-mig-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let with_qemu = args.qemu == QemuBaseline::On && qemu::available();
    if args.qemu == QemuBaseline::On && !with_qemu {
        eprintln!("bench: qemu-system-x86_64 not found; the QEMU rows are left out (apt-get install qemu-system-x86)");
    }
    let mut rows = Vec::new();
    for backing in ["shmem", "hugetlb-2m"] {
        for workload in ["verify", "idle"] {
            for mode in ["precopy", "postcopy", "hybrid"] {
                eprintln!("bench: hugevisor {mode} of {workload} on {backing} ...");
                let case = (backing, workload, mode);
                let default = ("on-fill", "sequential");
                rows.push(hugevisor_migration_row(&exe, args, case, default, &dir));
                // What collapse on fill buys a post-copy destination, and whether the
                // push order helps it (shmem: hugetlb is huge already).
                if backing == "shmem" && mode == "postcopy" {
                    for variant in [("on-fill", "fewest-missing-first"), ("off", "sequential")] {
                        eprintln!(
                            "bench: hugevisor {mode} of {workload} on {backing}, collapse {}, push {} ...",
                            variant.0, variant.1
                        );
                        rows.push(hugevisor_migration_row(&exe, args, case, variant, &dir));
                    }
                }
            }
            if with_qemu {
                for mode in [qemu::QemuMode::Precopy, qemu::QemuMode::PostcopyRam] {
                    eprintln!("bench: qemu {} of {workload} on {backing} ...", mode.name());
                    rows.push(qemu_migration_row(args, (backing, workload, mode), &dir));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let result = serde_json::json!({
        "memory": args.memory, "vcpus": args.vcpus, "qemu_vcpus": 1,
        "loopback_tcp_mib_s": tcp / (1 << 20) as f64,
        "raw_minor_round_trip_us": minor, "rows": rows,
    });
    if let Some(p) = &args.out {
        let _ = std::fs::write(p, result.to_string());
    }
    println!("guest {} on {} vCPUs (QEMU: 1 vCPU); baselines: loopback TCP {:.0} MiB/s, raw userfaultfd MINOR round trip {:.1} µs", args.memory, args.vcpus, tcp / (1 << 20) as f64, minor);
    println!();
    println!("| vmm | backing | workload | mode | total ms | downtime ms | guest stall ms | MiB sent | total vs bytes/bandwidth | rounds | demand pages | demand µs p50/p99/max | integrity errors | collapse | PMD-mapped % | passes after switch | last-pass MiB/s |");
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|");
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        if let Some(e) = r.get("error") {
            println!(
                "| {} | {} | {} | {} | error: {} | | | | | | | | | | | | |",
                s("vmm"),
                s("backing"),
                s("workload"),
                s("mode"),
                e
            );
            continue;
        }
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let stall = match r["guest_stall_ms"].as_f64() {
            Some(ms) => format!("{ms:.1}"),
            // No pass was slower than twice the fastest: the stall hid inside one pass.
            None => "< 2× a pass".to_string(),
        };
        let wire_ms = f("bytes_sent") / tcp.max(1.0) * 1e3;
        let opt = |k: &str| match &r[k] {
            serde_json::Value::Null => "–".to_string(),
            v => v.to_string(),
        };
        let demand = if r["demand_fault_us_p50"].is_null() {
            "–".to_string()
        } else {
            format!(
                "{:.0}/{:.0}/{:.0}",
                f("demand_fault_us_p50"),
                f("demand_fault_us_p99"),
                f("demand_fault_us_max")
            )
        };
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {} | {:.0} | ×{:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s("vmm"),
            s("backing"),
            s("workload"),
            s("mode"),
            f("total_ms"),
            f("downtime_ms"),
            stall,
            f("bytes_sent") / (1 << 20) as f64,
            f("total_ms") / wire_ms.max(1e-9),
            opt("precopy_rounds"),
            opt("pages_demand"),
            demand,
            opt("integrity_errors"),
            r["collapse"].as_str().unwrap_or("–"),
            match r["pmd_mapped_pct"].as_f64() {
                Some(p) => format!("{p:.0}"),
                None => "–".into(),
            },
            opt("passes_after_switch"),
            match r["steady_mib_s"].as_f64() {
                Some(v) => format!("{v:.0}"),
                None => "–".into(),
            },
        );
    }
    println!();
    println!("Post-copy on shmem: collapse on fill and the push order");
    println!();
    println!("| workload | collapse | push order | post-copy ms | guest stall ms | 50 % PMD-mapped at ms | 95 % at ms | PMD-mapped % | passes after switch | last-pass MiB/s |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows.iter().filter(|r| {
        r["vmm"] == "hugevisor"
            && r["backing"] == "shmem"
            && r["mode"] == "postcopy"
            && r.get("error").is_none()
    }) {
        let ms = |k: &str| match r[k].as_f64() {
            Some(v) => format!("{v:.0}"),
            None => "–".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["workload"].as_str().unwrap_or(""),
            r["collapse"].as_str().unwrap_or(""),
            r["push_order"].as_str().unwrap_or(""),
            ms("postcopy_ms"),
            ms("guest_stall_ms"),
            ms("collapsed_50pct_ms"),
            ms("collapsed_95pct_ms"),
            ms("pmd_mapped_pct"),
            r["passes_after_switch"],
            ms("steady_mib_s"),
        );
    }
    0
}
