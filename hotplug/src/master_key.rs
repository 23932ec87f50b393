//! The VM's master key in QEMU: the `secret` object every other secret (a network disk's CHAP
//! password or Ceph key) is encrypted with. A VM the SDK launched has it from its command line
//! ([`QemuProcess::master_key`](qhotplug_cmdline::QemuProcess::master_key)); otherwise the first
//! hot-add that needs it makes one: the key through a pipe (`add-fd`, then `object-add secret`
//! reading `/proc/self/fd/<n>`, then `remove-fd`), so it is never in a QMP argument, a file or a
//! log. It stays for the VM's life.

use qhotplug_cmdline::{MasterKey, Secret};
use qhotplug_qmp::command::{AddFd, ObjectAdd, RemoveFd};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::vm_core::Core;

/// The VM's master key, made in QEMU if it has none of ours yet.
pub(crate) async fn ensure(core: &Core) -> Result<MasterKey> {
    let mut held = core.master_key.lock().await;
    if let Some(key) = held.as_ref() {
        return Ok(key.clone());
    }
    let key = MasterKey::generate().map_err(Error::Spec)?;
    let span = tracing::debug_span!(crate::spans::STEP, name = "object-add", id = key.id());
    create(core, &key).instrument(span).await?;
    *held = Some(key.clone());
    Ok(key)
}

async fn create(core: &Core, key: &MasterKey) -> Result<()> {
    let pipe = key.pipe().map_err(Error::Spec)?;
    let add = AddFd {
        fdset_id: None,
        opaque: Some(key.id().to_owned()),
    };
    let info = core.client.add_fd(&add, pipe.into()).await?;
    let object = qhotplug_cmdline::object_add(&key.object_props(info.fd));
    let made = core.client.execute(&object).await;
    let remove = RemoveFd {
        fdset_id: info.fdset_id,
        fd: None,
    };
    let removed = core.client.execute(&remove).await;
    made?;
    removed?;
    Ok(())
}

/// The `secret` object `id` holding `secret`, encrypted with `key`.
pub(crate) fn secret_object(key: &MasterKey, id: &str, secret: &Secret) -> Result<ObjectAdd> {
    let props = key.encrypt(id, secret).map_err(Error::Spec)?;
    Ok(qhotplug_cmdline::object_add(&props))
}
