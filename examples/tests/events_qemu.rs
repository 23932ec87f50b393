//! The `events` program against real QEMU: thousands of events through a second monitor, filtered
//! by name, and a clean exit when QEMU goes away.

use std::process::Stdio;
use std::time::Duration;

use qhotplug_qmp::command::{Cont, Quit, Stop};
use qhotplug_qmp::Config;
use qhotplug_tests::Qemu;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn streams_thousands_of_filtered_events_and_exits_when_qemu_goes() {
    let (mut qemu, client, mon2) = Qemu::with_second_monitor(Config::new()).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_events"))
        .arg(&mon2)
        .arg("STOP")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let hello = tokio::time::timeout(Duration::from_secs(10), stderr.next_line())
        .await
        .expect("events connects")
        .unwrap()
        .unwrap();
    assert!(hello.contains("connected"), "{hello}");

    // Read what it prints while the events are made, as a terminal or a pipe reader would.
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let (seen_tx, mut seen) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut stops = 0;
        while let Some(line) = stdout.next_line().await.unwrap() {
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(event["event"], "STOP", "{line}");
            assert!(event["timestamp"]["seconds"].is_u64());
            stops += 1;
            seen_tx.send_replace(stops);
        }
        stops
    });

    const ROUNDS: usize = 2000;
    for _ in 0..ROUNDS {
        client.execute(&Cont).await.unwrap();
        client.execute(&Stop).await.unwrap();
    }
    // Every STOP printed, then QEMU goes.
    tokio::time::timeout(Duration::from_secs(30), seen.wait_for(|n| *n >= ROUNDS))
        .await
        .expect("all STOPs printed")
        .unwrap();
    let _ = client.execute(&Quit).await;
    qemu.wait().await;
    let stops = reader.await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("events exits when QEMU goes away")
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        stops, ROUNDS,
        "every STOP, and only STOPs (RESUME filtered out)"
    );
    let mut last = Vec::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        last.push(line);
    }
    assert!(last.iter().any(|l| l.contains("went away")), "{last:?}");
    assert!(!last.iter().any(|l| l.contains("lost")), "{last:?}");
}
