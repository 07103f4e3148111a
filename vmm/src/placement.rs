//! What the built-in workloads mean for guest NUMA: each vCPU's working set and where
//! guest memory starts out. guest-mm measures locality over the working sets and applies
//! the placement plan; it never sees a workload.

use guest_image::abi;
use guest_image::Workload;
use guest_mm::{Gpa, GpaRange, SIZE_2M, SIZE_4K};

/// Each vCPU's working set: its partition of the data area, or the whole data area for
/// numa01 (a buffer every vCPU shares). Partitions split the data area's pages as the
/// guest does, the last vCPU taking the remainder.
pub fn working_sets(workload: Workload, ram_size: u64, vcpus: usize) -> Vec<GpaRange> {
    let total = (ram_size - abi::DATA_START) / SIZE_4K;
    let per = total / vcpus as u64;
    (0..vcpus as u64)
        .map(|v| {
            if workload == Workload::Numa01 {
                return GpaRange::new(Gpa(abi::DATA_START), Gpa(ram_size));
            }
            let start = abi::DATA_START + v * per * SIZE_4K;
            let pages = if v == vcpus as u64 - 1 {
                total - v * per
            } else {
                per
            };
            GpaRange::new(Gpa(start), Gpa(start + pages * SIZE_4K))
        })
        .collect()
}

/// The initial placement of the data area's 2 MiB regions (the image area stays on
/// node 0): numa02 on the wrong node (the balancer must fix it), numa01 on node 0,
/// numa01_thread_alloc interleaved, every other workload on the node of the vCPU whose
/// working set holds the region. Regions that stay on node 0 are not listed.
pub fn plan(
    workload: Workload,
    ram_size: u64,
    sets: &[GpaRange],
    vcpu_nodes: &[u16],
    nodes: u16,
) -> Vec<(GpaRange, u16)> {
    if nodes < 2 {
        return Vec::new();
    }
    let node_of_vcpu = |v: usize| vcpu_nodes.get(v).copied().unwrap_or(0);
    (abi::DATA_START / SIZE_2M..ram_size / SIZE_2M)
        .filter_map(|r| {
            let gpa = Gpa(r * SIZE_2M);
            let owner = sets.iter().position(|s| s.contains_gpa(gpa)).unwrap_or(0);
            let node = match workload {
                Workload::Numa01 => 0,
                Workload::Numa02 => (node_of_vcpu(owner) + 1) % nodes,
                Workload::Numa01ThreadAlloc => (r % nodes as u64) as u16,
                _ => node_of_vcpu(owner),
            };
            (node != 0).then(|| (GpaRange::new(gpa, gpa.add(SIZE_2M)), node))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> GpaRange {
        GpaRange::new(Gpa(a), Gpa(b))
    }

    #[test]
    fn working_sets_split_like_the_guest() {
        let w = working_sets(Workload::Numa02, 64 << 20, 2);
        assert_eq!(w, vec![r(4 << 20, 34 << 20), r(34 << 20, 64 << 20)]);
        let w = working_sets(Workload::Numa01, 64 << 20, 2);
        assert!(w.iter().all(|&x| x == r(4 << 20, 64 << 20)));
    }

    #[test]
    fn plans_follow_the_workload() {
        let sets = working_sets(Workload::Numa02, 64 << 20, 2);
        let p = plan(Workload::Numa02, 64 << 20, &sets, &[0, 1], 2);
        // vCPU 0's regions (node 0) go to node 1; vCPU 1's stay on node 0 (unlisted).
        assert_eq!(p.first(), Some(&(r(4 << 20, 6 << 20), 1)));
        assert!(p.iter().all(|&(x, n)| n == 1 && x.end.0 <= 34 << 20));
        assert!(plan(Workload::Numa01, 64 << 20, &sets, &[0, 1], 2).is_empty());
        let alt = plan(Workload::Numa01ThreadAlloc, 64 << 20, &sets, &[0, 1], 2);
        assert_eq!(alt.len(), 15, "every other region of 30");
        assert!(plan(Workload::Verify, 64 << 20, &sets, &[0, 0], 1).is_empty());
    }
}
