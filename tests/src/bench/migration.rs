//! `hugevisor-bench migration`: every mode on shmem and hugetlb-2m, for a `verify` and an
//! `idle` guest, hugevisor to hugevisor on this host, beside loopback-TCP and
//! raw-userfaultfd baselines and QEMU `-M microvm` migrating the same image ([`super::qemu`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::baselines::{
    loopback_tcp_bytes_per_sec, populate_bytes_per_sec, raw_minor_round_trip_us, warm_host_memory,
};
use super::error::BenchError;
use super::qemu;
use super::{write_file, Completion, Hugevisor};
use crate::api;

#[derive(clap::Args, Debug)]
pub struct MigrationBenchArgs {
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
    /// Touch this much host memory once before measuring (0: do not): on a machine that
    /// is itself a guest, the first use of each host page costs several times any later
    /// one (2.6 s/GiB seen here), and would be charged to whichever row met it first.
    #[arg(long, default_value = "8G")]
    warm_host: String,
}

/// Whether `bench migration` measures the QEMU baseline.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum QemuBaseline {
    On,
    Off,
}

/// What one hugevisor row migrates: (backing, workload, mode).
type Case<'a> = (&'a str, &'a str, &'a str);

/// The settings of one hugevisor row beside its case.
#[derive(Clone, Copy)]
struct Variant<'a> {
    /// The destination's `--collapse`.
    collapse: &'a str,
    push_order: &'a str,
    /// Pre-copy channels (`connections`).
    channels: u32,
}

impl Variant<'_> {
    const DEFAULT: Variant<'static> = Variant {
        collapse: "on-fill",
        push_order: "sequential",
        channels: 1,
    };
}

/// Migrate a warm guest: every vCPU past its first pass (4 KiB first touches take seconds
/// per GiB here), then one more second of steady passes. Gives up at once if the source
/// has exited (it failed to start: the row then says why).
fn wait_until_warm(api_path: &Path, vcpus: u32, src: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if matches!(src.try_wait(), Ok(Some(_))) {
            return;
        }
        let passes = api::info(api_path)
            .ok()
            .and_then(|v| v["passes"].as_u64())
            .unwrap_or(0);
        if passes >= 2 * vcpus as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
}

/// One hugevisor-to-hugevisor migration of a guest running `workload`, as a result row.
fn hugevisor_migration_row(
    hv: &Hugevisor,
    args: &MigrationBenchArgs,
    (backing, workload, mode): Case,
    Variant {
        collapse,
        push_order,
        channels,
    }: Variant,
    dir: &Path,
) -> Value {
    let api_path = dir.join(format!("api-{backing}-{workload}-{mode}.sock"));
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
        hv.command()
            .args(common)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let id = serde_json::json!({ "vmm": "hugevisor", "backing": backing, "workload": workload, "mode": mode, "collapse": collapse, "push_order": push_order, "channels": channels });
    let (dst, mut src) = match (
        spawn(&["--incoming", &mig, "--collapse", collapse]),
        spawn(&["--api-socket", &api_path.to_string_lossy()]),
    ) {
        (Ok(d), Ok(s)) => (d, s),
        _ => return with_error(id, "spawning the migration peers".into()),
    };
    wait_until_warm(&api_path, args.vcpus, &mut src);
    let body = serde_json::json!({ "to": mig, "mode": mode, "downtime_ms": 50, "push_order": push_order, "connections": channels });
    let report = api::call(
        &api_path,
        api::Method::Put,
        "/api/v1/vm.migrate",
        Some(&body),
    );
    let (s_out, d_out) = (src.wait_with_output(), dst.wait_with_output());
    let dj: Value = d_out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Value::Null);
    let _ = s_out;
    match report {
        Ok(api::Answer { status: 200, body }) => hugevisor_figures(id, &body, &dj),
        Ok(api::Answer { status, body }) => with_error(id, format!("HTTP {status}: {body}")),
        Err(e) => with_error(id, e.to_string()),
    }
}

/// A row from the source's migration report `r` and the destination's run report `dj`.
fn hugevisor_figures(mut row: Value, r: &Value, dj: &Value) -> Value {
    for k in [
        "total_ms",
        "downtime_ms",
        "bytes_sent",
        "precopy_rounds",
        "pages_demand",
        "demand_fault_us_p50",
        "demand_fault_us_p99",
        "demand_fault_us_max",
        "converged_by",
        "throttle_percent",
        "expected_downtime_ms",
        "budget_met",
    ] {
        row[k] = r[k].clone();
    }
    row["guest_stall_ms"] = dj["guest_stall_ms"].clone();
    row["demand_breakdown"] = dj["incoming"]["demand_breakdown"].clone();
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

fn with_error(mut row: Value, e: String) -> Value {
    row["error"] = Value::String(e);
    row
}

/// One QEMU-to-QEMU migration of the same image, as a result row.
fn qemu_migration_row(
    args: &MigrationBenchArgs,
    (backing, workload, mode): (&str, &str, qemu::QemuMode),
    image: &Path,
    dir: &Path,
) -> Value {
    let id = serde_json::json!({ "vmm": "qemu", "backing": backing, "workload": workload, "mode": mode.name() });
    let c = qemu::QemuCase {
        memory: &args.memory,
        vcpus: args.vcpus,
        backing,
        workload,
        mode,
        warmup: Duration::from_secs(1),
        after: Duration::from_secs(3),
        image,
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
                None => Value::Null,
            };
            row["integrity_errors"] = r.integrity_errors.into();
            row["destination_lines"] = r.destination_lines.into();
            row
        }
        Err(e) => with_error(id, e.to_string()),
    }
}

