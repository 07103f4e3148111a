//! Rust mirror of `guest/abi.h`: the contract between the guest image and the VMM.
//!
//! Sizes and field offsets are asserted at compile time; `tests::header_matches_abi`
//! checks the built image's header against these constants.

/// "HVGUEST1"
pub const IMAGE_MAGIC: u64 = 0x3154_5345_5547_5648;
/// "HVMBOX11"
pub const MAILBOX_MAGIC: u64 = 0x3158_4f42_4d56_4856;
pub const ABI_VERSION: u32 = 1;

/// Guest-physical address the image is linked at (1 MiB).
pub const IMAGE_BASE: u64 = 0x10_0000;
/// First guest-physical byte the workloads use (4 MiB); below it: image and tables.
pub const DATA_START: u64 = 0x40_0000;
pub const MAX_VCPUS: usize = 64;
/// The page-table area in the image has room for this much identity-mapped RAM.
pub const MAX_RAM_GIB: u64 = 64;

pub const KSTACK_SIZE: u64 = 0x2000;
pub const USTACK_SIZE: u64 = 0x4000;
pub const CMDLINE_MAX: usize = 256;

pub const SEL_KCODE: u16 = 0x08;
pub const SEL_KDATA: u16 = 0x10;
pub const SEL_UCODE: u16 = 0x1b;
pub const SEL_UDATA: u16 = 0x23;
pub const SEL_TSS0: u16 = 0x28;
pub const GDT_ENTRIES: usize = 5 + 2 * MAX_VCPUS;
pub const TSS_STRIDE: u64 = 128;

pub const PORT_SERIAL: u16 = 0x3f8;
pub const PORT_EXIT: u16 = 0xf4;

/// Values a vCPU writes to [`PORT_EXIT`] when it is finished.
pub const EXIT_OK: u8 = 0;
pub const EXIT_INTEGRITY: u8 = 1;
pub const EXIT_EXCEPTION: u8 = 2;
pub const EXIT_BAD_PARAMS: u8 = 3;

/// Values of [`VcpuSlot::state`].
pub const STATE_IDLE: u64 = 0;
pub const STATE_RUNNING: u64 = 1;
pub const STATE_DONE: u64 = 2;
pub const STATE_FAILED: u64 = 3;
pub const STATE_EXCEPTION: u64 = 4;
pub const STATE_BAD_PARAMS: u64 = 5;

/// `struct hv_image_info`, at [`IMAGE_BASE`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ImageInfo {
    pub magic: u64,
    pub abi_version: u32,
    pub max_vcpus: u32,
    pub user_entry: u64,
    pub pvh_entry: u64,
    pub trap_handlers: u64,
    pub gdt: u64,
    pub idt: u64,
    pub tss: u64,
    pub kernel_stacks: u64,
    pub user_stacks: u64,
    pub page_tables: u64,
    pub mailbox: u64,
    pub data_start: u64,
    pub image_end: u64,
    pub default_cmdline: [u8; CMDLINE_MAX],
}

/// `struct hv_vcpu_slot`: one vCPU's counters, written by the guest, read by the VMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuSlot {
    pub state: u64,
    pub entry_tsc: u64,
    pub passes: u64,
    pub pages_touched: u64,
    pub bytes: u64,
    pub last_pass_cycles: u64,
    pub max_pass_cycles: u64,
    pub start_tsc: u64,
    pub end_tsc: u64,
    pub integrity_errors: u64,
    pub err_gpa: u64,
    pub err_expected: u64,
    pub err_found: u64,
    pub exc_vector: u64,
    pub exc_error_code: u64,
    pub exc_cr2: u64,
    pub exc_rip: u64,
    pub part_start: u64,
    pub part_end: u64,
    /// The vCPU's guest NUMA node.
    pub node: u64,
    pub pad: [u64; 12],
}

/// `struct hv_mailbox_header`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MailboxHeader {
    pub magic: u64,
    pub version: u64,
    pub stop: u64,
    pub nr_vcpus: u64,
    pub pad: [u64; 28],
}

pub const MAILBOX_HEADER_SIZE: u64 = std::mem::size_of::<MailboxHeader>() as u64;
pub const VCPU_SLOT_SIZE: u64 = std::mem::size_of::<VcpuSlot>() as u64;
/// Offset of `hdr.stop` in the mailbox.
pub const MAILBOX_STOP_OFFSET: u64 = std::mem::offset_of!(MailboxHeader, stop) as u64;

/// Guest-physical address of vCPU `index`'s slot, given the mailbox address.
pub fn vcpu_slot_gpa(mailbox: u64, index: usize) -> u64 {
    mailbox + MAILBOX_HEADER_SIZE + index as u64 * VCPU_SLOT_SIZE
}

const _: () = assert!(std::mem::size_of::<ImageInfo>() == 14 * 8 + CMDLINE_MAX);
const _: () = assert!(std::mem::size_of::<VcpuSlot>() == 256);
const _: () = assert!(std::mem::size_of::<MailboxHeader>() == 256);
const _: () = assert!(std::mem::offset_of!(VcpuSlot, part_end) == 18 * 8);
const _: () = assert!(MAILBOX_HEADER_SIZE + MAX_VCPUS as u64 * VCPU_SLOT_SIZE <= 0x5000);
