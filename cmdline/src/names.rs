//! The names of the QEMU objects behind each device, derived from the device id: the one place
//! they are spelled. Boot (`-blockdev`, `-netdev`) and hotplug (`blockdev-add`, `getfd`,
//! `add-fd`, `netdev_add`) use the same names, so a hot-plugged device and one given at boot look
//! alike to QEMU, and `reconcile` can find what a hot-add left behind from the id alone. The
//! storage half's names are here too: job ids, a storage migration's nodes and TLS object, the
//! backup bitmap, export names and the master key's id.

/// QEMU's container of the devices plugged with an id.
pub const PERIPHERAL: &str = "/machine/peripheral";
/// QEMU's container of the devices plugged without one.
pub const PERIPHERAL_ANON: &str = "/machine/peripheral-anon";
/// The `getfd` name of an outgoing migration's fd.
pub const MIGRATE_OUT_FD: &str = "migrate-out";
/// The `getfd` name of an incoming migration's fd.
pub const MIGRATE_IN_FD: &str = "migrate-in";

/// The QOM path of device `id`: `/machine/peripheral/<id>`.
pub fn peripheral_path(id: &str) -> String {
    format!("{PERIPHERAL}/{id}")
}

/// The device `path` is a part of, when it is a part (`/machine/peripheral/<id>/…` gives `<id>`
/// and the rest); `None` for a device itself or a path outside the container.
pub fn part_of(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix(PERIPHERAL)?
        .strip_prefix('/')?
        .split_once('/')
}

/// The implicit throttle group QEMU names after a device whose limits have no group of their own
/// (a QOM path under `/machine/peripheral/`, or the id).
pub fn is_implicit_throttle_group(id: &str, group: &str) -> bool {
    group == id || group.starts_with(&format!("{PERIPHERAL}/"))
}

/// True for `node` when it is one of device `id`'s format nodes (`<id>-fmt`, `<id>-fmt.<n>`):
/// those go before the protocol nodes under them.
pub fn is_format_node_of(id: &str, node: &str) -> bool {
    is_block_node_of(id, node) && node[id.len()..].starts_with("-fmt")
}

/// The bus a controller (virtio-scsi, virtio-serial) gives its devices: `<id>.0`.
pub fn controller_bus(id: &str) -> String {
    format!("{id}.0")
}

/// The protocol (file) node of disk `id`.
pub fn file_node(id: &str) -> String {
    format!("{id}-file")
}

/// The format node of disk `id` (what the device's `drive` names).
pub fn format_node(id: &str) -> String {
    format!("{id}-fmt")
}

/// The protocol node of device `id`'s image number `generation`: each medium a CD-ROM drive
/// takes, and each image a disk is moved to (a mirror's pivot), gets the next number, so the new
/// image's nodes exist beside the old one's until the switch. Generation 0 is `<id>-file`, later
/// ones `<id>-file.<n>`.
pub fn file_node_at(id: &str, generation: u32) -> String {
    generational(file_node(id), generation)
}

/// The format node of device `id`'s image number `generation` (`<id>-fmt`, `<id>-fmt.<n>`).
pub fn format_node_at(id: &str, generation: u32) -> String {
    generational(format_node(id), generation)
}

fn generational(name: String, generation: u32) -> String {
    match generation {
        0 => name,
        n => format!("{name}.{n}"),
    }
}

/// Whether block node `node` is one of device `id`'s: its protocol or format node, of any
/// medium generation. No two ids share a node name: a node name ends in `-file`/`-fmt` (and
/// maybe `.<n>`), so the id is what comes before.
pub fn is_block_node_of(id: &str, node: &str) -> bool {
    matches!(suffix_of(id, node), Some("-file" | "-fmt"))
}

/// The generation of device `id`'s block node `node`: the `<n>` of `-fmt.<n>`/`-file.<n>`, 0
/// for the first image's `-fmt`/`-file`; `None` when the node is not the device's. A disk's newer
/// images have higher generations, so its chain is deleted from the highest down.
pub fn generation_of(id: &str, node: &str) -> Option<u32> {
    if !is_block_node_of(id, node) {
        return None;
    }
    match node.rsplit_once('.') {
        Some((_, n)) => n.parse().ok(),
        None => Some(0),
    }
}

