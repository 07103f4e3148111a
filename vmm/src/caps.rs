//! `hugevisor caps`: what this host offers for hugevisor, each missing item with its fix.
//!
//! Probes are real (open /dev/kvm, ask userfaultfd for its features, read the hugetlb
//! pools and THP settings) rather than guesses from the kernel version.

use std::path::Path;

use serde::Serialize;

use guest_mm::host::HostPaths;
use guest_mm::size::format_size;

use crate::vstate::vm::open_kvm;

#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// How to fix it when not ok.
    pub fix: Option<String>,
}

fn item(name: &str, ok: bool, detail: String, fix: Option<String>) -> Item {
    Item {
        name: name.to_string(),
        ok,
        detail,
        fix: if ok { None } else { fix },
    }
}

/// How KVM runs guest code on this host.
pub fn kvm_flavour() -> &'static str {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (software virtualization: ring 0 emulated, ring 3 native)"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel (VMX)"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd (SVM)"
    } else {
        "unknown"
    }
}

fn kvm_items(kvm_device: &Path) -> Vec<Item> {
    match open_kvm(kvm_device) {
        Ok(kvm) => vec![
            item(
                "kvm",
                true,
                format!(
                    "{}: API {}, {}",
                    kvm_device.display(),
                    kvm.get_api_version(),
                    kvm_flavour()
                ),
                None,
            ),
            item(
                "kvm.max_vcpus",
                true,
                format!("{}", kvm.get_max_vcpus()),
                None,
            ),
            match crate::vstate::dirty_ring::offered(&kvm) {
                Some((cap, entries)) => item(
                    "kvm.dirty_ring",
                    true,
                    format!("up to {entries} entries per vCPU ({cap:?}); --dirty-log ring works"),
                    None,
                ),
                None => item(
                    "kvm.dirty_ring",
                    false,
                    "no KVM_CAP_DIRTY_LOG_RING".into(),
                    Some("pre-copy uses the dirty bitmap (--dirty-log bitmap, the default)".into()),
                ),
            },
        ],
        Err(e) => vec![item(
            "kvm",
            false,
            format!("{}: not usable", kvm_device.display()),
            Some(e.to_string()),
        )],
    }
}

/// userfaultfd feature bits (linux/userfaultfd.h) and their names.
const UFFD_FEATURES: &[(u64, &str)] = &[
    (1 << 0, "PAGEFAULT_FLAG_WP"),
    (1 << 1, "EVENT_FORK"),
    (1 << 2, "EVENT_REMAP"),
    (1 << 3, "EVENT_REMOVE"),
    (1 << 4, "MISSING_HUGETLBFS"),
    (1 << 5, "MISSING_SHMEM"),
    (1 << 6, "EVENT_UNMAP"),
    (1 << 7, "SIGBUS"),
    (1 << 8, "THREAD_ID"),
    (1 << 9, "MINOR_HUGETLBFS"),
    (1 << 10, "MINOR_SHMEM"),
    (1 << 11, "EXACT_ADDRESS"),
    (1 << 12, "WP_HUGETLBFS_SHMEM"),
    (1 << 13, "WP_UNPOPULATED"),
    (1 << 14, "POISON"),
    (1 << 15, "WP_ASYNC"),
    (1 << 16, "MOVE"),
];

/// Features the fault path and post-copy need.
const UFFD_NEEDED: &[&str] = &[
    "MINOR_SHMEM",
    "MINOR_HUGETLBFS",
    "MISSING_SHMEM",
    "MISSING_HUGETLBFS",
    "THREAD_ID",
];

/// Asks the kernel which userfaultfd features it offers (the `uffd` crate's probe, on a
/// throwaway fd).
fn uffd_features() -> Result<u64, uffd::Error> {
    uffd::Uffd::available_features().map(|f| f.bits())
}

