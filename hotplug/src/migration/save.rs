//! A VM saved to a file and restored from it (libvirt's `virsh save` and `restore`, Incus's
//! stateful stop): the migration stream written into a file the SDK creates, handed to QEMU with
//! `getfd` (`migrate fd:`), the source quit once it completed; later a QEMU launched from the
//! VM's spec with `-incoming defer` reads the file back (`migrate-incoming fd:`) and the guest
//! runs on where it was. A save that fails (its file system full) leaves the VM running as it
//! was and removes the file; a restore that fails quits the new QEMU.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use qhotplug_cmdline::names;
use qhotplug_qmp::command::{Cont, MigrateIncoming, MigrationInfo, QueryMigrate, QueryStatus};
use qhotplug_qmp::EventKind;

use crate::error::{Error, Result};
use crate::migration::migrate::{
    await_end, ended, is_final, progress_of, set_capabilities, CancelOnDrop, Progress,
};
use crate::spans::step;
use crate::vm_core::{Core, Outgoing as Migrating};

/// The commands a save uses.
const SAVE_COMMANDS: &[&str] = &["migrate", "migrate_cancel", "query-migrate", "getfd"];

/// See [`Vm::save`](crate::Vm::save).
pub(crate) async fn save(
    core: &Arc<Core>,
    path: &Path,
    mut progress: impl FnMut(&Progress),
) -> Result<MigrationInfo> {
    core.require("save", SAVE_COMMANDS).await?;
    let io = |what: &'static str| move |source| Error::Io { what, source };
    let file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("creating the save file"))?;
    // Removed unless the save completes: on an error, and if the call is dropped part-way.
    let mut unfinished = Unfinished(Some(path.to_owned()));
    let was_running = core.client.execute(&QueryStatus).await?.running;
    let mut guard = CancelOnDrop::new(core.clone());
    *core.outgoing() = Migrating::Running;
    let outcome = async {
        set_capabilities(&core.client, &[("events", true)]).await?;
        let mut events = core.client.events();
        step(
            "getfd",
            core.client.getfd(names::MIGRATE_OUT_FD, file.into()),
        )
        .await?;
        guard.arm();
        let uri = format!("fd:{}", names::MIGRATE_OUT_FD);
        let migrate = qhotplug_qmp::command::Migrate { uri };
        step("migrate", core.client.execute(&migrate)).await?;
        loop {
            let info = core.client.execute(&QueryMigrate).await?;
            if is_final(&info) {
                return ended(info);
            }
            progress(&progress_of(&info));
            // Asked again at a status change or a pass (or when events were lost).
            loop {
                match events.next().await {
                    None => return Err(Error::Qmp(qhotplug_qmp::Error::Disconnected)),
                    Some(Ok(event))
                        if !matches!(
                            event.kind(),
                            EventKind::Migration(_) | EventKind::MigrationPass(_)
                        ) => {}
                    Some(_) => break,
                }
            }
        }
    }
    .await;
    guard.disarm();
    match outcome {
        Ok(info) => {
            unfinished.0 = None;
            *core.outgoing() = Migrating::Completed;
            core.quit().await?;
            Ok(info)
        }
        Err(error) => {
            *core.outgoing() = Migrating::None;
            if was_running && !core.client.execute(&QueryStatus).await?.running {
                core.client.execute(&Cont).await?;
            }
            Err(error)
        }
    }
}

/// Reads the saved stream at `path` into `core`'s QEMU, launched with `-incoming defer`.
pub(crate) async fn restore(core: &Core, path: &Path) -> Result<MigrationInfo> {
    core.require("restore", &["migrate-incoming", "getfd"])
        .await?;
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        what: "opening the save file",
        source,
    })?;
    set_capabilities(&core.client, &[("events", true)]).await?;
    let mut events = core.client.events();
    step(
        "getfd",
        core.client.getfd(names::MIGRATE_IN_FD, file.into()),
    )
    .await?;
    let uri = format!("fd:{}", names::MIGRATE_IN_FD);
    step(
        "migrate-incoming",
        core.client.execute(&MigrateIncoming { uri }),
    )
    .await?;
    let info = await_end(core, &mut events).await?;
    let info = ended(info)?;
    core.state().migrated_in();
    Ok(info)
}

/// A save file that is removed when dropped, unless taken (`.0 = None`) once the save completed.
struct Unfinished(Option<std::path::PathBuf>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(%error, path = %path.display(), "removing an unfinished save file");
            }
        }
    }
}
