//! Builds the tests' own guests: `guests/irq/`, the interrupt test guest, a 32-bit PVH
//! image written independently of the built-in one. It is compiled with the host gcc
//! in 32-bit mode (freestanding: no 32-bit libraries needed), linked with `ld -m
//! elf_i386`, and converted to ELF64 with objcopy (hugevisor and linux-loader load
//! ELF64 only; the code stays 32-bit).

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &["guests/irq/entry.S", "guests/irq/irq.c"];
const LINKER_SCRIPT: &str = "guests/irq/link.ld";

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (install gcc and binutils)"));
    assert!(status.success(), "{cmd:?} failed");
}

fn main() {
    for f in SOURCES.iter().chain([&LINKER_SCRIPT]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut objects = Vec::new();
    for src in SOURCES {
        let obj = out.join(
            Path::new(src)
                .with_extension("o")
                .file_name()
                .expect("a file name"),
        );
        run(Command::new("gcc")
            .args([
                "-m32",
                "-ffreestanding",
                "-fno-pic",
                "-fno-pie",
                "-O2",
                "-nostdlib",
            ])
            .args(["-fno-stack-protector", "-fno-asynchronous-unwind-tables"])
            .args([
                "-mgeneral-regs-only",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-c",
                src,
                "-o",
            ])
            .arg(&obj));
        objects.push(obj);
    }
    let elf32 = out.join("irq32.elf");
    run(Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-z",
            "noexecstack",
            "--no-warn-rwx-segments",
            "-T",
        ])
        .arg(LINKER_SCRIPT)
        .arg("-o")
        .arg(&elf32)
        .args(&objects));
    run(Command::new("objcopy")
        .args(["-I", "elf32-i386", "-O", "elf64-x86-64"])
        .arg(&elf32)
        .arg(out.join("irq.elf")));
}
