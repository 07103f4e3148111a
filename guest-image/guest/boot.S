/*
 * hugevisor guest image: boot and ring-0 paths.
 *
 * Two ways in:
 *   - PVH (any VMM: QEMU microvm, Cloud Hypervisor, Firecracker): 32-bit protected
 *     mode at pvh_entry, ebx = struct hvm_start_info. We build identity page tables,
 *     enter long mode, set up GDT/IDT/TSS in C (kernel.c) and iretq to ring 3.
 *     The boot CPU then starts the APs the MADT lists (kernel.c: INIT/SIPI through
 *     the x2APIC); each enters at ap_tramp_start in real mode (copied below 1 MiB),
 *     goes straight to long mode on the boot CPU's page tables and irets to ring 3.
 *   - hugevisor fast path: the VMM writes the same tables itself and starts each vCPU
 *     at user_entry in 64-bit ring 3 (see vmm/src/boot/fast.rs). No ring-0 code runs
 *     unless an exception is taken.
 */
#include "abi.h"

/* ---- image header, first bytes of the image (see struct hv_image_info) ---- */
    .section .hvinfo, "aw"
    .globl hv_image_info
hv_image_info:
    .quad HV_IMAGE_MAGIC
    .long HV_ABI_VERSION
    .long HV_MAX_VCPUS
    .quad user_entry
    .quad pvh_entry
    .quad trap_handlers
    .quad gdt
    .quad idt
    .quad tss_area
    .quad kernel_stacks
    .quad user_stacks
    .quad page_tables
    .quad mailbox
    .quad HV_DATA_START
    .quad __image_end
    .globl hv_default_cmdline
hv_default_cmdline:
    .asciz "workload=verify passes=3"
    .fill HV_CMDLINE_MAX - (. - hv_default_cmdline), 1, 0

/* ---- Xen PVH entry note ---- */
    .section .note.Xen, "a"
    .p2align 2
    .long 4                     /* namesz */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_entry

/* ---- 32-bit PVH entry ---- */
    .section .text32, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    cld
    mov %ebx, %esi                       /* keep start_info */
    lgdt gdt_ptr32

    /* Identity map the first 1 GiB with 2 MiB pages (U/S set: ring 3 uses it).
     * kernel.c maps the rest of RAM once we are in 64-bit mode. */
    mov $page_tables, %edi               /* PML4 */
    lea 0x1000+7(%edi), %eax
    mov %eax, (%edi)                     /* PML4[0] -> PDPT */
    lea 0x2000+7(%edi), %eax
    mov %eax, 0x1000(%edi)               /* PDPT[0] -> PD0 */
    lea 0x2000(%edi), %edi
    mov $0x87, %eax                      /* P | RW | US | PS */
    mov $512, %ecx
