//! Entering the guest.
//!
//! - [`fast`]: hugevisor's fast path into the built-in image (tables written by the
//!   VMM, every vCPU started in ring 3);
//! - [`kernel`]: `--kernel FILE`, a guest hugevisor did not build: a PVH ELF through its
//!   32-bit entry, a bzImage through the Linux 64-bit boot protocol, or a bzImage's
//!   inner vmlinux through PVH ([`vmlinux`] unpacks it); [`layout`] is where the VMM
//!   puts what it writes for such a guest, [`params`] writes it (PVH start_info, the
//!   Linux zero page, the identity map the 64-bit entry needs), [`entry`] the boot
//!   vCPU's registers. ACPI tables are `crate::acpi`.

pub mod entry;
pub mod fast;
pub mod kernel;
pub mod layout;
pub mod params;
pub mod vmlinux;

pub use fast::*;
