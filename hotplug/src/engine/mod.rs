//! The hot-plug engine: the one hot-add sequence and the one hot-remove sequence that every
//! [kind](crate::kinds) runs on.
//!
//! Hot-add: check QEMU's schema for the kind's commands → reserve the id and an address → let the
//! kind plan (host-side work; nothing sent yet) → run its backends as a [`Transaction`] → let go of
//! fd sets QEMU now holds → `device_add`, last, so a failed hot-add never needs the guest to undo
//! it → commit to the SDK's view.
//!
//! Hot-remove: mark the device busy → [unplug](crate::qemu::unplug) by the handle's policy → run the
//! kind's teardown → forget the device (its address is free only now).

pub(crate) mod holds;
pub(crate) mod master_key;
pub(crate) mod transaction;

use std::sync::Arc;

use qhotplug_cmdline::MasterKey;
use qhotplug_qmp::Client;
use tracing::Instrument;

use self::holds::Hold;
use self::transaction::Transaction;
use crate::error::{Error, Result};
use crate::kinds::{After, Backend, DeviceKind, Plug};
use crate::qemu::delete::Delete;
use crate::qemu::unplug::{self, Refused, UnplugPolicy, Unplugged};
use crate::vm_core::Core;

/// Hot-adds one device of kind `K`; on failure every step done is undone.
pub(crate) async fn add<K: Plug>(core: &Arc<Core>, config: K) -> Result<K::Added> {
    core.require(K::OPERATION, K::COMMANDS).await?;
    if let Some(driver) = config.block_driver() {
        core.require_block_driver(driver).await?;
    }
    let want = config.want()?;
    let (mut reservation, place) = holds::reserve(core, config.id(), want)?;
    let plan = config.plan(place)?;
    reservation.plan(plan.added.clone().into());
    let client = core.client.clone();
    let mut txn = Transaction::new(client.clone(), "hot-add", reservation);
    let new_key = run_secret_backends(core, &mut txn, plan.backends).await?;
    let id = txn.id().to_owned();
    txn.step(
        "device_add",
        Some(Delete::Device(id)),
        client.execute(&plan.device),
    )
    .await?;
    for after in plan.after {
        match after {
            After::IoLimits(cmd) => {
                txn.step("block_set_io_throttle", None, client.execute(&cmd))
                    .await?
            }
        };
    }
    txn.commit().commit();
    keep_master_key(core, new_key).await;
    Ok(plan.added)
}

/// [`run_backends`] on `backends` with their secrets encrypted ([`with_secrets`]): what a change
/// whose backends may hold secrets (a hot-add, a medium change) runs. Returns the master key made
/// for it, if one was, for [`keep_master_key`] once the change commits.
pub(crate) async fn run_secret_backends<H: Hold>(
    core: &Core,
    txn: &mut Transaction<H>,
    backends: Vec<Backend>,
) -> Result<Option<MasterKey>> {
    let (backends, new_key) = with_secrets(core, txn, backends).await?;
    run_backends(&core.client, txn, backends).await?;
    Ok(new_key)
}

/// Keeps `key`, made by a change that committed, as the VM's master key from now on (unless a
/// concurrent change's came first: QEMU keeps both, each secret made with its own).
pub(crate) async fn keep_master_key(core: &Core, key: Option<MasterKey>) {
    if let Some(key) = key {
        core.master_key.lock().await.get_or_insert(key);
    }
}

/// `backends` with each secret made an encrypted `secret` object, with the VM's master key. A VM
/// whose QEMU has none of ours yet (one attached to) gets one made in QEMU as steps of `txn`, so a
/// failure later in the hot-add takes it away again; it is returned to be kept once the hot-add
/// commits.
async fn with_secrets<H: Hold>(
    core: &Core,
    txn: &mut Transaction<H>,
    backends: Vec<Backend>,
) -> Result<(Vec<Backend>, Option<MasterKey>)> {
    if !backends.iter().any(|b| matches!(b, Backend::Secret { .. })) {
        return Ok((backends, None));
    }
    // Held while a key is made, so `reconcile` never takes a key's pipe from under its making.
    let held = core.master_key.lock().await;
    let (key, new) = match held.clone() {
        Some(key) => (key, false),
        None => (
            crate::engine::master_key::create(&core.client, txn).await?,
            true,
        ),
    };
    drop(held);
    let backends = backends
        .into_iter()
        .map(|backend| match backend {
            Backend::Secret { id, secret } => Ok(Backend::Object(
                crate::engine::master_key::secret_object(&key, &id, &secret)?,
            )),
            other => Ok(other),
        })
        .collect::<Result<_>>()?;
    Ok((backends, new.then_some(key)))
}

