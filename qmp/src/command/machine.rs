//! The machine's resources: QOM objects (`object-add`, `qom-get`/`qom-set`), vCPU slots, memory
//! devices and the balloon.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Command, Empty};

/// `object-add`: creates a QOM object (a memory backend, an RNG source, …). Its properties are
/// free-form per type, so they travel as typed JSON in `props`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectAdd {
    /// The type, for example `memory-backend-ram`.
    #[serde(rename = "qom-type")]
    pub qom_type: String,
    /// The id (under `/objects`).
    pub id: String,
    /// The type's properties.
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl Command for ObjectAdd {
    const NAME: &'static str = "object-add";
    type Returns = Empty;
}

command!(
    /// `object-del`: deletes an object made with `object-add` (refused while a device uses it).
    "object-del", ObjectDel {
        /// The id.
        id: String,
    } -> Empty
);
command!(
    /// `qom-get`: reads a QOM property.
    "qom-get", QomGet {
        /// The object's path, for example `/machine/peripheral/vmem0`.
        path: String,
        /// The property.
        property: String,
    } -> Value
);
command!(
    /// `qom-set`: writes a QOM property (a virtio-mem device's `requested-size`, for one).
    "qom-set", QomSet {
        /// The object's path.
        path: String,
        /// The property.
        property: String,
        /// The new value.
        value: Value,
    } -> Empty
);
command!(
    /// `query-hotpluggable-cpus`: the machine's vCPU slots, plugged or free.
    "query-hotpluggable-cpus", QueryHotpluggableCpus, Vec<HotpluggableCpu>
);
command!(
    /// `query-memory-devices`: the plugged memory devices (DIMMs, virtio-mem, …).
    "query-memory-devices", QueryMemoryDevices, Vec<MemoryDeviceInfo>
);
command!(
    /// `balloon`: asks the guest's balloon driver to bring its memory to `value` bytes.
    "balloon", Balloon {
        /// The target, in bytes.
        value: i64,
    } -> Empty
);
command!(
    /// `query-balloon`: the guest's memory as the balloon leaves it.
    "query-balloon", QueryBalloon, BalloonInfo
);

/// One vCPU slot in `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct HotpluggableCpu {
    /// The device type to `device_add` into it, for example `qemu64-x86_64-cpu`.
    #[serde(rename = "type")]
    pub kind: String,
    /// How many vCPUs it holds.
    #[serde(rename = "vcpus-count")]
    pub vcpus_count: i64,
    /// The slot's address: `socket-id`, `core-id`, `thread-id`, `node-id`, … as `device_add`
    /// properties.
    pub props: Map<String, Value>,
    /// The vCPU's QOM path, when the slot is taken.
    #[serde(rename = "qom-path", default, skip_serializing_if = "Option::is_none")]
    pub qom_path: Option<String>,
}

/// One memory device in `query-memory-devices` (`MemoryDeviceInfo`, a union on `type`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "TaggedMemoryDevice")]
pub enum MemoryDeviceInfo {
    /// A `pc-dimm`.
    Dimm(DimmInfo),
    /// An NVDIMM.
    Nvdimm(DimmInfo),
    /// A `virtio-mem` device.
    VirtioMem(VirtioMemInfo),
    /// Any other kind (virtio-pmem, SGX EPC, …).
    Other,
}

/// The wire form: `{"type": …, "data": …}`.
#[derive(Deserialize)]
struct TaggedMemoryDevice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

impl TryFrom<TaggedMemoryDevice> for MemoryDeviceInfo {
    type Error = serde_json::Error;

    fn try_from(t: TaggedMemoryDevice) -> Result<Self, Self::Error> {
        Ok(match t.kind.as_str() {
            "dimm" => MemoryDeviceInfo::Dimm(serde_json::from_value(t.data)?),
            "nvdimm" => MemoryDeviceInfo::Nvdimm(serde_json::from_value(t.data)?),
            "virtio-mem" => MemoryDeviceInfo::VirtioMem(serde_json::from_value(t.data)?),
            _ => MemoryDeviceInfo::Other,
        })
    }
}

/// A DIMM in `query-memory-devices`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DimmInfo {
    /// The device id, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its size, in bytes.
    pub size: u64,
    /// Its slot.
    pub slot: i64,
    /// Its backend's QOM path (`/objects/<id>`).
    pub memdev: String,
}

/// A virtio-mem device in `query-memory-devices`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VirtioMemInfo {
    /// The device id, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What the guest has plugged, in bytes.
    pub size: u64,
    /// What the host asked the guest to plug, in bytes.
    #[serde(rename = "requested-size")]
    pub requested_size: u64,
    /// The most it can plug (its backend's size).
    #[serde(rename = "max-size")]
    pub max_size: u64,
    /// The unit the guest plugs in, in bytes.
    #[serde(rename = "block-size")]
    pub block_size: u64,
    /// Its backend's QOM path.
    pub memdev: String,
}

impl MemoryDeviceInfo {
    /// The device's id, for the kinds that have one.
    pub fn id(&self) -> Option<&str> {
        match self {
            MemoryDeviceInfo::Dimm(d) | MemoryDeviceInfo::Nvdimm(d) => d.id.as_deref(),
            MemoryDeviceInfo::VirtioMem(v) => v.id.as_deref(),
            MemoryDeviceInfo::Other => None,
        }
    }
}

/// The reply to `query-balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct BalloonInfo {
    /// The guest's memory as the balloon leaves it, in bytes.
    pub actual: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_devices_decode_by_type_and_unknown_kinds_are_kept_apart() {
        let reply = serde_json::json!([
            {"type": "dimm", "data": {"memdev": "/objects/m1", "hotplugged": true, "addr": 4294967296u64,
             "hotpluggable": true, "size": 134217728, "slot": 0, "node": 0, "id": "dimm1"}},
            {"type": "virtio-mem", "data": {"memdev": "/objects/m2", "memaddr": 4429185024u64,
             "block-size": 2097152, "size": 0, "node": 0, "max-size": 1073741824,
             "requested-size": 0, "id": "vm1"}},
            {"type": "sgx-epc", "data": {"memaddr": 0, "size": 1, "node": 0, "memdev": "x"}}
        ]);
        let devices: Vec<MemoryDeviceInfo> = serde_json::from_value(reply).unwrap();
        assert_eq!(devices[0].id(), Some("dimm1"));
        assert!(matches!(&devices[1], MemoryDeviceInfo::VirtioMem(v) if v.max_size == 1 << 30));
        assert_eq!(devices[2], MemoryDeviceInfo::Other);
    }
}
