//! The `hugevisor` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use guest_image::Workload;
use guest_mm::collapse::{BudgetError, CollapseMode, ScanBudget};
use guest_mm::numa::{BalancerConfig, Balancing, NumaSpec, SpecError};
use guest_mm::{BackingKind, Prefault, RamConfig, ThpMode};

use crate::config::{Exposure, GuestSource};
use crate::console::ConsoleMode;
use crate::run::{CorruptionTest, MemmapListing, Outcome, RunConfig, RunLimit};
use crate::vstate::vm::{DirtyLogMethod, DEFAULT_KVM_DEVICE};

mod snapshot;

/// Exit status: success.
pub const EXIT_OK: i32 = 0;
/// Exit status: bad input or a host/VMM problem (message on stderr).
pub const EXIT_ERROR: i32 = 1;
/// Exit status: the guest found integrity errors.
pub const EXIT_INTEGRITY: i32 = 2;
/// Exit status: the guest took an exception.
pub const EXIT_GUEST_EXCEPTION: i32 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "hugevisor",
    version,
    about = "A KVM VMM about guest memory management"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a built-in guest workload in a new VM.
    Run(Box<RunArgs>),
    /// Write the built-in guest image (a PVH ELF other VMMs can boot).
    GuestImage(GuestImageArgs),
    /// Report what this host offers (KVM, userfaultfd, huge pages, THP, NUMA) and how to fix what is missing.
    Caps(CapsArgs),
    /// Live-migrate a running VM (through its control API) to a `run --incoming` peer, or to
    /// a VMM told `vm.receive-migration`.
    Migrate(MigrateArgs),
    /// Write the ACPI tables a `run --kernel` with the same options gives its guest.
    AcpiTables(AcpiTablesArgs),
    /// Snapshot a running VM (through its control API) into a directory, for `run --restore`.
    Snapshot(snapshot::SnapshotArgs),
}

#[derive(Args, Debug)]
struct AcpiTablesArgs {
    /// Directory to write the tables into (created if missing), one file per table.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    run: Box<RunArgs>,
}

fn cmd_acpi_tables(args: &AcpiTablesArgs) -> i32 {
    let cfg = match args.run.to_config(0) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let topology = match &cfg.numa {
        Some(spec) => match spec.resolve(cfg.vcpus, guest_mm::numa::host_nodes().len()) {
            Ok(t) => Some(t),
            Err(e) => return fail(&e.to_string()),
        },
        None => None,
    };
    let cpus = crate::vstate::cpuid::CpuTopology {
        vcpus: cfg.vcpus,
        vcpu_nodes: topology.map(|t| t.vcpu_nodes).unwrap_or_default(),
    };
    let tables = crate::acpi::build(
        &cpus,
        cfg.ram.size,
        crate::acpi::NumaTables::for_run(cfg.numa.as_ref()),
    );
    match tables.write_dir(&args.out) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            EXIT_OK
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    guest_mm::size::parse_size(s).map_err(|e| e.to_string())
}

/// The longest duration a flag takes: the run's clocks are u64 nanoseconds, and the
/// controller adds durations to them (and a minute to `--duration` for the timeout).
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 5s, 500ms, 2m"))?;
    if d.is_zero() {
        return Err("duration must be greater than zero".into());
    }
    if d > MAX_DURATION {
        return Err(format!(
            "{s:?} does not fit: a duration is at most 10 years (87600h)"
        ));
    }
    Ok(d)
}

fn parse_collapse(s: &str) -> Result<CollapseMode, BudgetError> {
    s.parse()
}

fn parse_collapse_scan(s: &str) -> Result<ScanBudget, BudgetError> {
    s.parse()
}

fn parse_balancing(s: &str) -> Result<Balancing, SpecError> {
    s.parse()
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    s.parse().map_err(|e: guest_image::Error| e.to_string())
}

