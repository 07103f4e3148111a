//! The KVM VM: opening KVM, the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, the
//! port-I/O devices, the RAM memslot, each vCPU's CPUID.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guest_mm::Memslot;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};

use crate::devices::Devices;
use crate::error::{kvm, ConfigError, Error, Result};
use crate::vstate::cpuid::{self, CpuTopology};
use crate::vstate::dirty_ring::{self, DirtyRing};

pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Checks that the KVM device can be opened, before anything else is created.
pub fn open_kvm(path: &Path) -> Result<Kvm> {
    if !path.exists() {
        return Err(Error::KvmMissing(path.to_path_buf()));
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| ConfigError::NulInPath(path.to_path_buf()))?;
    let kvm = Kvm::new_with_path(&c).map_err(|e| match e.errno() {
        libc::EACCES | libc::EPERM => Error::KvmPermission(path.to_path_buf()),
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing(path.to_path_buf()),
        _ => Error::KvmOpen {
            path: PathBuf::from(path),
            source: std::io::Error::from_raw_os_error(e.errno()),
        },
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(Error::KvmApiVersion(v));
    }
    Ok(kvm)
}

/// Whether KVM logs guest writes to RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogging {
    On,
    Off,
}

/// How KVM reports the pages the guest wrote (`--dirty-log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyLogMethod {
    /// `KVM_GET_DIRTY_LOG`: a bitmap per memslot, fetched and cleared in one ioctl.
    #[default]
    Bitmap,
    /// The dirty ring: each vCPU pushes written frames into its own ring of `entries`
    /// (16 bytes each), which the VMM harvests.
    Ring { entries: u32 },
}

impl DirtyLogMethod {
    /// The name reports use: "bitmap" or "ring".
    pub fn name(&self) -> &'static str {
        match self {
            DirtyLogMethod::Bitmap => "bitmap",
            DirtyLogMethod::Ring { .. } => "ring",
        }
    }
}

impl std::fmt::Display for DirtyLogMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirtyLogMethod::Bitmap => write!(f, "bitmap"),
            DirtyLogMethod::Ring { entries } => write!(f, "ring={entries}"),
        }
    }
}

/// Why a `--dirty-log` value was refused.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogParseError {
    #[error("{0:?}: ring=ENTRIES takes a number of entries, e.g. ring=4096")]
    NotANumber(String),
    #[error("{0:?}: choose bitmap, ring or ring=ENTRIES (a power of two, 256..=65536)")]
    Unknown(String),
    #[error(transparent)]
    Entries(#[from] ConfigError),
}

impl std::str::FromStr for DirtyLogMethod {
    type Err = DirtyLogParseError;

    /// `bitmap`, `ring` (65536 entries per vCPU) or `ring=ENTRIES`.
    fn from_str(s: &str) -> std::result::Result<Self, DirtyLogParseError> {
        match s.split_once('=') {
            None if s == "bitmap" => Ok(DirtyLogMethod::Bitmap),
            None if s == "ring" => Ok(DirtyLogMethod::Ring {
                entries: dirty_ring::DEFAULT_ENTRIES,
            }),
            Some(("ring", n)) => {
                let entries: u32 = n
                    .trim()
                    .parse()
                    .map_err(|_| DirtyLogParseError::NotANumber(s.to_string()))?;
                dirty_ring::check_entries(entries)?;
                Ok(DirtyLogMethod::Ring { entries })
            }
            _ => Err(DirtyLogParseError::Unknown(s.to_string())),
        }
    }
}

/// Time the VMM spent fetching dirty logs (harvest + reset, or `KVM_GET_DIRTY_LOG`).
#[derive(Debug, Default)]
struct DirtyLogCost {
    takes: AtomicU64,
    ns: AtomicU64,
}

pub struct Vm {
    fd: VmFd,
    /// What KVM_GET_SUPPORTED_CPUID offers; each vCPU gets it with its topology.
    cpuid: CpuId,
    topology: CpuTopology,
    /// The MSRs KVM lists as saveable (KVM_GET_MSR_INDEX_LIST), for a migration.
    msr_indices: Vec<u32>,
    devices: Arc<Devices>,
    dirty_log: DirtyLogMethod,
    dirty_ring: Option<Arc<DirtyRing>>,
    cost: DirtyLogCost,
}

