//! Lining the SDK's view up with QEMU's: after a hot-add or hot-remove future was dropped
//! part-way, after an unplug reported pending completed, or after a rollback could not finish.

use std::collections::{BTreeSet, HashSet};

use qhotplug_cmdline::names;
use qhotplug_qmp::command::{QomList, QueryChardev, QueryFdsets, QueryNamedBlockNodes, QueryPci};

use crate::delete::{Delete, Outcome};
use crate::discover::scan_peripherals;
use crate::error::Result;
use crate::state::Entry;
use crate::vm::Vm;

/// What [`Vm::reconcile`] found and fixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Devices the SDK listed that QEMU no longer has (an unplug that completed late, a removal
    /// that was cancelled): dropped from the SDK's view, their slots freed.
    pub gone: Vec<String>,
    /// Block nodes of ours that no device used any more, deleted.
    pub nodes_deleted: Vec<String>,
    /// Netdevs of ours that no device used any more, deleted.
    pub netdevs_deleted: Vec<String>,
    /// Fd sets of ours (tagged `qhotplug:<id>`) that no node held, removed.
    pub fdsets_removed: Vec<i64>,
    /// QOM objects of ours (memory backends, RNG sources) that no device used any more, deleted.
    pub objects_deleted: Vec<String>,
    /// Chardevs of ours (`<id>-chr`) that no device used any more, removed.
    pub chardevs_removed: Vec<String>,
}

/// See [`Vm::reconcile`].
pub(crate) async fn reconcile(vm: &Vm) -> Result<Reconciled> {
    for task in vm.inner().take_rollbacks() {
        let _ = task.await;
    }
    let client = vm.client();
    let pci = client.execute(&QueryPci).await?;
    let found = scan_peripherals(client).await?;
    let present = &found.ids;
    let nodes: HashSet<String> = client
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await?
        .into_iter()
        .filter_map(|n| n.node_name)
        .collect();
    let fdsets = client.execute(&QueryFdsets).await?;
    let chardevs: HashSet<String> = client
        .execute(&QueryChardev)
        .await?
        .into_iter()
        .map(|c| c.label)
        .collect();
    let objects: HashSet<String> = client
        .execute(&QomList {
            path: "/objects".into(),
        })
        .await?
        .into_iter()
        .filter(|o| o.child_type().is_some())
        .map(|o| o.name)
        .collect();

    let mut report = Reconciled::default();
    // Ids whose leftovers may go: touched by us, not a device in QEMU, and not in use by a
    // running call.
    let orphans: BTreeSet<String> = {
        let mut state = vm.inner().state();
        let gone: Vec<String> = state
            .devices
            .iter()
            .filter(|(id, e)| {
                matches!(e, Entry::Placed { busy: false, .. }) && !present.contains(*id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            state.forget(id, false);
        }
        state.pci.fill_from(&pci);
        for p in &found.placements {
            state.pci.mark(p);
        }
        // Leftovers may belong to the devices just found gone, or to ids this handle used.
        let orphans = state
            .touched
            .iter()
            .filter(|id| !present.contains(*id) && !state.devices.contains_key(*id))
            .chain(&gone)
            .cloned()
            .collect();
        report.gone = gone;
        orphans
    };
    // A CD-ROM still there may have an old medium's nodes left (a change whose last deletes
    // failed): everything of its own but its medium's nodes goes.
    let drives: Vec<(String, Vec<String>)> = {
        let state = vm.inner().state();
        state
            .spec
            .cdroms
            .iter()
            .filter(|c| {
                matches!(
                    state.devices.get(&c.id),
                    Some(Entry::Placed { busy: false, .. })
                )
            })
            .map(|c| {
                let keep = match c.medium {
                    Some(_) => vec![c.top_node(), c.file_node()],
                    None => Vec::new(),
                };
                (c.id.clone(), keep)
            })
            .collect()
    };
    for (id, keep) in &drives {
        for step in nodes_of(&nodes, id, keep) {
            report.run(client, step).await;
        }
    }
    let mut clean = Vec::new();
    for id in &orphans {
        // The same deletes a rollback or a teardown would run, for what is there (netdevs cannot
        // be listed on QEMU 7.2: ours is asked for, and "not found" is the usual answer).
        let tag = names::fdset_tag(id);
        let backends = names::backends(id);
        let mut steps: Vec<Delete> = fdsets
            .iter()
            .filter(|set| set.fds.iter().any(|f| f.opaque.as_ref() == Some(&tag)))
            .map(|set| Delete::Fdset {
                id: Some(set.fdset_id),
                tag: tag.clone(),
            })
            .collect();
        steps.extend(backends.netdevs.into_iter().map(Delete::Netdev));
        steps.extend(nodes_of(&nodes, id, &[]));
        steps.extend(
            backends
                .chardevs
                .into_iter()
                .filter(|c| chardevs.contains(c))
                .map(Delete::Chardev),
        );
        // Objects go after what may use them.
        steps.extend(
            backends
                .objects
                .into_iter()
                .filter(|o| objects.contains(o))
                .map(Delete::Object),
        );
        let mut all_done = true;
        for step in steps {
            all_done &= report.run(client, step).await;
        }
        if all_done {
            clean.push(id);
        }
    }
    {
        // What is clean now needs no second look.
        let mut state = vm.inner().state();
        for id in clean {
            state.touched.remove(id);
        }
    }
    tracing::info!(?report, "reconciled");
    Ok(report)
}

impl Reconciled {
    /// Runs one delete and records what it removed; false when it failed (the thing is left in
    /// place, and said so in the log).
    async fn run(&mut self, client: &qhotplug_qmp::Client, step: Delete) -> bool {
        match step.run(client).await {
            Err(e) => {
                tracing::warn!(%step, error = %e, "reconcile: left in place");
                return false;
            }
            Ok(Outcome::Absent) => {}
            Ok(Outcome::Done) => match step {
                Delete::Fdset { id: Some(set), .. } => self.fdsets_removed.push(set),
                Delete::BlockNode(node) => self.nodes_deleted.push(node),
                Delete::Netdev(netdev) => self.netdevs_deleted.push(netdev),
                Delete::Object(object) => self.objects_deleted.push(object),
                Delete::Chardev(chardev) => self.chardevs_removed.push(chardev),
                _ => {}
            },
        }
        true
    }
}

/// Deletes of device `id`'s block nodes among `nodes`, but those in `keep`: format nodes before
/// the protocol nodes under them.
fn nodes_of(nodes: &HashSet<String>, id: &str, keep: &[String]) -> Vec<Delete> {
    let mut mine: Vec<&String> = nodes
        .iter()
        .filter(|n| names::is_block_node_of(id, n) && !keep.contains(n))
        .collect();
    mine.sort_by_key(|n| (!n[id.len()..].starts_with("-fmt"), n.to_owned()));
    mine.into_iter().cloned().map(Delete::BlockNode).collect()
}
