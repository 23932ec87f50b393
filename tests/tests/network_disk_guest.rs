//! Disks on the network, with a booted guest under TCG: an NBD export (`qemu-nbd`) on a Unix
//! socket and on loopback TCP, and an iSCSI LUN (`tgtd`, with and without CHAP) hot-added; the
//! guest writes a pattern, reads it back past its page cache, the host reads the same pattern
//! from the server's backing file, and the hot-remove leaves QEMU and our fd table as they were.

use std::path::Path;
use std::time::Duration;

use qhotplug::{DiskConfig, DiskModel, ErrorPolicy, EventKind, NetworkSource, OnError, RunState};
use qhotplug_qmp::event::BlockIoError;
use qhotplug_tests::ceph::CephCluster;
use qhotplug_tests::servers::{free_port, IscsiTarget, Listen, NbdExport};
use qhotplug_tests::traced::Captured;
use qhotplug_tests::{image, pc_spec, Console, Guest, Snapshot};

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
    write_to_server(g, id, source, model, || std::fs::read(file).unwrap(), mib).await
}

/// As [`write_through`], the server's bytes read by `on_server`.
async fn write_to_server(
    g: &Guest,
    id: &str,
    source: NetworkSource,
    model: DiskModel,
    on_server: impl Fn() -> Vec<u8>,
    mib: u64,
) -> String {
    let mark = g.console.mark();
    let uri = source.uri();
    let disk =
        g.vm.add_disk(DiskConfig::network(id, source, model))
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
    assert_eq!(read_back(&g.console, &dev, &word).await, word);
    let on_server = on_server();
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
async fn read_back(console: &Console, dev: &str, word: &str) -> String {
    let read = format!(
        "echo 3 >/proc/sys/vm/drop_caches; \
         dd if=/dev/{dev} bs=512 skip={SECTOR} count=1 2>/dev/null | head -c {}; echo",
        word.len()
    );
    console.run(&read, SEEN).await.concat()
}

#[test]
fn nbd_disks_on_a_unix_socket_and_on_tcp_carry_the_guests_writes_to_the_servers_file() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        let before = Snapshot::take(&g.vm).await;
        let exports = [
            (
                "nbd1",
                Listen::Unix(dir.join("nbd1.sock")),
                DiskModel::VirtioBlk,
            ),
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

#[test]
fn iscsi_luns_with_and_without_chap_carry_the_guests_writes_and_the_password_leaks_nowhere() {
    const PASSWORD: &str = "chap-secret-Zq81x";
    let traced = Captured::install();
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        let before = Snapshot::take(&g.vm).await;

        // Without CHAP, on scsi-hd.
        let open = image(&dir, "open.raw", 8);
        let target = IscsiTarget::start(&open, None);
        write_through(
            &g,
            "lun1",
            target.source(None).into(),
            DiskModel::ScsiHd,
            &open,
            8,
        )
        .await;
        g.vm.remove_disk("lun1").await.unwrap();
        assert_eq!(Snapshot::take(&g.vm).await, before);

        // Behind CHAP: a wrong password is a typed error naming no password, and changes
        // nothing; the right one works.
        let chap = ("qhotplug", PASSWORD);
        let closed = image(&dir, "closed.raw", 8);
        let target = IscsiTarget::start(&closed, Some(chap));
        let wrong = target.source(Some(("qhotplug", "not-the-password")));
        let refused =
            g.vm.add_disk(DiskConfig::network("lun2", wrong, DiskModel::VirtioBlk))
                .await
                .unwrap_err();
        let said = format!("{refused} {refused:?}");
        qhotplug_tests::assert_failed_at(&refused, "blockdev-add");
        assert!(said.contains("Authentication failure"), "{said}");
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
        assert_eq!(
            read_back(&again.console, "vda", &word("lun2")).await,
            word("lun2")
        );
        again.vm.remove_disk("lun2").await.unwrap();
        drop(target);
    });
    // Nothing the SDK traced, at any level, holds the password.
    let traced = traced.text();
    assert!(traced.contains("lun2"), "the capture saw the SDK's work");
    assert!(!traced.contains(PASSWORD));
}

/// The 4 KiB block the outage tests write (a whole page: no read before the write).
const PAGE: u64 = 13;

/// A guest command writing `word`, padded to a page, over page [`PAGE`] of `/dev/<dev>` and
/// flushing it, then running `then` if it succeeded.
fn full_page_write(word: &str, dev: &str, then: &str) -> String {
    format!(
        "printf {word} | dd of=/dev/{dev} bs=4096 seek={PAGE} conv=sync,notrunc,fsync \
         2>/dev/null && {then}"
    )
}

