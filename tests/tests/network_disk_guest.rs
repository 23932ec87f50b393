//! Disks on the network, with a booted guest under TCG: an NBD export (`qemu-nbd`) on a Unix
//! socket and on loopback TCP, and an iSCSI LUN (`tgtd`, with and without CHAP) hot-added; the
//! guest writes a pattern, reads it back past its page cache, the host reads the same pattern
//! from the server's backing file, and the hot-remove leaves QEMU and our fd table as they were.

use std::path::Path;
use std::time::Duration;

use qhotplug::{DiskConfig, DiskModel, NetworkSource};
use qhotplug_tests::servers::{free_port, IscsiTarget, Listen, NbdExport};
use qhotplug_tests::{image, pc_spec, Guest, Snapshot};

const SEEN: Duration = Duration::from_secs(60);

/// The sector the tests write their pattern at.
const SECTOR: u64 = 100;

/// Hot-adds network disk `id` from `source`; the guest writes `word` at [`SECTOR`], flushed,
/// drops its page cache and reads it back; then the host finds it in `file`. Returns the guest's
/// name for the disk.
async fn write_through(
    g: &Guest,
    id: &str,
    source: NetworkSource,
    model: DiskModel,
    file: &Path,
    mib: u64,
) -> String {
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
    let word = word(id);
    let write = format!(
        "printf {word} | dd of=/dev/{dev} bs=512 seek={SECTOR} conv=notrunc,fsync 2>/dev/null; \
         echo ok"
    );
    assert_eq!(g.console.run(&write, SEEN).await, ["ok"]);
    assert_eq!(read_back(g, &dev, &word).await, word);
    let on_server = std::fs::read(file).unwrap();
    let at = (SECTOR * 512) as usize;
    assert_eq!(&on_server[at..at + word.len()], word.as_bytes());
    dev
}

/// What the tests write on disk `id`.
fn word(id: &str) -> String {
    format!("written-over-the-network-by-{id}")
}

/// What the guest reads at [`SECTOR`] of `/dev/<dev>`, its page cache dropped first, as long
/// as `word`.
async fn read_back(g: &Guest, dev: &str, word: &str) -> String {
    let read = format!(
        "echo 3 >/proc/sys/vm/drop_caches; \
         dd if=/dev/{dev} bs=512 skip={SECTOR} count=1 2>/dev/null | head -c {}; echo",
        word.len()
    );
    g.console.run(&read, SEEN).await.concat()
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
            g.vm.remove_disk(id).await.unwrap();
        }
        // Nothing of either is left: nodes, sockets, objects, fd sets, our fds.
        assert_eq!(Snapshot::take(&g.vm).await, before);
    });
}

/// Everything the process's tracing says, at every level, kept for the secret test.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[test]
fn iscsi_luns_with_and_without_chap_carry_the_guests_writes_and_the_password_leaks_nowhere() {
    const PASSWORD: &str = "chap-secret-Zq81x";
    let traced = Captured::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
            .with_writer(traced.clone())
            .finish(),
    )
    .expect("the only subscriber of this test process (nextest runs one test a process)");
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        let before = Snapshot::take(&g.vm).await;

        // Without CHAP, on scsi-hd.
        let open = image(&dir, "open.raw", 8);
        let target = IscsiTarget::start(&open, None);
        write_through(&g, "lun1", target.source(None).into(), DiskModel::ScsiHd, &open, 8).await;
        g.vm.remove_disk("lun1").await.unwrap();
        assert_eq!(Snapshot::take(&g.vm).await, before);

        // Behind CHAP: a wrong password is a typed error naming no password, and changes
        // nothing; the right one works.
        let chap = ("qhotplug", PASSWORD);
        let closed = image(&dir, "closed.raw", 8);
        let target = IscsiTarget::start(&closed, Some(chap));
        let wrong = target.source(Some(("qhotplug", "not-the-password")));
        let refused = g
            .vm
            .add_disk(DiskConfig::network("lun2", wrong, DiskModel::VirtioBlk))
            .await
            .unwrap_err();
        let said = format!("{refused} {refused:?}");
        assert!(
            matches!(refused, qhotplug::Error::Step { step: "blockdev-add", .. })
                && said.contains("Authentication failure"),
            "{said}"
        );
        assert!(!said.contains("not-the-password"), "{said}");
        assert_eq!(Snapshot::take(&g.vm).await, before);
        let right = target.source(Some(chap));
        let config = DiskConfig::network("lun2", right.clone(), DiskModel::VirtioBlk);
        assert!(!format!("{config:?}").contains(PASSWORD));
        write_through(&g, "lun2", right.into(), DiskModel::VirtioBlk, &closed, 8).await;

        // A relaunch from the spec logs in with the password from the spec: the guest reads
        // what it wrote; QEMU's argv has only the encrypted secret.
        let spec = g.vm.spec();
        assert!(!format!("{spec:?}").contains(PASSWORD));
        g.vm.quit().await.unwrap();
        drop(g);
        let again = Guest::boot(spec, |l| l).await;
        let argv = std::fs::read(format!("/proc/{}/cmdline", again.vm.pid().unwrap())).unwrap();
        let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
        assert!(argv.contains("secret"), "{argv}");
        assert!(!argv.contains(PASSWORD), "{argv}");
        assert_eq!(read_back(&again, "vda", &word("lun2")).await, word("lun2"));
        again.vm.remove_disk("lun2").await.unwrap();
        drop(target);
    });
    // Nothing the SDK traced, at any level, holds the password.
    let traced = String::from_utf8_lossy(&traced.0.lock().unwrap()).into_owned();
    assert!(traced.contains("lun2"), "the capture saw the SDK's work");
    assert!(!traced.contains(PASSWORD));
}
