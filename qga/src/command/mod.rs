//! Typed guest agent commands (QEMU's `qga/qapi-schema.json`), run with
//! [`Agent::execute`](crate::Agent::execute). Unknown members in replies are ignored; a reply that
//! cannot be true (base64 that does not decode, a count that disagrees with its data or with the
//! request, a negative CPU number) is a decode error.

use base64::Engine;
use serde::{Deserialize, Serialize};

use qhotplug_qmp::command;
pub use qhotplug_qmp::command::Empty;

mod accounts;
mod clock;
mod filesystems;

pub use accounts::{
    AuthorizedKeys, GuestGetUsers, GuestSetUserPassword, GuestSshAddAuthorizedKeys,
    GuestSshGetAuthorizedKeys, GuestSshRemoveAuthorizedKeys, GuestUser, Redacted,
};
pub use clock::{GuestGetTimezone, GuestSetTime, Timezone};
pub use filesystems::{
    DiskAddress, DiskInfo, FilesystemInfo, GuestFstrim, GuestGetDisks, GuestGetFsinfo, PciAddress,
    TrimResponse, TrimResult,
};

command!(
    /// `guest-ping`: the agent is there and answering.
    "guest-ping", GuestPing, Empty
);
command!(
    /// `guest-info`: the agent's version and its commands.
    "guest-info", GuestInfo, AgentInfo
);
command!(
    /// `guest-get-osinfo`: the guest's operating system.
    "guest-get-osinfo", GuestGetOsinfo, OsInfo
);
command!(
    /// `guest-get-host-name`.
    "guest-get-host-name", GuestGetHostName, HostName
);
command!(
    /// `guest-get-time`: the guest's clock, in nanoseconds since the epoch.
    "guest-get-time", GuestGetTime, i64
);
command!(
    /// `guest-network-get-interfaces`.
    "guest-network-get-interfaces", GuestNetworkGetInterfaces, Vec<NetworkInterface>
);
command!(
    /// `guest-get-vcpus`: each logical CPU and whether it is online.
    "guest-get-vcpus", GuestGetVcpus, Vec<GuestVcpu>,
    check(_command, vcpus) {
        match vcpus.iter().find(|v| v.logical_id < 0) {
            Some(v) => Err(format!("a CPU numbered {}", v.logical_id)),
            None => Ok(()),
        }
    }
);
command!(
    /// `guest-set-vcpus`: brings CPUs online or offline; returns how many of the list (in order)
    /// were processed before the first failure.
    "guest-set-vcpus", GuestSetVcpus {
        /// The CPUs and the state each should have.
        vcpus: Vec<GuestVcpu>,
    } -> i64,
    check(command, done) { within("CPUs processed", *done, command.vcpus.len()) }
);
command!(
    /// `guest-get-memory-blocks`: each memory block the guest has, and whether it is online.
    "guest-get-memory-blocks", GuestGetMemoryBlocks, Vec<MemoryBlock>
);
command!(
    /// `guest-set-memory-blocks`: brings memory blocks online or offline; one response per
    /// block, in order.
    "guest-set-memory-blocks", GuestSetMemoryBlocks {
        /// The blocks and the state each should have.
        mem_blks: Vec<MemoryBlockState>,
    } -> Vec<MemoryBlockResponse>,
    check(command, answers) {
        match answers.len() == command.mem_blks.len() {
            true => Ok(()),
            false => Err(format!("{} answers to {} blocks", answers.len(), command.mem_blks.len())),
        }
    }
);
command!(
    /// `guest-get-memory-block-info`: the size of one memory block.
    "guest-get-memory-block-info", GuestGetMemoryBlockInfo, MemoryBlockInfo
);
command!(
    /// `guest-fsfreeze-status`: `thawed` or `frozen`.
    "guest-fsfreeze-status", GuestFsfreezeStatus, FreezeStatus
);
command!(
    /// `guest-fsfreeze-freeze`: freezes every freezable filesystem; returns how many.
    "guest-fsfreeze-freeze", GuestFsfreezeFreeze, i64,
    check(_command, count) { within("filesystems frozen", *count, usize::MAX) }
);
command!(
    /// `guest-fsfreeze-thaw`: thaws them; returns how many.
    "guest-fsfreeze-thaw", GuestFsfreezeThaw, i64,
    check(_command, count) { within("filesystems thawed", *count, usize::MAX) }
);
command!(
    /// `guest-exec`: starts a program; its status comes from [`GuestExecStatus`].
    "guest-exec", GuestExec {
        /// The program.
        path: String,
        /// Its arguments.
        arg: Vec<String>,
        /// Capture stdout and stderr (up to 16 MiB each).
        capture_output: bool,
    } -> ExecStarted
);
command!(
    /// `guest-exec-status`: whether the program has exited, its code and its captured output.
    "guest-exec-status", GuestExecStatus {
        /// The pid [`GuestExec`] returned.
        pid: i64,
    } -> ExecStatus
);
command!(
    /// `guest-file-open`: opens a file in the guest; returns a handle.
    "guest-file-open", GuestFileOpen {
        /// The guest's path.
        path: String,
        /// `fopen` mode (`r`, `w`, `a`, …).
        mode: String,
    } -> i64
);
command!(
    /// `guest-file-read`: up to `count` bytes (at most 48 MiB).
    "guest-file-read", GuestFileRead {
        /// The handle.
        handle: i64,
        /// How many bytes at most.
        count: u64,
    } -> FileRead,
    check(command, read) {
        match read.data.len() as u64 <= command.count {
            true => Ok(()),
            false => Err(format!("{} bytes for a read of {}", read.data.len(), command.count)),
        }
    }
);
command!(
    /// `guest-file-write`: writes base64-encoded bytes ([`GuestFileWrite::bytes`]).
    "guest-file-write", GuestFileWrite {
        /// The handle.
        handle: i64,
        /// The bytes, base64.
        buf_b64: String,
    } -> FileWritten,
    check(command, written) {
        // base64's length is 4/3 of the bytes it carries, padding included.
        let sent = command.buf_b64.len() / 4 * 3;
        match written.count as usize <= sent {
            true => Ok(()),
            false => Err(format!("{} bytes written of at most {sent}", written.count)),
        }
    }
);
command!(
    /// `guest-file-close`.
    "guest-file-close", GuestFileClose {
        /// The handle.
        handle: i64,
    } -> Empty
);
command!(
    /// `guest-shutdown`: `powerdown` (the default), `halt` or `reboot`. Replies only when it fails:
    /// send it with [`Agent::send_no_reply`](crate::Agent::send_no_reply) and see `SHUTDOWN` (or
    /// `RESET`) on QMP.
    "guest-shutdown", GuestShutdown {
        /// `powerdown`, `halt` or `reboot`.
        mode: String,
    } -> Empty
);

