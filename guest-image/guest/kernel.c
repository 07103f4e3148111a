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

/* PVH path, boot CPU only: finish the identity map, fill IDT and TSS. */
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
    return (u64)user_stacks + HV_USTACK_SIZE;
}