/// What `name` adds to device `id` after its generation number is taken off (`cd0-file.3` on
/// `cd0`: `-file`), if `name` starts with `id`.
fn suffix_of<'a>(id: &str, name: &'a str) -> Option<&'a str> {
    let rest = name.strip_prefix(id)?;
    Some(match rest.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => rest,
    })
}

/// The id of the hot-pluggable vCPU in CPU slot `index` (in slot order, the boot vCPU's being 0).
pub fn vcpu(index: usize) -> String {
    format!("vcpu{index}")
}

/// The memory backend object of memory device `id`.
pub fn memdev(id: &str) -> String {
    format!("{id}-mem")
}

/// The chardev of device `id` (a vhost-user device's, a serial port's).
pub fn chardev(id: &str) -> String {
    format!("{id}-chr")
}

/// The `rng-random` object of virtio RNG `id`.
pub fn rng(id: &str) -> String {
    format!("{id}-rng")
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

/// The `secret` object holding network disk `id`'s credential (a CHAP password, a Ceph key).
pub fn secret(id: &str) -> String {
    format!("{id}-secret")
}

/// The `tls-creds-x509` object of network disk `id`.
pub fn tls_creds(id: &str) -> String {
    format!("{id}-tls")
}

/// The `secret` object of device `id`'s network medium number `generation` (a CD-ROM's media
/// each have their own, since the old one's exists until the new one is in): `<id>-secret`, then
/// `<id>-secret.<n>`.
pub fn secret_at(id: &str, generation: u32) -> String {
    generational(secret(id), generation)
}

/// The `tls-creds-x509` object of device `id`'s network medium number `generation`.
pub fn tls_creds_at(id: &str, generation: u32) -> String {
    generational(tls_creds(id), generation)
}

/// Whether QOM object `object` is a network backend's object (secret, TLS credentials) of
/// device `id`, of any generation: what `reconcile` looks for besides [`backends`]'s.
pub fn is_network_object_of(id: &str, object: &str) -> bool {
    matches!(suffix_of(id, object), Some("-secret" | "-tls"))
}

/// The `opaque` tag of the fd sets that device `id`'s backends were opened from (`add-fd`), by
/// which `reconcile` finds sets a hot-add left behind.
pub fn fdset_tag(id: &str) -> String {
    format!("qhotplug:{id}")
}

/// Every netdev, QOM object and chardev a hot-add of device `id` may create, whatever its kind: what
/// `reconcile` looks for after a hot-add that could not finish. (Block nodes are found by name among QEMU's:
/// [`is_block_node_of`].)
pub fn backends(id: &str) -> Backends {
    Backends {
        netdevs: vec![netdev(id)],
        objects: vec![memdev(id), rng(id), secret(id), tls_creds(id)],
        chardevs: vec![chardev(id)],
    }
}

/// The device a QEMU object named by the SDK belongs to, by its name alone: an fd set's tag
/// (`qhotplug:<id>`), a block node (`<id>-file`, `<id>-fmt`, of any generation), a chardev
/// (`<id>-chr`) or a QOM object (`<id>-mem`, `<id>-rng`, `<id>-secret`, `<id>-tls`, of any
/// generation). How a process that attaches after another died finds what that one's unfinished
/// hot-adds left (a NIC's netdev cannot be listed on every QEMU, so it is not here). A storage
/// copy's TLS credentials ([`MIGRATION_TLS`]) are the migration's, no device's.
pub fn owner_of(name: &str) -> Option<&str> {
    if name == MIGRATION_TLS {
        return None;
    }
    if let Some(id) = name.strip_prefix("qhotplug:") {
        return Some(id).filter(|id| !id.is_empty());
    }
    let base = match name.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    };
    ["-file", "-fmt", "-chr", "-mem", "-rng", "-secret", "-tls"]
        .iter()
        .find_map(|suffix| base.strip_suffix(suffix))
        .filter(|id| !id.is_empty())
}

