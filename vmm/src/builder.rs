//! Builds a VM for a run, in the order that leaves nothing half-built: the request is
//! checked first, then the host (KVM), then guest memory (guest-mm validates pools and
//! limits before it maps anything), then the VM and — when the guest boots here — its
//! vCPUs at the image's entry. A migration destination gets the same VM with no vCPUs:
//! they arrive with the guest's state. Everything is owned by the returned [`Vmm`], so
//! an error at any step drops what exists, in reverse order.

use std::sync::Arc;

use guest_image::{abi, GuestParams};
use guest_mm::numa::Topology;
use guest_mm::{
    CollapseConfig, FaultPathNeed, GuestMemory, GuestOrigin, MemoryConfig, NumaConfig, Recurring,
    SIZE_2M, SIZE_4K,
};

use crate::acpi;
use crate::api::{ApiCall, ApiServer};
use crate::boot::kernel::{self, KernelEntry, LoadedKernel};
use crate::boot::{self, params};
use crate::config::{Exposure, GuestSource, RunConfig, RunLimit};
use crate::error::{ConfigError, Error, Result};
use crate::mailbox::Mailbox;
use crate::placement;
use crate::vstate::cpuid::CpuTopology;
use crate::vstate::vcpu::{install_kick_handler, Vcpu};
use crate::vstate::vm::{open_kvm, Vm};

/// How the guest comes to run on this VM.
pub enum Start {
    /// Booted here: the vCPUs are built at the image's ring-3 entry, or the boot vCPU
    /// at a kernel's entry with the APs waiting for INIT/SIPI.
    Boot(Vec<Vcpu>),
    /// Received from a migration source on this listener (bound while the VM is built,
    /// so a source can connect as soon as the run starts); the vCPUs come with its state.
    Incoming(migration::Listener),
    /// Received once a `vm.receive-migration` call says where to listen.
    AwaitReceive,
    /// Restored from this snapshot (opened and checked against the guest's layout before
    /// anything was built); the vCPUs come with its state.
    Restore(
        Box<migration::snapshot::Snapshot>,
        migration::snapshot::RestoreMode,
    ),
}

/// A built VM, not running yet.
pub struct Vmm {
    pub memory: Arc<GuestMemory>,
    pub vm: Arc<Vm>,
    /// How the guest is entered (the report's `entry`).
    pub entry: &'static str,
    pub mailbox: Mailbox,
    pub topology: Option<Topology>,
    pub start: Start,
    /// The control API and the calls it receives, when `--api-socket` was given.
    pub api: Option<(ApiServer, std::sync::mpsc::Receiver<ApiCall>)>,
}

/// Checks what can be checked without touching the host, and says what guest memory is
/// asked to be (guest-mm checks its own combinations: collapse, NUMA, stress zaps).
fn check(cfg: &RunConfig) -> Result<(Option<Topology>, MemoryConfig)> {
    // Sizes and alignment first: what the user typed is the likeliest mistake.
    cfg.ram.check_shape()?;
    let vcpus = cfg.vcpus as usize;
    if vcpus == 0 || vcpus > abi::MAX_VCPUS {
        return Err(ConfigError::VcpusOutOfRange {
            vcpus,
            max: abi::MAX_VCPUS,
        }
        .into());
    }
    if !cfg.ram.size.is_multiple_of(SIZE_2M) {
        return Err(ConfigError::MemoryNotMultipleOf2M { size: cfg.ram.size }.into());
    }
    let data_pages = cfg.ram.size.saturating_sub(abi::DATA_START) / SIZE_4K;
    if data_pages < vcpus as u64 {
        return Err(ConfigError::TooFewDataPages {
            size: cfg.ram.size,
            pages: data_pages,
            vcpus,
        }
        .into());
    }
    let topology = match &cfg.numa {
        Some(spec) => Some(spec.resolve(cfg.vcpus, guest_mm::numa::host_nodes().len())?),
        None => None,
    };
    if let GuestSource::Incoming(uri @ migration::Uri::Tcp(_)) = &cfg.guest {
        if !cfg.migration_auth.is_some() && cfg.exposure == Exposure::AuthenticatedOnly {
            return Err(ConfigError::UnauthenticatedTcp {
                uri: uri.to_string(),
            }
            .into());
        }
    }
    let memory = memory_config(cfg, topology.as_ref());
    memory.check()?;
    Ok((topology, memory))
}

