//! Disks on the network, with a booted guest under TCG: an NBD export (`qemu-nbd`) on a Unix
//! socket and on loopback TCP, and an iSCSI LUN (`tgtd`, with and without CHAP) hot-added; the
//! guest writes a pattern, reads it back past its page cache, the host reads the same pattern
//! from the server's backing file, and the hot-remove leaves QEMU and our fd table as they were.

use std::path::Path;
use std::time::Duration;

use qhotplug::{DiskConfig, DiskModel, NetworkSource};
use qhotplug_tests::servers::{free_port, Listen, NbdExport};
use qhotplug_tests::{image, pc_spec, Guest, Snapshot};

const SEEN: Duration = Duration::from_secs(60);

/// The sector the tests write their pattern at.
const SECTOR: u64 = 100;

/// Hot-adds network disk `id` from `source`; the guest writes `word` at [`SECTOR`], flushed,
/// drops its page cache and reads it back; then the host finds it in `file`; then the disk goes.
async fn write_through(
    g: &Guest,
    id: &str,
    source: NetworkSource,
    model: DiskModel,
    file: &Path,
    mib: u64,
) {
    let mark = g.console.mark();
    let uri = source.uri();
    let disk = g
        .vm
        .add_disk(DiskConfig::network(id, source, model))
        .await
        .unwrap();
    assert_eq!(disk.path.to_string_lossy(), uri);
    let (dev, sectors) = g.console.added_disk(mark).await;
    assert_eq!(sectors, mib * 2048, "{id} as {dev}");
    let word = format!("written-over-the-network-by-{id}");
    let write = format!(
        "printf {word} | dd of=/dev/{dev} bs=512 seek={SECTOR} conv=notrunc,fsync 2>/dev/null; \
         echo 3 >/proc/sys/vm/drop_caches; \
         dd if=/dev/{dev} bs=512 skip={SECTOR} count=1 2>/dev/null | head -c {}; echo",
        word.len()
    );
    assert_eq!(g.console.run(&write, SEEN).await, [word.clone()]);
    let on_server = std::fs::read(file).unwrap();
    let at = (SECTOR * 512) as usize;
    assert_eq!(&on_server[at..at + word.len()], word.as_bytes());
    g.vm.remove_disk(id).await.unwrap();
    assert!(!g.vm.has_device(id).await.unwrap());
}

#[test]
fn nbd_disks_on_a_unix_socket_and_on_tcp_carry_the_guests_writes_to_the_servers_file() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        let before = Snapshot::take(&g.vm).await;
        let exports = [
            ("nbd1", Listen::Unix(dir.join("nbd1.sock")), DiskModel::VirtioBlk),
            ("nbd2", Listen::Tcp(free_port()), DiskModel::ScsiHd),
        ];
        for (id, listen, model) in exports {
            let file = image(&dir, &format!("{id}.raw"), 8);
            let server = NbdExport::start(&file, id, listen);
            write_through(&g, id, server.source().into(), model, &file, 8).await;
        }
        // Nothing of either is left: nodes, sockets, objects, fd sets, our fds.
        assert_eq!(Snapshot::take(&g.vm).await, before);
    });
}
