//! Dumping the guest's memory (`qapi/dump.json`): `dump-guest-memory` into an fd, its progress
//! and outcome.

use serde::{Deserialize, Serialize};

use super::Empty;

command!(
    /// `dump-guest-memory`: writes the guest's memory and vCPU state into `protocol`
    /// (`fd:<getfd name>`, which QEMU takes and closes, or `file:<path>`). With `detach`, it
    /// returns at once and ends with `DUMP_COMPLETED`; `query-dump` tells its progress.
    "dump-guest-memory", DumpGuestMemory {
        /// Walk the guest's page tables to dump virtual mappings (ELF only; slower).
        paging: bool,
        /// Where to write.
        protocol: String,
        /// Run in the background.
        #[serde(skip_serializing_if = "Option::is_none")]
        detach: Option<bool>,
        /// `elf` (the default), `kdump-zlib`, `kdump-lzo`, `kdump-snappy`, … (QEMU's
        /// `DumpGuestMemoryFormat`; `query-dump-guest-memory-capability` lists this build's).
        #[serde(skip_serializing_if = "Option::is_none")]
        format: Option<String>,
    } -> Empty
);
command!(
    /// `query-dump`: the current or last dump's status and progress.
    "query-dump", QueryDump, DumpStatus
);
command!(
    /// `query-dump-guest-memory-capability`: the formats this QEMU can dump in.
    "query-dump-guest-memory-capability", QueryDumpGuestMemoryCapability, DumpCapability
);

/// The reply to `query-dump` (QEMU's `DumpQueryResult`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DumpStatus {
    /// `none`, `active`, `completed` or `failed`.
    pub status: String,
    /// Bytes written so far.
    pub completed: u64,
    /// Bytes to write in all.
    pub total: u64,
}

/// The reply to `query-dump-guest-memory-capability`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DumpCapability {
    /// The formats, by QEMU's names.
    pub formats: Vec<String>,
}
