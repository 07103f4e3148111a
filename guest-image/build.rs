//! Builds the guest image (guest/*.S, guest/*.c, guest/link.ld) into a PVH ELF with the
//! host C toolchain that the `cc` crate finds (GNU as/gcc and ld). No cross toolchain
//! is needed: the image is x86_64 like the host.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &["guest/boot.S", "guest/kernel.c", "guest/workloads.c"];
const HEADERS: &[&str] = &["guest/abi.h", "guest/hv.h", "guest/link.ld"];

fn main() {
    for f in SOURCES.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut build = cc::Build::new();
    build
        .files(SOURCES)
        .include("guest")
        .pic(false)
        .opt_level(2)
        .debug(false)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .flag("-ffreestanding")
        .flag("-fno-pie")
        .flag("-fno-stack-protector")
        .flag("-fno-asynchronous-unwind-tables")
        .flag("-fno-builtin")
        .flag("-mno-red-zone")
        .flag("-mgeneral-regs-only")
        .flag("-mcmodel=small")
        .flag("-nostdlib")
        .flag("-std=gnu11");
    let objects = build.compile_intermediates();
    let compiler = build.get_compiler();
    let image = out.join("hvguest.elf");
    let status = Command::new(compiler.path())
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-n",
        ])
        .arg("-Wl,-T,guest/link.ld")
        .args(&objects)
        .arg("-o")
        .arg(&image)
        .status()
        .expect("running the C compiler as linker driver for the guest image");
    assert!(status.success(), "linking the guest image failed");
}
