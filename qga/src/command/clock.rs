//! The guest's clock: `guest-set-time`, `guest-get-timezone` (`guest-get-time` is with the
//! basic commands).

use serde::{Deserialize, Serialize};

use qhotplug_qmp::command;

use super::Empty;

command!(
    /// `guest-set-time`: sets the guest's clock to `time` (nanoseconds since the epoch) and writes
    /// it to the guest's hardware clock; with none, sets the clock from the hardware clock (what
    /// an orchestrator does after a restore or a long pause, whose hardware clock QEMU keeps).
    "guest-set-time", GuestSetTime {
        /// Nanoseconds since the epoch; `None`: read the hardware clock.
        #[serde(skip_serializing_if = "Option::is_none")]
        time: Option<i64>,
    } -> Empty
);
command!(
    /// `guest-get-timezone`: the guest's time zone.
    "guest-get-timezone", GuestGetTimezone, Timezone
);

/// `guest-get-timezone`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Timezone {
    /// Its name, where the guest has one (`UTC`).
    pub zone: Option<String>,
    /// Seconds east of UTC.
    pub offset: i64,
}
