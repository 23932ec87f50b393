//! Typed commands: each is a serde struct whose fields are the command's arguments, tied to the type
//! its reply deserializes into. For anything not listed, use
//! [`Client::execute_raw`](crate::Client::execute_raw).
//!
//! Optional arguments are `Option`s that are left out of the request when `None`.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use crate::message::VersionInfo;

/// A QMP command: its arguments (the value itself), its name, and what it returns.
pub trait Command: Serialize {
    /// The command's QMP name, for example `query-status`.
    const NAME: &'static str;
    /// The type of the command's `return` value.
    type Returns: DeserializeOwned;

    /// Checks a decoded reply against the request (a count no larger than what was asked, one
    /// answer per item): the peer is untrusted, and a reply of the right shape can still be a
    /// lie. `Err` says what is wrong, and the call fails as a reply that did not decode. Accepts
    /// everything unless a command says otherwise.
    fn check_reply(&self, _reply: &Self::Returns) -> Result<(), String> {
        Ok(())
    }

    /// The texts of the request that no error may show (a password, a key): where the peer's
    /// error message repeats one, it is replaced by `<redacted>`. None unless a command says
    /// otherwise.
    fn redacted(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// The `{}` that commands without a return value return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Empty {}

/// Declares a typed command: a unit struct (no arguments) or a struct of its arguments
/// (kebab-case on the wire), and its [`Command`] impl, with an optional
/// `check(command, reply) { … }` block for [`Command::check_reply`] and an optional
/// `redact(command) { … }` block for [`Command::redacted`]. Used for QMP here and for the guest agent's
/// protocol, which shares QMP's request shape, in `qhotplug-qga`. The calling crate needs `serde`.
///
/// ```
/// qhotplug_qmp::command!(
///     /// `query-status`.
///     "query-status", MyQueryStatus, serde_json::Value
/// );
/// ```
#[macro_export]
macro_rules! command {
    ($(#[$doc:meta])* $name:literal, $ty:ident, $ret:ty $(, check($cmd:ident, $reply:ident) $check:block)?) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct $ty;

        $crate::command!(@impl $name, $ty, $ret $(, check($cmd, $reply) $check)?);
    };
    ($(#[$doc:meta])* $name:literal, $ty:ident { $($(#[$fdoc:meta])* $field:ident : $fty:ty),* $(,)? } -> $ret:ty $(, check($cmd:ident, $reply:ident) $check:block)? $(, redact($rcmd:ident) $redact:block)?) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize)]
        #[serde(rename_all = "kebab-case")]
        pub struct $ty {
            $($(#[$fdoc])* pub $field: $fty,)*
        }

        $crate::command!(@impl $name, $ty, $ret $(, check($cmd, $reply) $check)? $(, redact($rcmd) $redact)?);
    };
    (@impl $name:literal, $ty:ident, $ret:ty $(, check($cmd:ident, $reply:ident) $check:block)? $(, redact($rcmd:ident) $redact:block)?) => {
        impl $crate::command::Command for $ty {
            const NAME: &'static str = $name;
            type Returns = $ret;
            $(
                fn check_reply(&self, $reply: &$ret) -> ::std::result::Result<(), String> {
                    let $cmd = self;
                    $check
                }
            )?
            $(
                fn redacted(&self) -> Vec<&str> {
                    let $rcmd = self;
                    $redact
                }
            )?
        }
    };
}

mod bitmap;
mod block;
mod device;
mod display;
mod dump;
mod export;
mod job;
mod machine;
mod migration;

pub use bitmap::*;
pub use block::*;
pub use device::*;
pub use display::*;
pub use dump::*;
pub use export::*;
pub use job::*;
pub use machine::*;
pub use migration::*;

/// `qmp_capabilities`: leaves capabilities negotiation mode. The handshake sends it for you.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QmpCapabilities {
    /// Capabilities to enable, for example `["oob"]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub enable: Vec<String>,
}

impl Command for QmpCapabilities {
    const NAME: &'static str = "qmp_capabilities";
    type Returns = Empty;
}

command!(
    /// `query-commands`: the commands this QEMU knows.
    "query-commands", QueryCommands, Vec<CommandInfo>
);

command!(
    /// `query-status`: whether the VM runs, and its run state.
    "query-status", QueryStatus, StatusInfo
);

command!(
    /// `query-version`: QEMU's version.
    "query-version", QueryVersion, VersionInfo
);

command!(
    /// `query-kvm`: whether KVM is present and in use (when it is not, the accelerator on Linux
    /// is TCG).
    "query-kvm", QueryKvm, KvmInfo
);

/// The reply to `query-kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct KvmInfo {
    /// KVM runs this VM.
    pub enabled: bool,
    /// KVM is available in this QEMU build.
    pub present: bool,
}

command!(
    /// `query-name`: the guest's name (`-name`), if it was given one.
    "query-name", QueryName, NameInfo
);

/// The reply to `query-name`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct NameInfo {
    /// The name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

command!(
    /// `query-machines`: the machine types this QEMU has, with their defaults.
    "query-machines", QueryMachines, Vec<MachineInfo>
);

/// One machine type in `query-machines` (only what the SDK reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MachineInfo {
    /// Its name, for example `pc-i440fx-7.2`.
    pub name: String,
    /// The CPU type its vCPUs have unless `-cpu` says otherwise (`qemu64-x86_64-cpu`).
    #[serde(
        rename = "default-cpu-type",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub default_cpu_type: Option<String>,
    /// The id of the memory backend QEMU makes for its boot memory when none is given.
    #[serde(
        rename = "default-ram-id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub default_ram_id: Option<String>,
}

command!(
    /// `stop`: pauses the VM.
    "stop", Stop, Empty
);

command!(
    /// `cont`: resumes the VM (or starts one launched with `-S`).
    "cont", Cont, Empty
);

command!(
    /// `system_powerdown`: presses the guest's ACPI power button. The guest decides what to do;
    /// `SHUTDOWN` says it shut down.
    "system_powerdown", SystemPowerdown, Empty
);

command!(
    /// `system_reset`: resets the VM.
    "system_reset", SystemReset, Empty
);

command!(
    /// `system_wakeup`: wakes a guest suspended to RAM (`WAKEUP` says it woke); does nothing to
    /// one that is not suspended.
    "system_wakeup", SystemWakeup, Empty
);

command!(
    /// `query-current-machine`: what the running machine supports.
    "query-current-machine", QueryCurrentMachine, CurrentMachine
);

/// The reply to `query-current-machine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct CurrentMachine {
    /// The machine can wake a guest suspended to RAM (`system_wakeup`): true for `pc` and `q35`
    /// (whose ACPI tables may still hide S3 from the guest: `PIIX4_PM.disable_s3`).
    #[serde(rename = "wakeup-suspend-support")]
    pub wakeup_suspend_support: bool,
}

command!(
    /// `quit`: QEMU exits at once.
    "quit", Quit, Empty
);

command!(
    /// `qom-list`: the properties (and children) of a QOM object.
    "qom-list", QomList {
        /// The object's path, for example `/machine/peripheral`.
        path: String,
    } -> Vec<ObjectPropertyInfo>
);

command!(
    /// `human-monitor-command`: runs an HMP command and returns its output. A last resort.
    "human-monitor-command", HumanMonitorCommand {
        /// The HMP command line, for example `info network`.
        command_line: String,
        /// The CPU to run it on.
        #[serde(skip_serializing_if = "Option::is_none")]
        cpu_index: Option<i64>,
    } -> String
);

/// One entry of `query-commands`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CommandInfo {
    /// The command's name.
    pub name: String,
}

/// The reply to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StatusInfo {
    /// True when the guest's CPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// QEMU's run states (`RunState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this version of the SDK does not know.
    #[serde(other)]
    Unknown,
}

