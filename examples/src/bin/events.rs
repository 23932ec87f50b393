//! Streams a QEMU's QMP events as JSON lines, optionally only those with the given names.
//!
//! ```text
//! events /run/vm1/qmp.sock                      # every event
//! events /run/vm1/qmp.sock DEVICE_DELETED STOP  # only these
//! ```
//!
//! One line per event on stdout, in QMP's wire form (`{"event":…,"data":…,"timestamp":…}`). It says
//! on stderr when it is connected and when it fell behind (events lost), and exits 0 when QEMU goes
//! away. A QMP monitor serves one client at a time: give QEMU a second monitor for this.

use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;

use futures::StreamExt;
use qhotplug_qmp::Config;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: events QMP_SOCKET [EVENT_NAME ...]");
        return ExitCode::from(2);
    };
    let only: HashSet<String> = args.collect();
    // Events are what this program is for: buffer plenty before a slow stdout makes us lag.
    let client = match Config::new().event_capacity(4096).connect(&path).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("events: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "events: connected to QEMU {} at {path}",
        client.greeting().version.qemu
    );
    let mut events = client.events();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Some(item) = events.next().await {
        match item {
            Ok(event) if only.is_empty() || only.contains(event.name()) => {
                let line = event.to_json().to_string();
                // A closed stdout (`events … | head`) ends the program quietly.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return ExitCode::SUCCESS;
                }
            }
            Ok(_) => {}
            Err(lagged) => eprintln!("events: {lagged}"),
        }
    }
    eprintln!("events: QEMU went away");
    ExitCode::SUCCESS
}
