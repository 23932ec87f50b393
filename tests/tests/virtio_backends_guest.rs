//! Devices on host-side services, seen from a real guest under TCG (guest memory a shared memfd,
//! as vhost-user needs): a disk served by `qemu-storage-daemon` that the guest writes and the host
//! reads back once the export is gone; a folder served by `virtiofsd` that the guest mounts and
//! reads; a named virtio-serial port the guest writes and the host reads from its socket; and a
//! virtio RNG the guest's hw_random picks up.

use std::time::Duration;

use qhotplug::{
    MemoryBackend, RngConfig, SerialPortConfig, StorageDaemon, StorageDaemonLauncher,
    VhostUserBlkConfig, VirtioFsConfig, VirtioSerialConfig, VirtiofsdLauncher, VmSpec, MIB,
};
use qhotplug_tests::{pc_spec, Guest};
use tokio::io::AsyncReadExt;

const SEEN: Duration = Duration::from_secs(60);

/// The test VM with its 256 MiB of memory in a shared memfd.
fn shared_memory_spec() -> VmSpec {
    let mut spec = pc_spec();
    spec.memory_mib = 256;
    spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", 256 * MIB));
    spec
}

#[test]
fn a_vhost_user_disk_from_qemu_storage_daemon_holds_what_the_guest_wrote() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(shared_memory_spec(), |l| l).await;
        let image = qhotplug_tests::image(g.dir(), "vdisk.raw", 8);
        let qsd = StorageDaemon::launch(StorageDaemonLauncher::new(g.dir().join("qsd")))
            .await
            .unwrap();
        let socket = g.dir().join("vdisk.sock");
        qsd.export("vdisk", &image, &socket, true).await.unwrap();

        let mark = g.console.mark();
        g.vm.add_vhost_user_blk(VhostUserBlkConfig::new("vdisk", &socket))
            .await
            .unwrap();
        let (dev, sectors) = g.console.added_disk(mark).await;
        assert!(
            dev.starts_with("vd") && sectors == 16384,
            "{dev}: {sectors}"
        );
        let write = format!(
            "echo qhotplug-vhost-user-pattern | dd of=/dev/{dev} bs=512 conv=sync,fsync 2>/dev/null; echo written"
        );
        assert_eq!(g.console.run(&write, SEEN).await, ["written"]);

        let mark = g.console.mark();
        g.vm.remove_vhost_user_blk("vdisk").await.unwrap();
        g.console
            .wait_for(mark, &format!("qhg: remove block {dev}"), SEEN)
            .await
            .expect("the guest saw the disk go");
        qsd.unexport("vdisk").await.unwrap();
        let data = std::fs::read(&image).unwrap();
        assert!(
            data.starts_with(b"qhotplug-vhost-user-pattern\n"),
            "{:?}",
            String::from_utf8_lossy(&data[..40])
        );
        assert!(!g.vm.spec().vhost_user_blks.iter().any(|d| d.id == "vdisk"));
        qsd.quit().await.unwrap();
    });
}

#[test]
fn a_virtio_fs_share_a_serial_port_and_an_rng_work_in_the_guest() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(shared_memory_spec(), |l| l).await;

        // virtio-fs: a folder the host wrote into.
        let shared = g.dir().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("hello.txt"), "from the host\n").unwrap();
        let socket = g.dir().join("fs.sock");
        let _virtiofsd = VirtiofsdLauncher::new(&shared, &socket).launch().unwrap();
        g.vm.add_virtio_fs(VirtioFsConfig::new("fs0", &socket, "share"))
            .await
            .unwrap();
        // The tag is known once the guest's driver has probed the device (mount says EINVAL before).
        let read = "mkdir -p /share && mount -t virtiofs share /share && cat /share/hello.txt && umount /share";
        g.console.until_says(read, "from the host", SEEN).await;

        // A named serial port: the guest writes, the host reads from QEMU's socket.
        g.vm.add_virtio_serial(VirtioSerialConfig::new("vser0"))
            .await
            .unwrap();
        let port_socket = g.dir().join("agent.sock");
        g.vm.add_serial_port(SerialPortConfig::new(
            "agent",
            "vser0",
            "org.example.agent",
            &port_socket,
        ))
        .await
        .unwrap();
        let mut host = tokio::net::UnixStream::connect(&port_socket).await.unwrap();
        let write = "for p in /sys/class/virtio-ports/*; do \
                     [ \"$(cat $p/name)\" = org.example.agent ] && echo hello-host > /dev/${p##*/} && echo sent; \
                     done";
        // The port appears in the guest once its driver has probed it, and a write the guest makes
        // before QEMU has taken the host's connection in is lost (seen in one run of five): the
        // guest writes until the host hears it.
        let deadline = tokio::time::Instant::now() + SEEN;
        let mut got = [0u8; 64];
        let n = loop {
            let out = g.console.run(write, SEEN).await;
            if out == ["sent"] {
                if let Ok(n) =
                    tokio::time::timeout(Duration::from_secs(2), host.read(&mut got)).await
                {
                    break n.unwrap();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the host never heard the guest: {out:?}"
            );
        };
        assert_eq!(&got[..n], b"hello-host\n");

        // An RNG: the guest's hw_random uses it.
        g.vm.add_rng(RngConfig::new("rng0")).await.unwrap();
        let virtio = |out: &[String]| out.len() == 1 && out[0].starts_with("virtio_rng");
        g.console
            .until("cat /sys/class/misc/hw_random/rng_current", virtio, SEEN)
            .await;

        // And they all go again.
        drop(host);
        g.vm.remove_serial_port("agent").await.unwrap();
        g.vm.remove_virtio_serial("vser0").await.unwrap();
        g.vm.remove_rng("rng0").await.unwrap();
        g.vm.remove_virtio_fs("fs0").await.unwrap();
        let spec = g.vm.spec();
        assert!(spec.virtio_fs.is_empty() && spec.serial_ports.is_empty() && spec.rngs.is_empty());
    });
}
