//! Hot-plug that finishes in the guest: the vCPUs and memory blocks a hot-add gave the guest,
//! brought online through its agent. Only the new ones: what the guest listed before the hot-add
//! is left as the guest has it (an administrator's offlined CPU stays offline). A partial result
//! is reported, not hidden, as libvirt does.

use std::collections::BTreeSet;
use std::time::Duration;

use qhotplug_qga::command::{
    GuestGetMemoryBlockInfo, GuestGetMemoryBlocks, GuestGetVcpus, GuestSetMemoryBlocks,
    GuestSetVcpus, GuestVcpu, MemoryBlockState,
};
use qhotplug_qga::Result as AgentResult;
use tokio::time::Instant;

use crate::guest_agent::GuestAgent;

/// How often the guest is asked whether it lists the new vCPUs or memory blocks yet.
const POLL: Duration = Duration::from_millis(50);

/// What the guest agent did with what a hot-add gave the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Onlined {
    /// The guest's ids of what the hot-add gave it (logical CPU ids, memory block indexes), as
    /// the guest listed them by the deadline.
    pub new: Vec<u64>,
    /// Of `new`, those the agent brought online.
    pub onlined: Vec<u64>,
    /// Of `new`, those the guest could not bring online, with its words.
    pub failed: Vec<(u64, String)>,
    /// How many the guest has online now (all of them, not only the new).
    pub online: usize,
    /// How many the guest has in all.
    pub total: usize,
}

/// The logical ids of the guest's CPUs, before a hot-add.
/// A vCPU change (`change`, not yet started) with its new logical CPUs brought online in the
/// guest by `deadline` after it: the guest's CPUs listed first, so the new ones are those it did
/// not list.
pub(crate) async fn vcpus(
    agent: &GuestAgent,
    deadline: Duration,
    change: impl std::future::Future<Output = crate::error::Result<crate::VcpuChange>>,
) -> crate::error::Result<crate::VcpuChange> {
    let before = vcpu_ids(agent).await?;
    let mut change = change.await?;
    if !change.added.is_empty() {
        let deadline = Instant::now() + deadline;
        let guest = online_vcpus(agent, &before, change.added.len(), deadline).await?;
        change.guest = Some(guest);
    }
    Ok(change)
}

/// A memory hot-add (`add`, not yet started) with its new memory blocks brought online in the
/// guest by `deadline` after it: as many bytes as the device gives (a virtio-mem device's
/// requested size).
pub(crate) async fn memory(
    agent: &GuestAgent,
    deadline: Duration,
    add: impl std::future::Future<Output = crate::error::Result<qhotplug_cmdline::MemoryDevice>>,
) -> crate::error::Result<(qhotplug_cmdline::MemoryDevice, Onlined)> {
    let before = memory_block_ids(agent).await?;
    let device = add.await?;
    let bytes = match &device.kind {
        qhotplug_cmdline::MemoryDeviceKind::VirtioMem { requested, .. } => *requested,
        _ => device.backend.size,
    };
    let guest = online_memory(agent, &before, bytes, Instant::now() + deadline).await?;
    Ok((device, guest))
}

pub(crate) async fn vcpu_ids(agent: &GuestAgent) -> AgentResult<BTreeSet<u64>> {
    Ok(agent
        .execute(&GuestGetVcpus)
        .await?
        .into_iter()
        .map(|c| c.logical_id as u64)
        .collect())
}

