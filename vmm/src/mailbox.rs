//! The shared mailbox: per-vCPU counters the guest publishes and the VMM reads without
//! an exit, plus the VMM's stop flag. Accesses go through the staging view with atomic
//! loads and stores (the guest writes the same words concurrently).
//!
//! A guest hugevisor did not build has no mailbox ([`Mailbox::none`]): its slots read as
//! empty and the VMM's writes go nowhere, so the controller and the report treat it as
//! a guest that publishes nothing.

use std::sync::atomic::Ordering;

use guest_image::abi::{self, VcpuSlot};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Clone, Copy, Debug)]
pub struct Mailbox {
    base: Option<u64>,
}

impl Mailbox {
    pub fn new(base: u64) -> Self {
        Mailbox { base: Some(base) }
    }

    /// The mailbox of a guest that has none.
    pub fn none() -> Self {
        Mailbox { base: None }
    }

    /// Whether the guest publishes a mailbox (the built-in image, by either entry).
    pub fn is_present(&self) -> bool {
        self.base.is_some()
    }

    /// Its guest-physical address, if the guest has one.
    pub fn base(&self) -> Option<u64> {
        self.base
    }

    /// Asks every vCPU to finish its current pass and exit.
    pub fn request_stop(&self, mem: &GuestMemoryMmap) {
        let Some(base) = self.base else { return };
        // The address lies inside the loaded image, which was written at start-up, so
        // the store cannot fail; a failure would only delay the stop until --timeout.
        let _ = mem.store(
            1u64,
            GuestAddress(base + abi::MAILBOX_STOP_OFFSET),
            Ordering::Release,
        );
    }

    /// Clears vCPU `index`'s worst pass, so that it measures from now on (a migration
    /// destination's guest stall).
    pub fn reset_max_pass(&self, mem: &GuestMemoryMmap, index: usize) {
        let Some(base) = self.base else { return };
        let gpa = abi::vcpu_slot_gpa(base, index)
            + std::mem::offset_of!(VcpuSlot, max_pass_cycles) as u64;
        let _ = mem.store(0u64, GuestAddress(gpa), Ordering::Release);
    }

    /// Sets vCPU `index`'s worst pass (restoring it after a migration that failed).
    pub fn set_max_pass(&self, mem: &GuestMemoryMmap, index: usize, cycles: u64) {
        let Some(base) = self.base else { return };
        let gpa = abi::vcpu_slot_gpa(base, index)
            + std::mem::offset_of!(VcpuSlot, max_pass_cycles) as u64;
        let _ = mem.store(cycles, GuestAddress(gpa), Ordering::Release);
    }

    /// The guest-physical range of the mailbox for `vcpus` vCPUs.
    /// Empty for a guest without a mailbox.
    pub fn gpa_range(&self, vcpus: usize) -> std::ops::Range<u64> {
        match self.base {
            Some(base) => base..abi::vcpu_slot_gpa(base, vcpus),
            None => 0..0,
        }
    }

    /// A consistent-enough snapshot of vCPU `index`'s slot (each word read atomically).
    pub fn slot(&self, mem: &GuestMemoryMmap, index: usize) -> VcpuSlot {
        let Some(mailbox) = self.base else {
            return VcpuSlot::default();
        };
        let base = abi::vcpu_slot_gpa(mailbox, index);
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