fn parse_backing(s: &str) -> Result<BackingKind, String> {
    s.parse().map_err(|e: guest_mm::Error| e.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ThpArg {
    Off,
    On,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest RAM size (e.g. 512M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size, allow_hyphen_values = true)]
    memory: u64,
    /// Guest RAM backing: shmem, hugetlb-2m, hugetlb-1g, anon.
    #[arg(long, default_value = "shmem", value_parser = parse_backing)]
    backing: BackingKind,
    /// Transparent huge pages for the anon backing (MADV_HUGEPAGE).
    #[arg(long, value_enum, default_value = "off")]
    thp: ThpArg,
    /// Populate all guest RAM before the guest starts (MADV_POPULATE_WRITE).
    #[arg(long)]
    prefault: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Workload: touch, verify (the default), stream, random, fault, numa01, numa02,
    /// numa01_thread_alloc. With --api-socket and no --workload (and no --incoming) the
    /// VMM boots nothing: it waits for `vm.receive-migration`.
    #[arg(long, value_parser = parse_workload)]
    workload: Option<Workload>,
    /// Run the workload for this long (e.g. 5s); the default is 5s (one pass for touch).
    #[arg(long, value_parser = parse_duration, conflicts_with = "passes")]
    duration: Option<Duration>,
    /// Run this many passes per vCPU instead of a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    passes: Option<u64>,
    /// Seed for the random workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Where guest console lines (COM1) go: stderr, stdout, off or file:PATH.
    #[arg(long, default_value = "stderr", value_parser = parse_console)]
    console: ConsoleMode,
    /// Give up (and stop the guest) after this long.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// KVM device node.
    #[arg(long, default_value = DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,
    /// Testing: after vCPU 0's first pass, corrupt one word of a guest page through the
    /// staging view; `verify` must then report that page.
    #[arg(long)]
    inject_corruption: bool,
    /// Testing: a VMM thread zaps a random range of the guest view this often (e.g. 1ms);
    /// every zapped page comes back through the userfaultfd fault path.
    #[arg(long, value_parser = parse_duration)]
    stress_zap: Option<Duration>,
    /// Print the second-stage table (like smaps) at exit.
    #[arg(long)]
    memmap: bool,
    /// Guest NUMA topology: nodes=N[,cpus=0-1:2-3][,backend=host|emulated][,policy=bind|preferred|interleave].
    #[arg(long, value_parser = parse_numa)]
    numa: Option<NumaSpec>,
    /// NUMA balancing (hint faults and region moves): on or off; on by default with --numa.
    #[arg(long, default_value = "on", value_parser = parse_balancing)]
    numa_balancing: Balancing,
    /// NUMA scanner: window=SIZE,period=D[,max=D][,rate=N] (default: 256M windows, a full scan every 1s backing off to 60s, 256 moves/s).
    #[arg(long, value_parser = parse_numa_scan)]
    numa_scan: Option<BalancerConfig>,
    /// Testing: move a random 2 MiB region to another node this often.
    #[arg(long, alias = "numa-force-migrate", value_parser = parse_duration)]
    numa_force_move: Option<Duration>,
    /// Collapse guest RAM into 2 MiB huge pages: off, on-fill (regions a migration
    /// completes), background (also a khugepaged-like scan). shmem and anon only.
    #[arg(long, default_value = "on-fill", value_parser = parse_collapse)]
    collapse: CollapseMode,
    /// Background collapse budget: pages=N,period=MS,rate=N,max-ptes-none=N
    /// (default pages=16384,period=100,rate=200,max-ptes-none=64).
    #[arg(long, value_parser = parse_collapse_scan)]
    collapse_scan: Option<ScanBudget>,
    /// Serve the control API (HTTP/1.1 + JSON, Cloud Hypervisor's paths; docs/api.yaml)
    /// on this unix socket (mode 0600).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Receive the guest from a migration source (tcp:HOST:PORT or unix:PATH) instead of
    /// booting it; memory, backing and vCPUs must match the source's.
    #[arg(long, value_parser = parse_uri)]
    incoming: Option<migration::Uri>,
    /// How KVM reports pages the guest wrote, for pre-copy migration: bitmap
    /// (KVM_GET_DIRTY_LOG), ring (per-vCPU dirty rings of 65536 entries) or ring=ENTRIES
    /// (a power of two, 256..=65536; 16 bytes each).
    #[arg(long, default_value = "bitmap", value_parser = parse_dirty_log)]
    dirty_log: DirtyLogMethod,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Authenticate every migration connection, in and out, with the pre-shared key in
    /// FILE (at least 16 bytes, mode 0600; the same file on both ends), by
    /// challenge–response before anything the peer sends is trusted.
    #[arg(long, value_name = "FILE", conflicts_with = "tls_cert")]
    migration_key: Option<PathBuf>,
    /// Mutual TLS for every migration connection, in and out: this end's certificate
    /// (PEM), signed by a CA the other end trusts (with --tls-key and --tls-ca).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed the other end's certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Let a `--incoming tcp:` listener run without --migration-key: anyone who reaches
    /// the port could hand this VM a guest.
    #[arg(long)]
    insecure: bool,
    /// Destination: how long a post-copy whose connection broke waits for the source to
    /// resume (`hugevisor migrate --resume`) before it ends naming the pages it lacks.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    recovery_timeout: Duration,
    #[command(flatten)]
    snapshot: snapshot::RunSnapshotArgs,
}

/// A guest hugevisor did not build (`run --kernel`, `acpi-tables`).
#[derive(Args, Debug, Clone)]
pub struct KernelArgs {
    /// Boot this kernel instead of the built-in image: a PVH ELF (a vmlinux, or the
    /// image `guest-image` writes) or a bzImage.
    #[arg(long, conflicts_with = "incoming")]
    kernel: Option<PathBuf>,
    /// An initramfs for --kernel (PVH module 0, or the bzImage's initrd).
    #[arg(long, requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// The kernel's command line (default: none; the built-in image gets the run's
    /// parameters).
    #[arg(long, requires = "kernel", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Which entry of --kernel: auto (PVH for an ELF, the 64-bit boot protocol for a
    /// bzImage), pvh (a bzImage's inner vmlinux through PVH), linux64.
    #[arg(long, default_value = "auto", requires = "kernel", value_parser = parse_boot_entry)]
    boot_entry: crate::boot::kernel::BootEntry,
}

fn parse_boot_entry(s: &str) -> Result<crate::boot::kernel::BootEntry, String> {
    s.parse()
        .map_err(|e: crate::boot::kernel::BootEntryParseError| e.to_string())
}

impl KernelArgs {
    fn to_config(&self) -> Option<crate::boot::kernel::KernelConfig> {
        self.kernel
            .as_ref()
            .map(|path| crate::boot::kernel::KernelConfig {
                path: path.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
                entry: self.boot_entry,
            })
    }
}

fn parse_console(s: &str) -> Result<ConsoleMode, String> {
    s.parse()
        .map_err(|e: crate::console::ConsoleParseError| e.to_string())
}

fn parse_dirty_log(s: &str) -> Result<DirtyLogMethod, String> {
    s.parse()
        .map_err(|e: crate::vstate::vm::DirtyLogParseError| e.to_string())
}

fn parse_uri(s: &str) -> Result<migration::Uri, String> {
    s.parse().map_err(|e: migration::ParseError| e.to_string())
}

#[derive(Args, Debug)]
struct MigrateArgs {
    /// The source VMM's control API socket.
    #[arg(long)]
    api_socket: PathBuf,
    /// Destination: tcp:HOST:PORT or unix:PATH (a `hugevisor run --incoming` there).
    #[arg(long, value_parser = parse_uri)]
    to: migration::Uri,
    /// precopy, postcopy (userfaultfd on the destination; pages on demand plus background
    /// push), hybrid (three pre-copy rounds, then post-copy) or auto (pre-copy until the
    /// rounds stop converging, then post-copy; pre-copy throttles the vCPUs instead).
    #[arg(long, default_value = "precopy", value_parser = parse_mode)]
    mode: migration::Mode,
    /// Pre-copy stops when what is left would take this long to send; rounds that stop
    /// converging throttle the vCPUs (auto mode: switch to post-copy), and a migration
    /// that still cannot keep it says so.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    downtime_ms: u64,
    /// Cancel the migration (the guest keeps running here) if it has not switched over
    /// after this many seconds (Cloud Hypervisor's `timeout_s`).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_s: u64,
    /// Post-copy background push: sequential (from the last demand request on) or
    /// fewest-missing-first (complete the 2 MiB regions the guest touched first).
    #[arg(long, default_value = "sequential", value_parser = parse_push_order)]
    push_order: migration::PushOrder,
    /// Connections the pre-copy rounds send pages on, each with a thread at both ends
    /// (QEMU's multifd, Cloud Hypervisor's `connections`); a region's pages always take
    /// the same one. Post-copy's push and demand pages keep to their two connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=migration::MAX_CHANNELS as i64))]
    channels: u32,
    /// Print the migration report as JSON.
    #[arg(long)]
    json: bool,
    /// Check the transfer: `memory-hash` compares a CRC-32 of guest RAM on both ends at the
    /// switch-over (adds a pass over guest RAM to the downtime on each side).
    #[arg(long, value_parser = parse_verify)]
    verify: Option<migration::Verify>,
    /// Resume a migration paused after the hand-over (`postcopy-paused` in vm.info): the
    /// source reconnects to --to, learns what the destination lacks and goes on.
    #[arg(long)]
    resume: bool,
}

fn parse_mode(s: &str) -> Result<migration::Mode, String> {
    s.parse().map_err(|e: migration::ParseError| e.to_string())
}

fn parse_push_order(s: &str) -> Result<migration::PushOrder, String> {
    s.parse().map_err(|e: migration::ParseError| e.to_string())
}

fn parse_verify(s: &str) -> Result<migration::Verify, String> {
    s.parse().map_err(|e: migration::ParseError| e.to_string())
}

fn parse_numa(s: &str) -> Result<NumaSpec, SpecError> {
    s.parse()
}

fn parse_numa_scan(s: &str) -> Result<BalancerConfig, SpecError> {
    guest_mm::numa::parse_scan(s)
}

#[derive(Args, Debug)]
struct GuestImageArgs {
    /// Workload the image runs when the loader gives no command line.
    #[arg(long, default_value = "verify", value_parser = parse_workload)]
    workload: Workload,
    /// Passes per vCPU in the default command line (other VMMs cannot stop it otherwise).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    passes: u64,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct CapsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// KVM device node to check.
    #[arg(long, default_value = DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,
}

impl RunArgs {
    /// Where the guest comes from: `--incoming`, or nothing to boot (`--api-socket` and no
    /// `--workload` or `--kernel`: wait for `vm.receive-migration`), or a guest booted here.
    fn guest_source(&self) -> Result<GuestSource, String> {
        if let Some(restore) = self.snapshot.guest_source() {
            return Ok(restore);
        }
        Ok(match (&self.incoming, &self.api_socket, self.workload) {
            (Some(uri), _, _) => GuestSource::Incoming(uri.clone()),
            (None, Some(_), None) if self.kernel.kernel.is_none() => {
                if self.passes.is_some() || self.inject_corruption {
                    return Err("--api-socket with no --workload waits for vm.receive-migration, and a received guest brings its own passes and data; add --workload to boot a guest here".into());
                }
                GuestSource::ApiReceive
            }
            (None, _, _) => GuestSource::Boot,
        })
    }

    pub fn to_config(&self, process_start_ns: u64) -> Result<RunConfig, String> {
        let guest = self.guest_source()?;
        let workload = self.workload.unwrap_or(Workload::Verify);
        let limit = match (self.duration, self.passes) {
            (Some(d), _) => RunLimit::Duration(d),
            (None, Some(p)) => RunLimit::Passes(p),
            // The guest's own limit comes with it.
            (None, None) if guest.is_migration() => RunLimit::FromSource,
            (None, None) if workload == Workload::Touch => RunLimit::Passes(1),
            (None, None) => RunLimit::Duration(Duration::from_secs(5)),
        };
        Ok(RunConfig {
            ram: RamConfig {
                size: self.memory,
                backing: self.backing,
                thp: match self.thp {
                    ThpArg::Off => ThpMode::Off,
                    ThpArg::On => ThpMode::Madvise,
                },
                prefault: if self.prefault {
                    Prefault::Populate
                } else {
                    Prefault::No
                },
                ..RamConfig::default()
            },
            vcpus: self.vcpus,
            workload,
            limit,
            seed: self.seed,
            console: self.console.clone(),
            kvm_device: self.kvm_device.clone(),
            timeout: self.timeout,
            corruption: if self.inject_corruption {
                CorruptionTest::AfterFirstPass
            } else {
                CorruptionTest::None
            },
            process_start_ns,
            stress_zap: self.stress_zap,
            memmap: if self.memmap {
                MemmapListing::AtExit
            } else {
                MemmapListing::Off
            },
            numa: self.numa.clone(),
            numa_balancing: self.numa_balancing,
            numa_scan: self.numa_scan.unwrap_or_default(),
            numa_force_move: self.numa_force_move,
            collapse: self.collapse,
            collapse_scan: self.collapse_scan.unwrap_or_default(),
            api_socket: self.api_socket.clone(),
            guest,
            dirty_log: self.dirty_log,
            kernel: self.kernel.to_config(),
            migration_auth: self.migration_auth()?,
            exposure: if self.insecure {
                Exposure::Insecure
            } else {
                Exposure::AuthenticatedOnly
            },
            recovery_timeout: self.recovery_timeout,
            snapshot_at: self.snapshot.snapshot_at(),
        })
    }
}

impl RunArgs {
    /// `--migration-key` or the `--tls-*` trio (clap has refused both, or part of the trio).
    fn migration_auth(&self) -> Result<migration::Auth, String> {
        use std::sync::Arc;
        if let Some(path) = &self.migration_key {
            let key =
                migration::Key::from_file(path).map_err(|e| format!("--migration-key: {e}"))?;
            return Ok(migration::Auth::Key(Arc::new(key)));
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let files = migration::wire::tls::TlsFiles { cert, key, ca };
                let tls = migration::wire::tls::TlsConfig::from_files(&files)
                    .map_err(|e| e.to_string())?;
                Ok(migration::Auth::Tls(Arc::new(tls)))
            }
            _ => Ok(migration::Auth::None),
        }
    }
}