command!(
    /// `guest-suspend-ram`: the guest suspends itself to RAM (S3; systemd, pm-utils or
    /// `/sys/power/state`). Replies only when it fails: send it with
    /// [`Agent::send_no_reply`](crate::Agent::send_no_reply) and see `SUSPEND` on QMP; QMP's
    /// `system_wakeup` wakes it (`WAKEUP`).
    "guest-suspend-ram", GuestSuspendRam, Empty
);

impl GuestFileWrite {
    /// A write of `bytes` to `handle`.
    pub fn bytes(handle: i64, bytes: &[u8]) -> GuestFileWrite {
        GuestFileWrite {
            handle,
            buf_b64: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }
}

/// `guest-info`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentInfo {
    /// The agent's version.
    pub version: String,
    /// Each command and whether it is enabled.
    #[serde(rename = "supported_commands", default)]
    pub commands: Vec<AgentCommand>,
}

/// One command of `guest-info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentCommand {
    /// Its name.
    pub name: String,
    /// Enabled now (commands are disabled while frozen, or by `--block-rpcs`).
    pub enabled: bool,
    /// Replies when it succeeds (false for `guest-shutdown` and `guest-suspend-*`).
    #[serde(rename = "success-response", default)]
    pub success_response: bool,
}

/// `guest-get-osinfo`'s reply: what the guest's `os-release` and `uname` say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    /// `ID`, for example `debian`.
    pub id: Option<String>,
    /// `NAME`.
    pub name: Option<String>,
    /// `PRETTY_NAME`.
    pub pretty_name: Option<String>,
    /// `VERSION_ID`.
    pub version_id: Option<String>,
    /// The kernel's release (`uname -r`).
    pub kernel_release: Option<String>,
    /// The machine (`uname -m`).
    pub machine: Option<String>,
}

/// `guest-get-host-name`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostName {
    /// The host name.
    pub host_name: String,
}

/// One network interface of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetworkInterface {
    /// The interface's name (`eth0`).
    pub name: String,
    /// Its MAC address, when it has one (`lo` has `00:00:00:00:00:00`).
    pub hardware_address: Option<String>,
    /// Its addresses.
    #[serde(default)]
    pub ip_addresses: Vec<IpAddress>,
}

/// One address of a guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct IpAddress {
    /// `ipv4` or `ipv6`.
    pub ip_address_type: String,
    /// The address.
    pub ip_address: String,
    /// The prefix length.
    pub prefix: u8,
}