/// Creates `backends` in order, each with its undo recorded in `txn`. An image's fd set stays
/// while its nodes are open (QEMU's fd table then names the file); whatever deletes the nodes
/// removes it.
pub(crate) async fn run_backends<H: Hold>(
    client: &Client,
    txn: &mut Transaction<H>,
    backends: Vec<Backend>,
) -> Result<()> {
    let mut fdset = None;
    for backend in backends {
        match backend {
            Backend::Fdset { fd, tag } => {
                let info = txn.add_fdset(fd, tag).await?;
                fdset = Some(info.fdset_id);
            }
            Backend::Getfd { name, fd } => {
                let undo = Delete::Fd(name.clone());
                txn.step("getfd", Some(undo), client.getfd(&name, fd))
                    .await?;
            }
            Backend::Blockdev { mut add, on_fdset } => {
                if on_fdset {
                    let set = fdset.expect("a kind adds its fd set before the node on it");
                    add.props
                        .insert("filename".into(), format!("/dev/fdset/{set}").into());
                }
                let undo = Delete::BlockNode(add.node_name.clone());
                txn.step("blockdev-add", Some(undo), client.execute(&add))
                    .await?;
            }
            Backend::Secret { .. } => unreachable!("secrets are objects by now (with_secrets)"),
            Backend::Object(add) => {
                let undo = Delete::Object(add.id.clone());
                txn.step("object-add", Some(undo), client.execute(&add))
                    .await?;
            }
            Backend::Chardev(add) => {
                let undo = Delete::Chardev(add.id.clone());
                txn.step("chardev-add", Some(undo), client.execute(&add))
                    .await?;
            }
            Backend::Netdev(add) => {
                let undo = Delete::Netdev(add.id.clone());
                txn.step("netdev_add", Some(undo), client.execute(&add))
                    .await?;
                // netdev_add took the named fds; the netdev's removal closes them.
                txn.forget(|d| !matches!(d, Delete::Fd(_)));
            }
        }
    }
    Ok(())
}

/// Hot-removes device `id`, which must be of `kind`: waits for the guest to let it go, then
/// deletes its backends, then frees its address.
pub(crate) async fn remove(
    core: &Arc<Core>,
    id: &str,
    kind: DeviceKind,
    policy: &UnplugPolicy,
) -> Result<()> {
    core.require(kind.operation(), kind.commands()).await?;
    let busy = holds::mark_busy(core, id, kind)?;
    let device = core
        .state()
        .device(id)
        .expect("a placed entry is in the spec");
    let before = device.before_unplug();
    if let Some((step, _)) = &before {
        let span = tracing::debug_span!(crate::spans::STEP, name = step.command(), id);
        step.run(&core.client)
            .instrument(span)
            .await
            .map_err(|e| Error::Backend {
                id: id.to_owned(),
                step: step.command(),
                source: Box::new(e),
            })?;
    }
    let stale = core.state().late_deleted.remove(id);
    let unplugged = unplug::unplug(&core.client, id, policy, stale).await;
    if matches!(unplugged, Ok(Unplugged::Vanished | Unplugged::Already))
        || (stale && unplugged.is_err())
    {
        // Its own DEVICE_DELETED may still come: the next unplug of this id checks it.
        core.state().late_deleted.insert(id.to_owned());
    }
    if let Err(refused) = unplugged {
        // The device stays: what went before the unplug comes back.
        for step in before.into_iter().flat_map(|(_, back)| back) {
            let span = tracing::debug_span!(crate::spans::UNDO, step = %step);
            if let Err(error) = step.run(&core.client).instrument(span).await {
                tracing::warn!(%step, %error, "could not put back what went before the unplug");
            }
        }
        busy.set_pending(matches!(refused, Refused::Pending(_)));
        return Err(refused.into_error(id));
    }
    // The device is gone: whatever happens to the backends, the address and the id are free.
    let mut result = Ok(());
    for step in device.teardown() {
        let span = tracing::debug_span!(crate::spans::STEP, name = step.command(), id);
        if let Err(e) = step.run(&core.client).instrument(span).await {
            result = Err(Error::Backend {
                id: id.to_owned(),
                step: step.command(),
                source: Box::new(e),
            });
            break;
        }
    }
    drop(busy);
    core.state().forget(id, result.is_ok());
    if result.is_ok() {
        tracing::info!("{} removed", kind.name());
    }
    result
}