/// What guest memory is asked to be in this run: the RAM, and the fault path, collapse,
/// NUMA and stress options, with the workload's working sets and placement plan.
fn memory_config(cfg: &RunConfig, topology: Option<&Topology>) -> MemoryConfig {
    let vcpus = cfg.vcpus as usize;
    let mut ram = cfg.ram.clone();
    let numa = topology.map(|t| {
        ram.numa = t.layout;
        let sets = placement::working_sets(cfg.workload, ram.size, vcpus);
        let placement =
            placement::plan(cfg.workload, ram.size, &sets, &t.vcpu_nodes, t.layout.nodes);
        NumaConfig {
            balancing: cfg.numa_balancing,
            scan: cfg.numa_scan,
            vcpu_nodes: t.vcpu_nodes.clone(),
            working_sets: sets,
            placement,
            forced_moves: cfg.numa_force_move.map(|period| Recurring {
                period,
                seed: cfg.seed,
            }),
            note: t.note.clone(),
        }
    });
    MemoryConfig {
        ram,
        vcpus,
        origin: match cfg.guest {
            GuestSource::Incoming(_) | GuestSource::ApiReceive | GuestSource::Restore { .. } => {
                GuestOrigin::MigrationDestination
            }
            GuestSource::Boot => GuestOrigin::Booted,
        },
        fault_path: FaultPathNeed::Derived,
        collapse: CollapseConfig {
            mode: cfg.collapse,
            scan: cfg.collapse_scan,
        },
        numa,
        stress_zap: cfg.stress_zap.map(|period| Recurring {
            period,
            seed: cfg.seed,
        }),
    }
}

/// The guest's command line for the built-in image.
fn guest_params(cfg: &RunConfig, topology: Option<&Topology>) -> GuestParams {
    GuestParams {
        workload: cfg.workload,
        passes: match cfg.limit {
            RunLimit::Passes(p) => Some(p),
            RunLimit::Duration(_) | RunLimit::FromSource => None,
        },
        vcpus: cfg.vcpus,
        seed: cfg.seed,
        vcpu_nodes: topology.map(|t| t.vcpu_nodes.clone()).unwrap_or_default(),
    }
}

/// What the guest is.
enum Guest {
    /// The built-in image by the fast path (or, on a destination, arriving).
    Builtin(boot::LoadedImage),
    /// A `--kernel` file.
    Kernel(LoadedKernel),
}

/// Puts the guest into RAM (through the staging view) with everything the VMM writes
/// for it; a destination gets nothing (it all arrives with the guest's memory).
fn load_guest(
    cfg: &RunConfig,
    staging: &vm_memory::GuestMemoryMmap,
    size: u64,
    cpus: &CpuTopology,
    topology: Option<&Topology>,
) -> Result<Guest> {
    let Some(k) = cfg.kernel.as_ref().filter(|_| !cfg.guest.is_migration()) else {
        return Ok(Guest::Builtin(match cfg.guest {
            // The image (and everything else) arrives with the guest's memory.
            GuestSource::Incoming(_) | GuestSource::ApiReceive | GuestSource::Restore { .. } => {
                boot::LoadedImage {
                    info: guest_image::image_info(guest_image::IMAGE)?,
                }
            }
            GuestSource::Boot => {
                let image = boot::load_image(staging, guest_image::IMAGE, size)?;
                let cmdline = guest_params(cfg, topology).cmdline();
                boot::write_boot_tables(staging, &image, size, cfg.vcpus as usize, &cmdline)?;
                image
            }
        }));
    };
    let loaded = kernel::load(staging, size, k)?;
    // The corruption test is checked by the built-in image's verify workload.
    if loaded.builtin.is_none() && cfg.corruption != crate::config::CorruptionTest::None {
        return Err(ConfigError::CorruptionNeedsMailbox.into());
    }
    // The built-in image booted through PVH gets the run's parameters, as on the fast path.
    let cmdline = match (&k.cmdline, loaded.builtin) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => guest_params(cfg, topology).cmdline(),
        (None, None) => String::new(),
    };
    kernel::check_cmdline(&cmdline, loaded.cmdline_max)?;
    let tables = acpi::build(cpus, size, acpi::NumaTables::for_run(cfg.numa.as_ref()));
    tables.write(staging)?;
    params::write_gdt(staging)?;
    match (loaded.entry, loaded.setup) {
        (KernelEntry::Linux64 { .. }, Some(setup)) => params::write_zero_page(
            staging,
            size,
            setup,
            &cmdline,
            loaded.initramfs,
            tables.rsdp(),
        )?,
        _ => params::write_start_info(staging, size, &cmdline, loaded.initramfs, tables.rsdp())?,
    }
    Ok(Guest::Kernel(loaded))
}