/// Waits by `deadline` for `expected` CPUs beyond `before` to show in the guest, then onlines
/// those of them that are offline, one `guest-set-vcpus` with the rest after a partial count.
pub(crate) async fn online_vcpus(
    agent: &GuestAgent,
    before: &BTreeSet<u64>,
    expected: usize,
    deadline: Instant,
) -> AgentResult<Onlined> {
    let listed = until_listed(agent, &GuestGetVcpus, before, expected, deadline, |c| {
        c.logical_id as u64
    })
    .await?;
    let mut out = Onlined::default();
    let mut todo: Vec<GuestVcpu> = Vec::new();
    for cpu in &listed {
        let id = cpu.logical_id as u64;
        if before.contains(&id) {
            continue;
        }
        out.new.push(id);
        if !cpu.online {
            todo.push(GuestVcpu {
                logical_id: cpu.logical_id,
                online: true,
                can_offline: None,
            });
        }
    }
    // The agent returns how many of the list (in order) it processed; the first one it did not
    // failed. Go on with the rest after it, as libvirt does.
    while !todo.is_empty() {
        let sent = todo.len();
        match agent
            .execute(&GuestSetVcpus {
                vcpus: todo.clone(),
            })
            .await
        {
            Ok(done) if done > 0 && (done as usize) <= sent => {
                let done = done as usize;
                out.onlined
                    .extend(todo.drain(..done).map(|c| c.logical_id as u64));
            }
            Ok(done) => {
                let failed = todo.remove(0);
                out.failed.push((
                    failed.logical_id as u64,
                    format!("guest-set-vcpus processed {done} of {sent}"),
                ));
            }
            Err(e) if e.is_in_doubt() || matches!(e, qhotplug_qga::Error::NotRunning { .. }) => {
                return Err(e)
            }
            Err(e) => {
                let failed = todo.remove(0);
                out.failed.push((failed.logical_id as u64, e.to_string()));
            }
        }
    }
    let now = agent.execute(&GuestGetVcpus).await?;
    out.total = now.len();
    out.online = now.iter().filter(|c| c.online).count();
    Ok(out)
}

/// The indexes of the guest's memory blocks, before a hot-add.
pub(crate) async fn memory_block_ids(agent: &GuestAgent) -> AgentResult<BTreeSet<u64>> {
    Ok(agent
        .execute(&GuestGetMemoryBlocks)
        .await?
        .into_iter()
        .map(|b| b.phys_index)
        .collect())
}

/// Waits by `deadline` for the blocks `bytes` of new memory make, beyond `before`, then onlines
/// those of them that are offline.
pub(crate) async fn online_memory(
    agent: &GuestAgent,
    before: &BTreeSet<u64>,
    bytes: u64,
    deadline: Instant,
) -> AgentResult<Onlined> {
    let block = agent.execute(&GuestGetMemoryBlockInfo).await?.size.max(1);
    let expected = bytes.div_ceil(block) as usize;
    let listed = until_listed(
        agent,
        &GuestGetMemoryBlocks,
        before,
        expected,
        deadline,
        |b| b.phys_index,
    )
    .await?;
    let mut out = Onlined::default();
    let mut todo = Vec::new();
    for block in listed.iter().filter(|b| !before.contains(&b.phys_index)) {
        out.new.push(block.phys_index);
        if !block.online {
            todo.push(MemoryBlockState {
                phys_index: block.phys_index,
                online: true,
            });
        }
    }
    if !todo.is_empty() {
        for answer in agent
            .execute(&GuestSetMemoryBlocks { mem_blks: todo })
            .await?
        {
            if answer.response == "success" {
                out.onlined.push(answer.phys_index);
            } else {
                let code = answer
                    .error_code
                    .map(|c| format!(" (errno {c})"))
                    .unwrap_or_default();
                out.failed
                    .push((answer.phys_index, format!("{}{code}", answer.response)));
            }
        }
    }
    let now = agent.execute(&GuestGetMemoryBlocks).await?;
    out.total = now.len();
    out.online = now.iter().filter(|b| b.online).count();
    Ok(out)
}

/// Asks the guest (`list`) until it lists `expected` ids (`id` of each item) that are not in
/// `before`, or `deadline` passes; returns the last listing.
async fn until_listed<C, T>(
    agent: &GuestAgent,
    list: &C,
    before: &BTreeSet<u64>,
    expected: usize,
    deadline: Instant,
    id: impl Fn(&T) -> u64,
) -> AgentResult<Vec<T>>
where
    C: qhotplug_qmp::Command<Returns = Vec<T>>,
{
    loop {
        let listed = agent.execute(list).await?;
        let new = listed.iter().filter(|t| !before.contains(&id(t))).count();
        if new >= expected || Instant::now() >= deadline {
            return Ok(listed);
        }
        tokio::time::sleep(POLL).await;
    }
}
