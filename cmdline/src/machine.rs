//! The machine type, which decides the root bus and which devices hot-plug where.

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Machine {
    /// i440FX: conventional PCI, devices hot-plug into slots of `pci.0` (ACPI hotplug).
    #[default]
    Pc,
    /// Q35: PCIe; each hot-plugged device needs a free `pcie-root-port`.
    Q35,
}

impl Machine {
    /// The root bus's name.
    pub fn root_bus(self) -> &'static str {
        match self {
            Machine::Pc => "pci.0",
            Machine::Q35 => "pcie.0",
        }
    }
}
