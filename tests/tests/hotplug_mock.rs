//! Hotplug against a scripted monitor: what real QEMU cannot be made to lack.

use qhotplug::{DiskConfig, Error, Vm};
use qhotplug_cmdline::{Disk, Machine, Pci, VmSpec};
use qhotplug_mock::{greeting, schema, MockServer};
use qhotplug_qmp::Config;
use serde_json::json;

/// A VM attached through a mock that answers the attach queries, and the mock.
async fn attached(package: &str) -> (MockServer, Vm) {
    attached_with(VmSpec::new("mock", Machine::Pc), package).await
}

/// `package` names the mock's QEMU build: the client shares a schema between connections to the
/// same build, and each test's mock has its own.
async fn attached_with(spec: VmSpec, package: &str) -> (MockServer, Vm) {
    let (mut server, stream) = MockServer::pair();
    let vm = tokio::spawn(async move {
        let client = Config::new().connect_stream(stream).await.unwrap();
        Vm::attach(client, spec).await
    });
    server.handshake_with(&greeting(7, 2, package)).await;
    for (command, reply) in [
        ("qom-get", json!("pc-i440fx-7.2-machine")),
        ("query-pci", json!([{"bus": 0, "devices": []}])),
        // Devices by QOM (ids, controllers, placements): /machine/peripheral, then -anon.
        ("qom-list", json!([{"name": "type", "type": "string"}])),
        ("qom-list", json!([{"name": "type", "type": "string"}])),
    ] {
        let got = server.recv().await.unwrap();
        assert_eq!(got.command(), command);
        server.reply(reply).await;
    }
    (server, vm.await.unwrap().unwrap())
}

#[tokio::test]
async fn a_qemu_without_add_fd_is_refused_by_name_before_anything_changes() {
    let (mut server, vm) = attached("no add-fd").await;
    let dir = tempfile::tempdir().unwrap();
    let path = qhotplug_tests::image(dir.path(), "m.raw", 1);
    let add = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.add_disk(DiskConfig::virtio_blk("m1", path)).await })
    };
    let got = server.recv().await.unwrap();
    assert_eq!(got.command(), "query-qmp-schema");
    let commands = ["blockdev-add", "device_add", "device_del", "getfd"];
    server.reply(schema(&commands, &[])).await;
    match add.await.unwrap() {
        Err(Error::Unsupported { command, operation }) => {
            assert_eq!((command.as_str(), operation), ("add-fd", "disk hotplug"));
        }
        other => panic!("{other:?}"),
    }
    // The schema is read once; the next check answers from it without a round trip.
    match vm.check_nic_hotplug().await {
        Err(Error::Unsupported { command, .. }) => assert_eq!(command, "closefd"),
        other => panic!("{other:?}"),
    }
    // Nothing else was sent.
    drop(vm);
    assert!(server.recv().await.is_none());
}

#[tokio::test]
async fn a_guest_that_refuses_an_unplug_keeps_the_device_and_says_so() {
    let mut spec = VmSpec::new("mock", Machine::Pc);
    spec.disks
        .push(Disk::virtio_blk("d1", "/img", Pci::new("pci.0", 5)));
    let (mut server, vm) = attached_with(spec, "refuses unplug").await;
    let remove = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.remove_disk("d1").await })
    };
    let got = server.recv().await.unwrap();
    assert_eq!(got.command(), "query-qmp-schema");
    let all = [
        "add-fd",
        "remove-fd",
        "query-fdsets",
        "blockdev-add",
        "blockdev-del",
        "device_add",
        "device_del",
    ];
    server
        .reply(schema(
            &all,
            &["DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"],
        ))
        .await;
    let got = server.recv().await.unwrap();
    assert_eq!(
        (got.command(), &got.arguments()["id"]),
        ("device_del", &json!("d1"))
    );
    server.reply(json!({})).await;
    // Another device's refusal is not ours.
    server
        .event(
            "DEVICE_UNPLUG_GUEST_ERROR",
            json!({"device": "other", "path": "/machine/peripheral/other"}),
        )
        .await;
    server
        .event(
            "DEVICE_UNPLUG_GUEST_ERROR",
            json!({"device": "d1", "path": "/machine/peripheral/d1"}),
        )
        .await;
    match remove.await.unwrap() {
        Err(Error::UnplugRejected { id, reason }) => {
            assert_eq!(id, "d1");
            assert_eq!(reason, "DEVICE_UNPLUG_GUEST_ERROR");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.disks().len(), 1, "the device is kept");
    // No blockdev-del was sent: the backend stays with the device.
    drop(vm);
    assert!(server.recv().await.is_none());
}

#[tokio::test]
async fn a_qemu_older_than_the_oldest_supported_is_refused_by_version() {
    let (mut server, stream) = MockServer::pair();
    let vm = tokio::spawn(async move {
        let client = Config::new().connect_stream(stream).await.unwrap();
        Vm::attach(client, VmSpec::new("old", Machine::Pc)).await
    });
    server.handshake_with(&greeting(4, 2, "old")).await;
    match vm.await.unwrap() {
        Err(e @ Error::QemuTooOld { .. }) => {
            let text = e.to_string();
            assert!(text.contains("4.2.0") && text.contains("5.0.0"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    // Refused before anything was asked of it.
    assert!(server.recv().await.is_none());
}
