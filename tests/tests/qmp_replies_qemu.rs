//! Every typed command's reply decodes, from each QEMU the project supports: live against the QEMU
//! under test, and from replies recorded from QEMU 7.2 and 10.0 (`tests/data/replies/<version>/`),
//! so a reply shape that changes between versions shows here whichever QEMU runs the suite.
//!
//! To record a new QEMU's replies:
//! `QHOTPLUG_RECORD_REPLIES=1 QHOTPLUG_QEMU=/path/to/qemu cargo nextest run -E 'binary(qmp_replies_qemu)'`.

use std::path::PathBuf;

use qhotplug_qmp::command::*;
use qhotplug_qmp::{Client, Command, Schema};
use qhotplug_tests::{pipe_fd, Qemu};
use serde_json::{json, Value};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/replies")
}

/// Decodes one recorded or live reply as command `name`'s typed return value.
fn decode(name: &str, raw: &str) -> Result<(), String> {
    fn typed<C: Command>(raw: &str) -> Result<(), String> {
        serde_json::from_str::<C::Returns>(raw)
            .map(drop)
            .map_err(|e| format!("{}: {e}", C::NAME))
    }
    match name {
        "query-commands" => typed::<QueryCommands>(raw),
        "query-status" => typed::<QueryStatus>(raw),
        "query-version" => typed::<QueryVersion>(raw),
        "query-pci" => typed::<QueryPci>(raw),
        "query-block" => typed::<QueryBlock>(raw),
        "query-fdsets" => typed::<QueryFdsets>(raw),
        "query-named-block-nodes" => typed::<QueryNamedBlockNodes>(raw),
        "qom-list" => typed::<QomList>(raw),
        "add-fd" => typed::<AddFd>(raw),
        "human-monitor-command" => typed::<HumanMonitorCommand>(raw),
        "query-qmp-schema" => Schema::from_json(raw)
            .map(drop)
            .map_err(|e| format!("query-qmp-schema: {e}")),
        other => Err(format!("no typed command {other}")),
    }
}

/// The typed queries, each with arguments that make its reply say something (a disk, a
/// fd set, a PCI device).
async fn replies(client: &Client) -> Vec<(&'static str, Value)> {
    let fdset = client
        .add_fd(
            &AddFd {
                fdset_id: None,
                opaque: Some("recorded".into()),
            },
            pipe_fd(),
        )
        .await
        .unwrap();
    let mut out = vec![("add-fd", serde_json::to_value(fdset).unwrap())];
    for (name, args) in [
        ("query-commands", Value::Null),
        ("query-status", Value::Null),
        ("query-version", Value::Null),
        ("query-pci", Value::Null),
        ("query-block", Value::Null),
        ("query-fdsets", Value::Null),
        ("query-named-block-nodes", json!({"flat": true})),
        ("qom-list", json!({"path": "/machine/peripheral"})),
        (
            "human-monitor-command",
            json!({"command-line": "info version"}),
        ),
        ("query-qmp-schema", Value::Null),
    ] {
        out.push((name, client.execute_raw(name, &args).await.unwrap()));
    }
    out
}

#[tokio::test]
async fn every_typed_reply_of_the_qemu_under_test_decodes() {
    let (_qemu, client) = Qemu::launch(
        &[
            "-blockdev",
            "driver=null-co,node-name=rec0",
            "-device",
            "virtio-blk-pci,drive=rec0,id=rec-disk",
        ],
        qhotplug_qmp::Config::new(),
    )
    .await;
    let version = client.greeting().version.qemu;
    let record = std::env::var_os("QHOTPLUG_RECORD_REPLIES").is_some();
    let dir = data_dir().join(format!("{}.{}", version.major, version.minor));
    for (name, reply) in replies(&client).await {
        let raw = reply.to_string();
        decode(name, &raw).unwrap_or_else(|e| panic!("QEMU {version}: {e}"));
        if record && name != "query-qmp-schema" && name != "query-commands" {
            std::fs::create_dir_all(&dir).unwrap();
            let pretty = serde_json::to_string_pretty(&reply).unwrap();
            std::fs::write(dir.join(format!("{name}.json")), pretty + "\n").unwrap();
        }
    }
}

#[test]
fn replies_recorded_from_7_2_and_10_0_decode() {
    let mut seen = Vec::new();
    for version in ["7.2", "10.0"] {
        let dir = data_dir().join(version);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let raw = std::fs::read_to_string(&path).unwrap();
            decode(&name, &raw).unwrap_or_else(|e| panic!("QEMU {version}: {e}"));
            seen.push(format!("{version}/{name}"));
        }
    }
    // Both versions, every recorded query.
    assert_eq!(seen.len(), 2 * 9, "{seen:?}");
}

#[tokio::test]
async fn the_schema_says_what_this_qemu_has_and_is_read_once_per_build() {
    let (qemu, client, second) = Qemu::with_second_monitor(qhotplug_qmp::Config::new()).await;
    let schema = client.schema().await.unwrap();
    assert!(schema.command_count() > 100);
    assert!(schema.has_command("device_add"));
    assert!(!schema.has_command("no-such-command"));
    // What the SDK relies on, present in both 7.2 and 10.0.
    assert!(schema.command_takes("query-named-block-nodes", "flat"));
    assert!(schema.command_takes("add-fd", "opaque"));
    assert!(schema.command_takes("blockdev-add", "filename"));
    assert!(schema.command_returns("query-pci", "devices"));
    assert!(schema.has_event("DEVICE_DELETED"));
    assert!(schema.event_has("DEVICE_DELETED", "device"));
    assert!(schema.has_event("DEVICE_UNPLUG_GUEST_ERROR"));
    assert!(schema
        .arg_values("blockdev-add", "driver")
        .unwrap()
        .contains(&"qcow2"));
    // A clone, and a second connection to the same QEMU, share the parsed copy.
    assert!(std::sync::Arc::ptr_eq(
        &schema,
        &client.clone().schema().await.unwrap()
    ));
    let other = qhotplug_qmp::connect(&second).await.unwrap();
    assert!(std::sync::Arc::ptr_eq(
        &schema,
        &other.schema().await.unwrap()
    ));
    drop(qemu);
}

#[tokio::test]
async fn connections_to_one_build_that_ask_at_once_read_the_schema_once() {
    let qemu = qhotplug_mock::MockQemu::pc();
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(qemu.connect().await.unwrap());
    }
    let schemas = futures::future::join_all(clients.iter().map(|c| c.schema())).await;
    let first = schemas[0].as_ref().unwrap().clone();
    for s in &schemas {
        assert!(std::sync::Arc::ptr_eq(s.as_ref().unwrap(), &first));
    }
    let reads = qemu
        .commands()
        .iter()
        .filter(|c| *c == "query-qmp-schema")
        .count();
    // One, or none when another test in this process already holds the mock's schema.
    assert!(reads <= 1, "{reads} connections read the schema");
}
