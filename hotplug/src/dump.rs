//! A dump of the guest's memory for crash analysis (libvirt's `virsh dump`, KubeVirt's `virtctl
//! memory-dump`): `dump-guest-memory` in the background into a file the caller opened, handed
//! over with `getfd` (QEMU takes the fd and closes it when done), its progress from `query-dump`
//! and its end from `DUMP_COMPLETED`. QEMU has no command to cancel a dump: once started it runs
//! to its end, and so does the call, even if its caller stops waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use qhotplug_qmp::command::{
    DumpGuestMemory, DumpStatus, QueryDump, QueryDumpGuestMemoryCapability,
};
use qhotplug_qmp::EventKind;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::vm_core::Core;

/// How often the dump's progress is asked while no event comes.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// The format of a memory dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DumpFormat {
    /// An ELF core file: one `LOAD` segment per block of guest memory, a `NOTE` segment with
    /// each vCPU's registers (`readelf`, `gdb`, `crash`).
    Elf,
    /// makedumpfile's flattened kdump-compressed format, zlib (`crash`, after
    /// `makedumpfile -R`).
    KdumpZlib,
    /// The same, lzo (where QEMU was built with it).
    KdumpLzo,
    /// The same, snappy (where QEMU was built with it).
    KdumpSnappy,
}

impl DumpFormat {
    /// QEMU's name for it.
    pub fn qemu_name(self) -> &'static str {
        match self {
            DumpFormat::Elf => "elf",
            DumpFormat::KdumpZlib => "kdump-zlib",
            DumpFormat::KdumpLzo => "kdump-lzo",
            DumpFormat::KdumpSnappy => "kdump-snappy",
        }
    }
}

/// How far a dump is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpProgress {
    /// Bytes of guest memory written.
    pub written: u64,
    /// Bytes of guest memory to write in all.
    pub total: u64,
}

/// See [`Vm::dump_memory`](crate::Vm::dump_memory).
pub(crate) async fn dump(
    core: &Core,
    file: std::fs::File,
    format: DumpFormat,
    mut progress: impl FnMut(DumpProgress) + Send,
) -> Result<DumpProgress> {
    let client = &core.client;
    let formats = client
        .execute(&QueryDumpGuestMemoryCapability)
        .await?
        .formats;
    if !formats.iter().any(|f| f == format.qemu_name()) {
        return Err(Error::Unsupported {
            command: format!("dump-guest-memory format {}", format.qemu_name()),
            operation: "dump_memory",
        });
    }
    // A name of its own, so two calls at once never hand QEMU each other's file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = qhotplug_cmdline::names::dump_fd(NEXT.fetch_add(1, Ordering::Relaxed));
    let mut events = client.events();
    client.getfd(&name, file.into()).await?;
    let start = DumpGuestMemory {
        paging: false,
        protocol: format!("fd:{name}"),
        detach: Some(true),
        format: Some(format.qemu_name().into()),
    };
    if let Err(refused) = client.execute(&start).await {
        // Refused before QEMU took the fd (another dump runs, say): the name goes.
        let close = qhotplug_qmp::command::Closefd { fdname: name };
        if let Err(error) = client.execute(&close).await {
            tracing::warn!(%error, "the dump's fd could not be closed");
        }
        return Err(refused.into());
    }
    // QEMU says why a dump failed only in its `DUMP_COMPLETED` (7.2 and 10.0).
    let mut reason = None;
    loop {
        let until = Instant::now() + PROGRESS_EVERY;
        while let Ok(Some(item)) = tokio::time::timeout_at(until, events.next()).await {
            let Ok(event) = item else { continue };
            if matches!(event.kind(), EventKind::Other { name } if name == "DUMP_COMPLETED") {
                reason = event.data_value()["error"].as_str().map(str::to_owned);
                break;
            }
        }
        let status: DumpStatus = client.execute(&QueryDump).await?;
        let now = DumpProgress {
            written: status.completed,
            total: status.total,
        };
        match status.status.as_str() {
            "completed" => {
                progress(now);
                return Ok(now);
            }
            "failed" => {
                let reason = reason.unwrap_or_else(|| "QEMU did not say why".into());
                return Err(Error::DumpFailed(reason));
            }
            _ => progress(now),
        }
    }
}
