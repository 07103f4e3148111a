/*
 * Ring-3 half of the guest: parameters, the built-in workloads, reporting.
 *
 * Each vCPU works on its own partition of [HV_DATA_START, end of RAM), times its own
 * passes with the TSC and publishes counters in its mailbox slot, which the VMM reads
 * without an exit. The console (port 0x3f8) is used only at start and end.
 */
#include "hv.h"

enum workload {
    W_NONE, W_TOUCH, W_VERIFY, W_STREAM, W_RANDOM, W_FAULT,
    W_NUMA01,              /* all vCPUs share the whole data area */
    W_NUMA02,              /* each vCPU works on its own partition */
    W_NUMA01_THREAD_ALLOC, /* as numa02; the VMM interleaves the initial placement */
    W_IDLE,                /* writes its partition once, then touches no memory */
};

struct params {
    enum workload workload;
    u64 passes;            /* 0: until the VMM sets mailbox.hdr.stop */
    u64 vcpus;
    u64 seed;
    u64 node;              /* this vCPU's node, from nodes=<n0>,<n1>,... */
    u64 slow;              /* slow=K: print every pass slower than K x the fastest; 0 off */
};

/* Held while a vCPU prints a line other vCPUs may print at the same time: under other
 * VMMs every vCPU shares one UART (hugevisor assembles lines per vCPU). */
static u64 console_lock;
static void console_take(void)
{
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
}
static void console_give(void) { __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE); }

/* ---- tiny libc ---- */
void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void serial_puts(const char *s)
{
    while (*s)
        outb(HV_PORT_SERIAL, (u8)*s++);
}

void serial_put_hex(u64 v)
{
    char buf[19];
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < 16; i++)
        buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
    buf[18] = 0;
    /* Skip leading zeros, keep at least one digit. */
    int z = 2;
    while (z < 17 && buf[z] == '0')
        z++;
    buf[z - 1] = 'x';
    buf[z - 2] = '0';
    serial_puts(buf + z - 2);
}

void serial_put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    serial_puts(buf + i);
}

static void serial_kv(const char *key, u64 v)
{
    serial_puts(" ");
    serial_puts(key);
    serial_puts("=");
    serial_put_dec(v);
}