impl Vm {
    /// Creates the VM with its in-kernel irqchip and PIT and its port-I/O devices; with
    /// [`DirtyLogMethod::Ring`] the ring is enabled here, before any vCPU exists (KVM
    /// refuses it afterwards), as is the irqchip.
    pub fn new(kvm_sys: &Kvm, dirty_log: DirtyLogMethod, topology: CpuTopology) -> Result<Vm> {
        let fd = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        let cpuid = kvm_sys
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_indices = kvm_sys
            .get_msr_index_list()
            .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let dirty_ring = match dirty_log {
            DirtyLogMethod::Bitmap => None,
            DirtyLogMethod::Ring { entries } => Some(Arc::new(DirtyRing::enable(&fd, entries)?)),
        };
        fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        // The PIT's speaker port (0x61) is KVM's too, so a guest calibrating its TSC
        // against PIT channel 2 needs no exit.
        fd.create_pit2(kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm("KVM_CREATE_PIT2"))?;
        let devices = Arc::new(Devices::new(&fd)?);
        Ok(Vm {
            fd,
            cpuid,
            topology,
            msr_indices,
            devices,
            dirty_log,
            dirty_ring,
            cost: DirtyLogCost::default(),
        })
    }

    pub fn dirty_log_method(&self) -> DirtyLogMethod {
        self.dirty_log
    }

    /// The VM's dirty ring, when `--dirty-log ring` is in use; vCPUs attach to it.
    pub fn dirty_ring(&self) -> Option<&Arc<DirtyRing>> {
        self.dirty_ring.as_ref()
    }

    /// Dirty-log fetches so far and the milliseconds they took in all.
    pub fn dirty_log_cost(&self) -> (u64, f64) {
        (
            self.cost.takes.load(Ordering::Relaxed),
            self.cost.ns.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }

    /// Slot 0 maps guest RAM (guest-mm's memslot: its guest view).
    pub fn register_ram(&self, slot: Memslot) -> Result<()> {
        self.set_slot(slot, DirtyLogging::Off)
    }

    /// Starts or stops KVM dirty logging on the RAM slot (for pre-copy).
    pub fn set_dirty_logging(&self, slot: Memslot, logging: DirtyLogging) -> Result<()> {
        self.set_slot(slot, logging)
    }

    /// The pages of slot 0 written since the last call (one bit per 4 KiB), and clears it.
    /// With the dirty ring this harvests every vCPU's ring (KVM_GET_DIRTY_LOG fails with
    /// ENXIO once the ring is on); pages in the result have been re-armed, so a write after
    /// the caller reads them is logged again.
    pub fn take_dirty_log(&self, slot: Memslot) -> Result<Vec<u64>> {
        let t = guest_image::clock::monotonic_ns();
        let log = match &self.dirty_ring {
            Some(ring) => ring.take(slot.size),
            None => self
                .fd
                .get_dirty_log(0, slot.size as usize)
                .map_err(kvm("KVM_GET_DIRTY_LOG")),
        };
        self.cost.takes.fetch_add(1, Ordering::Relaxed);
        self.cost.ns.fetch_add(
            guest_image::clock::monotonic_ns().saturating_sub(t),
            Ordering::Relaxed,
        );
        log
    }

    fn set_slot(&self, slot: Memslot, logging: DirtyLogging) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: match logging {
                DirtyLogging::On => kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
                DirtyLogging::Off => 0,
            },
            guest_phys_addr: slot.guest_phys_addr.raw(),
            memory_size: slot.size,
            userspace_addr: slot.userspace_addr,
        };
        // SAFETY: the memslot is guest-mm's guest view, a live mapping of exactly
        // `slot.size` bytes owned by the GuestMemory it came from, which the caller keeps
        // alive for as long as the VM (and so the slot) exists.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// What KVM_GET_SUPPORTED_CPUID offered this VM.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// vCPU `index`'s CPUID: the supported one with its topology leaves.
    pub fn vcpu_cpuid(&self, index: usize) -> CpuId {
        cpuid::vcpu_cpuid(&self.cpuid, index, &self.topology)
    }

    pub fn topology(&self) -> &CpuTopology {
        &self.topology
    }

    /// The MSRs KVM can save and restore.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }
}
