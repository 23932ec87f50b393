//! Devices on host-side services, on real QEMU without a guest: a vhost-user device on a VM
//! without shared memory refused before anything is sent; a failure forced at each step of each
//! sequence (through [`FaultProxy`]) leaving `query-pci`, `query-chardev`, `qom-list /objects` and
//! our fd table as they were; a relaunch from `vm.spec()` with every kind at boot; and the
//! `qemu-storage-daemon` handle's exports, a failed one leaving no node behind.

use qhotplug::{
    Error, MemoryBackend, RngConfig, SerialPortConfig, StorageDaemon, StorageDaemonLauncher,
    VhostUserBlkConfig, VirtioFsConfig, VirtioSerialConfig, VirtiofsdLauncher, Vm, VmSpec, MIB,
};
use qhotplug_qmp::command::QueryChardev;
use qhotplug_tests::servers::vhost_user_backends;
use qhotplug_tests::{assert_rolls_back, image, pc_spec, second_monitor, TestVm};
use serde_json::json;

fn shared_memory_spec() -> VmSpec {
    let mut spec = pc_spec();
    spec.memory_mib = 256;
    spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", 256 * MIB));
    spec
}

#[test]
fn vhost_user_devices_need_shared_memory() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let before = t.snapshot().await;
        let sock = t.dir().join("none.sock");
        assert!(matches!(
            t.vm.add_vhost_user_blk(VhostUserBlkConfig::new("v1", &sock)).await,
            Err(Error::NeedsSharedMemory(id)) if id == "v1"
        ));
        assert!(matches!(
            t.vm.add_virtio_fs(VirtioFsConfig::new("f1", &sock, "t"))
                .await,
            Err(Error::NeedsSharedMemory(_))
        ));
        // A port on a controller the VM does not have.
        assert!(matches!(
            t.vm.add_serial_port(SerialPortConfig::new("p", "nope", "n", &sock))
                .await,
            Err(Error::NotFound { .. })
        ));
        assert_eq!(t.snapshot().await, before);
    });
}

#[test]
fn a_failure_at_each_step_leaves_chardevs_objects_and_slots_as_they_were() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (_qsd, _fsd) = vhost_user_backends(d).await;
        let mon2 = d.join("mon2.sock");
        let mut spec = shared_memory_spec();
        second_monitor(&mut spec, &mon2);
        let t = TestVm::running(spec).await;
        t.vm.add_virtio_serial(VirtioSerialConfig::new("vser0"))
            .await
            .unwrap();
        type Change = Box<dyn Fn(Vm) -> futures::future::BoxFuture<'static, qhotplug::Result<()>>>;
        let (vdisk, fs, port) = (d.join("vdisk.sock"), d.join("fs.sock"), d.join("port.sock"));
        let cases: Vec<(&str, Change)> = vec![
            ("chardev-add", {
                let s = vdisk.clone();
                Box::new(move |vm| Box::pin(add(vm, VhostUserBlkConfig::new("vdisk", s.clone()))))
            }),
            ("device_add", {
                let s = vdisk.clone();
                Box::new(move |vm| Box::pin(add(vm, VhostUserBlkConfig::new("vdisk", s.clone()))))
            }),
            ("chardev-add", {
                let s = fs.clone();
                Box::new(move |vm| {
                    Box::pin(add_fs(vm, VirtioFsConfig::new("fs0", s.clone(), "share")))
                })
            }),
            ("device_add", {
                let s = fs.clone();
                Box::new(move |vm| {
                    Box::pin(add_fs(vm, VirtioFsConfig::new("fs0", s.clone(), "share")))
                })
            }),
            ("chardev-add", {
                let s = port.clone();
                Box::new(move |vm| {
                    Box::pin(add_port(
                        vm,
                        SerialPortConfig::new("p0", "vser0", "org.x", s.clone()),
                    ))
                })
            }),
            ("device_add", {
                let s = port.clone();
                Box::new(move |vm| {
                    Box::pin(add_port(
                        vm,
                        SerialPortConfig::new("p0", "vser0", "org.x", s.clone()),
                    ))
                })
            }),
            ("object-add", Box::new(|vm| Box::pin(add_rng(vm)))),
            ("device_add", Box::new(|vm| Box::pin(add_rng(vm)))),
            ("device_add", Box::new(|vm| Box::pin(add_vser(vm)))),
        ];
        for (step, change) in &cases {
            assert_rolls_back(&t, &mon2, step, 1, change).await;
        }
    });
}