/// One property in `qom-list`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ObjectPropertyInfo {
    /// The property's name (for a child, the child's name).
    pub name: String,
    /// The property's type, for example `child<virtio-blk-pci>`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl ObjectPropertyInfo {
    /// For a `child<T>` property, `T`.
    pub fn child_type(&self) -> Option<&str> {
        self.kind.strip_prefix("child<")?.strip_suffix('>')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{encode_request, Execution};
    use serde_json::Map;

    fn wire<C: Command>(c: &C) -> String {
        let mut out = Vec::new();
        encode_request(&mut out, C::NAME, c, Execution::InBand).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn optional_arguments_are_left_out() {
        assert_eq!(
            wire(&AddFd {
                fdset_id: None,
                opaque: None
            }),
            "{\"execute\":\"add-fd\"}\r\n"
        );
        assert_eq!(
            wire(&RemoveFd {
                fdset_id: 3,
                fd: None
            }),
            "{\"execute\":\"remove-fd\",\"arguments\":{\"fdset-id\":3}}\r\n"
        );
        assert_eq!(
            wire(&QmpCapabilities::default()),
            "{\"execute\":\"qmp_capabilities\"}\r\n"
        );
        assert_eq!(
            wire(&BlockdevDel {
                node_name: "n".into()
            }),
            "{\"execute\":\"blockdev-del\",\"arguments\":{\"node-name\":\"n\"}}\r\n"
        );
    }

    #[test]
    fn device_add_flattens_props() {
        let mut props = Map::new();
        props.insert("addr".into(), "0x9".into());
        let d = DeviceAdd {
            driver: "virtio-blk-pci".into(),
            id: Some("disk-1".into()),
            bus: None,
            props,
        };
        assert_eq!(
            wire(&d),
            "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"virtio-blk-pci\",\"id\":\"disk-1\",\"addr\":\"0x9\"}}\r\n"
        );
    }

    #[test]
    fn unknown_run_state_is_kept_apart() {
        let s: StatusInfo = serde_json::from_str(
            r#"{"running": false, "status": "brand-new", "singlestep": false}"#,
        )
        .unwrap();
        assert_eq!(s.status, RunState::Unknown);
        let s: StatusInfo =
            serde_json::from_str(r#"{"running": false, "status": "prelaunch"}"#).unwrap();
        assert_eq!(s.status, RunState::Prelaunch);
    }
}
