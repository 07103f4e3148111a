/* Helpers shared by the ring-0 (kernel.c) and ring-3 (workloads.c) halves. */
#ifndef HV_H
#define HV_H
#include "abi.h"

#define NULL ((void *)0)

/* PVH start_info (Xen public/arch-x86/hvm/start_info.h), version 1. */
struct hvm_start_info {
    u32 magic;             /* 0x336ec578 */
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};
struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;              /* 1 = RAM */
    u32 reserved;
};
#define HVM_START_MAGIC 0x336ec578

extern struct hv_image_info hv_image_info;
extern char hv_default_cmdline[];
extern struct hv_mailbox mailbox;
extern volatile u64 hv_boot_cpus;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause"); }

/* Volatile accessors: the mailbox is read and written by the VMM concurrently. */
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))

void serial_puts(const char *s);
void serial_put_hex(u64 v);
void serial_put_dec(u64 v);

/* Highest RAM address + 1 from a PVH memory map (0 if none). */
u64 pvh_ram_end(const struct hvm_start_info *si);

void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
#endif
