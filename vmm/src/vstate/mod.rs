//! KVM state: the VM ([`vm`]), its vCPUs with the vCPU loop ([`vcpu`]) and the set of
//! vCPU threads that pauses and resumes them in place ([`vcpu_set`]), each vCPU's CPUID
//! ([`cpuid`]).
pub mod cpuid;
pub mod dirty_ring;
pub mod vcpu;
pub mod vcpu_set;
pub mod vm;