/// The server's file holds `word` at page [`PAGE`].
fn assert_on_server(file: &Path, word: &str) {
    let on_server = std::fs::read(file).unwrap();
    let at = (PAGE * 4096) as usize;
    assert_eq!(&on_server[at..at + word.len()], word.as_bytes());
}

/// The next `BLOCK_IO_ERROR` on `events`, by [`SEEN`].
async fn next_io_error(events: &mut qhotplug_qmp::EventStream) -> BlockIoError {
    let seen = async {
        loop {
            if let Some(Ok(event)) = futures::StreamExt::next(events).await {
                if let EventKind::BlockIoError(error) = event.kind() {
                    return error.clone();
                }
            }
        }
    };
    tokio::time::timeout(SEEN, seen)
        .await
        .expect("a BLOCK_IO_ERROR")
}

/// Hot-adds NBD disk `id` on `source` with the `stop` error policy; returns the guest's name for
/// it and QEMU's events from then on.
async fn add_stopping(
    g: &Guest,
    id: &str,
    source: qhotplug::Nbd,
) -> (String, qhotplug_qmp::EventStream) {
    let config = DiskConfig::network(id, source, DiskModel::VirtioBlk)
        .on_error(ErrorPolicy::both(OnError::Stop));
    let dev = add_seen(g, config).await;
    (dev, g.vm.client().events())
}

/// The next `BLOCK_IO_ERROR` is a write on disk `id` that paused the VM (`nospace`: whether it
/// was "no space left"), and the VM is paused on it.
async fn paused_by_write(
    g: &Guest,
    events: &mut qhotplug_qmp::EventStream,
    id: &str,
    nospace: bool,
) {
    let error = next_io_error(events).await;
    assert_eq!(
        (error.operation.as_str(), error.action.as_str()),
        ("write", "stop")
    );
    assert_eq!(error.nospace, Some(nospace));
    assert_eq!(g.vm.disk_of_io_error(&error).as_deref(), Some(id));
    assert_eq!(g.vm.run_state().await.unwrap(), RunState::IoError);
}

/// Hot-adds the disk `config` describes and returns the guest's name for it.
async fn add_seen(g: &Guest, config: DiskConfig) -> String {
    let mark = g.console.mark();
    g.vm.add_disk(config).await.unwrap();
    g.console.added_disk(mark).await.0
}

#[test]
fn with_stop_a_server_that_goes_away_pauses_the_vm_with_an_event_naming_the_disk() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        let file = image(&dir, "gone.raw", 8);
        let mut server = NbdExport::start(&file, "gone", Listen::Tcp(free_port()));
        let (dev, mut events) = add_stopping(&g, "nbd3", server.source()).await;
        server.stop();

        // The guest writes a whole page (no read first) and flushes it while the server is
        // gone: instead of an error in the guest, the VM pauses, and the event names the disk.
        let write = full_page_write(&word("nbd3"), &dev, "echo ok");
        let guest = g.console.run(&write, SEEN);
        let host = async {
            paused_by_write(&g, &mut events, "nbd3", false).await;
        };
        tokio::select! {
            said = guest => panic!("the guest's write returned with the VM paused: {said:?}"),
            () = host => {}
        }
        // Recovery from here is QEMU's NBD client's to make, and it does not (7.2, 10.0): every
        // retry after a resume fails again with EIO, even once the server is back and QEMU has
        // a TCP connection to it. `reconnect_delay` is the way to ride out an outage (below).
        g.vm.quit().await.unwrap();
    });
}

#[test]
fn with_stop_storage_out_of_space_pauses_the_vm_and_one_resume_completes_the_write() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        // A thin image on a 4 MiB filesystem that is full: the server's writes fail ENOSPC.
        let fs = qhotplug_tests::storage::SmallFs::mount(&dir, "thin", 4);
        let file = fs.0.join("thin.raw");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let filler = fs.0.join("filler");
        let _ = std::fs::write(&filler, vec![0u8; 4 << 20]);
        let server = NbdExport::start(&file, "thin", Listen::Tcp(free_port()));
        let (dev, mut events) = add_stopping(&g, "nbd5", server.source()).await;

        let word = word("nbd5");
        let write = full_page_write(&word, &dev, "echo ok");
        let guest = g.console.run(&write, SEEN);
        let host = async {
            // The VM pauses on "no space left" (the server's words, through NBD), the event
            // names the disk; space comes back, and one call resumes the VM.
            paused_by_write(&g, &mut events, "nbd5", true).await;
            std::fs::remove_file(&filler).unwrap();
            g.vm.resume().await.unwrap();
        };
        let (said, ()) = tokio::join!(guest, host);
        assert_eq!(said, ["ok"]);
        assert_eq!(g.vm.run_state().await.unwrap(), RunState::Running);
        assert_on_server(&file, &word);
        g.vm.remove_disk("nbd5").await.unwrap();
        drop(server);
    });
}