fn cmd_run(args: &RunArgs, start_ns: u64) -> i32 {
    let cfg = match args.to_config(start_ns) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if let Err(e) = crate::signals::install() {
        return fail(&e.to_string());
    }
    match crate::run::run(&cfg) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => return fail(&format!("serializing the report: {e}")),
                }
            } else {
                print!("{report}");
            }
            match report.outcome {
                Outcome::Ok | Outcome::Migrated | Outcome::NoGuest => EXIT_OK,
                Outcome::MigrationFailed => fail(
                    report
                        .migration_error
                        .as_deref()
                        .unwrap_or("the migration failed"),
                ),
                Outcome::IntegrityErrors => {
                    if let Some(e) = &report.first_error {
                        eprintln!(
                            "hugevisor: error: guest found {} integrity error(s); first on vCPU {} at GPA {:#x}: expected {:#x}, found {:#x}",
                            report.integrity_errors, e.vcpu, e.gpa, e.expected, e.found
                        );
                    }
                    EXIT_INTEGRITY
                }
                Outcome::GuestException => {
                    if let Some(x) = &report.exception {
                        eprintln!(
                            "hugevisor: error: guest exception on vCPU {}: {} (vector {}), error code {:#x}, CR2 {:#x}, RIP {:#x}",
                            x.vcpu, x.name, x.vector, x.error_code, x.cr2, x.rip
                        );
                    }
                    EXIT_GUEST_EXCEPTION
                }
            }
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn cmd_guest_image(args: &GuestImageArgs) -> i32 {
    let cmdline = format!("workload={} passes={}", args.workload, args.passes);
    let elf = match guest_image::image_with_default_cmdline(&cmdline) {
        Ok(e) => e,
        Err(e) => return fail(&e.to_string()),
    };
    if let Err(e) = std::fs::write(&args.out, &elf) {
        return fail(&format!("writing {}: {e}", args.out.display()));
    }
    eprintln!(
        "wrote {} ({} bytes): PVH ELF, default command line \"{cmdline}\"",
        args.out.display(),
        elf.len()
    );
    EXIT_OK
}

