//! Host memory facts from /proc and /sys: hugetlb pools, MemAvailable, thp settings,
//! NUMA nodes. Roots are overridable so validation can be tested on a fake tree.

use std::path::{Path, PathBuf};

/// How much the scheduler favours a thread that a vCPU waits on ([`favour_this_thread`]).
pub const FAVOURED_NICE: i32 = -10;

/// Makes the calling thread win the CPU over the vCPU threads whenever it wakes (nice
/// -10): for the threads a faulting vCPU waits on — the fault thread, a post-copy
/// destination's urgent receiver, the source answering its requests. On a host whose
/// cores are busy running vCPUs, a wake-up otherwise waits for a running vCPU's time
/// slice to end (milliseconds), which is what a demand fault's p99 measured. These
/// threads sleep until there is work and do little per wake-up, so they cannot starve
/// the guest. Best effort: without CAP_SYS_NICE the thread keeps its priority.
pub fn favour_this_thread() -> std::io::Result<()> {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id; no memory is passed.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, FAVOURED_NICE) };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPaths {
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
        }
    }
}

/// One hugetlb pool (one page size).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HugetlbPool {
    pub page_size: u64,
    pub nr: u64,
    pub free: u64,
    /// Reserved by existing mappings but not yet faulted in: not available to us.
    pub resv: u64,
    pub surplus: u64,
}

impl HugetlbPool {
    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.resv)
    }
}

/// thp settings (the selected value of each sysfs knob).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ThpSettings {
    pub enabled: String,
    pub defrag: String,
    pub shmem_enabled: String,
    pub khugepaged_max_ptes_none: Option<u64>,
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trim(p)?.parse().ok()
}

/// The bracketed choice in a sysfs selector such as "always [madvise] never".
fn selected(s: &str) -> String {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or(s)
        .to_string()
}

impl HostPaths {
    /// The sysfs directory of the pool of `page_size`-byte hugetlb pages.
    pub fn hugetlb_dir(&self, page_size: u64) -> PathBuf {
        self.sys_root.join(format!(
            "kernel/mm/hugepages/hugepages-{}kB",
            page_size >> 10
        ))
    }

    pub fn hugetlb_pool(&self, page_size: u64) -> Option<HugetlbPool> {
        let dir = self.hugetlb_dir(page_size);
        Some(HugetlbPool {
            page_size,
            nr: read_u64(&dir.join("nr_hugepages"))?,
            free: read_u64(&dir.join("free_hugepages"))?,
            resv: read_u64(&dir.join("resv_hugepages")).unwrap_or(0),
            surplus: read_u64(&dir.join("surplus_hugepages")).unwrap_or(0),
        })
    }

    /// Every hugetlb pool the host has, smallest page first.
    pub fn hugetlb_pools(&self) -> Vec<HugetlbPool> {
        let mut sizes: Vec<u64> = std::fs::read_dir(self.sys_root.join("kernel/mm/hugepages"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("hugepages-")?
                            .strip_suffix("kB")?
                            .parse::<u64>()
                            .ok()
                    })
                    .map(|kib| kib << 10)
                    .collect()
            })
            .unwrap_or_default();
        sizes.sort_unstable();
        sizes
            .into_iter()
            .filter_map(|s| self.hugetlb_pool(s))
            .collect()
    }

    /// MemAvailable from /proc/meminfo, in bytes.
    pub fn mem_available(&self) -> Option<u64> {
        let meminfo = std::fs::read_to_string(self.proc_root.join("meminfo")).ok()?;
        meminfo.lines().find_map(|l| {
            let kb = l
                .strip_prefix("MemAvailable:")?
                .trim()
                .strip_suffix("kB")?
                .trim();
            kb.parse::<u64>().ok().map(|k| k << 10)
        })
    }

    pub fn thp(&self) -> Option<ThpSettings> {
        let dir = self.sys_root.join("kernel/mm/transparent_hugepage");
        Some(ThpSettings {
            enabled: selected(&read_trim(&dir.join("enabled"))?),
            defrag: read_trim(&dir.join("defrag"))
                .map(|s| selected(&s))
                .unwrap_or_default(),
            shmem_enabled: read_trim(&dir.join("shmem_enabled"))
                .map(|s| selected(&s))
                .unwrap_or_default(),
            khugepaged_max_ptes_none: read_u64(&dir.join("khugepaged/max_ptes_none")),
        })
    }

    /// Online NUMA nodes.
    pub fn numa_nodes(&self) -> Vec<u32> {
        let online =
            read_trim(&self.sys_root.join("devices/system/node/online")).unwrap_or_default();
        parse_cpu_list(&online)
    }
}

/// Parses a kernel list such as "0-3,5".
pub fn parse_cpu_list(s: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<u32>().ok()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_selectors_and_lists() {
        assert_eq!(selected("always [madvise] never"), "madvise");
        assert_eq!(parse_cpu_list("0-2,5"), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpu_list("0"), vec![0]);
        assert!(parse_cpu_list("").is_empty());
    }

    #[test]
    fn reads_this_host() {
        let h = HostPaths::default();
        assert!(h.mem_available().unwrap() > 0);
        assert!(!h.numa_nodes().is_empty());
    }
}