/// With the server of `dev` gone, the guest writes `word` in the background; once its `dd`
/// waits on the disk (state D), `come_back` brings the server back, and the write completes with
/// no error in the guest and no `BLOCK_IO_ERROR` on `events`.
async fn write_rides_out(
    g: &Guest,
    events: &mut qhotplug_qmp::EventStream,
    dev: &str,
    word: &str,
    come_back: impl FnOnce(),
) {
    let write = full_page_write(word, dev, "echo $? >/tmp/written");
    let started = format!("rm -f /tmp/written; ( {write} ) >/dev/null 2>&1 & echo started");
    assert_eq!(g.console.run(&started, SEEN).await, ["started"]);
    let blocked = "for i in $(seq 600); do grep -q 'State:.*D' /proc/$(pidof dd)/status \
         2>/dev/null && break; sleep 0.1; done; sed -n 's/^State:.//p' /proc/$(pidof dd)/status";
    let state = g.console.run(blocked, SEEN).await.concat();
    assert!(state.trim_start().starts_with('D'), "dd is {state:?}");
    come_back();
    let done = "while [ ! -s /tmp/written ]; do sleep 0.1; done; cat /tmp/written";
    assert_eq!(g.console.run(done, SEEN).await, ["0"]);
    let quiet = events
        .wait_for(tokio::time::Instant::now(), |e| {
            matches!(e, EventKind::BlockIoError(_))
        })
        .await;
    assert!(!quiet, "a BLOCK_IO_ERROR");
    assert_eq!(g.vm.run_state().await.unwrap(), RunState::Running);
}

#[test]
fn nbd_reconnect_rides_out_a_short_outage_with_no_error() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        let file = image(&dir, "again.raw", 8);
        let mut server = NbdExport::start(&file, "again", Listen::Tcp(free_port()));
        let mut source = server.source();
        source.reconnect_delay = Some(60);
        let dev = add_seen(
            &g,
            DiskConfig::network("nbd4", source, DiskModel::VirtioBlk),
        )
        .await;
        let mut events = g.vm.client().events();
        server.stop();
        let word = word("nbd4");
        write_rides_out(&g, &mut events, &dev, &word, || server.restart()).await;
        assert_on_server(&file, &word);
        g.vm.remove_disk("nbd4").await.unwrap();
    });
}

#[test]
fn an_iscsi_target_that_goes_away_and_comes_back_is_ridden_out_even_with_stop() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        let file = image(&dir, "away.raw", 8);
        let mut target = IscsiTarget::start(&file, None);
        // libiscsi logs in again and sends the waiting requests when the target is back; they
        // never fail meanwhile (QEMU's `timeout` does not count while it reconnects), so the
        // `stop` policy never comes into play.
        let config = DiskConfig::network("lun3", target.source(None), DiskModel::VirtioBlk)
            .on_error(ErrorPolicy::both(OnError::Stop));
        let dev = add_seen(&g, config).await;
        let mut events = g.vm.client().events();
        target.stop();
        let word = word("lun3");
        write_rides_out(&g, &mut events, &dev, &word, || target.restart()).await;
        assert_on_server(&file, &word);
        g.vm.remove_disk("lun3").await.unwrap();
    });
}

#[test]
fn a_guest_on_nbd_migrates_with_both_qemus_on_one_export_and_relaunches_from_the_spec() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        // The server's file and socket outlive the first guest (its directory goes with it).
        let storage = tempfile::tempdir().unwrap();
        let dir = storage.path();
        let file = image(dir, "shared.raw", 8);
        let server = NbdExport::start(&file, "shared", Listen::Unix(dir.join("shared.sock")));
        let source = server.source().into();
        let dev = write_through(&g, "nbd6", source, DiskModel::VirtioBlk, &file, 8).await;
        assert_eq!(dev, "vda");

        // Shared storage: the target, launched from the source's spec, opens the same export.
        let work = tempfile::tempdir().unwrap();
        let console_path = work.path().join("target-console.sock");
        let mut launcher = g.vm.migration_launcher(work.path().join("target"));
        launcher.spec_mut().serials = vec![qhotplug::Serial::Socket(console_path.clone())];
        let target = qhotplug::Vm::launch(launcher).await.unwrap();
        let options = qhotplug::MigrationOptions::new(qhotplug::Transport::Unix(
            work.path().join("migrate.sock"),
        ));
        let migrated = g.vm.migrate(target, options, |_| {}).await.unwrap();
        let console = Console::connect(&console_path).await;
        assert_eq!(
            read_back(&console, "vda", &word("nbd6")).await,
            word("nbd6")
        );
        // The guest writes on through the target's connection.
        let after = "written-after-the-migration";
        let write = format!(
            "printf {after} | dd of=/dev/vda bs=512 seek={} conv=notrunc,fsync 2>/dev/null; echo ok",
            SECTOR + 8
        );
        assert_eq!(console.run(&write, SEEN).await, ["ok"]);
        let on_server = std::fs::read(&file).unwrap();
        let at = ((SECTOR + 8) * 512) as usize;
        assert_eq!(&on_server[at..at + after.len()], after.as_bytes());

        // A relaunch from the target's spec boots on the same export.
        let spec = migrated.target.spec();
        assert_eq!(
            spec.disks[0].network_source(),
            Some(&server.source().into())
        );
        migrated.target.quit().await.unwrap();
        drop(g);
        let again = Guest::boot(spec, |l| l).await;
        assert_eq!(
            read_back(&again.console, "vda", &word("nbd6")).await,
            word("nbd6")
        );
    });
}

