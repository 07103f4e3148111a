//! KVM state: the VM ([`vm`]), its vCPUs with the vCPU loop ([`vcpu`]) and the set of
//! vCPU threads that pauses and resumes them in place ([`vcpu_set`]), each vCPU's CPUID
//! ([`cpuid`]) and the whole CPU and device state a migration carries ([`state`]).
pub mod cpuid;
pub mod dirty_ring;
pub mod state;
pub mod vcpu;
pub mod vcpu_set;
pub mod vm;
