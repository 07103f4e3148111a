//! The tests' own guests, and what the end-to-end tests boot with `--kernel`:
//! - the interrupt test guest (`tests/guests/irq`, built by `tests/build.rs`);
//! - the built-in image as a file (`hugevisor guest-image`), booted through its PVH path;
//! - Debian's cloud kernel, when installed (`.ci/run` installs `linux-image-cloud-amd64`).

use std::path::{Path, PathBuf};

/// The interrupt test guest: a 32-bit PVH ELF that counts LAPIC timer, PIT and UART
/// interrupts and prints `irq: timer=T pit=P uart=U` every 50 timer ticks.
pub static IRQ_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/irq.elf"));

/// Writes the interrupt test guest into `dir`.
pub fn irq_guest(dir: &Path) -> PathBuf {
    let p = dir.join("irq.elf");
    std::fs::write(&p, IRQ_GUEST).expect("writing the irq test guest");
    p
}

/// Writes the built-in image into `dir` (through `hugevisor guest-image`).
pub fn builtin_image(dir: &Path) -> PathBuf {
    let p = dir.join("hvguest.elf");
    let out = crate::hugevisor()
        .args(["guest-image", "--out"])
        .arg(&p)
        .output()
        .expect("running hugevisor guest-image");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

/// The counts in an `irq: timer=T pit=P uart=U` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqCounts {
    pub timer: u64,
    pub pit: u64,
    pub uart: u64,
}

pub fn parse_irq_line(line: &str) -> Option<IrqCounts> {
    let rest = line.split("irq: ").nth(1)?;
    let mut c = IrqCounts::default();
    let mut seen = 0;
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "timer" => c.timer = v,
            "pit" => c.pit = v,
            "uart" => c.uart = v,
            _ => continue,
        }
        seen += 1;
    }
    (seen == 3).then_some(c)
}

/// The counts of the last console line `vm.info` shows, if it is an irq line.
pub fn irq_counts(info: &serde_json::Value) -> Option<IrqCounts> {
    parse_irq_line(info["console_last"].as_str()?)
}

/// The newest Debian cloud kernel in /boot, if one is installed.
pub fn debian_cloud_kernel() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Whether KVM here is hardware virtualization (not kvm_pvm, which emulates ring 0).
pub fn hardware_kvm() -> bool {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    !module("kvm_pvm") && (module("kvm_intel") || module("kvm_amd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_lines_parse() {
        assert_eq!(
            parse_irq_line("guest: irq: timer=50 pit=49 uart=11"),
            Some(IrqCounts {
                timer: 50,
                pit: 49,
                uart: 11
            })
        );
        assert_eq!(parse_irq_line("irq: start"), None);
    }
}