/// Writes the guest image of the hugevisor under measurement to `path`, so QEMU boots the
/// very image that build runs.
pub(super) fn write_guest_image(hv: &Hugevisor, path: &Path) -> Result<(), BenchError> {
    let what = format!("hugevisor guest-image --out {}", path.display());
    let out = hv
        .command()
        .args(["guest-image", "--out"])
        .arg(path)
        .output()
        .map_err(|source| BenchError::Spawn {
            what: what.clone(),
            source,
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(BenchError::ChildFailed {
            message: err.lines().last().unwrap_or("failed").trim().to_string(),
            what,
        });
    }
    Ok(())
}

pub fn bench_migration(
    hv: &Hugevisor,
    args: &MigrationBenchArgs,
) -> Result<Completion, BenchError> {
    let warm = guest_mm::size::parse_size(&args.warm_host).map_err(BenchError::BaselineRam)?;
    if warm > 0 {
        eprintln!("bench: touching {} of host memory once ...", args.warm_host);
        let t = Instant::now();
        warm_host_memory(warm);
        eprintln!("bench: ... in {:.1} s", t.elapsed().as_secs_f64());
    }
    eprintln!("bench: baselines ...");
    let tcp = loopback_tcp_bytes_per_sec().unwrap_or(0.0);
    let minor = raw_minor_round_trip_us(2000).unwrap_or(0.0);
    // The better of two tries: the first use of host memory after a while costs more.
    let populate: Vec<(&str, f64)> = ["shmem", "hugetlb-2m"]
        .into_iter()
        .map(|b| {
            let best = (0..2)
                .filter_map(|_| populate_bytes_per_sec(b, &args.memory).ok())
                .fold(0.0, f64::max);
            (b, best)
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("hv-bench-mig-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut with_qemu = args.qemu == QemuBaseline::On && qemu::available();
    if args.qemu == QemuBaseline::On && !with_qemu {
        eprintln!("bench: qemu-system-x86_64 not found; the QEMU rows are left out (apt-get install qemu-system-x86)");
    }
    let image = dir.join("hvguest.elf");
    if with_qemu {
        if let Err(e) = write_guest_image(hv, &image) {
            eprintln!("bench: {e}; the QEMU rows are left out");
            with_qemu = false;
        }
    }
    let mut rows: Vec<Value> = Vec::new();
    for backing in ["shmem", "hugetlb-2m"] {
        for workload in ["verify", "idle"] {
            for mode in ["precopy", "postcopy", "hybrid", "auto"] {
                eprintln!("bench: hugevisor {mode} of {workload} on {backing} ...");
                let case = (backing, workload, mode);
                rows.push(hugevisor_migration_row(
                    hv,
                    args,
                    case,
                    Variant::DEFAULT,
                    &dir,
                ));
                // What collapse on fill buys a post-copy destination, and whether the
                // push order helps it (shmem: hugetlb is huge already).
                if backing == "shmem" && mode == "postcopy" {
                    let others = [
                        Variant {
                            push_order: "fewest-missing-first",
                            ..Variant::DEFAULT
                        },
                        Variant {
                            collapse: "off",
                            ..Variant::DEFAULT
                        },
                    ];
                    for v in others {
                        eprintln!(
                            "bench: hugevisor {mode} of {workload} on {backing}, collapse {}, push {} ...",
                            v.collapse, v.push_order
                        );
                        rows.push(hugevisor_migration_row(hv, args, case, v, &dir));
                    }
                }
                // What several pre-copy channels buy.
                if mode == "precopy" {
                    let v = Variant {
                        channels: 4,
                        ..Variant::DEFAULT
                    };
                    eprintln!("bench: hugevisor {mode} of {workload} on {backing}, 4 channels ...");
                    rows.push(hugevisor_migration_row(hv, args, case, v, &dir));
                }
            }
            if with_qemu {
                for mode in [qemu::QemuMode::Precopy, qemu::QemuMode::PostcopyRam] {
                    eprintln!("bench: qemu {} of {workload} on {backing} ...", mode.name());
                    rows.push(qemu_migration_row(
                        args,
                        (backing, workload, mode),
                        &image,
                        &dir,
                    ));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    for r in rows.iter_mut() {
        let fill = populate
            .iter()
            .find(|(b, _)| r["backing"] == *b)
            .map_or(0.0, |p| p.1);
        add_floor(r, tcp, fill);
    }
    let mib = |bps: f64| bps / (1 << 20) as f64;
    let result = serde_json::json!({
        "memory": args.memory, "vcpus": args.vcpus, "qemu_vcpus": args.vcpus,
        "loopback_tcp_mib_s": mib(tcp),
        "populate_mib_s": populate.iter().map(|(b, r)| (b.to_string(), mib(*r).into())).collect::<serde_json::Map<String, Value>>(),
        "raw_minor_round_trip_us": minor, "rows": rows,
    });
    if let Some(p) = &args.out {
        write_file(p, result.to_string())?;
    }
    println!("guest {} on {} vCPUs (QEMU too); baselines: loopback TCP {:.0} MiB/s, populating a fresh backing {}, raw userfaultfd MINOR round trip {:.1} µs", args.memory, args.vcpus, mib(tcp),
        populate.iter().map(|(b, r)| format!("{b} {:.0} MiB/s", mib(*r))).collect::<Vec<_>>().join(", "), minor);
    println!();
    print_rows(&rows);
    println!();
    print_demand_rows(&rows);
    println!();
    print_collapse_rows(&rows);
    Ok(Completion::AllMeasured)
}

/// A row's floor: its bytes over the slower of the wire (`tcp`) and populating its
/// backing (`fill`), both in bytes/s measured in this run; and its total over that.
fn add_floor(r: &mut Value, tcp: f64, fill: f64) {
    let slower = match (tcp > 0.0, fill > 0.0) {
        (true, true) => tcp.min(fill),
        (true, false) => tcp,
        (false, true) => fill,
        (false, false) => return,
    };
    let floor_ms = r["bytes_sent"].as_f64().unwrap_or(0.0) / slower * 1e3;
    r["floor_ms"] = floor_ms.into();
    if let Some(total) = r["total_ms"].as_f64() {
        r["total_vs_floor"] = (total / floor_ms.max(1e-9)).into();
    }
}

/// The main table: one line per row.
/// Post-copy rows' demand faults, stage by stage (p50 / p99 µs), and the whole fault's
/// histogram (power-of-two buckets: `≤edge µs: faults`).
fn print_demand_rows(rows: &[Value]) {
    println!("| backing | workload | mode | collapse, push | faults | request sent | page arrived | installed, resumed | total | total's histogram |");
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let b = &r["demand_breakdown"];
        if b.is_null() || b["total"]["count"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        let stage = |k: &str| {
            format!(
                "{:.0} / {:.0}",
                b[k]["p50_us"].as_f64().unwrap_or(0.0),
                b[k]["p99_us"].as_f64().unwrap_or(0.0)
            )
        };
        let hist = b["total"]["histogram"]
            .as_array()
            .map(|h| {
                h.iter()
                    .map(|e| format!("≤{}: {}", e[0], e[1]))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let text = |k: &str| r[k].as_str().unwrap_or("");
        println!(
            "| {} | {} | {} | {}, {} | {} | {} | {} | {} | {} | {hist} |",
            text("backing"),
            text("workload"),
            text("mode"),
            text("collapse"),
            text("push_order"),
            b["total"]["count"],
            stage("request_sent"),
            stage("page_arrived"),
            stage("installed_resumed"),
            stage("total"),
        );
    }
}

fn print_rows(rows: &[Value]) {
    println!("| vmm | backing | workload | mode | total ms | floor ms | total ÷ floor | downtime ms (budget 50: ended by) | guest stall ms | MiB sent | rounds | demand pages | demand µs p50/p99/max | integrity errors | collapse | PMD-mapped % | passes after switch | last-pass MiB/s |");
    println!(
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    );
    for r in rows {
        let s = |k: &str| match (k, r["channels"].as_u64()) {
            ("mode", Some(n)) if n > 1 => format!("{} ×{n} channels", r[k].as_str().unwrap_or("")),
            _ => r[k].as_str().unwrap_or("").to_string(),
        };
        if let Some(e) = r.get("error") {
            println!(
                "| {} | {} | {} | {} | error: {} | | | | | | | | | | | | | |",
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
        let downtime = match r["converged_by"].as_str() {
            Some(how) if how != "not-applicable" => format!(
                "{:.1} ({}{})",
                f("downtime_ms"),
                how,
                match r["throttle_percent"].as_u64() {
                    Some(p) if p > 0 => format!(" {p} %"),
                    _ => String::new(),
                }
            ),
            _ => format!("{:.1}", f("downtime_ms")),
        };
        let opt = |k: &str| match &r[k] {
            Value::Null => "–".to_string(),
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
            "| {} | {} | {} | {} | {:.0} | {:.0} | ×{:.2} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s("vmm"),
            s("backing"),
            s("workload"),
            s("mode"),
            f("total_ms"),
            f("floor_ms"),
            f("total_vs_floor"),
            downtime,
            stall,
            f("bytes_sent") / (1 << 20) as f64,
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
}

/// Post-copy on shmem: collapse on fill and the push order, side by side.
fn print_collapse_rows(rows: &[Value]) {
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
}
