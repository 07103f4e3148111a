//! A tiny initramfs for booting a real kernel to userspace: one static `init` (built
//! from C with the host gcc and glibc's static libc) that mounts /proc, prints the CPUs
//! and memory it sees, and powers the VM off (ACPI S5 through hugevisor's FADT).
//! The archive is the kernel's "newc" cpio format, written here.

use std::path::{Path, PathBuf};
use std::process::Command;

const INIT_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/reboot.h>
int main(void) {
    mount("proc", "/proc", "proc", 0, 0);
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];
    int cpus = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "processor", 9)) cpus++;
    long pages = sysconf(_SC_PHYS_PAGES);
    printf("hugevisor-init: cpus=%d mem_mib=%ld\n", cpus, pages * (sysconf(_SC_PAGESIZE) / 1024) / 1024);
    printf("hugevisor-init: done\n");
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
"#;

fn entry(out: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        0,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A newc cpio archive of `init` with /dev/console and /proc.
pub fn archive(init: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    entry(&mut a, "dev", 0o040755, (0, 0), &[]);
    entry(&mut a, "dev/console", 0o020600, (5, 1), &[]);
    entry(&mut a, "proc", 0o040755, (0, 0), &[]);
    entry(&mut a, "init", 0o100755, (0, 0), init);
    entry(&mut a, "TRAILER!!!", 0, (0, 0), &[]);
    a
}

/// Builds the initramfs in `dir` and returns its path.
pub fn build(dir: &Path) -> PathBuf {
    let src = dir.join("init.c");
    let bin = dir.join("init");
    std::fs::write(&src, INIT_C).expect("writing init.c");
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("running gcc");
    assert!(
        st.success(),
        "building the initramfs init (needs libc6-dev's static libc)"
    );
    let out = dir.join("initramfs.cpio");
    std::fs::write(&out, archive(&std::fs::read(&bin).expect("reading init")))
        .expect("writing the initramfs");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let a = super::archive(b"12345");
        assert!(a.starts_with(b"070701"));
        assert!(a.len().is_multiple_of(4));
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
