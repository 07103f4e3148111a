//! The ACPI tables a `--kernel` guest gets (rust-vmm's `acpi_tables`): RSDP, XSDT, FADT
//! (hardware-reduced, with the sleep registers that power the VM off), DSDT (`_S5_`,
//! COM1), MADT (one LAPIC per vCPU, the IOAPIC) and, with `--numa`, SRAT (each node's
//! memory range and vCPUs) and SLIT. `hugevisor acpi-tables --out DIR` writes the same
//! tables to files for inspection (`iasl -d`).
//!
//! The tables sit from [`layout::ACPI_GPA`] (0xe0000), in the reserved hole below 1 MiB,
//! the RSDP first so that a guest that scans the BIOS area (no PVH rsdp_paddr) finds it.

use std::path::Path;

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::slit::SLIT;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use guest_mm::{Gpa, GpaRange, SIZE_2M};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::layout;
use crate::devices;
use crate::error::{Error, Result};
use crate::vstate::cpuid::CpuTopology;

const OEM_ID: [u8; 6] = *b"HUGEVS";
const OEM_TABLE: [u8; 8] = *b"HUGEVISR";
const OEM_REVISION: u32 = 1;
const LAPIC_BASE: u32 = 0xfee0_0000;
const IOAPIC_BASE: u32 = 0xfec0_0000;
/// SLIT distances: the ACPI convention's 10 for a node to itself, 20 to another.
const LOCAL_DISTANCE: u8 = 10;
const REMOTE_DISTANCE: u8 = 20;

/// One table and where it goes.
#[derive(Clone, Debug)]
pub struct Table {
    /// The file name `acpi-tables` writes (acpixtract's convention: signature.dat).
    pub name: &'static str,
    pub gpa: u64,
    pub bytes: Vec<u8>,
}

/// Every table of a guest, the RSDP first.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    pub tables: Vec<Table>,
}

/// Each node's part of guest RAM as the SRAT gives it: an even split in 2 MiB regions
/// (the last node takes the remainder). Regions may move later (NUMA balancing); this
/// is where they start.
pub fn node_ranges(ram: u64, nodes: u32) -> Vec<GpaRange> {
    let regions = ram / SIZE_2M;
    let per = regions / u64::from(nodes.max(1));
    (0..u64::from(nodes.max(1)))
        .map(|n| {
            let start = n * per * SIZE_2M;
            let end = if n + 1 == u64::from(nodes) {
                ram
            } else {
                (n + 1) * per * SIZE_2M
            };
            GpaRange::new(Gpa(start), Gpa(end))
        })
        .collect()
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt() -> Vec<u8> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&devices::ACPI_S5_TYPE]),
    );
    let io = aml::IO::new(devices::COM1, devices::COM1, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, devices::COM1_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.append_slice(&bytes(&s5));
    t.append_slice(&bytes(&com1));
    t.as_slice().to_vec()
}

fn fadt(dsdt_gpa: u64) -> Vec<u8> {
    let sleep = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_gpa)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    f.sleep_control_reg = sleep(devices::ACPI_SLEEP_CONTROL);
    f.sleep_status_reg = sleep(devices::ACPI_SLEEP_STATUS);
    // Reset through the i8042's command port, which ends the VM.
    f.reset_reg = sleep(devices::I8042_COMMAND);
    f.reset_value = 0xfe;
    bytes(&f.finalize())
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_BASE),
    );
    for cpu in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(
            cpu as u8,
            cpu as u8,
            EnabledStatus::Enabled,
        ));
    }
    m.add_structure(IoApic::new(0, IOAPIC_BASE, 0));
    bytes(&m)
}

/// SRAT: a Processor Local APIC Affinity per vCPU (the crate has no such structure, so
/// it is written here) and a Memory Affinity per node.
fn srat(topo: &CpuTopology, ram: u64) -> Vec<u8> {
    let mut t = Sdt::new(*b"SRAT", 36, 3, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.append_slice(&1u32.to_le_bytes()); // reserved, 1 for compatibility
    t.append_slice(&0u64.to_le_bytes());
    for cpu in 0..topo.vcpus as usize {
        let node = topo.node_of(cpu);
        let mut s = vec![0u8, 16, node as u8, cpu as u8];
        s.extend_from_slice(&1u32.to_le_bytes()); // enabled
        s.push(0); // local SAPIC EID
        s.extend_from_slice(&node.to_le_bytes()[1..4]);
        s.extend_from_slice(&0u32.to_le_bytes()); // clock domain
        t.append_slice(&s);
    }
    for (node, r) in node_ranges(ram, topo.nodes()).iter().enumerate() {
        t.append_slice(&bytes(
            &MemoryAffinity::new(node as u32, r.start.raw(), r.len()).enabled(),
        ));
    }
    t.as_slice().to_vec()
}

fn slit(nodes: u32) -> Vec<u8> {
    let mut s = SLIT::new(OEM_ID, OEM_TABLE, OEM_REVISION, nodes);
    for a in 0..nodes as usize {
        for b in 0..nodes as usize {
            s.set_distance(
                a,
                b,
                if a == b {
                    LOCAL_DISTANCE
                } else {
                    REMOTE_DISTANCE
                },
            );
        }
    }
    bytes(&s)
}

/// Whether the tables describe guest NUMA nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumaTables {
    /// SRAT and SLIT: the run has `--numa`.
    Describe,
    /// Neither: one node, as without ACPI NUMA.
    Omit,
}