1:  mov %eax, (%edi)
    movl $0, 4(%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b

    mov %cr4, %eax
    or $0x620, %eax                      /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $page_tables, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx                /* EFER */
    rdmsr
    or $0x100, %eax                      /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80010023, %eax                 /* PG | WP | NE | MP | PE */
    and $~0x60000000, %eax               /* caches on: clear CD | NW */
    mov %eax, %cr0
    ljmp $HV_SEL_KCODE, $long_entry

    .p2align 3
gdt_ptr32:
    .word HV_GDT_ENTRIES * 8 - 1
    .long gdt

/* ---- 64-bit ring-0 continuation of the PVH path ---- */
    .text
    .code64
long_entry:
    mov $HV_SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov %esi, %ebx                       /* start_info, zero-extended */
    mov $kernel_stacks + HV_KSTACK_SIZE - 16, %rsp
    mov %rbx, %rdi
    call kernel_boot_pvh                 /* maps RAM, fills IDT/TSS; returns ring-3 rsp */
    mov $HV_SEL_TSS0, %cx
    ltr %cx
    lidt idt_ptr
    /* iretq into ring 3 at user_entry(cpu 0, start_info). */
    pushq $HV_SEL_UDATA
    pushq %rax
    pushq $0x3002                        /* IF=0, IOPL=3 */
    pushq $HV_SEL_UCODE
    pushq $user_entry
    xor %edi, %edi
    mov %rbx, %rsi
    mov $HV_SEL_UDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    iretq

    .p2align 3
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

/* ---- 64-bit ring-0 entry of an AP (from the trampoline) ---- */
ap_long_entry:
    mov $HV_SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov ap_boot_cpu(%rip), %rbx          /* this AP's index, set by the boot CPU */
    lea 1(%rbx), %rax
    imul $HV_KSTACK_SIZE, %rax
    lea kernel_stacks - 16(%rax), %rsp   /* below the index stored at the top */
    mov %rbx, %rdi
    call kernel_ap_pvh                   /* acknowledges; returns the ring-3 rsp */
    mov %rbx, %rcx
    shl $4, %rcx
    add $HV_SEL_TSS0, %rcx
    ltr %cx
    lidt idt_ptr
    pushq $HV_SEL_UDATA
    pushq %rax
    pushq $0x3002                        /* IF=0, IOPL=3 */
    pushq $HV_SEL_UCODE
    pushq $user_entry
    mov %rbx, %rdi
    mov boot_start_info(%rip), %rsi
    mov $HV_SEL_UDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    iretq

/* ---- the AP trampoline: real mode at HV_AP_TRAMPOLINE, copied there by kernel.c ----
 * Everything but the GDT pointer is absolute (linked addresses below 4 GiB). Paging
 * and protection go on in one step: with EFER.LME that enters long mode, and the far
 * jump lands in the 64-bit code segment. */
    .section .rodata
    .code16
    .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_tramp_gdt - ap_tramp_start
    mov $0x620, %eax                     /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $page_tables, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx                /* EFER */
    rdmsr
    or $0x100, %eax                      /* LME */
    wrmsr
    mov $0x80010023, %eax                /* PG | WP | NE | MP | PE */
    mov %eax, %cr0
    ljmpl $HV_SEL_KCODE, $ap_long_entry
    .p2align 2
ap_tramp_gdt:
    .word HV_GDT_ENTRIES * 8 - 1
    .long gdt
ap_tramp_end:
    .code64
    .text

/* ---- ring-3 entry (both paths) ---- */
    .globl user_entry
user_entry:
    and $-16, %rsp
    call user_main                       /* never returns */
1:  ud2
    jmp 1b

/* ---- exception stubs ---- */
.macro TRAP vec, has_error
    .p2align 4
trap_\vec:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vec
    jmp trap_common
.endm

TRAP 0,0;  TRAP 1,0;  TRAP 2,0;  TRAP 3,0;  TRAP 4,0;  TRAP 5,0;  TRAP 6,0;  TRAP 7,0
TRAP 8,1;  TRAP 9,0;  TRAP 10,1; TRAP 11,1; TRAP 12,1; TRAP 13,1; TRAP 14,1; TRAP 15,0
TRAP 16,0; TRAP 17,1; TRAP 18,0; TRAP 19,0; TRAP 20,0; TRAP 21,1; TRAP 22,0; TRAP 23,0
TRAP 24,0; TRAP 25,0; TRAP 26,0; TRAP 27,0; TRAP 28,0; TRAP 29,1; TRAP 30,1; TRAP 31,0

trap_common:
    /* Frame layout must match struct trap_frame in kernel.c. */
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call kernel_trap                     /* returns only if the trap was handled */
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp                        /* vector, error code */
    iretq

    .section .rodata
    .p2align 3
    .globl trap_handlers
trap_handlers:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad trap_\v
    .endr

/* ---- GDT (TSS descriptors are filled in at boot) ---- */
    .data
    .p2align 4
    .globl gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff             /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff             /* 0x10 kernel data */
    .quad 0x00affa000000ffff             /* 0x18 user code, 64-bit, DPL 3 */
    .quad 0x00cff2000000ffff             /* 0x20 user data, DPL 3 */
    .fill 2 * HV_MAX_VCPUS, 8, 0         /* TSS descriptors */

/* ---- ring-0 data the VMM may also write (fast path) ---- */
    .section .bss.tables, "aw", @nobits
    .p2align 12
    .globl page_tables
page_tables:
    .skip 0x1000 * (2 + HV_MAX_RAM_GIB)
    .globl idt
idt:
    .skip 256 * 16
    .globl mailbox
mailbox:
    .skip 0x5000
    .p2align 7
    .globl tss_area
tss_area:
    .skip HV_MAX_VCPUS * HV_TSS_STRIDE
    .p2align 13
    .globl kernel_stacks
kernel_stacks:
    .skip HV_MAX_VCPUS * HV_KSTACK_SIZE
    .p2align 12
    .globl user_stacks
user_stacks:
    .skip HV_MAX_VCPUS * HV_USTACK_SIZE
