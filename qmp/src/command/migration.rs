//! Live migration: capabilities and parameters, the incoming and outgoing sides, and
//! `query-migrate`'s progress.

use serde::{Deserialize, Serialize};

use super::{Command, Empty};

command!(
    /// `migrate`: starts migrating to `uri` (`unix:PATH`, `fd:NAME`, `tcp:HOST:PORT`).
    "migrate", Migrate {
        /// Where to.
        uri: String,
    } -> Empty
);
command!(
    /// `migrate-incoming`: on a QEMU started with `-incoming defer`, listens at `uri`.
    "migrate-incoming", MigrateIncoming {
        /// Where from.
        uri: String,
    } -> Empty
);
command!(
    /// `migrate_cancel`: cancels the outgoing migration; the source runs on.
    "migrate_cancel", MigrateCancel, Empty
);
command!(
    /// `migrate-start-postcopy`: switches a running migration (with `postcopy-ram` on both sides)
    /// to post-copy: the target runs and pulls the pages it still lacks.
    "migrate-start-postcopy", MigrateStartPostcopy, Empty
);
command!(
    /// `query-migrate`: the migration's status and progress.
    "query-migrate", QueryMigrate, MigrationInfo
);
command!(
    /// `query-migrate-capabilities`: the capabilities this QEMU knows, and their state.
    "query-migrate-capabilities", QueryMigrateCapabilities, Vec<MigrationCapabilityStatus>
);
command!(
    /// `migrate-set-capabilities`: turns capabilities on or off (before a migration starts).
    "migrate-set-capabilities", MigrateSetCapabilities {
        /// The capabilities.
        capabilities: Vec<MigrationCapabilityStatus>,
    } -> Empty
);

/// One capability and its state (`events`, `postcopy-ram`, `multifd`, `auto-converge`, …).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MigrationCapabilityStatus {
    /// The capability's name.
    pub capability: String,
    /// On or off.
    pub state: bool,
}

/// `migrate-set-parameters`: only what is given changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Bandwidth limit, bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// The most downtime to aim for, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Channels, with the `multifd` capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Returns = Empty;
}

/// `query-migrate`'s reply (only what the SDK reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `postcopy-active`, `completed`, `failed`, `cancelling`,
    /// `cancelled`, …; absent before any migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// RAM progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationRam>,
    /// Milliseconds since it started (or its total, once completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// The guest's downtime in milliseconds, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// The expected downtime in milliseconds, while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Why it failed, in QEMU's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// Where an incoming migration listens (the port QEMU picked for `tcp:…:0`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub socket_address: Vec<serde_json::Value>,
}

/// RAM progress in `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRam {
    /// Bytes sent.
    pub transferred: u64,
    /// Bytes left.
    pub remaining: u64,
    /// The guest's RAM, in bytes.
    pub total: u64,
    /// Pages dirtied per second.
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// Dirty bitmap syncs so far: passes over memory.
    #[serde(default)]
    pub dirty_sync_count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completed_migration_reads_its_times() {
        let info: MigrationInfo = serde_json::from_value(serde_json::json!({
            "downtime": 24, "setup-time": 1, "status": "completed", "total-time": 730,
            "ram": {"dirty-pages-rate": 0, "dirty-sync-count": 3, "remaining": 0,
                    "total": 269230080, "transferred": 103880759, "mbps": 1142.7}
        }))
        .unwrap();
        assert_eq!((info.total_time, info.downtime), (Some(730), Some(24)));
        assert_eq!(info.ram.unwrap().dirty_sync_count, 3);
    }
}
