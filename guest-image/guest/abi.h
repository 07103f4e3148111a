/*
 * The contract between the hugevisor guest image and the VMMs that run it.
 *
 * Mirrored in Rust by guest-image/src/abi.rs; the Rust side asserts the
 * sizes and offsets at compile time, and build.rs checks the image header.
 * Every address here is a guest-physical address (the guest runs identity mapped).
 */
#ifndef HV_ABI_H
#define HV_ABI_H

#define HV_IMAGE_MAGIC      0x3154534555475648ULL /* "HVGUEST1" */
#define HV_MAILBOX_MAGIC    0x31584f424d564856ULL /* "HVMBOX1" + '1' */
#define HV_ABI_VERSION      1

#define HV_IMAGE_BASE       0x100000   /* 1 MiB: where the ELF is linked */
#define HV_DATA_START       0x400000   /* 4 MiB: first byte the workloads use */
#define HV_MAX_VCPUS        64
#define HV_MAX_RAM_GIB      64         /* page-table area sized for this */

#define HV_KSTACK_SIZE      0x2000     /* ring-0 (exception) stack per vCPU */
#define HV_USTACK_SIZE      0x4000     /* ring-3 stack per vCPU */
#define HV_CMDLINE_MAX      256
/* PVH path: the real-mode AP trampoline is copied here (SIPI vector 0x70). Below
 * 1 MiB, clear of hugevisor's start_info/tables (0x6000-0xffff) and of QEMU's. */
#define HV_AP_TRAMPOLINE    0x70000

/* GDT selectors. The user selectors match what KVM needs for a CPL3 start. */
#define HV_SEL_KCODE        0x08
#define HV_SEL_KDATA        0x10
#define HV_SEL_UCODE        0x1b       /* index 3, RPL 3 */
#define HV_SEL_UDATA        0x23       /* index 4, RPL 3 */
#define HV_SEL_TSS0         0x28       /* index 5; vCPU i uses 0x28 + 16 * i */
#define HV_GDT_ENTRIES      (5 + 2 * HV_MAX_VCPUS)
#define HV_TSS_STRIDE       128

/* I/O ports. */
#define HV_PORT_SERIAL      0x3f8      /* 16550 THR: the guest console */
#define HV_PORT_EXIT        0xf4       /* a vCPU is finished; value = HV_EXIT_* */

#define HV_EXIT_OK          0x00
#define HV_EXIT_INTEGRITY   0x01
#define HV_EXIT_EXCEPTION   0x02
#define HV_EXIT_BAD_PARAMS  0x03

/* vCPU slot states. */
#define HV_STATE_IDLE       0
#define HV_STATE_RUNNING    1
#define HV_STATE_DONE       2
#define HV_STATE_FAILED     3          /* integrity errors were found */
#define HV_STATE_EXCEPTION  4
#define HV_STATE_BAD_PARAMS 5

#ifndef __ASSEMBLER__
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

/* At HV_IMAGE_BASE, first bytes of the loaded image. Read by the VMM fast path. */
struct hv_image_info {
    u64 magic;
    u32 abi_version;
    u32 max_vcpus;
    u64 user_entry;        /* 64-bit ring-3 entry: rdi = vCPU index, rsi = start_info */
    u64 pvh_entry;         /* 32-bit PVH entry (also in the Xen ELF note) */
    u64 trap_handlers;     /* u64[32]: ring-0 handler of each exception vector */
    u64 gdt;               /* HV_GDT_ENTRIES * 8 bytes */
    u64 idt;               /* 256 * 16 bytes */
    u64 tss;               /* HV_MAX_VCPUS * HV_TSS_STRIDE bytes */
    u64 kernel_stacks;     /* HV_MAX_VCPUS * HV_KSTACK_SIZE, HV_KSTACK_SIZE aligned */
    u64 user_stacks;       /* HV_MAX_VCPUS * HV_USTACK_SIZE */
    u64 page_tables;       /* PML4, PDPT, then HV_MAX_RAM_GIB page directories */
    u64 mailbox;           /* struct hv_mailbox */
    u64 data_start;        /* HV_DATA_START */
    u64 image_end;
    char default_cmdline[HV_CMDLINE_MAX]; /* used when the loader gives no command line */
};

struct hv_vcpu_slot {
    u64 state;
    u64 entry_tsc;         /* TSC at this vCPU's first ring-3 instruction */
    u64 passes;
    u64 pages_touched;     /* distinct pages of the partition written at least once */
    u64 bytes;             /* bytes read + written by the workload */
    u64 last_pass_cycles;
    u64 max_pass_cycles;
    u64 start_tsc;         /* workload start (after parameter parsing) */
    u64 end_tsc;           /* last completed pass */
    u64 integrity_errors;
    u64 err_gpa;           /* first integrity error */
    u64 err_expected;
    u64 err_found;
    u64 exc_vector;        /* guest exception, when state == HV_STATE_EXCEPTION */
    u64 exc_error_code;
    u64 exc_cr2;
    u64 exc_rip;
    u64 part_start;        /* the vCPU's partition [start, end) */
    u64 part_end;
    u64 node;              /* the vCPU's guest NUMA node (from the command line) */
    u64 pad[12];
};

struct hv_mailbox_header {
    u64 magic;
    u64 version;
    u64 stop;              /* written by the VMM: finish the current pass and exit */
    u64 nr_vcpus;          /* written by the guest's vCPU 0 after parsing */
    u64 pad[28];
};

struct hv_mailbox {
    struct hv_mailbox_header hdr;
    struct hv_vcpu_slot vcpu[HV_MAX_VCPUS];
};
#endif
#endif