impl NumaTables {
    /// What a run with `numa` (its `--numa`, if any) needs.
    pub fn for_run<T>(numa: Option<&T>) -> NumaTables {
        match numa {
            Some(_) => NumaTables::Describe,
            None => NumaTables::Omit,
        }
    }
}

/// The tables for `topo`'s vCPUs and nodes and `ram` bytes of RAM; the SRAT and SLIT
/// only when `numa` says so.
pub fn build(topo: &CpuTopology, ram: u64, numa: NumaTables) -> AcpiTables {
    let mut next = layout::ACPI_GPA + 64; // after the RSDP
    let mut place = |name: &'static str, bytes: Vec<u8>| {
        let gpa = next;
        next = (next + bytes.len() as u64).next_multiple_of(16);
        Table { name, gpa, bytes }
    };
    let dsdt = place("dsdt.dat", dsdt());
    let fadt = place("facp.dat", fadt(dsdt.gpa));
    let madt = place("apic.dat", madt(topo.vcpus));
    let mut tables = vec![dsdt, fadt, madt];
    if numa == NumaTables::Describe {
        tables.push(place("srat.dat", srat(topo, ram)));
        tables.push(place("slit.dat", slit(topo.nodes())));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    // The XSDT lists every table but the DSDT (the FADT points at it).
    for t in &tables[1..] {
        xsdt.add_entry(t.gpa);
    }
    let xsdt = place("xsdt.dat", bytes(&xsdt));
    let rsdp = Table {
        name: "rsdp.dat",
        gpa: layout::ACPI_GPA,
        bytes: bytes(&Rsdp::new(OEM_ID, xsdt.gpa)),
    };
    let mut all = vec![rsdp, xsdt];
    all.extend(tables);
    AcpiTables { tables: all }
}

impl AcpiTables {
    /// The RSDP's address (PVH start_info, the zero page).
    pub fn rsdp(&self) -> u64 {
        layout::ACPI_GPA
    }

    /// Writes every table into guest RAM.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<()> {
        for t in &self.tables {
            if t.gpa + t.bytes.len() as u64 > layout::ACPI_END {
                return Err(Error::AcpiTooLarge {
                    end: t.gpa + t.bytes.len() as u64,
                });
            }
            mem.write_slice(&t.bytes, GuestAddress(t.gpa))
                .map_err(|e| Error::GuestWrite {
                    gpa: t.gpa,
                    what: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Writes every table to `dir` (created if missing), one file each.
    pub fn write_dir(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        let io = |what: String| move |source| Error::Io { what, source };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        self.tables
            .iter()
            .map(|t| {
                let p = dir.join(t.name);
                std::fs::write(&p, &t.bytes).map_err(io(format!("writing {}", p.display())))?;
                Ok(p)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_sums_to_zero_and_fits() {
        let topo = CpuTopology {
            vcpus: 4,
            vcpu_nodes: vec![0, 0, 1, 1],
        };
        let t = build(&topo, 256 << 20, NumaTables::Describe);
        for table in &t.tables {
            let len = if table.name == "rsdp.dat" {
                36
            } else {
                table.bytes.len()
            };
            let sum = table.bytes[..len]
                .iter()
                .fold(0u8, |a, b| a.wrapping_add(*b));
            assert_eq!(sum, 0, "{}", table.name);
            assert!(table.gpa + table.bytes.len() as u64 <= layout::ACPI_END);
            if table.name != "rsdp.dat" {
                let declared = u32::from_le_bytes(table.bytes[4..8].try_into().unwrap());
                assert_eq!(declared as usize, table.bytes.len(), "{}", table.name);
            }
        }
        assert_eq!(
            node_ranges(256 << 20, 2)[1],
            GpaRange::new(Gpa(128 << 20), Gpa(256 << 20))
        );
    }
}
