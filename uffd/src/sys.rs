//! Kernel ABI of userfaultfd (linux/userfaultfd.h), written by hand so the build needs no
//! bindgen/libclang. Struct layouts and ioctl numbers are checked at compile time against
//! the values the kernel header produces.

#![allow(non_camel_case_types)]

pub const UFFD_API: u64 = 0xaa;
const UFFDIO: u64 = 0xaa;

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const fn iowr(nr: u64, size: usize) -> u64 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}
const fn ior(nr: u64, size: usize) -> u64 {
    ioc(IOC_READ, nr, size)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_copy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_zeropage {
    pub range: uffdio_range,
    pub mode: u64,
    pub zeropage: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_continue {
    pub range: uffdio_range,
    pub mode: u64,
    pub mapped: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_poison {
    pub range: uffdio_range,
    pub mode: u64,
    pub updated: i64,
}

/// `struct uffd_msg`: an 8-byte header then a 24-byte union; we read the union as words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffd_msg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

pub const UFFDIO_API: u64 = iowr(0x3f, std::mem::size_of::<uffdio_api>());
pub const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<uffdio_register>());
pub const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<uffdio_range>());
pub const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<uffdio_range>());
pub const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<uffdio_copy>());
pub const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<uffdio_zeropage>());
pub const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<uffdio_writeprotect>());
pub const UFFDIO_CONTINUE: u64 = iowr(0x07, std::mem::size_of::<uffdio_continue>());
pub const UFFDIO_POISON: u64 = iowr(0x08, std::mem::size_of::<uffdio_poison>());
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd.
pub const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0x00, 0);

// The values linux/userfaultfd.h produces on x86_64 (_IOWR/_IOR with these sizes).
const _: () = assert!(std::mem::size_of::<uffd_msg>() == 32);
const _: () = assert!(std::mem::size_of::<uffdio_api>() == 24);
const _: () = assert!(std::mem::size_of::<uffdio_register>() == 32);
const _: () = assert!(std::mem::size_of::<uffdio_copy>() == 40);
const _: () = assert!(std::mem::size_of::<uffdio_continue>() == 32);
const _: () = assert!(std::mem::offset_of!(uffdio_continue, mapped) == 24);
const _: () = assert!(std::mem::size_of::<uffdio_range>() == 16);
const _: () = assert!(std::mem::size_of::<uffdio_zeropage>() == 32);
const _: () = assert!(std::mem::size_of::<uffdio_writeprotect>() == 24);
const _: () = assert!(std::mem::size_of::<uffdio_poison>() == 32);
const _: () = assert!(std::mem::offset_of!(uffdio_register, mode) == 16);
const _: () = assert!(std::mem::offset_of!(uffdio_register, ioctls) == 24);
const _: () = assert!(std::mem::offset_of!(uffdio_copy, copy) == 32);
const _: () = assert!(std::mem::offset_of!(uffdio_zeropage, zeropage) == 24);
const _: () = assert!(std::mem::offset_of!(uffdio_writeprotect, mode) == 16);
const _: () = assert!(std::mem::offset_of!(uffdio_poison, updated) == 24);
const _: () = assert!(std::mem::offset_of!(uffd_msg, arg) == 8);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(UFFDIO_CONTINUE == 0xc020_aa07);
const _: () = assert!(UFFDIO_POISON == 0xc020_aa08);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
