//! `hugevisor-bench numa`: `numa02` on two emulated nodes with balancing on and off, beside
//! a raw userfaultfd MINOR round trip (the floor under every hint fault). Writes
//! `numa.json` and `numa-locality.png`.

use std::path::PathBuf;

use serde_json::Value;

use super::baselines::raw_minor_round_trip_us;
use super::error::BenchError;
use super::plot::{percent_chart, Series};
use super::{run_child, write_file, Completion, Hugevisor};

#[derive(clap::Args, Debug)]
pub struct NumaBenchArgs {
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

fn numa_child(hv: &Hugevisor, args: &NumaBenchArgs, balancing: &str) -> Result<Value, BenchError> {
    let vcpus = args.vcpus.to_string();
    let run = run_child(
        hv,
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
    Ok(run.json)
}

/// (ms, locality %) points of a run's NUMA report.
fn locality_series(run: &Value) -> Vec<(f64, f64)> {
    run["numa"]["locality_over_time"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn mib_steady(j: &Value) -> f64 {
    j["steady_bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
}

fn mib_avg(j: &Value) -> f64 {
    j["bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
}

pub fn bench_numa(hv: &Hugevisor, args: &NumaBenchArgs) -> Result<Completion, BenchError> {
    eprintln!("bench: raw userfaultfd MINOR round trip ...");
    let raw = raw_minor_round_trip_us(2000)?;
    eprintln!("bench: numa02, balancing on ...");
    let on = numa_child(hv, args, "on")?;
    eprintln!("bench: numa02, balancing off ...");
    let off = numa_child(hv, args, "off")?;
    let series = locality_series(&on);
    let series_off = locality_series(&off);
    let x_max = series.last().map(|p| p.0).unwrap_or(1.0);
    std::fs::create_dir_all(&args.out_dir).map_err(|source| BenchError::CreateDir {
        path: args.out_dir.clone(),
        source,
    })?;
    let png = percent_chart(
        &[
            Series {
                points: &series,
                rgb: [30, 90, 200],
            },
            Series {
                points: &series_off,
                rgb: [150, 150, 150],
            },
        ],
        x_max,
        95.0,
    )
    .map_err(BenchError::Plot)?;
    let png_path = args.out_dir.join("numa-locality.png");
    write_file(&png_path, png)?;
    let result = serde_json::json!({
        "memory": args.memory, "vcpus": args.vcpus, "duration": args.duration, "scan": args.scan,
        "backend": on["numa"]["backend"],
        "raw_minor_round_trip_us": raw,
        "hint_fault_us_p50": on["fault_us_p50"], "hint_fault_us_p99": on["fault_us_p99"],
        "time_to_95_ms": on["numa"]["time_to_95_ms"],
        "locality_final_pct": on["locality_pct"], "locality_off_pct": off["locality_pct"],
        "numa_pages_migrated": on["numa_pages_migrated"], "numa_hint_faults": on["numa_hint_faults"],
        "throughput_on_mib_s": mib_steady(&on), "throughput_off_mib_s": mib_steady(&off),
        "throughput_avg_on_mib_s": mib_avg(&on), "throughput_avg_off_mib_s": mib_avg(&off),
        "locality_over_time": series,
    });
    write_file(&args.out_dir.join("numa.json"), result.to_string())?;
    print_tables(args, raw, &on, &off, &series);
    println!();
    println!(
        "plot: {} (blue: balancing on, grey: off, red dashes: 95%)",
        png_path.display()
    );
    Ok(Completion::AllMeasured)
}

fn print_tables(args: &NumaBenchArgs, raw: f64, on: &Value, off: &Value, series: &[(f64, f64)]) {
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
        mib_avg(on),
        mib_avg(off)
    );
    println!(
        "| numa02 throughput, last pass, balancing on / off | {:.1} / {:.1} MiB/s |",
        mib_steady(on),
        mib_steady(off)
    );
    println!();
    println!("locality over time (balancing on):");
    println!("| ms | locality % |");
    println!("|---:|---:|");
    let step = (series.len() / 16).max(1);
    for p in series.iter().step_by(step) {
        println!("| {:.0} | {:.1} |", p.0, p.1);
    }
}
