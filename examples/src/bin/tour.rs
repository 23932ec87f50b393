//! A tour of the QMP client: launches a paused QEMU from a `VmSpec`, then shows the greeting, a few commands, a
//! SCSI disk hot-added and removed, and the events as they arrive.
//!
//! Run it with `scripts/demo` (installs QEMU when missing) or
//! `cargo run -p qhotplug-examples --bin tour`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use qhotplug_cmdline::{Launcher, Machine, VmSpec};
use qhotplug_qmp::command::*;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("qhotplug-tour-{}", std::process::id()));
    let result = tour(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn tour(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut spec = VmSpec::new("tour", Machine::Pc);
    spec.paused = true;
    let (client, mut qemu) = Launcher::new(spec, dir)
        .launch()
        .await
        .map_err(|e| format!("{e} (scripts/demo installs qemu-system-x86)"))?;
    let g = client.greeting();
    println!(
        "connected in {:?}: QEMU {} ({}), capabilities {:?}, oob enabled: {}",
        start.elapsed(),
        g.version.qemu,
        g.version.package,
        g.capabilities,
        client.oob_enabled()
    );

    // Print every event as it arrives, from a task of its own.
    let mut events = client.events();
    let printer = tokio::spawn(async move {
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => println!("  event  {}", event.to_json()),
                Err(lag) => println!("  events lost: {lag}"),
            }
        }
    });

    let status = client.execute(&QueryStatus).await?;
    println!(
        "query-status: running={} status={:?}",
        status.running, status.status
    );
    let commands = client.execute(&QueryCommands).await?;
    println!("query-commands: {} commands", commands.len());
    for bus in client.execute(&QueryPci).await? {
        for d in bus.devices {
            println!(
                "query-pci: bus {} slot {:2} fn {} {}",
                d.bus,
                d.slot,
                d.function,
                d.class_info.desc.as_deref().unwrap_or("?")
            );
        }
    }

    println!("hot-adding a virtio-scsi controller and a 64 MiB scsi-hd ...");
    client
        .execute(&BlockdevAdd {
            driver: "null-co".into(),
            node_name: "tour-disk".into(),
            props: json!({"size": 64 << 20})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        })
        .await?;
    for (driver, id, bus, props) in [
        ("virtio-scsi-pci", "scsi0", "pci.0", json!({"addr": "0x5"})),
        (
            "scsi-hd",
            "disk0",
            "scsi0.0",
            json!({"drive": "tour-disk", "scsi-id": 1}),
        ),
    ] {
        client
            .execute(&DeviceAdd {
                driver: driver.into(),
                id: Some(id.into()),
                bus: Some(bus.into()),
                props: props.as_object().cloned().unwrap_or_default(),
            })
            .await?;
    }
    for b in client.execute(&QueryBlock).await? {
        if let Some(node) = b.inserted {
            println!(
                "query-block: {} on {} ({})",
                node.drv,
                b.qdev.unwrap_or_default(),
                node.file
            );
        }
    }
    let (_, event) = client
        .execute_and_wait(
            &DeviceDel { id: "disk0".into() },
            |e| e.deleted_device() == Some("disk0"),
            Duration::from_secs(5),
        )
        .await?;
    println!("device_del disk0 completed: {}", event.name());
    client
        .execute(&BlockdevDel {
            node_name: "tour-disk".into(),
        })
        .await?;

    // A failing command is a typed error.
    if let Err(e) = client
        .execute_raw("no-such-command", &serde_json::Value::Null)
        .await
    {
        println!("an error reply: {e} (class {:?})", e.qmp_class());
    }

    client.execute(&Cont).await?;
    client.execute(&Stop).await?;
    client.execute(&Quit).await?;
    // The event stream ends when QEMU closes the socket.
    tokio::time::timeout(Duration::from_secs(5), printer).await??;
    qemu.wait().await?;
    println!("QEMU quit; tour done in {:?}", start.elapsed());
    Ok(())
}
