//! The VM's master key in QEMU: the `secret` object every other secret (a network disk's CHAP
//! password or Ceph key) is encrypted with. A VM the SDK launched has it from its command line
//! ([`QemuProcess::master_key`](qhotplug_cmdline::QemuProcess::master_key)); a VM attached to
//! gets one with its first hot-add that needs it, as steps of that hot-add's transaction: the
//! key through a pipe (`add-fd`), `object-add secret` reading `/proc/self/fd/<n>`, `remove-fd`.
//! So it is never in a QMP argument, a file or a log, and a hot-add that fails takes it away
//! again. Once made, it stays for the VM's life.

use qhotplug_cmdline::{MasterKey, Secret};
use qhotplug_qmp::command::ObjectAdd;
use qhotplug_qmp::Client;

use crate::engine::holds::Hold;
use crate::engine::transaction::Transaction;
use crate::error::{Error, Result};
use crate::qemu::delete::Delete;

/// Makes a new master key in QEMU, each step in `txn`; the caller holds the core's key lock, so
/// the key's pipe is in an fd set (tagged with the key's id) only while a key is in the making
/// or after a process died making one ([`reconcile`](crate::Vm::reconcile) removes it then).
pub(crate) async fn create<H: Hold>(
    client: &Client,
    txn: &mut Transaction<H>,
) -> Result<MasterKey> {
    let key = MasterKey::generate().map_err(Error::Spec)?;
    let pipe = key.pipe().map_err(Error::Spec)?;
    let info = txn.add_fdset(pipe.into(), key.id().to_owned()).await?;
    let object = key.object(info.fd).object_add();
    let undo = Delete::Object(key.id().to_owned());
    txn.step("object-add", Some(undo), client.execute(&object))
        .await?;
    // QEMU has read the key; the pipe goes.
    txn.let_go_fdset(info.fdset_id).await?;
    Ok(key)
}

/// The `secret` object `id` holding `secret`, encrypted with `key`.
pub(crate) fn secret_object(key: &MasterKey, id: &str, secret: &Secret) -> Result<ObjectAdd> {
    Ok(key.encrypt(id, secret).map_err(Error::Spec)?.object_add())
}
