/*
 * The interrupt test guest: a PVH ELF that stays in 32-bit protected mode, ring 0,
 * paging off. Written independently of the built-in image: it owns its GDT and IDT
 * and takes interrupts — the LAPIC timer, the PIT through the IOAPIC, the UART's
 * transmitter-empty interrupt through the IOAPIC — and counts them (irq.c).
 *
 * No handler returns with iret: KVM's instruction emulator, which runs ring 0 under
 * kvm_pvm, cannot emulate a protected-mode iret to the same ring. The interrupted code
 * is only ever the idle loop below, so each handler discards its frame and goes back
 * to idling, interrupts on.
 */
    .section .note.Xen, "a"
    .p2align 2
    .long 4                     /* namesz */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_entry

    .text
    .globl pvh_entry
pvh_entry:
    cli
    cld
    mov $stack_top, %esp
    lgdt gdt_ptr
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    push %ebx                   /* PVH start_info */
    call irq_main
idle:
    mov $stack_top, %esp
    sti
    hlt                         /* sti's shadow: the wake-up interrupt lands here */
    jmp idle

/* Interrupt stubs: count in C, then back to the idle loop (see above). */
.macro ISR name, handler
    .globl \name
\name:
    call \handler
    jmp idle
.endm
ISR isr_timer, on_timer
ISR isr_pit, on_pit
ISR isr_uart, on_uart
ISR isr_other, on_other

    .data
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff    /* 0x08 code, 32-bit flat */
    .quad 0x00cf93000000ffff    /* 0x10 data, flat */
gdt_ptr:
    .word 3 * 8 - 1
    .long gdt

    .bss
    .p2align 4
    .skip 16384
stack_top:
