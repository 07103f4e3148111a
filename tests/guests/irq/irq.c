/*
 * The interrupt test guest's C half: programs the x2APIC timer (periodic, 100 Hz),
 * the PIT (channel 0, 100 Hz, IOAPIC pin 0: KVM routes GSI n to pin n) and COM1's
 * transmitter-empty interrupt (IOAPIC pin 4), then halts with interrupts on. Every
 * interrupt is counted; every 50 timer ticks a line "irq: timer=T pit=P uart=U" goes
 * out on COM1 interrupt-driven: the first byte is written, each further byte from the
 * UART's interrupt, so U counts real UART interrupts.
 *
 * Command line: poweroff=N (ACPI S5 after N timer ticks), reset=N (i8042 reset).
 */
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned char u8;

struct start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist, cmdline, rsdp, memmap;
    u32 memmap_entries, reserved;
};

#define COM1 0x3f8
#define V_TIMER 0x20
#define V_PIT 0x22
#define V_UART 0x24
#define V_SPURIOUS 0xff
#define IOAPIC ((volatile u32 *)0xfec00000)

void isr_timer(void);
void isr_pit(void);
void isr_uart(void);
void isr_other(void);

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p));
    return v;
}
static inline u64 rdmsr(u32 m)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(m));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 m, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(m), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static volatile u32 timer, pit, uart, other;
static char line[96];
static volatile u32 pos, len;
static u64 idt[256];

static void eoi(void) { wrmsr(0x80b, 0); }

static u32 poweroff, reset, next_line = 50;
static u32 put_str(u32 at, const char *s);
static u32 put_dec(u32 at, u32 v);
static void send(u32 n);

/* Every 50 ticks a line with the counts (unless the last one is still going out). */
void on_timer(void)
{
    timer++;
    eoi();
    if (poweroff && timer >= poweroff)
        outb(0x600, (5 << 2) | (1 << 5)); /* SLP_TYP=S5 | SLP_EN */
    if (reset && timer >= reset)
        outb(0x64, 0xfe);
    if (timer < next_line || pos < len)
        return;
    next_line += 50;
    u32 n = put_str(0, "irq: timer=");
    n = put_dec(n, timer);
    n = put_str(n, " pit=");
    n = put_dec(n, pit);
    n = put_str(n, " uart=");
    n = put_dec(n, uart);
    n = put_str(n, "\n");
    send(n);
}
void on_pit(void) { pit++; eoi(); }
void on_other(void) { other++; }
void on_uart(void)
{
    uart++;
    (void)inb(COM1 + 2); /* IIR: reading it clears the THR-empty interrupt */
    if (pos < len)
        outb(COM1, (u8)line[pos++]);
    eoi();
}

static void gate(int v, void (*h)(void))
{
    u32 a = (u32)h;
    idt[v] = (u64)((a & 0xffff) | (0x08u << 16)) | ((u64)((a & 0xffff0000u) | 0x8e00u) << 32);
}

static u32 put_str(u32 at, const char *s)
{
    while (*s && at < sizeof line - 1)
        line[at++] = *s++;
    return at;
}

static u32 put_dec(u32 at, u32 v)
{
    char b[11];
    int i = 10;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return put_str(at, b + i);
}

/* Starts sending `line` (len bytes); the UART's interrupts send the rest. */
static void send(u32 n)
{
    len = n;
    pos = 1;
    outb(COM1, (u8)line[0]);
}

static u32 parse(const char *s, const char *key)
{
    for (; s && *s; s++) {
        const char *k = key, *p = s;
        while (*k && *p == *k)
            k++, p++;
        if (!*k) {
            u32 v = 0;
            while (*p >= '0' && *p <= '9')
                v = v * 10 + (u32)(*p++ - '0');
            return v;
        }
    }
    return 0;
}

static void ioapic_route(u32 pin, u32 vector, u32 apic_id)
{
    IOAPIC[0] = 0x10 + 2 * pin + 1;
    IOAPIC[4] = apic_id << 24;
    IOAPIC[0] = 0x10 + 2 * pin;
    IOAPIC[4] = vector; /* fixed, physical, edge, active high, unmasked */
}

void irq_main(const struct start_info *si)
{
    const char *cmdline = si && si->magic == 0x336ec578 ? (const char *)(u32)si->cmdline : 0;
    poweroff = parse(cmdline, "poweroff=");
    reset = parse(cmdline, "reset=");
    for (int v = 0; v < 256; v++)
        gate(v, isr_other);
    gate(V_TIMER, isr_timer);
    gate(V_PIT, isr_pit);
    gate(V_UART, isr_uart);
    struct __attribute__((packed)) { u16 limit; u32 base; } idtr = {sizeof idt - 1, (u32)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));

    /* The 8259s stay masked: every interrupt comes through the LAPIC. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    wrmsr(0x1b, rdmsr(0x1b) | (1 << 10) | (1 << 11)); /* x2APIC on */
    wrmsr(0x80f, 0x100 | V_SPURIOUS);                  /* software-enable the LAPIC */
    u32 self = (u32)rdmsr(0x802);
    wrmsr(0x83e, 0xb);                 /* timer divide by 1 */
    wrmsr(0x832, V_TIMER | (1 << 17)); /* periodic */
    wrmsr(0x838, 10000000);            /* 10 ms at KVM's 1 GHz APIC bus */
    outb(0x43, 0x34);                  /* PIT channel 0, rate generator */
    outb(0x40, 11932 & 0xff);          /* 1193182 Hz / 11932 = 100 Hz */
    outb(0x40, 11932 >> 8);
    ioapic_route(0, V_PIT, self);
    ioapic_route(4, V_UART, self);
    outb(COM1 + 1, 0x02);              /* IER: transmitter-empty interrupt */

    send(put_str(0, "irq: start\n"));
    /* entry.S idles from here on; the handlers do the rest. */
}