/// Builds the VM `cfg` asks for.
pub fn build(cfg: &RunConfig) -> Result<Vmm> {
    let (topology, memory_cfg) = check(cfg)?;
    // A snapshot that cannot be restored into this guest is refused before the host is touched.
    let snapshot = match &cfg.guest {
        GuestSource::Restore { dir, mode } => {
            Some((crate::snapshot::open(dir, *mode, cfg)?, *mode))
        }
        _ => None,
    };
    // Host capabilities first, so a missing KVM leaves nothing behind.
    let kvm = open_kvm(&cfg.kvm_device)?;
    install_kick_handler()?;

    let memory = GuestMemory::create(&memory_cfg)?;
    let staging = memory.staging();
    let cpus = CpuTopology {
        vcpus: cfg.vcpus,
        vcpu_nodes: topology
            .as_ref()
            .map(|t| t.vcpu_nodes.clone())
            .unwrap_or_default(),
    };
    let guest = load_guest(cfg, staging, memory.size(), &cpus, topology.as_ref())?;
    let vm = Arc::new(Vm::new(&kvm, cfg.dirty_log, cpus)?);
    vm.register_ram(memory.memslot())?;
    let api = match &cfg.api_socket {
        Some(p) => Some(ApiServer::start(p)?),
        None => None,
    };
    let start = match (&cfg.guest, &guest) {
        (GuestSource::Restore { .. }, _) => match snapshot {
            Some((snap, mode)) => Start::Restore(Box::new(snap), mode),
            None => Start::AwaitReceive,
        },
        (GuestSource::Incoming(uri), _) => {
            let listener = migration::Listener::bind(uri).map_err(Error::Listen)?;
            if matches!(uri, migration::Uri::Tcp(_)) && !cfg.migration_auth.is_some() {
                eprintln!("hugevisor: warning: --insecure: {uri} takes migrations without authentication; anyone who reaches it can hand this VM a guest");
            }
            Start::Incoming(listener)
        }
        (GuestSource::ApiReceive, _) => Start::AwaitReceive,
        (GuestSource::Boot, Guest::Builtin(image)) => Start::Boot(
            (0..cfg.vcpus as usize)
                .map(|i| Vcpu::new(&vm, i, image))
                .collect::<Result<_>>()?,
        ),
        (GuestSource::Boot, Guest::Kernel(k)) => Start::Boot(
            (0..cfg.vcpus as usize)
                .map(|i| Vcpu::boot(&vm, i, (i == 0).then_some(k.entry)))
                .collect::<Result<_>>()?,
        ),
    };
    let (entry, mailbox) = match &guest {
        Guest::Builtin(image) if matches!(cfg.guest, GuestSource::Restore { .. }) => {
            ("snapshot restore", Mailbox::new(image.info.mailbox))
        }
        Guest::Builtin(image) if cfg.guest.is_migration() => {
            ("incoming migration", Mailbox::new(image.info.mailbox))
        }
        Guest::Builtin(image) => ("ring-3 fast path", Mailbox::new(image.info.mailbox)),
        Guest::Kernel(k) => (
            k.used.name(),
            k.builtin
                .map_or_else(Mailbox::none, |i| Mailbox::new(i.mailbox)),
        ),
    };
    Ok(Vmm {
        memory,
        vm,
        entry,
        mailbox,
        topology,
        start,
        api,
    })
}