fn uffd_items() -> Vec<Item> {
    match uffd_features() {
        Ok(f) => {
            let names: Vec<&str> = UFFD_FEATURES
                .iter()
                .filter(|(b, _)| f & b != 0)
                .map(|(_, n)| *n)
                .collect();
            let missing: Vec<&str> = UFFD_NEEDED
                .iter()
                .copied()
                .filter(|n| !names.contains(n))
                .collect();
            vec![item(
                "userfaultfd",
                missing.is_empty(),
                format!("features {f:#x}: {}", names.join(" ")),
                Some(format!(
                    "missing {}: needs a kernel with these userfaultfd features (MINOR faults on shmem/hugetlbfs: Linux 5.13+)",
                    missing.join(", ")
                )),
            )]
        }
        Err(e) => vec![item(
            "userfaultfd",
            false,
            "unavailable".into(),
            Some(e.to_string()),
        )],
    }
}

fn memory_items(host: &HostPaths) -> Vec<Item> {
    let mut items = Vec::new();
    for (page, name) in [(2u64 << 20, "hugetlb-2m"), (1 << 30, "hugetlb-1g")] {
        let dir = host.hugetlb_dir(page);
        match host.hugetlb_pool(page) {
            Some(p) => items.push(item(
                name,
                p.available() > 0,
                format!(
                    "pool {}: {} pages, {} free, {} reserved",
                    format_size(page),
                    p.nr,
                    p.free,
                    p.resv
                ),
                Some(format!(
                    "reserve pages for --backing {name}: echo {} > {}/nr_hugepages",
                    p.nr.max(if page == 1 << 30 { 2 } else { 512 }),
                    dir.display()
                )),
            )),
            None => items.push(item(
                name,
                false,
                "no pool of this page size".into(),
                Some(format!(
                    "boot the host with hugepagesz={} to have one",
                    if page == 1 << 30 { "1G" } else { "2M" }
                )),
            )),
        }
    }
    match host.thp() {
        Some(t) => {
            let anon_ok = t.enabled != "never";
            items.push(item(
                "thp",
                anon_ok,
                format!(
                    "enabled={} defrag={} shmem_enabled={} khugepaged max_ptes_none={}",
                    t.enabled,
                    t.defrag,
                    t.shmem_enabled,
                    t.khugepaged_max_ptes_none
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "?".into())
                ),
                Some("echo madvise > /sys/kernel/mm/transparent_hugepage/enabled".into()),
            ));
        }
        None => items.push(item(
            "thp",
            false,
            "no transparent_hugepage in sysfs".into(),
            Some("build the kernel with CONFIG_TRANSPARENT_HUGEPAGE".into()),
        )),
    }
    let nodes = host.numa_nodes();
    items.push(item(
        "numa",
        !nodes.is_empty(),
        format!(
            "{} node(s): {:?}{}",
            nodes.len(),
            nodes,
            if nodes.len() == 1 {
                " (multi-node placement uses the emulated backend)"
            } else {
                ""
            }
        ),
        Some("no NUMA information in /sys/devices/system/node".into()),
    ));
    if let Some(avail) = host.mem_available() {
        items.push(item(
            "memory",
            true,
            format!("{} available", format_size(avail / (1 << 20) * (1 << 20))),
            None,
        ));
    }
    items
}

/// Everything `hugevisor caps` reports.
pub fn probe(kvm_device: &Path) -> Vec<Item> {
    let host = HostPaths::default();
    let mut v = kvm_items(kvm_device);
    v.extend(uffd_items());
    v.extend(memory_items(&host));
    v
}

/// How `hugevisor caps` prints what it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// One JSON array (`--json`).
    Json,
    /// A line per capability, with its fix.
    Text,
}

pub fn cmd_caps(output: Output, kvm_device: &Path) -> i32 {
    let items = probe(kvm_device);
    if output == Output::Json {
        match serde_json::to_string_pretty(&items) {
            Ok(s) => println!("{s}"),
            Err(e) => return crate::cli::fail(&format!("serializing: {e}")),
        }
    } else {
        for i in &items {
            println!(
                "{:<4} {:<15} {}",
                if i.ok { "ok" } else { "MISS" },
                i.name,
                i.detail
            );
            if let Some(fix) = &i.fix {
                println!("     {:<15} fix: {fix}", "");
            }
        }
    }
    // Missing optional capabilities are reported, not failures; only KVM is essential.
    if items.iter().any(|i| i.name == "kvm" && !i.ok) {
        crate::cli::EXIT_ERROR
    } else {
        crate::cli::EXIT_OK
    }
}
