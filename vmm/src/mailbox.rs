//! The shared mailbox: per-vCPU counters the guest publishes and the VMM reads without
//! an exit, plus the VMM's stop flag. Accesses go through the staging view with atomic
//! loads and stores (the guest writes the same words concurrently).

use std::sync::atomic::Ordering;

use guest_image::abi::{self, VcpuSlot};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Clone, Copy, Debug)]
pub struct Mailbox {
    base: u64,
}

impl Mailbox {
    pub fn new(base: u64) -> Self {
        Mailbox { base }
    }

    /// Asks every vCPU to finish its current pass and exit.
    pub fn request_stop(&self, mem: &GuestMemoryMmap) {
        // The address lies inside the loaded image, which was written at start-up, so
        // the store cannot fail; a failure would only delay the stop until --timeout.
        let _ = mem.store(
            1u64,
            GuestAddress(self.base + abi::MAILBOX_STOP_OFFSET),
            Ordering::Release,
        );
    }

    /// Clears vCPU `index`'s worst pass, so that it measures from now on (a migration
    /// destination's guest stall).
    pub fn reset_max_pass(&self, mem: &GuestMemoryMmap, index: usize) {
        let gpa = abi::vcpu_slot_gpa(self.base, index)
            + std::mem::offset_of!(VcpuSlot, max_pass_cycles) as u64;
        let _ = mem.store(0u64, GuestAddress(gpa), Ordering::Release);
    }

    /// Sets vCPU `index`'s worst pass (restoring it after a migration that failed).
    pub fn set_max_pass(&self, mem: &GuestMemoryMmap, index: usize, cycles: u64) {
        let gpa = abi::vcpu_slot_gpa(self.base, index)
            + std::mem::offset_of!(VcpuSlot, max_pass_cycles) as u64;
        let _ = mem.store(cycles, GuestAddress(gpa), Ordering::Release);
    }

    /// The guest-physical range of the mailbox for `vcpus` vCPUs.
    pub fn gpa_range(&self, vcpus: usize) -> std::ops::Range<u64> {
        self.base..abi::vcpu_slot_gpa(self.base, vcpus)
    }

    /// A consistent-enough snapshot of vCPU `index`'s slot (each word read atomically).
    pub fn slot(&self, mem: &GuestMemoryMmap, index: usize) -> VcpuSlot {
        let base = abi::vcpu_slot_gpa(self.base, index);
        let mut words = [0u64; (abi::VCPU_SLOT_SIZE / 8) as usize];
        for (i, w) in words.iter_mut().enumerate() {
            *w = mem
                .load::<u64>(GuestAddress(base + 8 * i as u64), Ordering::Acquire)
                .unwrap_or(0);
        }
        // SAFETY: VcpuSlot is repr(C), exactly VCPU_SLOT_SIZE bytes of u64 fields (checked
        // at compile time in guest_image::abi), so any [u64; 32] is a valid VcpuSlot.
        unsafe { std::mem::transmute::<[u64; (abi::VCPU_SLOT_SIZE / 8) as usize], VcpuSlot>(words) }
    }
}