fn cmd_migrate(args: &MigrateArgs) -> i32 {
    // vm.send-migration's body (Cloud Hypervisor's names, hugevisor's extras), to the
    // endpoint that answers with the report.
    let mut body = serde_json::json!({
        "destination_url": args.to.to_string(),
        "mode": args.mode.name(),
        "downtime_ms": args.downtime_ms,
        "timeout_s": args.timeout_s,
        "push_order": args.push_order.name(),
        "connections": args.channels,
    });
    if let Some(migration::Verify::MemoryHash) = args.verify {
        body["verify"] = "memory-hash".into();
    }
    if args.resume {
        body["action"] = "resume".into();
    }
    match crate::api::call(&args.api_socket, "PUT", "/api/v1/vm.migrate", Some(&body)) {
        Ok((200, report)) => {
            if args.json {
                println!("{report}");
            } else {
                if report["budget_met"] == false {
                    eprintln!(
                        "hugevisor: warning: the downtime ({:.1} ms) exceeded its budget of {} ms (rounds ended: {}, {:.1} ms expected)",
                        report["downtime_ms"].as_f64().unwrap_or(0.0),
                        report["downtime_budget_ms"],
                        report["converged_by"].as_str().unwrap_or("?"),
                        report["expected_downtime_ms"].as_f64().unwrap_or(0.0),
                    );
                }
                println!(
                    "migrated ({}) to {}: {:.0} ms total, {:.1} ms downtime, {} bytes sent, {} pre-copy rounds (ended by {}, {}% throttle); dirty {} fetched {} times in {:.2} ms",
                    report["mode"].as_str().unwrap_or("?"),
                    report["to"].as_str().unwrap_or("?"),
                    report["total_ms"].as_f64().unwrap_or(0.0),
                    report["downtime_ms"].as_f64().unwrap_or(0.0),
                    report["bytes_sent"],
                    report["precopy_rounds"],
                    report["converged_by"].as_str().unwrap_or("?"),
                    report["throttle_percent"],
                    report["dirty_log"].as_str().unwrap_or("?"),
                    report["dirty_log_takes"],
                    report["dirty_log_ms"].as_f64().unwrap_or(0.0)
                );
            }
            EXIT_OK
        }
        Ok((status, body)) => fail(&format!(
            "migration failed (HTTP {status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        )),
        Err(e) => fail(&e.to_string()),
    }
}

pub fn fail(msg: &str) -> i32 {
    eprintln!("hugevisor: error: {msg}");
    EXIT_ERROR
}

/// Runs the CLI; returns the process exit status.
pub fn main(process_start_ns: u64) -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line: clap's first line names the problem; usage is one --help away.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            return fail(&format!(
                "{} (see --help)",
                first.trim_start_matches("error: ")
            ));
        }
        Err(e) => {
            let _ = e.print();
            return EXIT_OK;
        }
    };
    match &cli.command {
        Command::Run(a) => cmd_run(a, process_start_ns),
        Command::GuestImage(a) => cmd_guest_image(a),
        Command::Caps(a) => {
            let output = match a.json {
                true => crate::caps::Output::Json,
                false => crate::caps::Output::Text,
            };
            crate::caps::cmd_caps(output, &a.kvm_device)
        }
        Command::Migrate(a) => cmd_migrate(a),
        Command::AcpiTables(a) => cmd_acpi_tables(a),
        Command::Snapshot(a) => snapshot::cmd_snapshot(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["hugevisor", "run"].iter().chain(args).copied();
        match Cli::try_parse_from(argv)?.command {
            Command::Run(a) => Ok(*a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn numa_force_move_keeps_its_old_name_as_an_alias() {
        for flag in ["--numa-force-move", "--numa-force-migrate"] {
            let a = run_args(&[flag, "2ms"]).unwrap();
            assert_eq!(a.numa_force_move, Some(Duration::from_millis(2)), "{flag}");
        }
    }

    #[test]
    fn durations_that_do_not_fit_are_refused() {
        for d in ["99999999999h", "11y", "18446744073709551615s"] {
            let e = run_args(&["--duration", d]).unwrap_err().to_string();
            assert!(e.contains(d) || e.contains("not a duration"), "{d}: {e}");
        }
        let e = run_args(&["--timeout", "100y"]).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        assert!(run_args(&["--duration", "87600h"]).is_ok());
    }

    #[test]
    fn numa_balancing_is_on_or_off() {
        assert_eq!(run_args(&[]).unwrap().numa_balancing, Balancing::On);
        let off = run_args(&["--numa-balancing", "off"]).unwrap();
        assert_eq!(off.numa_balancing, Balancing::Off);
        let e = run_args(&["--numa-balancing", "maybe"]).unwrap_err();
        assert!(e.to_string().contains("choose on or off"), "{e}");
    }
}