/// The NIC a netdev named by the SDK belongs to (`<id>-net`).
pub fn netdev_owner(name: &str) -> Option<&str> {
    name.strip_suffix("-net").filter(|id| !id.is_empty())
}

const MASTER_KEY_PREFIX: &str = "qhotplug-key-";

/// The id of the master key's `secret` object, from a random `tag` (hex): `qhotplug-key-<tag>`.
pub fn master_key(tag: &str) -> String {
    format!("{MASTER_KEY_PREFIX}{tag}")
}

/// The `getfd` name of memory dump number `n` of this process (each its own, so two dumps at
/// once never hand QEMU each other's file).
pub fn dump_fd(n: u64) -> String {
    format!("qhotplug-dump-{n}")
}

/// Whether `name` is a master key's id ([`master_key`]).
pub fn is_master_key(name: &str) -> bool {
    name.starts_with(MASTER_KEY_PREFIX)
}

/// The job id of a mirror of disk `disk`: `mirror-<disk>`.
pub fn mirror_job(disk: &str) -> String {
    format!("mirror-{disk}")
}

/// The job id of a commit on disk `disk`: `commit-<disk>` for the active commit (the top image
/// merged down), `commit-<disk>-gen<n>` for the intermediate commit of the layer of generation
/// `n`, so a later process can tell which it is.
pub fn commit_job(disk: &str, layer_generation: Option<u32>) -> String {
    match layer_generation {
        None => format!("commit-{disk}"),
        Some(generation) => format!("commit-{disk}-gen{generation}"),
    }
}

/// The job id of a stream into disk `disk`: `stream-<disk>`.
pub fn stream_job(disk: &str) -> String {
    format!("stream-{disk}")
}

/// The job id of a push backup of disk `disk`: `backup-<disk>`.
pub fn backup_job(disk: &str) -> String {
    format!("backup-{disk}")
}

/// The id of a pull backup's `blockdev-backup` job of disk `disk`, and of its NBD export:
/// `pull-<disk>`.
pub fn pull_job(disk: &str) -> String {
    format!("pull-{disk}")
}

/// The id of the `blockdev-create` job that formats the image under node `node`: `create-<node>`.
pub fn create_job(node: &str) -> String {
    format!("create-{node}")
}

/// Whether job `id` is named as the SDK names its jobs (a mirror's, a commit's, a stream's, a
/// backup's, a pull backup's, an image creation's, a storage copy's).
pub fn is_sdk_job(id: &str) -> bool {
    [
        "mirror-", "commit-", "stream-", "backup-", "pull-", "create-", "mig-",
    ]
    .iter()
    .any(|prefix| id.strip_prefix(prefix).is_some_and(|rest| !rest.is_empty()))
}

/// The name an NBD export of disk `disk` is served under (pull backups, storage migration):
/// the disk's id.
pub fn export_name(disk: &str) -> String {
    disk.to_owned()
}

/// Storage migration of disk `disk`: the source's mirror job id and the target's export id,
/// `mig-<disk>`.
pub fn migration_job(disk: &str) -> String {
    format!("mig-{disk}")
}

/// Storage migration of disk `disk`: the source's NBD client node and the raw node on it,
/// `mig-<disk>-nbd` and `mig-<disk>-raw`.
pub fn migration_client_nodes(disk: &str) -> [String; 2] {
    [format!("mig-{disk}-nbd"), format!("mig-{disk}-raw")]
}

/// The id of each side's `tls-creds-x509` object while storage migrates over TLS.
pub const MIGRATION_TLS: &str = "mig-tls";

/// The temporary dirty bitmap a backup in progress copies from, on the disk's top node (the
/// changes since its checkpoint; one backup per disk at a time: the disk's busy mark).
pub const BACKUP_BITMAP: &str = "qhotplug-backup";

/// A scratch dirty bitmap, number `n`, that a count of several checkpoints merges into.
pub fn scratch_bitmap(n: u64) -> String {
    format!("qhotplug-size-{n}")
}

