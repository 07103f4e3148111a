//! Each vCPU's CPUID: what `KVM_GET_SUPPORTED_CPUID` offers (never the host's own
//! CPUID, which leaks features KVM cannot give a guest here — XSAVE, AVX-512, SMAP
//! under kvm_pvm), with the topology leaves rewritten to match `--vcpus` and `--numa`:
//! one package, one thread per core, one core per vCPU, APIC ID = vCPU index, and on
//! AMD the node of each vCPU in leaf 0x8000_001e.

use kvm_bindings::CpuId;

/// The guest's CPU topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuTopology {
    pub vcpus: u32,
    /// Guest NUMA node of each vCPU (empty: all on node 0).
    pub vcpu_nodes: Vec<u16>,
}

impl CpuTopology {
    pub fn nodes(&self) -> u32 {
        self.vcpu_nodes
            .iter()
            .map(|&n| u32::from(n) + 1)
            .max()
            .unwrap_or(1)
    }

    pub fn node_of(&self, vcpu: usize) -> u32 {
        self.vcpu_nodes.get(vcpu).map_or(0, |&n| u32::from(n))
    }

    /// Bits of the APIC ID that number the cores of the package.
    fn core_bits(&self) -> u32 {
        self.vcpus.max(1).next_power_of_two().trailing_zeros()
    }
}

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
/// CPUID.1:EDX.HTT — the logical-processor count in EBX[23:16] is valid.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.1:ECX.HYPERVISOR — KVM sets it; a guest then looks for kvmclock at 0x4000_0000.
const ECX_HYPERVISOR: u32 = 1 << 31;

/// `supported` with vCPU `index`'s topology leaves.
pub fn vcpu_cpuid(supported: &CpuId, index: usize, topo: &CpuTopology) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = index as u32;
    let n = topo.vcpus.max(1);
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((n.min(255)) << 16);
                e.edx |= EDX_HTT;
                e.ecx |= ECX_HYPERVISOR;
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                // Level 0: SMT (one thread per core); level 1: cores in the package.
                let (shift, count, kind) = match e.index {
                    0 => (0, 1, 1),
                    1 => (topo.core_bits(), n, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (kind << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            LEAF_AMD_SIZES => {
                e.ecx = (topo.core_bits() << 12) | (n - 1).min(255);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // compute unit = core; one thread per unit
                e.ecx = ((topo.nodes() - 1) << 8) | topo.node_of(index);
                e.edx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_leaves_follow_vcpus_and_nodes() {
        let base = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap();
        let topo = CpuTopology {
            vcpus: 3,
            vcpu_nodes: vec![0, 1, 1],
        };
        let c = vcpu_cpuid(&base, 2, &topo);
        let e = |f: u32, i: u32| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        assert_eq!(e(1, 0).ebx >> 24, 2);
        assert_eq!((e(1, 0).ebx >> 16) & 0xff, 3);
        assert_eq!(e(0xb, 1).ebx, 3);
        assert_eq!(e(0xb, 1).eax, 2);
        assert_eq!(e(0xb, 0).edx, 2);
        assert_eq!(e(0x8000_0008, 0).ecx & 0xff, 2);
        assert_eq!(e(0x8000_001e, 0).ecx, (1 << 8) | 1);
    }
}
