//! The KVM VM: opening KVM, the RAM memslot, creating vCPUs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use guest_mm::GuestRam;
use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};

use crate::error::{kvm, Error, Result};

pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Checks that the KVM device can be opened, before anything else is created.
pub fn open_kvm(path: &Path) -> Result<Kvm> {
    if !path.exists() {
        return Err(Error::KvmMissing(path.to_path_buf()));
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Config(format!("KVM device path {} contains NUL", path.display())))?;
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

pub struct Vm {
    fd: VmFd,
    cpuid: CpuId,
}

impl Vm {
    pub fn new(kvm_sys: &Kvm) -> Result<Vm> {
        let fd = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        let cpuid = kvm_sys
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Vm { fd, cpuid })
    }

    /// Slot 0 maps guest-physical [0, size) to the guest view of `ram`.
    pub fn register_ram(&self, ram: &GuestRam) -> Result<()> {
        self.set_slot(ram, DirtyLogging::Off)
    }

    /// Starts or stops KVM dirty logging on the RAM slot (for pre-copy).
    pub fn set_dirty_logging(&self, ram: &GuestRam, logging: DirtyLogging) -> Result<()> {
        self.set_slot(ram, logging)
    }

    /// The pages of slot 0 written since the last call (one bit per 4 KiB), and clears it.
    pub fn take_dirty_log(&self, ram: &GuestRam) -> Result<Vec<u64>> {
        self.fd
            .get_dirty_log(0, ram.size() as usize)
            .map_err(kvm("KVM_GET_DIRTY_LOG"))
    }

    fn set_slot(&self, ram: &GuestRam, logging: DirtyLogging) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: match logging {
                DirtyLogging::On => kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
                DirtyLogging::Off => 0,
            },
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.guest_view_addr() as u64,
        };
        // SAFETY: the guest view is a live mapping of exactly `ram.size()` bytes owned by
        // `ram`, which the caller keeps alive for as long as the VM (and so the slot) exists.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn cpuid(&self) -> &CpuId {
        &self.cpuid
    }
}