async fn add(vm: Vm, c: VhostUserBlkConfig) -> qhotplug::Result<()> {
    vm.add_vhost_user_blk(c).await.map(drop)
}
async fn add_fs(vm: Vm, c: VirtioFsConfig) -> qhotplug::Result<()> {
    vm.add_virtio_fs(c).await.map(drop)
}
async fn add_port(vm: Vm, c: SerialPortConfig) -> qhotplug::Result<()> {
    vm.add_serial_port(c).await.map(drop)
}
async fn add_rng(vm: Vm) -> qhotplug::Result<()> {
    vm.add_rng(RngConfig::new("rng0")).await.map(drop)
}
async fn add_vser(vm: Vm) -> qhotplug::Result<()> {
    vm.add_virtio_serial(VirtioSerialConfig::new("vser1"))
        .await
        .map(drop)
}

#[test]
fn a_relaunch_from_the_spec_has_every_kind_at_boot() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (_qsd, fsd) = vhost_user_backends(d).await;
        let t = TestVm::running(shared_memory_spec()).await;
        t.vm.add_vhost_user_blk(VhostUserBlkConfig::new("vdisk", d.join("vdisk.sock")))
            .await
            .unwrap();
        t.vm.add_virtio_fs(VirtioFsConfig::new("fs0", d.join("fs.sock"), "share"))
            .await
            .unwrap();
        t.vm.add_virtio_serial(VirtioSerialConfig::new("vser0"))
            .await
            .unwrap();
        t.vm.add_serial_port(SerialPortConfig::new(
            "p0",
            "vser0",
            "org.example.agent",
            d.join("port.sock"),
        ))
        .await
        .unwrap();
        t.vm.add_rng(RngConfig::new("rng0")).await.unwrap();
        let spec = t.vm.spec();
        let pci = t.snapshot().await.pci;
        drop(t);
        // virtiofsd serves one VM and exits when it goes: the relaunch gets a new one. The storage
        // daemon's export takes the new client.
        drop(fsd);
        let _fsd = VirtiofsdLauncher::new(d.join("shared"), d.join("fs.sock"))
            .launch()
            .unwrap();
        let again = TestVm::running(spec).await;
        assert_eq!(again.snapshot().await.pci, pci);
        let chardevs: Vec<String> = again
            .vm
            .client()
            .execute(&QueryChardev)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.label)
            .collect();
        for c in ["vdisk-chr", "fs0-chr", "p0-chr"] {
            assert!(chardevs.iter().any(|l| l == c), "{c} in {chardevs:?}");
        }
        assert!(again
            .snapshot()
            .await
            .objects
            .contains(&"rng0-rng".to_owned()));
    });
}

#[test]
fn a_storage_daemon_export_that_fails_leaves_no_node_behind() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let qsd = StorageDaemon::launch(StorageDaemonLauncher::new(dir.path().join("qsd")))
            .await
            .unwrap();
        let nodes = || async {
            qsd.client()
                .execute_raw("query-named-block-nodes", &json!({}))
                .await
                .unwrap()
                .as_array()
                .unwrap()
                .len()
        };
        // No such image: the first node fails.
        let missing = dir.path().join("missing.raw");
        match qsd
            .export("e1", &missing, &dir.path().join("e1.sock"), false)
            .await
        {
            Err(Error::Step {
                step: "blockdev-add",
                undo_failures,
                ..
            }) => assert!(undo_failures.is_empty()),
            other => panic!("{other:?}"),
        }
        // A socket path that cannot be bound: the export fails after both nodes were added.
        let img = image(dir.path(), "e2.raw", 1);
        let unbindable = dir.path().join("no-such-dir/e2.sock");
        match qsd.export("e2", &img, &unbindable, false).await {
            Err(Error::Step {
                step: "block-export-add",
                undo_failures,
                ..
            }) => assert!(undo_failures.is_empty()),
            other => panic!("{other:?}"),
        }
        assert_eq!(nodes().await, 0);
        // And a good one comes and goes.
        qsd.export("e3", &img, &dir.path().join("e3.sock"), false)
            .await
            .unwrap();
        assert_eq!(nodes().await, 2);
        qsd.unexport("e3").await.unwrap();
        assert_eq!(nodes().await, 0);
        let pid = qsd.pid();
        qsd.quit().await.unwrap();
        assert!(
            qhotplug_tests::exited(pid, std::time::Duration::from_secs(5))
                .await
                .unwrap()
        );
    });
}
