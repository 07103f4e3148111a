/*
 * Ring-0 half of the guest: PVH boot set-up and the exception path.
 *
 * Under kvm_pvm every ring-0 instruction is emulated (~1.3 us each), so this file
 * only runs at boot (PVH path) and when an exception is taken.
 */
#include "hv.h"

struct trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error_code;
    u64 rip, cs, rflags, rsp, ss;
};

extern u64 trap_handlers[32];
extern u64 gdt[];
extern u8 idt[];
extern u8 tss_area[];
extern u8 kernel_stacks[];
extern u8 user_stacks[];
extern u64 page_tables[];

static const char *const vector_names[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow",
    "#BR bound range", "#UD invalid opcode", "#NM device not available",
    "#DF double fault", "coprocessor overrun", "#TS invalid TSS", "#NP segment not present",
    "#SS stack fault", "#GP general protection", "#PF page fault", "reserved 15",
    "#MF x87 error", "#AC alignment check", "#MC machine check", "#XM SIMD error",
    "#VE virtualization", "#CP control protection", "reserved 22", "reserved 23",
    "reserved 24", "reserved 25", "reserved 26", "reserved 27",
    "#HV hypervisor injection", "#VC VMM communication", "#SX security", "reserved 31",
};

/* The vCPU index is stored in the top 16 bytes of each vCPU's ring-0 stack. */
static u64 current_vcpu(void)
{
    u64 rsp;
    __asm__ volatile("mov %%rsp, %0" : "=r"(rsp));
    u64 top = (rsp | (HV_KSTACK_SIZE - 1)) + 1;
    return *(u64 *)(top - 16);
}

