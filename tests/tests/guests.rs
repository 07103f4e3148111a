//! Guests hugevisor did not build, booted with `run --kernel`: the interrupt test guest
//! (LAPIC timer, PIT and UART interrupts, counted across a migration), the built-in
//! image through its own PVH path on 2 vCPUs (APs from the MADT) migrating by pre-copy
//! and post-copy, Debian's cloud kernel to its banner, the ACPI tables through `iasl`,
//! and every kind of bad kernel input.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::guests::{builtin_image, debian_cloud_kernel, hardware_kvm, irq_counts, irq_guest};
use tests::peers::{
    end_run, finish, migrate, run_until, scratch, spawn, start_pair, wait_for, wait_until,
    EVENT_BOUND, RUN_BOUND,
};
use tests::{have_kvm, host_has, run};

#[test]
fn irq_guest_counts_timer_pit_and_uart_interrupts() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("irq-counts");
    let kernel = irq_guest(&dir);
    let k = kernel.to_str().unwrap();
    let args = [
        "run",
        "--kernel",
        k,
        "--memory",
        "64M",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ];
    let r = run_until(&args, "100 timer, 50 PIT and 20 UART interrupts", |info| {
        irq_counts(info).is_some_and(|c| c.timer >= 100 && c.pit >= 50 && c.uart >= 20)
    });
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let j = r.json();
    assert_eq!(j["guest_mailbox"], false, "{j}");
    assert_eq!(j["ended_by"], "stopped", "{j}");
    assert_eq!(j["entry"], "pvh", "{j}");
    assert!(j["console_bytes"].as_u64().unwrap() > 20, "{j}");
    assert!(j["exits_by_kind"]["io_out"].as_u64().unwrap() > 0, "{j}");
    assert!(j["vcpu_time_ms"].as_f64().unwrap() > 0.0, "{j}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_ends_the_vm_by_acpi_power_off_and_by_i8042_reset() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("irq-end");
    let kernel = irq_guest(&dir);
    let k = kernel.to_str().unwrap();
    for (cmdline, ended_by) in [("poweroff=60", "power-off"), ("reset=60", "reset")] {
        let r = run(&[
            "run",
            "--kernel",
            k,
            "--memory",
            "64M",
            "--cmdline",
            cmdline,
            "--timeout",
            "300s",
            "--console",
            "off",
            "--json",
        ]);
        assert_eq!(r.code(), 0, "{cmdline}: {}", r.stderr());
        assert_eq!(r.json()["ended_by"], ended_by, "{cmdline}: {}", r.json());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn irq_count_keeps_rising_across_precopy_and_postcopy() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    irq_count_keeps_rising_across(&["--mode", "precopy"]);
    irq_count_keeps_rising_across(&["--mode", "postcopy"]);
}

/// The irq guest migrates mid-run; its interrupt counts (LAPIC timer, PIT, UART: the
/// LAPIC, IOAPIC, PIT and UART state all travel) go on rising on the destination.
fn irq_count_keeps_rising_across(mode: &[&str]) {
    let dir = scratch(&format!("irq-migrate-{}", mode[1]));
    let kernel = irq_guest(&dir);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (api, dst_api) = (dir.join("api.sock"), dir.join("dst-api.sock"));
    let common = [
        "run",
        "--memory",
        "64M",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ];
    let mut dst_args = common.to_vec();
    dst_args.extend([
        "--incoming",
        &uri,
        "--api-socket",
        dst_api.to_str().unwrap(),
    ]);
    let mut dst = spawn(&dst_args);
    let mut src_args = common.to_vec();
    src_args.extend([
        "--kernel",
        kernel.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    let mut src = spawn(&src_args);
    wait_for(&api);
    let before = wait_until(&mut src, &api, "100 timer interrupts on the source", |i| {
        irq_counts(i).is_some_and(|c| c.timer >= 100 && c.uart > 0)
    });
    let before = irq_counts(&before).unwrap();
    let (code, report, err) = migrate(&api, &uri, mode);
    assert_eq!(code, 0, "{err}");
    assert!(report["downtime_ms"].as_f64().is_some(), "{report}");
    let after = wait_until(
        &mut dst,
        &dst_api,
        "the counts rising on the destination",
        |i| {
            irq_counts(i).is_some_and(|c| {
                c.timer >= before.timer + 100 && c.pit > before.pit && c.uart > before.uart
            })
        },
    );
    end_run(&dst_api);
    let (src_code, src_json, src_err) = finish(src);
    let (dst_code, dst_json, dst_err) = finish(dst);
    assert_eq!(src_code, 0, "{src_err}");
    assert_eq!(src_json["outcome"], "migrated", "{src_json}");
    assert_eq!(dst_code, 0, "{dst_err}");
    assert_eq!(dst_json["guest_mailbox"], false, "{dst_json}");
    eprintln!(
        "irq counts: source {before:?}, destination {:?}",
        irq_counts(&after)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The built-in image booted through its own PVH entry (32-bit entry, long mode, IDT
/// and TSS set up in emulated ring 0, APs from the MADT), migrated mid-run.
fn builtin_through_pvh_migrates(mode: &str) {
    let dir = scratch(&format!("pvh-{mode}"));
    let image = builtin_image(&dir);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let api = dir.join("api.sock");
    let common = [
        "run",
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ];
    let mut pair = start_pair(
        &common,
        &uri,
        &api,
        &[],
        &["--kernel", image.to_str().unwrap()],
    );
    let (code, _, err) = migrate(&api, &uri, &["--mode", mode]);
    assert_eq!(code, 0, "{mode}: {err}");
    let at_switch = tests::peers::vm_info(&pair.dst_api)["passes"]
        .as_u64()
        .unwrap_or(0);
    wait_until(
        &mut pair.dst,
        &pair.dst_api,
        "passes on the destination",
        |i| i["passes"].as_u64().unwrap_or(0) >= at_switch + 4 && tests::peers::incoming_settled(i),
    );
    end_run(&pair.dst_api);
    let (src_code, src, src_err) = finish(pair.src);
    let (dst_code, dst, dst_err) = finish(pair.dst);
    assert_eq!(src_code, 0, "{mode}: {src_err}");
    assert_eq!(src["entry"], "pvh", "{src}");
    assert_eq!(src["outcome"], "migrated", "{src}");
    assert_eq!(dst_code, 0, "{mode}: {dst_err}");
    assert_eq!(dst["integrity_errors"], 0, "{mode}: {dst}");
    assert_eq!(dst["outcome"], "ok", "{mode}: {dst}");
    for v in dst["per_vcpu"].as_array().unwrap() {
        assert!(
            v["passes"].as_u64().unwrap() > 0,
            "{mode}: a vCPU never ran: {dst}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn builtin_image_through_its_pvh_path_runs_verify_on_two_vcpus() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("pvh-2vcpu");
    let image = builtin_image(&dir);
    let r = run(&[
        "run",
        "--kernel",
        image.to_str().unwrap(),
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--passes",
        "3",
        "--timeout",
        "300s",
        "--console",
        "off",
        "--json",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let j = r.json();
    assert_eq!(j["entry"], "pvh", "{j}");
    assert_eq!(j["integrity_errors"], 0, "{j}");
    assert_eq!(j["passes"], 6, "both vCPUs ran 3 passes: {j}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn builtin_image_through_its_pvh_path_migrates_by_precopy_and_postcopy() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    builtin_through_pvh_migrates("precopy");
    builtin_through_pvh_migrates("postcopy");
}

#[test]
fn acpi_tables_decompile_cleanly_with_iasl() {
    let iasl = Command::new("iasl")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !host_has(
        iasl,
        "iasl (Debian package acpica-tools; .ci/run installs it)",
    ) {
        return;
    }
    let dir = scratch("acpi");
    let out = dir.join("tables");
    let r = run(&[
        "acpi-tables",
        "--out",
        out.to_str().unwrap(),
        "--vcpus",
        "3",
        "--memory",
        "256M",
        "--numa",
        "nodes=2,cpus=0:1-2,backend=emulated",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let mut tables: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    tables.sort();
    assert_eq!(tables.len(), 7, "{tables:?}");
    // iasl has no disassembler for the RSDP (not an SDT: no length, two checksums):
    // its checksums are checked here, every other table by iasl.
    let rsdp = std::fs::read(out.join("rsdp.dat")).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    assert_eq!((sum(&rsdp[..20]), sum(&rsdp)), (0, 0), "RSDP checksums");
    for t in tables.iter().filter(|t| !t.ends_with("rsdp.dat")) {
        let o = Command::new("iasl")
            .arg("-d")
            .arg(t)
            .current_dir(&out)
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "iasl -d {}: {text}", t.display());
        assert!(
            !text.contains("Error") && !text.contains("Warning"),
            "iasl -d {}: {text}",
            t.display()
        );
    }
    let dsl = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    let madt = dsl("apic.dsl");
    assert_eq!(madt.matches("[Processor Local APIC]").count(), 3, "{madt}");
    assert!(madt.contains("[I/O APIC]"), "{madt}");
    let srat = dsl("srat.dsl");
    assert_eq!(
        srat.matches("[Processor Local APIC/SAPIC Affinity]")
            .count(),
        3,
        "{srat}"
    );
    assert_eq!(srat.matches("[Memory Affinity]").count(), 2, "{srat}");
    assert!(
        srat.contains("Base Address : 0000000008000000"),
        "node 1 starts at 128 MiB: {srat}"
    );
    assert!(srat.contains("Proximity Domain : 00000001"), "{srat}");
    assert!(dsl("facp.dsl").contains("Hardware Reduced (V5) : 1"));
    assert!(dsl("dsdt.dsl").contains("_S5"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `kernel` with `args` until its console (a file) shows `needle`, the VM exits,
/// or `bound` passes; returns the console and how long it took.
fn console_until(
    kernel: &Path,
    args: &[&str],
    needle: &str,
    bound: Duration,
) -> (String, Duration) {
    let dir = scratch("console-until");
    let (console, api) = (dir.join("console.txt"), dir.join("api.sock"));
    let console_arg = format!("file:{}", console.display());
    let mut all = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--console",
        &console_arg,
    ];
    all.extend([
        "--api-socket",
        api.to_str().unwrap(),
        "--duration",
        RUN_BOUND,
    ]);
    all.extend(args);
    let started = Instant::now();
    let mut child = spawn(&all);
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    while !read().contains(needle) && started.elapsed() < bound {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    if api.exists() {
        let _ = tests::api::shutdown(&api);
    }
    let (_, _, err) = finish(child);
    let text = read();
    let _ = std::fs::remove_dir_all(&dir);
    (text + "\n--- hugevisor stderr ---\n" + &err, took)
}

#[test]
fn debian_cloud_kernel_prints_its_banner_through_pvh() {
    if !have_kvm() {
        return;
    }
    let kernel = debian_cloud_kernel();
    if !host_has(
        kernel.is_some(),
        "/boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64; .ci/run installs it)",
    ) {
        return;
    }
    let _heavy = tests::heavy();
    // Ring 0 is emulated here (~0.6 M instructions/s): the banner takes ~20–40 s; the
    // kernel later stops on an instruction the emulator lacks, so the test goes no further.
    let (console, took) = console_until(
        &kernel.unwrap(),
        &[
            "--boot-entry",
            "pvh",
            "--memory",
            "256M",
            "--cmdline",
            "console=ttyS0 earlyprintk=ttyS0",
        ],
        "Linux version",
        EVENT_BOUND,
    );
    assert!(
        console.contains("Linux version"),
        "no banner within {took:?}:\n{console}"
    );
    eprintln!("Debian cloud kernel banner through PVH after {took:?}");
}

/// On hardware KVM (not kvm_pvm) the same kernel boots all the way to a tiny
/// initramfs whose init prints what it sees and powers the VM off.
#[test]
fn hardware_kvm_boots_debian_cloud_kernel_to_an_initramfs() {
    if !have_kvm() {
        return;
    }
    if !hardware_kvm() {
        eprintln!("SKIP: KVM here is kvm_pvm (ring 0 emulated; the kernel cannot reach init): this test needs hardware KVM (kvm_intel or kvm_amd)");
        return;
    }
    let Some(kernel) = debian_cloud_kernel() else {
        eprintln!("SKIP: no Debian cloud kernel in /boot");
        return;
    };
    let _heavy = tests::heavy();
    let dir = scratch("initramfs");
    let initramfs = tests::initramfs::build(&dir);
    let (console, took) = console_until(
        &kernel,
        &[
            "--boot-entry",
            "pvh",
            "--memory",
            "512M",
            "--vcpus",
            "2",
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 panic=-1",
        ],
        "hugevisor-init: done",
        EVENT_BOUND,
    );
    assert!(
        console.contains("hugevisor-init: cpus=2"),
        "after {took:?}:\n{console}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `hugevisor run ARGS --api-socket S` expecting a refusal: exit 1, one line on
/// stderr containing `needle`, and nothing left behind (the socket never created).
fn refused(args: &[&str], needle: &str) {
    let dir = scratch("refused");
    let api = dir.join("api.sock");
    let mut all = vec!["run", "--timeout", "60s"];
    if !args.contains(&"--memory") {
        all.extend(["--memory", "64M"]);
    }
    all.extend(args);
    all.extend(["--api-socket", api.to_str().unwrap()]);
    let r = run(&all);
    let err = r.stderr();
    assert_eq!(r.code(), 1, "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} does not say {needle:?}"
    );
    assert!(!api.exists(), "{args:?}: left {} behind", api.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The irq guest with its first PT_LOAD segment moved to `paddr`.
fn moved_segment(dir: &Path, paddr: u64) -> std::path::PathBuf {
    let mut elf = tests::guests::IRQ_GUEST.to_vec();
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[0x38..0x3a].try_into().unwrap()) as usize;
    let ph = (0..phnum)
        .map(|i| phoff + 56 * i)
        .find(|&ph| elf[ph..ph + 4] == 1u32.to_le_bytes())
        .unwrap();
    elf[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    let p = dir.join(format!("moved-{paddr:x}.elf"));
    std::fs::write(&p, elf).unwrap();
    p
}

#[test]
fn bad_kernel_input_is_refused_in_one_line() {
    let dir = scratch("bad-kernel");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a kernel\n").unwrap();
    refused(&["--kernel", &s(&text)], "neither an ELF nor a bzImage");
    refused(&["--kernel", &s(&dir.join("missing"))], "No such file");

    let mut no_note = tests::guests::IRQ_GUEST.to_vec();
    let at = no_note
        .windows(8)
        .position(|w| w == b"\x12\x00\x00\x00Xen\x00")
        .unwrap();
    no_note[at] = 0x11;
    let no_note_p = dir.join("no-note.elf");
    std::fs::write(&no_note_p, no_note).unwrap();
    refused(&["--kernel", &s(&no_note_p)], "no PVH entry note");

    let mut bz = vec![0u8; 0x1000];
    bz[0x1f1] = 1;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x20bu16.to_le_bytes());
    let bz_p = dir.join("old.bzImage");
    std::fs::write(&bz_p, bz).unwrap();
    refused(&["--kernel", &s(&bz_p)], "no 64-bit entry");

    refused(
        &["--kernel", &s(&moved_segment(&dir, 0x7000_0000))],
        "outside guest RAM",
    );
    refused(
        &["--kernel", &s(&moved_segment(&dir, 0x8000))],
        "below 1 MiB",
    );

    let irq = irq_guest(&dir);
    refused(
        &["--kernel", &s(&irq), "--boot-entry", "linux64"],
        "needs a bzImage",
    );
    refused(
        &[
            "--kernel",
            &s(&irq),
            "--initramfs",
            &s(&dir.join("missing.cpio")),
        ],
        "No such file",
    );
    let empty = dir.join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    refused(
        &["--kernel", &s(&irq), "--initramfs", &s(&empty)],
        "is empty",
    );
    let big = dir.join("big.cpio");
    std::fs::write(&big, vec![0u8; 70 << 20]).unwrap();
    refused(
        &["--kernel", &s(&irq), "--initramfs", &s(&big)],
        "do not fit",
    );
    let long = "x".repeat(3000);
    refused(&["--kernel", &s(&irq), "--cmdline", &long], "at most 2047");
    refused(
        &["--kernel", &s(&irq), "--memory", "4G"],
        "IOAPIC/LAPIC window",
    );
    refused(
        &["--kernel", &s(&irq), "--inject-corruption"],
        "needs the built-in image",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_initramfs_init_builds_and_archives() {
    // What the hardware-KVM test boots, built here too so a broken init shows up on
    // any host.
    let dir = scratch("initramfs-build");
    let archive = tests::initramfs::build(&dir);
    let bytes = std::fs::read(&archive).unwrap();
    assert!(
        bytes.starts_with(b"070701") && bytes.len() > 100_000,
        "{} bytes",
        bytes.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
