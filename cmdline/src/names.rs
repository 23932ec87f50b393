//! The names of the QEMU objects behind each device, derived from the device id: the one place
//! they are spelled. Boot (`-blockdev`, `-netdev`) and hotplug (`blockdev-add`, `getfd`,
//! `add-fd`, `netdev_add`) use the same names, so a hot-plugged device and one given at boot look
//! alike to QEMU, and `reconcile` can find what a hot-add left behind from the id alone.

/// The protocol (file) node of disk `id`.
pub fn file_node(id: &str) -> String {
    format!("{id}-file")
}

/// The format node of disk `id` (what the device's `drive` names).
pub fn format_node(id: &str) -> String {
    format!("{id}-fmt")
}

/// The netdev of NIC `id`.
pub fn netdev(id: &str) -> String {
    format!("{id}-net")
}

/// The `getfd` name of tap queue `queue` of NIC `id`.
pub fn tap_fd(id: &str, queue: usize) -> String {
    format!("{id}-tap{queue}")
}

/// The `getfd` name of vhost-net queue `queue` of NIC `id`.
pub fn vhost_fd(id: &str, queue: usize) -> String {
    format!("{id}-vhost{queue}")
}

/// The `opaque` tag of the fd sets that device `id`'s backends were opened from (`add-fd`), by
/// which `reconcile` finds sets a hot-add left behind.
pub fn fdset_tag(id: &str) -> String {
    format!("qhotplug:{id}")
}

/// Every block node and netdev a hot-add of device `id` may create, whatever its kind: what
/// `reconcile` looks for after a hot-add that could not finish.
pub fn backends(id: &str) -> Backends {
    Backends {
        block_nodes: vec![format_node(id), file_node(id)],
        netdevs: vec![netdev(id)],
    }
}

/// The QEMU objects a device's backends may be, by kind, as [`backends`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    /// Block nodes, the top one first.
    pub block_nodes: Vec<String>,
    /// Netdevs.
    pub netdevs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_id() {
        assert_eq!(file_node("d1"), "d1-file");
        assert_eq!(format_node("d1"), "d1-fmt");
        assert_eq!(netdev("n1"), "n1-net");
        assert_eq!(tap_fd("n1", 1), "n1-tap1");
        assert_eq!(vhost_fd("n1", 0), "n1-vhost0");
        assert_eq!(fdset_tag("d1"), "qhotplug:d1");
        assert_eq!(backends("x").block_nodes, ["x-fmt", "x-file"]);
    }
}