static inline u64 read_cr2(void)
{
    u64 v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void __attribute__((noreturn)) halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/*
 * A guest that enters ring 3 through its own iretq gets #GP on ring-3 port I/O under
 * kvm_pvm even with IOPL=3 (host-facts.md). Emulate the few privileged instructions
 * the ring-3 code uses: out/in on al, and hlt. Returns 1 if handled.
 */
static int emulate_user_gp(struct trap_frame *f)
{
    const u8 *ip = (const u8 *)f->rip;
    switch (ip[0]) {
    case 0xee: /* out dx, al */
        outb((u16)f->rdx, (u8)f->rax);
        f->rip += 1;
        return 1;
    case 0xe6: /* out imm8, al */
        outb(ip[1], (u8)f->rax);
        f->rip += 2;
        return 1;
    case 0xec: /* in al, dx */
        f->rax = (f->rax & ~0xffULL) | inb((u16)f->rdx);
        f->rip += 1;
        return 1;
    case 0xf4: /* hlt: the vCPU is finished */
        halt_forever();
    }
    return 0;
}

void kernel_trap(struct trap_frame *f)
{
    if (f->vector == 13 && (f->cs & 3) == 3 && emulate_user_gp(f))
        return;

    u64 cpu = current_vcpu();
    u64 cr2 = f->vector == 14 ? read_cr2() : 0;
    if (cpu < HV_MAX_VCPUS) {
        struct hv_vcpu_slot *s = &mailbox.vcpu[cpu];
        WRITE_ONCE(s->exc_vector, f->vector);
        WRITE_ONCE(s->exc_error_code, f->error_code);
        WRITE_ONCE(s->exc_cr2, cr2);
        WRITE_ONCE(s->exc_rip, f->rip);
        WRITE_ONCE(s->state, HV_STATE_EXCEPTION);
    }
    serial_puts("hvguest: vcpu ");
    serial_put_dec(cpu);
    serial_puts(": exception ");
    serial_puts(vector_names[f->vector & 31]);
    serial_puts(" (vector ");
    serial_put_dec(f->vector);
    serial_puts(") error_code=");
    serial_put_hex(f->error_code);
    serial_puts(" cr2=");
    serial_put_hex(cr2);
    serial_puts(" rip=");
    serial_put_hex(f->rip);
    serial_puts(f->cs & 3 ? " (ring 3)\n" : " (ring 0)\n");
    outb(HV_PORT_EXIT, HV_EXIT_EXCEPTION);
    halt_forever();
}

static void set_idt_gate(int vec, u64 handler)
{
    u64 *g = (u64 *)(idt + vec * 16);
    g[0] = (handler & 0xffff) | ((u64)HV_SEL_KCODE << 16) | (0x8eULL << 40) |
           ((handler >> 16 & 0xffff) << 48);
    g[1] = handler >> 32;
}

static void set_tss(u64 cpu)
{
    u8 *tss = tss_area + cpu * HV_TSS_STRIDE;
    u64 kstack_top = (u64)kernel_stacks + (cpu + 1) * HV_KSTACK_SIZE;
    *(u64 *)(kstack_top - 16) = cpu;
    *(u64 *)(tss + 4) = kstack_top - 16; /* rsp0 */
    *(u16 *)(tss + 102) = 104;           /* no I/O bitmap */
    u64 base = (u64)tss, limit = 103;
    u64 *d = &gdt[5 + 2 * cpu];
    d[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
           ((limit >> 16 & 0xf) << 48) | ((base >> 24 & 0xff) << 56);
    d[1] = base >> 32;
}

/* ---- PVH path: the APs ---- */

/* Shared with boot.S: the AP being started, its acknowledgement, the start_info. */
volatile u64 ap_boot_cpu;
volatile u64 ap_ack;
/* Set once every AP has been started and hv_boot_cpus is final: the APs wait for it,
 * so that every CPU agrees on the number of partitions. */
static volatile u64 aps_go;
const struct hvm_start_info *boot_start_info;
/* CPUs running the image (PVH path): the boot CPU and the APs that answered. */
volatile u64 hv_boot_cpus;

extern const u8 ap_tramp_start[], ap_tramp_end[];

#define MSR_APIC_BASE       0x1b
#define APIC_BASE_X2APIC    (1ULL << 10)
#define APIC_BASE_ENABLE    (1ULL << 11)
#define MSR_X2APIC_ID       0x802
#define MSR_X2APIC_ICR      0x830
#define ICR_INIT            0x4500ULL  /* INIT, level assert */
#define ICR_STARTUP         0x4600ULL  /* start-up IPI; low byte: vector (page number) */

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static int sig_is(const u8 *p, const char *s)
{
    for (int i = 0; s[i]; i++)
        if (p[i] != (u8)s[i])
            return 0;
    return 1;
}

/* The RSDP: from start_info, else by scanning the BIOS area as a PC guest would. */
static const u8 *find_rsdp(const struct hvm_start_info *si)
{
    if (si->rsdp_paddr)
        return (const u8 *)si->rsdp_paddr;
    for (u64 a = 0xe0000; a < 0x100000; a += 16)
        if (sig_is((const u8 *)a, "RSD PTR "))
            return (const u8 *)a;
    return NULL;
}

/* The MADT's enabled LAPICs (types 0 and 9): their APIC IDs, in table order. */
static u64 madt_apic_ids(const struct hvm_start_info *si, u32 *ids, u64 max)
{
    const u8 *rsdp = find_rsdp(si);
    if (!rsdp)
        return 0;
    int xsdt = rsdp[15] >= 2;
    const u8 *sdt = (const u8 *)(xsdt ? *(const u64 *)(rsdp + 24) : *(const u32 *)(rsdp + 16));
    u32 len = *(const u32 *)(sdt + 4);
    u32 step = xsdt ? 8 : 4;
    for (u32 off = 36; off + step <= len; off += step) {
        const u8 *t = (const u8 *)(xsdt ? *(const u64 *)(sdt + off) : *(const u32 *)(sdt + off));
        if (!sig_is(t, "APIC"))
            continue;
        u32 tlen = *(const u32 *)(t + 4);
        u64 n = 0;
        for (u32 e = 44; e + 2 <= tlen && n < max; e += t[e + 1] ? t[e + 1] : 1) {
            if (t[e] == 0 && (*(const u32 *)(t + e + 4) & 1))
                ids[n++] = t[e + 3];
            else if (t[e] == 9 && (*(const u32 *)(t + e + 8) & 1))
                ids[n++] = *(const u32 *)(t + e + 4);
        }
        return n;
    }
    return 0;
}

/* An AP in long mode, ring 0: tell the boot CPU, wait until all are up, get the
 * ring-3 stack. */
u64 kernel_ap_pvh(u64 cpu)
{
    WRITE_ONCE(ap_ack, 1);
    while (!READ_ONCE(aps_go))
        cpu_relax();
    return (u64)user_stacks + (cpu + 1) * HV_USTACK_SIZE;
}

/* Starts every AP the MADT lists, one at a time, through the x2APIC. */
static void start_aps(const struct hvm_start_info *si)
{
    u32 ids[HV_MAX_VCPUS];
    u64 n = madt_apic_ids(si, ids, HV_MAX_VCPUS);
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    hv_boot_cpus = 1;
    if (n <= 1)
        return;
    if (!(c & (1u << 21))) {
        serial_puts("hvguest: no x2APIC; the APs stay stopped\n");
        return;
    }
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
    u32 self = (u32)rdmsr(MSR_X2APIC_ID);
    memcpy((void *)HV_AP_TRAMPOLINE, ap_tramp_start, (u64)(ap_tramp_end - ap_tramp_start));
    u64 cpu = 1;
    for (u64 i = 0; i < n && cpu < HV_MAX_VCPUS; i++) {
        if (ids[i] == self)
            continue;
        set_tss(cpu);
        ap_boot_cpu = cpu;
        ap_ack = 0;
        u64 dest = (u64)ids[i] << 32;
        wrmsr(MSR_X2APIC_ICR, dest | ICR_INIT);
        wrmsr(MSR_X2APIC_ICR, dest | ICR_STARTUP | (HV_AP_TRAMPOLINE >> 12));
        wrmsr(MSR_X2APIC_ICR, dest | ICR_STARTUP | (HV_AP_TRAMPOLINE >> 12));
        /* ~20 s of TSC at a few GHz: an AP boots in microseconds, in a few ms when ring 0
         * is emulated, and in seconds when that emulation shares a loaded host. */
        u64 t0 = rdtsc();
        while (!READ_ONCE(ap_ack) && rdtsc() - t0 < 50000000000ULL)
            cpu_relax();
        if (!READ_ONCE(ap_ack)) {
            serial_puts("hvguest: AP with APIC ID ");
            serial_put_dec(ids[i]);
            serial_puts(" did not start\n");
            continue;
        }
        cpu++;
    }
    hv_boot_cpus = cpu;
    WRITE_ONCE(aps_go, 1);
}

/* PVH path, boot CPU only: finish the identity map, fill IDT and TSS, start the APs. */
u64 kernel_boot_pvh(const struct hvm_start_info *si)
{
    u64 ram_end = pvh_ram_end(si);
    u64 max = (u64)HV_MAX_RAM_GIB << 30;
    if (ram_end > max)
        ram_end = max;
    /* page_tables: PML4, PDPT, then one page directory per GiB. 1 GiB is mapped. */
    u64 *pdpt = page_tables + 512;
    for (u64 gib = 1; gib < (ram_end + (1ULL << 30) - 1) >> 30; gib++) {
        u64 *pd = page_tables + 512 * (2 + gib);
        for (u64 i = 0; i < 512; i++)
            pd[i] = ((gib << 30) + (i << 21)) | 0x87;
        pdpt[gib] = (u64)pd | 7;
    }
    for (int v = 0; v < 32; v++)
        set_idt_gate(v, trap_handlers[v]);
    set_tss(0);
    boot_start_info = si;
    start_aps(si);
    return (u64)user_stacks + HV_USTACK_SIZE;
}
