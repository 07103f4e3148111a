//! KVM state: the VM ([`vm`]) and its vCPUs with the vCPU loop ([`vcpu`]).
pub mod dirty_ring;
pub mod vcpu;
pub mod vm;
