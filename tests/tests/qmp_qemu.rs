//! The QMP client against a real, paused `qemu-system-x86_64` (TCG, no guest).

use std::time::Duration;

use futures::StreamExt;
use qhotplug_qmp::command::*;
use qhotplug_qmp::{Config, Error, EventKind};
use qhotplug_tests::{pipe_fd, Qemu};
use serde_json::{json, Map, Value};

fn props(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[tokio::test]
async fn greeting_and_queries_on_a_paused_vm() {
    let (_qemu, client) = Qemu::paused().await;
    assert!(client.oob_enabled(), "a unix socket monitor offers oob");

    let version = client.execute(&QueryVersion).await.unwrap();
    assert_eq!(&version, &client.greeting().version);
    assert!(version.qemu.major >= 7);

    let status = client.execute(&QueryStatus).await.unwrap();
    assert_eq!(
        (status.running, status.status),
        (false, RunState::Prelaunch)
    );

    let commands = client.execute(&QueryCommands).await.unwrap();
    for needed in [
        "device_add",
        "blockdev-add",
        "netdev_add",
        "getfd",
        "add-fd",
        "query-fdsets",
    ] {
        assert!(
            commands.iter().any(|c| c.name == needed),
            "{needed} missing"
        );
    }

    let pci = client.execute(&QueryPci).await.unwrap();
    assert_eq!(pci.len(), 1);
    assert_eq!(pci[0].devices[0].slot, 0, "the host bridge sits at slot 0");

    assert!(client.execute(&QueryFdsets).await.unwrap().is_empty());
    let peripherals = client
        .execute(&QomList {
            path: "/machine/peripheral".into(),
        })
        .await
        .unwrap();
    assert!(
        peripherals.iter().all(|p| p.child_type().is_none()),
        "{peripherals:?}"
    );

    let hmp = client
        .execute(&HumanMonitorCommand {
            command_line: "info version".into(),
            cpu_index: None,
        })
        .await
        .unwrap();
    assert!(hmp.starts_with(&version.qemu.to_string()), "{hmp}");

    let err = client
        .execute_raw("no-such-command", &Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.qmp_class(), Some("CommandNotFound"));
    assert!(matches!(err, Error::Qmp { ref command, .. } if command == "no-such-command"));
}

#[tokio::test]
async fn block_and_device_commands_show_in_qemu_state() {
    let (_qemu, client) = Qemu::paused().await;
    client
        .execute(&BlockdevAdd {
            driver: "null-co".into(),
            node_name: "null0".into(),
            props: props(json!({"size": 1048576, "read-only": true})),
        })
        .await
        .unwrap();
    let nodes = client
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap();
    assert!(nodes
        .iter()
        .any(|n| n.node_name.as_deref() == Some("null0") && n.ro));

    client
        .execute(&DeviceAdd {
            driver: "virtio-scsi-pci".into(),
            id: Some("scsi0".into()),
            bus: Some("pci.0".into()),
            props: props(json!({"addr": "0x5"})),
        })
        .await
        .unwrap();
    client
        .execute(&DeviceAdd {
            driver: "scsi-hd".into(),
            id: Some("disk0".into()),
            bus: Some("scsi0.0".into()),
            props: props(json!({"drive": "null0", "scsi-id": 1, "lun": 0})),
        })
        .await
        .unwrap();
    let pci = client.execute(&QueryPci).await.unwrap();
    let scsi = pci[0]
        .devices
        .iter()
        .find(|d| d.qdev_id == "scsi0")
        .unwrap();
    assert_eq!(scsi.slot, 5);
    let block = client.execute(&QueryBlock).await.unwrap();
    assert!(block
        .iter()
        .any(|b| b.qdev.as_deref().is_some_and(|q| q.contains("disk0"))));
    let peripherals = client
        .execute(&QomList {
            path: "/machine/peripheral".into(),
        })
        .await
        .unwrap();
    let disk = peripherals.iter().find(|p| p.name == "disk0").unwrap();
    assert_eq!(disk.child_type(), Some("scsi-hd"));

    // SCSI devices unplug without a guest: DEVICE_DELETED comes, then the node can go.
    let (_, event) = client
        .execute_and_wait(
            &DeviceDel { id: "disk0".into() },
            |e| e.deleted_device() == Some("disk0"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(matches!(event.kind(), EventKind::DeviceDeleted(_)));
    client
        .execute(&BlockdevDel {
            node_name: "null0".into(),
        })
        .await
        .unwrap();
    let nodes = client
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap();
    assert!(nodes
        .iter()
        .all(|n| n.node_name.as_deref() != Some("null0")));

    // A bad device is a typed error naming the command.
    let err = client
        .execute(&DeviceAdd {
            driver: "no-such-device".into(),
            id: None,
            bus: None,
            props: Map::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.qmp_class(), Some("GenericError"));
}

#[tokio::test]
async fn netdev_add_and_del() {
    let (_qemu, client) = Qemu::paused().await;
    client
        .execute(&NetdevAdd {
            kind: "user".into(),
            id: "net0".into(),
            props: Map::new(),
        })
        .await
        .unwrap();
    let dup = client
        .execute(&NetdevAdd {
            kind: "user".into(),
            id: "net0".into(),
            props: Map::new(),
        })
        .await
        .unwrap_err();
    assert!(dup.qmp_desc().unwrap().contains("Duplicate"), "{dup}");
    client
        .execute(&NetdevDel { id: "net0".into() })
        .await
        .unwrap();
    let gone = client
        .execute(&NetdevDel { id: "net0".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.qmp_class(), Some("DeviceNotFound"));
}

#[tokio::test]
async fn run_state_commands_and_their_events() {
    let (mut qemu, client) = Qemu::paused().await;
    let mut events = client.events();
    client.execute(&Cont).await.unwrap();
    assert_eq!(
        events.next().await.unwrap().unwrap().kind().clone(),
        EventKind::Resume
    );
    assert!(client.execute(&QueryStatus).await.unwrap().running);
    client.execute(&Stop).await.unwrap();
    assert_eq!(
        events.next().await.unwrap().unwrap().kind().clone(),
        EventKind::Stop
    );
    client.execute(&SystemReset).await.unwrap();
    let reset = events.next().await.unwrap().unwrap();
    assert!(
        matches!(reset.kind(), EventKind::Reset(r) if !r.guest),
        "{reset:?}"
    );
    client.execute(&Quit).await.unwrap();
    let shutdown = events.next().await.unwrap().unwrap();
    assert!(matches!(shutdown.kind(), EventKind::Shutdown(s) if s.reason == "host-qmp-quit"));
    assert!(
        events.next().await.is_none(),
        "the stream ends when QEMU exits"
    );
    assert!(qemu.wait().await.success());
}

#[tokio::test]
async fn getfd_names_belong_to_their_connection() {
    let (qemu, first) = Qemu::launch(
        &["-qmp", "unix:{dir}/second.sock,server=on,wait=off"],
        Config::new(),
    )
    .await;
    let second = Config::new()
        .connect(qemu.dir().join("second.sock"))
        .await
        .unwrap();
    first.getfd("mine", pipe_fd()).await.unwrap();
    let elsewhere = second
        .execute(&Closefd {
            fdname: "mine".into(),
        })
        .await
        .unwrap_err();
    assert!(
        elsewhere.qmp_desc().unwrap().contains("not found"),
        "{elsewhere}"
    );
    first
        .execute(&Closefd {
            fdname: "mine".into(),
        })
        .await
        .unwrap();
    let again = first
        .execute(&Closefd {
            fdname: "mine".into(),
        })
        .await
        .unwrap_err();
    assert!(again.qmp_desc().unwrap().contains("not found"), "{again}");
}

#[tokio::test]
async fn add_fd_shows_in_query_fdsets_and_remove_fd_takes_it_away() {
    let (_qemu, client) = Qemu::paused().await;
    // QEMU before 9.1 defers closing removed fds while the VM is paused: run it (SeaBIOS, no disk).
    client.execute(&Cont).await.unwrap();
    let info = client
        .add_fd(
            &AddFd {
                fdset_id: None,
                opaque: Some("disk-1".into()),
            },
            pipe_fd(),
        )
        .await
        .unwrap();
    let sets = client.execute(&QueryFdsets).await.unwrap();
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].fdset_id, info.fdset_id);
    assert_eq!(sets[0].fds[0].fd, info.fd);
    assert_eq!(sets[0].fds[0].opaque.as_deref(), Some("disk-1"));

    let info2 = client
        .add_fd(
            &AddFd {
                fdset_id: Some(info.fdset_id),
                opaque: None,
            },
            pipe_fd(),
        )
        .await
        .unwrap();
    assert_eq!(info2.fdset_id, info.fdset_id);
    assert_eq!(client.execute(&QueryFdsets).await.unwrap()[0].fds.len(), 2);

    client
        .execute(&RemoveFd {
            fdset_id: info.fdset_id,
            fd: None,
        })
        .await
        .unwrap();
    let sets = client.execute(&QueryFdsets).await.unwrap();
    assert!(sets.is_empty(), "after remove-fd: {sets:?}");
}

#[tokio::test]
async fn sixty_four_pipelined_commands_each_get_their_reply() {
    let (_qemu, client) = Qemu::paused().await;
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let s = client.execute(&QueryStatus).await.unwrap();
                    assert_eq!(s.status, RunState::Prelaunch);
                } else {
                    let path = "/machine/peripheral-anon".to_owned();
                    client.execute(&QomList { path }).await.unwrap();
                }
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
}

#[tokio::test]
async fn oob_commands_carry_an_id_and_come_back_to_their_caller() {
    let (_qemu, client) = Qemu::paused().await;
    let err = client
        .execute_oob_raw("migrate-pause", &Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.qmp_class(), Some("GenericError"), "{err}");
    // A command that does not allow oob is refused, and the reply still finds its caller.
    let err = client
        .execute_oob_raw("query-status", &Value::Null)
        .await
        .unwrap_err();
    assert!(
        err.qmp_desc().unwrap().contains("does not support OOB"),
        "{err}"
    );
    client.execute(&QueryStatus).await.unwrap();

    let (_plain_qemu, plain) = Qemu::launch(&[], Config::new().oob(false)).await;
    assert!(matches!(
        plain.execute_oob_raw("migrate-pause", &Value::Null).await,
        Err(Error::OobUnavailable)
    ));
}

#[tokio::test]
async fn connect_from_a_socketpair_given_to_qemu() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    // The launcher's own monitor is fd 3; the first inherited fd is 4.
    let (qemu, _first) = Qemu::launch_with_fds(
        &[
            "-chardev",
            "socket,id=mon1,fd=4",
            "-mon",
            "chardev=mon1,mode=control",
        ],
        vec![theirs.into()],
        Config::new(),
    )
    .await;
    ours.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(ours).unwrap();
    let client = Config::new()
        .connect_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", qemu.stderr()));
    assert!(!client.execute(&QueryStatus).await.unwrap().running);
}

#[tokio::test]
async fn connecting_to_a_missing_socket_fails_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let err = Config::new()
        .connect_timeout(Duration::from_millis(200))
        .connect(dir.path().join("nothing.sock"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Io(ref e) if e.kind() == std::io::ErrorKind::NotFound),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn killing_qemu_fails_pending_calls_with_disconnected() {
    let (qemu, client) = Qemu::launch(&[], Config::new().default_timeout(None)).await;
    client.execute(&QueryStatus).await.unwrap();
    // Stop QEMU so commands pile up unanswered, then kill it.
    qemu.signal(libc::SIGSTOP);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.execute(&QueryStatus).await })
        })
        .collect();
    qemu.signal(libc::SIGKILL);
    for call in calls {
        let r = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("a pending call hung after QEMU died")
            .unwrap();
        assert!(matches!(r, Err(Error::Disconnected)), "{r:?}");
    }
}
