//! The device registry: what the engine and the state ask of a placed device ([`Placed`]), and the
//! `Device` enum with every dispatch over it and over `DeviceKind`, generated from the one list
//! of kinds in [`device_kind`](crate::device_kind), so no other module names the kinds one by
//! one.

use qhotplug_cmdline::{DeviceModel, Pci, ScsiAddr, VmSpec};

use super::Plug;
use crate::device_kind::DeviceKind;
use crate::error::{Error, Result};
use crate::qemu::delete::Delete;

/// Where a device sits, for the slot maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Place {
    Pci(Pci),
    Scsi(ScsiAddr),
    /// Somewhere no slot map of the SDK's covers: an IDE unit, a vCPU slot, a DIMM slot (QEMU
    /// picks it).
    Fixed,
}

impl Place {
    /// The PCI address of a kind that asked for one (`Want::Pci`); any other place is
    /// [`Error::AddressMismatch`] for device `id`.
    pub(crate) fn pci(self, id: &str) -> Result<Pci> {
        match self {
            Place::Pci(pci) => Ok(pci),
            _ => Err(Error::AddressMismatch(id.to_owned())),
        }
    }
}

/// A placed device of one kind, as the spec lists it: its name, the config its hot-add takes,
/// where it sits, and what its removal deletes.
pub(crate) trait Placed: DeviceModel + Clone {
    /// What a caller hot-adds it with.
    type Config: Plug<Added = Self>;
    /// Where it sits.
    fn place(&self) -> Place;
    /// What goes before the guest is asked to let the device go, with what puts it back if the
    /// device stays (a CD-ROM's medium).
    fn before_unplug(&self) -> Option<(Delete, Vec<Delete>)> {
        None
    }
    /// What goes once the guest has let the device go, in order.
    fn teardown(&self) -> Vec<Delete> {
        Vec::new()
    }
}

/// A field of the spec that holds devices of one kind: a list, or at most one (the balloon).
trait Field<T: DeviceModel> {
    fn take_id(&mut self, id: &str) -> Option<T>;
    fn put(&mut self, device: T);
    /// Puts `device` where the one with its id is; false when there is none.
    fn replace_id(&mut self, device: T) -> bool;
}

impl<T: DeviceModel> Field<T> for Vec<T> {
    fn take_id(&mut self, id: &str) -> Option<T> {
        let at = self.iter().position(|d| DeviceModel::id(d) == id)?;
        Some(self.remove(at))
    }
    fn put(&mut self, device: T) {
        self.push(device);
    }
    fn replace_id(&mut self, device: T) -> bool {
        match self.iter_mut().find(|d| d.id() == device.id()) {
            Some(slot) => {
                *slot = device;
                true
            }
            None => false,
        }
    }
}

impl<T: DeviceModel> Field<T> for Option<T> {
    fn take_id(&mut self, id: &str) -> Option<T> {
        self.take_if(|d| DeviceModel::id(d) == id)
    }
    fn put(&mut self, device: T) {
        *self = Some(device);
    }
    fn replace_id(&mut self, device: T) -> bool {
        match self {
            Some(d) if d.id() == device.id() => {
                *d = device;
                true
            }
            _ => false,
        }
    }
}

/// Generates `Device` and the dispatch over it and over `DeviceKind` from the one list of kinds
/// (`device_kind::kinds!`): per kind, the variant, the placed type (which implements [`Placed`]),
/// the `VmSpec` field that lists them, and its name.
macro_rules! registry {
    ($($(#[$doc:meta])* $kind:ident($placed:ty) in $field:ident, $name:literal;)*) => {

        /// A placed device, as `vm.spec()` lists it. One per device in the state's map, moved
        /// rarely: a disk's size (its I/O limits, chain and checkpoints inline) is not worth a box.
        #[derive(Debug, Clone)]
        #[allow(clippy::large_enum_variant)]
        pub(crate) enum Device {
            $($kind($placed),)*
        }

        $(impl From<$placed> for Device {
            fn from(device: $placed) -> Device {
                Device::$kind(device)
            }
        })*

        impl DeviceKind {
            /// What its hot-add and hot-remove are called in errors.
            pub(crate) fn operation(self) -> &'static str {
                match self {
                    $(DeviceKind::$kind => <<$placed as Placed>::Config as Plug>::OPERATION,)*
                }
            }

            /// The QMP commands its hot-add and hot-remove use.
            pub(crate) fn commands(self) -> &'static [&'static str] {
                match self {
                    $(DeviceKind::$kind => <<$placed as Placed>::Config as Plug>::COMMANDS,)*
                }
            }
        }

        impl Device {
            pub(crate) fn kind(&self) -> DeviceKind {
                match self {
                    $(Device::$kind(_) => DeviceKind::$kind,)*
                }
            }

            pub(crate) fn id(&self) -> &str {
                match self {
                    $(Device::$kind(d) => DeviceModel::id(d),)*
                }
            }

            pub(crate) fn place(&self) -> Place {
                match self {
                    $(Device::$kind(d) => d.place(),)*
                }
            }

            /// See [`Placed::before_unplug`].
            pub(crate) fn before_unplug(&self) -> Option<(Delete, Vec<Delete>)> {
                match self {
                    $(Device::$kind(d) => d.before_unplug(),)*
                }
            }

            /// See [`Placed::teardown`].
            pub(crate) fn teardown(&self) -> Vec<Delete> {
                match self {
                    $(Device::$kind(d) => d.teardown(),)*
                }
            }

            /// Every device `spec` lists, kind by kind.
            pub(crate) fn all(spec: &VmSpec) -> Vec<Device> {
                let mut all = Vec::new();
                $(all.extend(spec.$field.iter().cloned().map(Device::$kind));)*
                all
            }

            /// The device of this kind and id in `spec`, looked up in its kind's list only.
            pub(crate) fn find(spec: &VmSpec, kind: DeviceKind, id: &str) -> Option<Device> {
                match kind {
                    $(DeviceKind::$kind => spec.$field.iter().find(|d| DeviceModel::id(*d) == id).cloned().map(Device::$kind),)*
                }
            }

            /// Takes the device of this kind and id out of `spec`.
            pub(crate) fn take(spec: &mut VmSpec, kind: DeviceKind, id: &str) -> Option<Device> {
                match kind {
                    $(DeviceKind::$kind => spec.$field.take_id(id).map(Device::$kind),)*
                }
            }

            /// Puts the device where the one of its kind and id is in `spec`; false when there is
            /// none.
            pub(crate) fn replace(self, spec: &mut VmSpec) -> bool {
                match self {
                    $(Device::$kind(d) => spec.$field.replace_id(d),)*
                }
            }

            /// Puts the device into its kind's list in `spec`.
            pub(crate) fn put(self, spec: &mut VmSpec) {
                match self {
                    $(Device::$kind(d) => spec.$field.put(d),)*
                }
            }
        }
    };
}

// The one list of kinds. A new kind is a module in `kinds/` (its config with `impl Plug`, its
// placed type with `impl Placed`) and one line here.
crate::device_kind::kinds!(registry);
