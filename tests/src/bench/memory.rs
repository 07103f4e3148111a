//! `hugevisor-bench memory` measures, for a guest of `--memory` per backing:
//! - start-up: from the bench's fork of `hugevisor run` to the guest's first instruction
//!   (timestamped by the guest's TSC, which is the host's here) and to the end of a
//!   `touch` pass over all of guest RAM;
//! - `random` throughput on warm memory, as a ratio to the anon 4 KiB baseline;
//! - the VMM's own resident memory, guest RAM excluded.

use std::path::PathBuf;

use serde::Serialize;

use super::error::BenchError;
use super::{median, run_child, write_file, Completion, Hugevisor};

#[derive(clap::Args, Debug)]
pub struct MemoryBenchArgs {
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

fn measure(hv: &Hugevisor, args: &MemoryBenchArgs, v: Variant) -> Row {
    let mut row = Row {
        variant: v.name.to_string(),
        ..Default::default()
    };
    let (mut first, mut end, mut exit) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        let mut a = v.args.to_vec();
        a.extend(["--workload", "touch", "--passes", "1"]);
        match run_child(hv, &args.memory, &a) {
            Ok(run) => {
                let j = &run.json;
                let ns = |k: &str| j["startup"][k].as_u64().unwrap_or(0);
                let first_ns = ns("first_insn_monotonic_ns");
                first.push(first_ns.saturating_sub(run.fork_ns) as f64 / 1e6);
                let to_end = j["startup"]["to_workload_end_ms"].as_f64().unwrap_or(0.0);
                let proc_start = ns("process_start_monotonic_ns");
                end.push(proc_start.saturating_sub(run.fork_ns) as f64 / 1e6 + to_end);
                exit.push(run.exit_ms);
                row.vmm_overhead_rss_kib = j["vmm_overhead_rss_bytes"].as_u64().unwrap_or(0) >> 10;
            }
            Err(e) => {
                row.error = Some(e.row_message());
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
    match run_child(hv, &args.memory, &a) {
        Ok(run) => {
            let j = &run.json;
            row.random_warm_mib_s =
                j["steady_bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
            row.random_first_pass_ms = j["max_pass_ms"].as_f64().unwrap_or(0.0);
        }
        Err(e) => row.error = Some(e.row_message()),
    }
    row
}

pub fn bench_memory(hv: &Hugevisor, args: &MemoryBenchArgs) -> Result<Completion, BenchError> {
    let mut rows: Vec<Row> = VARIANTS
        .iter()
        .map(|&v| {
            eprintln!("bench: {} ...", v.name);
            measure(hv, args, v)
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
    let completion = if rows.iter().any(|r| r.error.is_some()) {
        Completion::SomeFailed
    } else {
        Completion::AllMeasured
    };
    let json = serde_json::json!({ "memory": args.memory, "repeat": args.repeat, "rows": rows });
    if let Some(path) = &args.out {
        write_file(path, json.to_string())?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_table(args, &rows);
    }
    Ok(completion)
}

fn print_table(args: &MemoryBenchArgs, rows: &[Row]) {
    println!(
        "guest RAM {} per run; start-up medians of {} runs; random: last of {} passes",
        args.memory, args.repeat, args.passes
    );
    println!();
    println!("| backing | fork→first insn ms | fork→touch end ms | fork→exit ms | random first pass ms | random warm MiB/s | vs anon 4K | VMM RSS KiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
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
}