#[test]
fn an_nbd_export_over_tls_carries_the_guests_writes_and_a_client_that_trusts_another_ca_is_refused()
{
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = g.dir().to_owned();
        let (server_creds, client_creds) = qhotplug_tests::servers::x509(&dir.join("pki"));
        let file = image(&dir, "tls.raw", 8);
        let server =
            NbdExport::start_tls(&file, "tls", Listen::Tcp(free_port()), Some(&server_creds));
        let before = Snapshot::take(&g.vm).await;

        // A client whose CA is not the server's: a typed error, and nothing left (the TLS
        // object included).
        let (_, stranger) = qhotplug_tests::servers::x509(&dir.join("other-pki"));
        let mut untrusting = server.source();
        untrusting.tls_dir = Some(stranger);
        let config = DiskConfig::network("nbd7", untrusting, DiskModel::VirtioBlk);
        let refused = g.vm.add_disk(config).await.unwrap_err();
        qhotplug_tests::assert_failed_at(&refused, "blockdev-add");
        assert_eq!(Snapshot::take(&g.vm).await, before);

        // With the server's CA: the guest's writes reach the file; the TLS object goes with the
        // disk.
        let mut source = server.source();
        source.tls_dir = Some(client_creds);
        write_through(&g, "nbd7", source.into(), DiskModel::VirtioBlk, &file, 8).await;
        let objects = Snapshot::take(&g.vm).await.objects;
        assert!(objects.iter().any(|o| o == "nbd7-tls"), "{objects:?}");
        g.vm.remove_disk("nbd7").await.unwrap();
        assert_eq!(Snapshot::take(&g.vm).await, before);
    });
}

#[test]
fn an_rbd_image_on_a_real_ceph_cluster_carries_the_guests_writes_and_its_key_stays_encrypted() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        // The cluster outlives this QEMU's directory: the relaunch below uses it too.
        let ceph_dir = tempfile::tempdir().unwrap();
        let ceph = CephCluster::start(ceph_dir.path());
        ceph.create_image("vm-data", 8);
        let key = ceph.admin_key();
        let before = Snapshot::take(&g.vm).await;

        // Hot-added on scsi-hd and removed: the guest's write is in the image (read back by
        // librbd), and QEMU has nothing left.
        let read = || ceph.read_image("vm-data");
        let source = ceph.source("vm-data");
        write_to_server(
            &g,
            "rbd1",
            source.clone().into(),
            DiskModel::ScsiHd,
            read,
            8,
        )
        .await;
        g.vm.remove_disk("rbd1").await.unwrap();
        assert_eq!(Snapshot::take(&g.vm).await, before);

        // On virtio-blk, then a relaunch from the spec: QEMU opens the image again with the key
        // from the spec, which its argv has only encrypted; the guest reads what it wrote.
        let config = DiskConfig::network("rbd2", source.clone(), DiskModel::VirtioBlk);
        assert!(!format!("{config:?}").contains(&key));
        let read = || ceph.read_image("vm-data");
        write_to_server(&g, "rbd2", source.into(), DiskModel::VirtioBlk, read, 8).await;
        let spec = g.vm.spec();
        assert!(!format!("{spec:?}").contains(&key));
        g.vm.quit().await.unwrap();
        drop(g);
        let again = Guest::boot(spec, |l| l).await;
        let argv = std::fs::read(format!("/proc/{}/cmdline", again.vm.pid().unwrap())).unwrap();
        let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
        assert!(
            argv.contains("driver\":\"rbd") || argv.contains("driver=rbd"),
            "{argv}"
        );
        assert!(!argv.contains(&key), "{argv}");
        assert_eq!(
            read_back(&again.console, "vda", &word("rbd2")).await,
            word("rbd2")
        );
        again.vm.remove_disk("rbd2").await.unwrap();
    });
}