static int streq_n(const char *a, const char *b, u64 n)
{
    for (u64 i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return b[n] == 0;
}

static int parse_u64(const char *s, u64 n, u64 *out)
{
    u64 v = 0;
    if (n == 0)
        return 0;
    for (u64 i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (u64)(s[i] - '0');
    }
    *out = v;
    return 1;
}

static const struct {
    const char *name;
    enum workload w;
} workload_names[] = {
    {"touch", W_TOUCH}, {"verify", W_VERIFY}, {"stream", W_STREAM},
    {"random", W_RANDOM}, {"fault", W_FAULT}, {"numa01", W_NUMA01}, {"numa02", W_NUMA02},
    {"numa01_thread_alloc", W_NUMA01_THREAD_ALLOC}, {"idle", W_IDLE},
};

/* Parses "key=value key=value ..."; unknown keys are ignored (they may be for
 * another component), bad values are errors. Returns 0 and prints on error. */
/* The cpu-th entry of a comma-separated list of numbers. */
static int parse_nth(const char *s, u64 n, u64 cpu, u64 *out)
{
    u64 i = 0, start = 0;
    for (u64 k = 0; k <= n; k++) {
        if (k == n || s[k] == ',') {
            if (i == cpu)
                return parse_u64(s + start, k - start, out);
            i++;
            start = k + 1;
        }
    }
    return 0;
}

static int parse_cmdline(const char *s, struct params *p, u64 cpu)
{
    while (*s) {
        while (*s == ' ')
            s++;
        const char *key = s;
        while (*s && *s != '=' && *s != ' ')
            s++;
        u64 klen = (u64)(s - key);
        if (*s != '=')
            continue;
        const char *val = ++s;
        while (*s && *s != ' ')
            s++;
        u64 vlen = (u64)(s - val);
        int ok = 1;
        if (streq_n(key, "workload", klen)) {
            ok = 0;
            for (u64 i = 0; i < sizeof(workload_names) / sizeof(workload_names[0]); i++) {
                if (streq_n(val, workload_names[i].name, vlen)) {
                    p->workload = workload_names[i].w;
                    ok = 1;
                }
            }
        } else if (streq_n(key, "passes", klen)) {
            ok = parse_u64(val, vlen, &p->passes);
        } else if (streq_n(key, "vcpus", klen)) {
            ok = parse_u64(val, vlen, &p->vcpus) && p->vcpus >= 1 && p->vcpus <= HV_MAX_VCPUS;
        } else if (streq_n(key, "seed", klen)) {
            ok = parse_u64(val, vlen, &p->seed);
        } else if (streq_n(key, "slow", klen)) {
            ok = parse_u64(val, vlen, &p->slow);
        } else if (streq_n(key, "nodes", klen)) {
            ok = parse_nth(val, vlen, cpu, &p->node);
        }
        if (!ok) {
            serial_puts("hvguest: bad command line value near: ");
            serial_puts(key);
            serial_puts("\n");
            return 0;
        }
    }
    return p->workload != W_NONE;
}

u64 pvh_ram_end(const struct hvm_start_info *si)
{
    u64 end = 0;
    if (!si || si->magic != HVM_START_MAGIC)
        return 0;
    const struct hvm_memmap_entry *m = (const struct hvm_memmap_entry *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (m[i].type == 1 && m[i].addr + m[i].size > end)
            end = m[i].addr + m[i].size;
    return end;
}

/* End of the RAM range that holds HV_DATA_START: the workloads' upper bound. */
static u64 data_end(const struct hvm_start_info *si)
{
    const struct hvm_memmap_entry *m = (const struct hvm_memmap_entry *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (m[i].type == 1 && m[i].addr <= HV_DATA_START && m[i].addr + m[i].size > HV_DATA_START)
            return m[i].addr + m[i].size;
    return 0;
}

/* ---- workloads: one pass over the partition each; return bytes moved ---- */
struct part {
    u64 start, npages, cpu;
    struct hv_vcpu_slot *slot;
};

static u64 pass_touch(const struct part *pt, u64 pass)
{
    for (u64 i = 0; i < pt->npages; i++)
        *(volatile u64 *)(pt->start + (i << 12)) = pass + 1;
    return pt->npages * 8;
}

static void integrity_error(const struct part *pt, u64 gpa, u64 expected, u64 found)
{
    struct hv_vcpu_slot *s = pt->slot;
    u64 n = s->integrity_errors;
    if (n == 0) {
        WRITE_ONCE(s->err_gpa, gpa);
        WRITE_ONCE(s->err_expected, expected);
        WRITE_ONCE(s->err_found, found);
    }
    WRITE_ONCE(s->integrity_errors, n + 1);
    if (n < 4) {
        console_take();
        serial_puts("hvguest: vcpu ");
        serial_put_dec(pt->cpu);
        serial_puts(": INTEGRITY ERROR gpa=");
        serial_put_hex(gpa);
        serial_puts(" expected=");
        serial_put_hex(expected);
        serial_puts(" found=");
        serial_put_hex(found);
        serial_puts("\n");
        console_give();
    }
}

/*
 * verify: every page holds (page number, generation) in its first two words and a
 * check word at its end. Before writing generation g+1 the page must hold g; a fresh
 * page (g = 0) must be all zero in those words.
 */
static u64 pass_verify(const struct part *pt, u64 pass)
{
    u64 g = pass, next = pass + 1;
    for (u64 i = 0; i < pt->npages; i++) {
        u64 gpa = pt->start + (i << 12);
        volatile u64 *p = (volatile u64 *)gpa;
        u64 pfn = gpa >> 12;
        u64 want0 = g ? pfn : 0, want1 = g, want511 = g ? ~(pfn ^ g) : 0;
        u64 w0 = p[0], w1 = p[1], w511 = p[511];
        if (w0 != want0)
            integrity_error(pt, gpa, want0, w0);
        else if (w1 != want1)
            integrity_error(pt, gpa + 8, want1, w1);
        else if (w511 != want511)
            integrity_error(pt, gpa + 4088, want511, w511);
        p[0] = pfn;
        p[1] = next;
        p[511] = ~(pfn ^ next);
    }
    return pt->npages * 48;
}

/* idle: after the first pass (verify's, which writes every page), a pass is a fixed
 * stretch of TSC cycles spent spinning without touching guest RAM, so that a pass which
 * takes longer than IDLE_TICK_CYCLES measures time the vCPU did not run. */
#define IDLE_TICK_CYCLES (1ULL << 24)
static u64 pass_idle(const struct part *pt, u64 pass)
{
    if (pass == 0)
        return pass_verify(pt, 0);
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < IDLE_TICK_CYCLES && !READ_ONCE(mailbox.hdr.stop))
        __asm__ volatile("pause");
    return 0;
}

/* slow=K: report a pass slower than K times the fastest pass since the first, with its
 * end TSC, so that a stall can be placed in time by whoever reads the console (the
 * host's TSC is the guest's here). */
static void report_slow_pass(const struct part *pt, u64 pass, u64 cycles, u64 end, u64 *best,
                             u64 k)
{
    if (!k || pass == 0)
        return;
    if (pass == 1) {
        /* The first pass (first touches) is behind: tell whoever waits for a warm guest. */
        console_take();
        serial_puts("hvguest: vcpu ");
        serial_put_dec(pt->cpu);
        serial_puts(" warm\n");
        console_give();
    }
    if (*best && cycles > k * *best) {
        console_take();
        serial_puts("hvguest: vcpu ");
        serial_put_dec(pt->cpu);
        serial_puts(" slow");
        serial_kv("pass", pass);
        serial_kv("cycles", cycles);
        serial_kv("end_tsc", end);
        serial_puts("\n");
        console_give();
    }
    if (!*best || cycles < *best)
        *best = cycles;
}

static u64 pass_stream(const struct part *pt, u64 pass)
{
    (void)pass;
    u64 *p = (u64 *)pt->start;
    u64 n = pt->npages << 9;
    for (u64 i = 0; i < n; i++)
        p[i] += 1;
    return n * 16;
}

/* numa01: every vCPU walks the whole shared area, updating its own word of each page. */
static u64 pass_shared(const struct part *pt, u64 start, u64 npages)
{
    for (u64 i = 0; i < npages; i++) {
        volatile u64 *w = (volatile u64 *)(start + (i << 12)) + 8 * (pt->cpu & 63);
        *w += 1;
    }
    return npages * 16;
}

static u64 gcd(u64 a, u64 b)
{
    while (b) {
        u64 t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* random: every page once per pass in a scrambled order (a stride coprime with the
 * page count), one read-modify-write at a random word of the page. */
static u64 pass_random(const struct part *pt, u64 pass, u64 *rng)
{
    u64 n = pt->npages;
    u64 stride = 2654435761ULL % n;
    while (n > 1 && (stride == 0 || gcd(stride, n) != 1))
        stride++;
    u64 idx = (pass * 7919) % n;
    u64 x = *rng;
    for (u64 i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        u64 *w = (u64 *)(pt->start + (idx << 12) + ((x & 511) << 3));
        *w += 1;
        idx += stride;
        if (idx >= n)
            idx -= n;
    }
    *rng = x;
    return n * 16;
}

static void __attribute__((noreturn)) finish(u8 code)
{
    outb(HV_PORT_EXIT, code);
    /* hlt from ring 3 traps; kernel.c turns it into a real halt. */
    for (;;)
        __asm__ volatile("hlt");
}

void __attribute__((noreturn)) user_main(u64 cpu, const struct hvm_start_info *si)
{
    u64 entry = rdtsc();
    struct hv_vcpu_slot *slot = &mailbox.vcpu[cpu < HV_MAX_VCPUS ? cpu : 0];
    WRITE_ONCE(slot->entry_tsc, entry);
    WRITE_ONCE(slot->state, HV_STATE_RUNNING);

    /* Without vcpus= on the command line: the CPUs the PVH path started (0 on the
     * fast path, where the VMM always passes vcpus=). */
    u64 started = READ_ONCE(hv_boot_cpus);
    struct params p = {.workload = W_NONE, .passes = 0, .vcpus = started ? started : 1,
                       .seed = 1, .node = 0, .slow = 0};
    const char *cmdline = hv_default_cmdline;
    if (si && si->magic == HVM_START_MAGIC && si->cmdline_paddr && *(const char *)si->cmdline_paddr)
        cmdline = (const char *)si->cmdline_paddr;
    u64 end = si && si->magic == HVM_START_MAGIC ? data_end(si) : 0;
    if (cpu >= HV_MAX_VCPUS || !parse_cmdline(cmdline, &p, cpu) || cpu >= p.vcpus ||
        end <= HV_DATA_START) {
        console_take();
        serial_puts("hvguest: bad parameters (command line: ");
        serial_puts(cmdline);
        serial_puts(")\n");
        console_give();
        WRITE_ONCE(slot->state, HV_STATE_BAD_PARAMS);
        finish(HV_EXIT_BAD_PARAMS);
    }
    if (cpu == 0) {
        WRITE_ONCE(mailbox.hdr.magic, HV_MAILBOX_MAGIC);
        WRITE_ONCE(mailbox.hdr.version, HV_ABI_VERSION);
        WRITE_ONCE(mailbox.hdr.nr_vcpus, p.vcpus);
    }

    u64 total = (end - HV_DATA_START) >> 12;
    u64 per = total / p.vcpus;
    struct part pt = {
        .start = HV_DATA_START + ((cpu * per) << 12),
        .npages = cpu == p.vcpus - 1 ? total - cpu * per : per,
        .cpu = cpu,
        .slot = slot,
    };
    WRITE_ONCE(slot->part_start, pt.start);
    WRITE_ONCE(slot->part_end, pt.start + (pt.npages << 12));
    WRITE_ONCE(slot->node, p.node);
    if (cpu == 0) {
        console_take();
        serial_puts("hvguest: start");
        serial_puts(" cmdline=\"");
        serial_puts(cmdline);
        serial_puts("\"");
        serial_kv("vcpus", p.vcpus);
        serial_kv("data_mib", (total << 12) >> 20);
        serial_puts("\n");
        console_give();
    }

    if (p.workload == W_FAULT) {
        /* Deliberate #PF: nothing is mapped at 112 TiB. */
        *(volatile u64 *)0x700000000000ULL = 1;
    }

    u64 rng = 0x9e3779b97f4a7c15ULL ^ (p.seed * 0x100000001b3ULL) ^ (cpu + 1);
    u64 start = rdtsc();
    WRITE_ONCE(slot->start_tsc, start);
    WRITE_ONCE(slot->end_tsc, start);
    u64 bytes = 0, maxc = 0, best = 0;
    for (u64 pass = 0; p.passes == 0 || pass < p.passes; pass++) {
        if (READ_ONCE(mailbox.hdr.stop))
            break;
        u64 t0 = rdtsc();
        switch (p.workload) {
        case W_TOUCH: bytes += pass_touch(&pt, pass); break;
        case W_VERIFY: bytes += pass_verify(&pt, pass); break;
        case W_STREAM: bytes += pass_stream(&pt, pass); break;
        case W_RANDOM: bytes += pass_random(&pt, pass, &rng); break;
        case W_NUMA01: bytes += pass_shared(&pt, HV_DATA_START, total); break;
        case W_NUMA02:
        case W_NUMA01_THREAD_ALLOC: bytes += pass_stream(&pt, pass); break;
        case W_IDLE: bytes += pass_idle(&pt, pass); break;
        default: break;
        }
        u64 t1 = rdtsc();
        /* Read the worst pass back from the slot: a VMM may reset it (a migration
         * destination does, to measure the pass that spans the switch-over). */
        maxc = READ_ONCE(slot->max_pass_cycles);
        if (t1 - t0 > maxc)
            maxc = t1 - t0;
        WRITE_ONCE(slot->last_pass_cycles, t1 - t0);
        WRITE_ONCE(slot->max_pass_cycles, maxc);
        WRITE_ONCE(slot->bytes, bytes);
        WRITE_ONCE(slot->pages_touched, pt.npages);
        WRITE_ONCE(slot->end_tsc, t1);
        WRITE_ONCE(slot->passes, pass + 1);
        report_slow_pass(&pt, pass, t1 - t0, t1, &best, p.slow);
    }
    /* idle checks at the end what its first pass wrote: migration must not lose it. */
    if (p.workload == W_IDLE && READ_ONCE(slot->passes) >= 1)
        pass_verify(&pt, 1);

    u64 errors = READ_ONCE(slot->integrity_errors);
    console_take();
    serial_puts("hvguest: vcpu ");
    serial_put_dec(cpu);
    serial_puts(" done");
    serial_kv("passes", READ_ONCE(slot->passes));
    serial_kv("pages", READ_ONCE(slot->pages_touched));
    serial_kv("integrity_errors", errors);
    serial_kv("max_pass_cycles", maxc);
    serial_puts("\n");
    console_give();
    u64 state = errors ? HV_STATE_FAILED : HV_STATE_DONE;
    WRITE_ONCE(slot->state, state);
    finish(errors ? HV_EXIT_INTEGRITY : HV_EXIT_OK);
}