/// The NBD meta context that serves dirty bitmap `bitmap` with an export.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// The QEMU objects a device's backends may be, by kind, as [`backends`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    /// Netdevs.
    pub netdevs: Vec<String>,
    /// QOM objects (under `/objects`).
    pub objects: Vec<String>,
    /// Chardevs.
    pub chardevs: Vec<String>,
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
        assert_eq!(backends("x").netdevs, ["x-net"]);
        assert_eq!(file_node_at("cd", 0), "cd-file");
        assert_eq!(format_node_at("cd", 3), "cd-fmt.3");
        assert_eq!(commit_job("d", Some(2)), "commit-d-gen2");
        assert_eq!(migration_client_nodes("d"), ["mig-d-nbd", "mig-d-raw"]);
        assert_eq!(generation_of("d", "d-fmt.12"), Some(12));
        assert_eq!(generation_of("d", "d-file"), Some(0));
        assert_eq!(generation_of("d", "e-file"), None);
    }

    #[test]
    fn an_objects_name_says_whose_it_is() {
        for (name, id) in [
            ("qhotplug:d1", "d1"),
            ("d1-file", "d1"),
            ("d1-fmt.3", "d1"),
            ("my-disk-fmt", "my-disk"),
            ("p0-chr", "p0"),
            ("m1-mem", "m1"),
            ("r-rng", "r"),
            ("cd-secret.2", "cd"),
            ("nbd-tls", "nbd"),
        ] {
            assert_eq!(owner_of(name), Some(id), "{name}");
        }
        for name in [
            "qhotplug:",
            "-file",
            "ram",
            "qhotplug-key-ab12",
            "d1-net",
            "d1-fmt.x",
            MIGRATION_TLS,
        ] {
            assert_eq!(owner_of(name), None, "{name}");
        }
        assert_eq!(netdev_owner("n1-net"), Some("n1"));
        assert_eq!(netdev_owner("-net"), None);
        for job in [
            mirror_job("d"),
            commit_job("d", Some(1)),
            create_job("d-fmt.2"),
        ] {
            assert!(is_sdk_job(&job), "{job}");
        }
        for job in ["mirror-", "copy-d", "job0"] {
            assert!(!is_sdk_job(job), "{job}");
        }
    }

    #[test]
    fn network_objects_belong_to_one_id_whatever_their_generation() {
        assert_eq!(secret_at("cd", 0), "cd-secret");
        assert_eq!(tls_creds_at("cd", 3), "cd-tls.3");
        for object in ["cd-secret", "cd-tls", "cd-secret.1", "cd-tls.12"] {
            assert!(is_network_object_of("cd", object), "{object}");
        }
        for object in [
            "cd-1-secret",
            "cd-secret.x",
            "cdx-tls",
            "cd-mem",
            "cd-file.1",
        ] {
            assert!(!is_network_object_of("cd", object), "{object}");
        }
    }

    #[test]
    fn block_nodes_belong_to_one_id() {
        for node in ["cd-file", "cd-fmt", "cd-file.1", "cd-fmt.12"] {
            assert!(is_block_node_of("cd", node), "{node}");
        }
        // Another id's nodes, however alike.
        for node in [
            "cd-1-file",
            "cd-file-file",
            "cd-file.x",
            "cd-file.",
            "cdx-fmt",
            "cd-net",
        ] {
            assert!(!is_block_node_of("cd", node), "{node}");
        }
        assert!(is_block_node_of("cd-file", "cd-file-file"));
    }

    #[test]
    fn paths_and_parts() {
        assert_eq!(peripheral_path("d0"), "/machine/peripheral/d0");
        assert_eq!(
            part_of("/machine/peripheral/d0/virtio-backend"),
            Some(("d0", "virtio-backend"))
        );
        assert_eq!(part_of("/machine/peripheral/d0"), None);
        assert_eq!(part_of("/machine/peripheral-anon/d0/x"), None);
        assert!(is_format_node_of("cd", "cd-fmt.2") && is_format_node_of("cd", "cd-fmt"));
        assert!(!is_format_node_of("cd", "cd-file") && !is_format_node_of("c", "cd-fmt"));
        assert!(is_implicit_throttle_group(
            "d0",
            "/machine/peripheral/d0/virtio-backend"
        ));
        assert!(!is_implicit_throttle_group("d0", "tenant-a"));
    }
}