/// One memory block in `guest-get-memory-blocks`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryBlock {
    /// The block's index (`/sys/devices/system/memory/memory<N>`).
    pub phys_index: u64,
    /// True when it is online.
    pub online: bool,
    /// True when the guest could take it offline (absent: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// A block and the state `guest-set-memory-blocks` should give it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryBlockState {
    /// The block's index.
    pub phys_index: u64,
    /// Online or offline.
    pub online: bool,
}

/// What `guest-set-memory-blocks` did with one block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryBlockResponse {
    /// The block's index.
    pub phys_index: u64,
    /// `success`, `not-found`, `operation-not-supported` or `operation-failed`.
    pub response: String,
    /// The guest's `errno`, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
}

/// The reply to `guest-get-memory-block-info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MemoryBlockInfo {
    /// A memory block's size, in bytes.
    pub size: u64,
}

/// A logical CPU of the guest, as `guest-get-vcpus` lists and `guest-set-vcpus` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct GuestVcpu {
    /// The guest's CPU number.
    #[serde(rename = "logical-id")]
    pub logical_id: i64,
    /// Online.
    pub online: bool,
    /// Can be taken offline (`cpu0` usually cannot).
    #[serde(rename = "can-offline", default, skip_serializing)]
    pub can_offline: Option<bool>,
}

/// `guest-fsfreeze-status`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    /// Writes go through.
    Thawed,
    /// Frozen: writes block until a thaw.
    Frozen,
}

/// `guest-exec`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ExecStarted {
    /// The program's pid, for [`GuestExecStatus`].
    pub pid: i64,
}

/// `guest-exec-status`'s reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExecStatus {
    /// It has exited.
    pub exited: bool,
    /// Its exit code, once exited normally.
    pub exitcode: Option<i64>,
    /// The signal that ended it, if one did.
    pub signal: Option<i64>,
    /// Captured stdout, decoded from the reply's base64 ([`ExecStatus::stdout`]).
    #[serde(rename = "out-data", default, deserialize_with = "base64_option")]
    pub out_data: Option<Vec<u8>>,
    /// Captured stderr, decoded ([`ExecStatus::stderr`]).
    #[serde(rename = "err-data", default, deserialize_with = "base64_option")]
    pub err_data: Option<Vec<u8>>,
    /// stdout went past 16 MiB and was cut.
    #[serde(rename = "out-truncated", default)]
    pub out_truncated: bool,
    /// stderr went past 16 MiB and was cut.
    #[serde(rename = "err-truncated", default)]
    pub err_truncated: bool,
}

impl ExecStatus {
    /// The captured stdout (empty when none).
    pub fn stdout(&self) -> &[u8] {
        self.out_data.as_deref().unwrap_or_default()
    }

    /// The captured stderr (empty when none).
    pub fn stderr(&self) -> &[u8] {
        self.err_data.as_deref().unwrap_or_default()
    }
}

/// `guest-file-read`'s reply: its `count` must be the length of its data, which must be base64
/// (else the reply is a decode error), and no more than the read asked for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "FileReadWire")]
pub struct FileRead {
    /// The bytes read, decoded from the reply's base64.
    pub data: Vec<u8>,
    /// The end of the file was reached.
    pub eof: bool,
}

impl FileRead {
    /// The bytes read.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

/// `guest-file-read`'s reply as it comes.
#[derive(Deserialize)]
struct FileReadWire {
    count: u64,
    #[serde(rename = "buf-b64", deserialize_with = "base64")]
    data: Vec<u8>,
    eof: bool,
}

impl TryFrom<FileReadWire> for FileRead {
    type Error = String;

    fn try_from(wire: FileReadWire) -> Result<FileRead, String> {
        if wire.count != wire.data.len() as u64 {
            return Err(format!(
                "count {} for {} bytes of data",
                wire.count,
                wire.data.len()
            ));
        }
        Ok(FileRead {
            data: wire.data,
            eof: wire.eof,
        })
    }
}

/// `guest-file-write`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct FileWritten {
    /// How many bytes were written.
    pub count: u64,
    /// The end of the file was reached.
    pub eof: bool,
}

/// Base64 text, decoded; text that is not base64 fails the reply. Decoded straight from the
/// reply's text, so only the decoded bytes are made.
fn base64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("base64 text")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Vec<u8>, E> {
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| E::custom(format!("data that is not base64: {e}")))
        }
    }
    d.deserialize_str(Text)
}

fn base64_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    #[derive(Deserialize)]
    struct Base64(#[serde(deserialize_with = "base64")] Vec<u8>);
    Ok(Option::<Base64>::deserialize(d)?.map(|b| b.0))
}

/// `count` within `0..=most`.
fn within(what: &str, count: i64, most: usize) -> Result<(), String> {
    match usize::try_from(count) {
        Ok(n) if n <= most => Ok(()),
        _ => Err(format!("{count} {what}")),
    }
}
