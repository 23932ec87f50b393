//! The VM's master key in QEMU: the `secret` object every other secret (a network disk's CHAP
//! password or Ceph key) is encrypted with. A VM the SDK launched has it from its command line
//! ([`QemuProcess::master_key`](qhotplug_cmdline::QemuProcess::master_key)); a VM attached to
//! gets one with its first hot-add that needs it, as steps of that hot-add's transaction: the
//! key through a pipe (`add-fd`), `object-add secret` reading `/proc/self/fd/<n>`, `remove-fd`.
//! So it is never in a QMP argument, a file or a log, and a hot-add that fails takes it away
//! again. Once made, it stays for the VM's life.

use qhotplug_cmdline::{MasterKey, Secret};
use qhotplug_qmp::command::{AddFd, ObjectAdd, RemoveFd};
use qhotplug_qmp::Client;

use crate::delete::Delete;
use crate::error::{Error, Result};
use crate::holds::Hold;
use crate::transaction::Transaction;

/// Makes a new master key in QEMU, each step in `txn`.
pub(crate) async fn create<H: Hold>(
    client: &Client,
    txn: &mut Transaction<H>,
) -> Result<MasterKey> {
    let key = MasterKey::generate().map_err(Error::Spec)?;
    let pipe = key.pipe().map_err(Error::Spec)?;
    let add = AddFd {
        fdset_id: None,
        opaque: Some(key.id().to_owned()),
    };
    let undo = Delete::Fdset {
        id: None,
        tag: key.id().to_owned(),
    };
    let info = txn
        .step("add-fd", Some(undo), client.add_fd(&add, pipe.into()))
        .await?;
    txn.amend(|d| {
        if let Delete::Fdset { id, .. } = d {
            id.get_or_insert(info.fdset_id);
        }
    });
    let object = qhotplug_cmdline::object_add(&key.object_props(info.fd));
    let undo = Delete::Object(key.id().to_owned());
    txn.step("object-add", Some(undo), client.execute(&object))
        .await?;
    // QEMU has read the key; the pipe goes.
    let remove = RemoveFd {
        fdset_id: info.fdset_id,
        fd: None,
    };
    txn.step("remove-fd", None, client.execute(&remove)).await?;
    txn.forget(|d| !matches!(d, Delete::Fdset { .. }));
    Ok(key)
}

/// The `secret` object `id` holding `secret`, encrypted with `key`.
pub(crate) fn secret_object(key: &MasterKey, id: &str, secret: &Secret) -> Result<ObjectAdd> {
    let props = key.encrypt(id, secret).map_err(Error::Spec)?;
    Ok(qhotplug_cmdline::object_add(&props))
}
