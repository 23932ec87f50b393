//! The mock's storage half, modelled on QEMU's (`../shared/reference/block-jobs-snapshots-backup.md`
//! §1, which records what 7.2 and 10.0 do): block jobs with QEMU's status machine and
//! `JOB_STATUS_CHANGE` at every step, `blockdev-create`, snapshots, dirty bitmaps, the QMP
//! `transaction` (all or nothing), and the NBD server and its exports.
//!
//! A job runs at once: after the reply that starts it, it goes as far as it can without the
//! user (`ready` for a mirror or an active commit, `running` for a backup with `sync: none`,
//! `pending` when it is not finalized automatically, else `concluded`), unless the test holds
//! jobs ([`MockQemu::hold_jobs`](crate::MockQemu::hold_jobs)) or fails one
//! ([`MockQemu::fail_job`](crate::MockQemu::fail_job)).

use std::os::unix::fs::FileExt;

use serde_json::{json, Value};

use crate::args::{generic, required, str_arg, Reply};
use crate::{MockBlockNode, MockDevice};

/// One job, as `query-jobs` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockJob {
    /// Its id.
    pub id: String,
    /// Its type: `mirror`, `commit`, `stream`, `backup`, `create`.
    pub kind: String,
    /// Its status (`created`, `running`, `paused`, `ready`, `standby`, `waiting`, `pending`,
    /// `aborting`, `concluded`).
    pub status: String,
    /// Its error, once concluded with one.
    pub error: Option<String>,
    auto_finalize: bool,
    /// What it changes in the block graph when it completes.
    effect: Effect,
    /// A user's pause.
    paused: bool,
    /// Its bitmap, busy while it runs.
    bitmap: Option<(String, String)>,
}

/// What a job changes once it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    None,
    /// Mirror or active commit: devices on `from` move to `to` (on `job-complete` only).
    Pivot {
        from: String,
        to: String,
    },
    /// Stream, intermediate commit: node `node` stands on `backing` afterwards.
    Rebase {
        node: String,
        backing: Option<String>,
    },
    /// A backup with `sync: none`: runs until it is cancelled.
    Endless,
}

/// A dirty bitmap on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockBitmap {
    /// The node it is on.
    pub node: String,
    /// Its name.
    pub name: String,
    /// Whether it records writes (not disabled).
    pub recording: bool,
    /// Whether it is stored in the image.
    pub persistent: bool,
    /// Whether a job uses it.
    pub busy: bool,
}

/// An NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockExport {
    /// Its id.
    pub id: String,
    /// The node it serves.
    pub node: String,
    /// The name a client asks for.
    pub name: String,
    /// Whether clients may write.
    pub writable: bool,
}

/// The storage state of the mock QEMU.
#[derive(Debug, Clone, Default)]
pub(crate) struct Storage {
    pub(crate) jobs: Vec<MockJob>,
    pub(crate) bitmaps: Vec<MockBitmap>,
    pub(crate) nbd_server: bool,
    pub(crate) exports: Vec<MockExport>,
    /// Jobs stay `running` while held.
    pub(crate) hold: bool,
    /// Jobs of these kinds (`backup`, `mirror`, …) stay `running` too.
    pub(crate) held_kinds: Vec<String>,
    /// Jobs to fail when they run: the id and the error.
    pub(crate) failing: Vec<(String, String)>,
}

/// The storage commands and the arguments the schema lists for each.
pub(crate) const COMMANDS: &[(&str, &[&str])] = &[
    ("job-pause", &["id"]),
    ("job-resume", &["id"]),
    ("job-complete", &["id"]),
    ("job-cancel", &["id"]),
    ("job-finalize", &["id"]),
    ("job-dismiss", &["id"]),
    ("block-job-cancel", &["device", "force"]),
    ("block-job-set-speed", &["device", "speed"]),
    (
        "blockdev-mirror",
        &[
            "job-id",
            "device",
            "target",
            "sync",
            "speed",
            "auto-dismiss",
        ],
    ),
    ("blockdev-create", &["job-id", "options"]),
    (
        "block-commit",
        &["job-id", "device", "top-node", "base-node", "auto-dismiss"],
    ),
    ("block-stream", &["job-id", "device", "auto-dismiss"]),
    (
        "blockdev-backup",
        &[
            "job-id",
            "device",
            "target",
            "sync",
            "bitmap",
            "auto-finalize",
            "auto-dismiss",
            "x-perf",
        ],
    ),
    ("blockdev-snapshot", &["node", "overlay"]),
    ("transaction", &["actions", "properties"]),
    (
        "block-dirty-bitmap-add",
        &["node", "name", "persistent", "disabled"],
    ),
    ("block-dirty-bitmap-remove", &["node", "name"]),
    ("block-dirty-bitmap-merge", &["node", "target", "bitmaps"]),
    ("block-dirty-bitmap-enable", &["node", "name"]),
    ("block-dirty-bitmap-disable", &["node", "name"]),
    ("nbd-server-start", &["addr", "tls-creds"]),
    ("nbd-server-stop", &[]),
    (
        "block-export-add",
        &["type", "id", "node-name", "name", "writable", "bitmaps"],
    ),
    ("block-export-del", &["id", "mode"]),
    ("query-block-exports", &[]),
];

/// The storage events.
pub(crate) const EVENTS: &[&str] = &[
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_EXPORT_DELETED",
];

/// Bitmap actions, which QEMU refuses in a `transaction` with `completion-mode: grouped`.
const BITMAP_ACTIONS: &[&str] = &[
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-merge",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-clear",
];

/// What the storage half changes of the rest of the mock: the block graph, the devices on it,
/// and the events it sends (collected, for the model to send after its reply).
pub(crate) struct Graph<'a> {
    pub(crate) nodes: &'a mut Vec<MockBlockNode>,
    pub(crate) devices: &'a mut Vec<MockDevice>,
    pub(crate) events: &'a mut Vec<(String, Value)>,
}

impl Graph<'_> {
    fn emit(&mut self, name: &str, data: Value) {
        self.events.push((name.to_owned(), data));
    }
}

impl Storage {
    /// Answers a storage command, or `None` when `name` is not one.
    pub(crate) fn command(&mut self, g: &mut Graph<'_>, name: &str, args: &Value) -> Option<Reply> {
        let reply = match name {
            "query-jobs" => Ok(self.query_jobs()),
            "job-pause" => self.job_verb(g, required(args, "id"), "pause"),
            "job-resume" => self.job_verb(g, required(args, "id"), "resume"),
            "job-complete" => self.job_verb(g, required(args, "id"), "complete"),
            "job-cancel" => self.job_verb(g, required(args, "id"), "cancel"),
            "job-finalize" => self.job_verb(g, required(args, "id"), "finalize"),
            "job-dismiss" => self.job_verb(g, required(args, "id"), "dismiss"),
            "block-job-cancel" => {
                let force = args.get("force").and_then(Value::as_bool) == Some(true);
                let verb = if force { "cancel" } else { "soft-cancel" };
                self.job_verb(g, required(args, "device"), verb)
            }
            "block-job-set-speed" => required(args, "device")
                .and_then(|id| self.job(id))
                .map(|_| json!({})),
            "blockdev-create" => self.blockdev_create(g, args),
            "blockdev-mirror" | "block-commit" | "block-stream" | "blockdev-backup" => {
                self.start_job(g, name, args)
            }
            "blockdev-snapshot" => self.blockdev_snapshot(g, args),
            "transaction" => self.transaction(g, args),
            "block-dirty-bitmap-add" => self.bitmap_add(g, args),
            "block-dirty-bitmap-remove" => self.bitmap_remove(g, args),
            "block-dirty-bitmap-merge" => self.bitmap_merge(g, args),
            "block-dirty-bitmap-enable" => self.bitmap_record(g, args, true),
            "block-dirty-bitmap-disable" => self.bitmap_record(g, args, false),
            "nbd-server-start" => self.nbd_server_start(),
            "nbd-server-stop" => self.nbd_server_stop(g),
            "block-export-add" => self.export_add(g, args),
            "block-export-del" => self.export_del(g, args),
            "query-block-exports" => Ok(Value::Array(
                self.exports
                    .iter()
                    .map(|e| json!({"id": e.id, "node-name": e.node, "type": "nbd", "shutting-down": false}))
                    .collect(),
            )),
            _ => return None,
        };
        Some(reply)
    }

    fn query_jobs(&self) -> Value {
        Value::Array(
            self.jobs
                .iter()
                .map(|j| {
                    let mut info = json!({"id": j.id, "type": j.kind, "status": j.status,
                                          "current-progress": 1, "total-progress": 1});
                    if let Some(error) = &j.error {
                        info["error"] = json!(error);
                    }
                    info
                })
                .collect(),
        )
    }

    fn job(&self, id: &str) -> Result<&MockJob, (&'static str, String)> {
        self.jobs
            .iter()
            .find(|j| j.id == id)
            .ok_or_else(|| ("DeviceNotActive", format!("Block job '{id}' not found")))
    }

    /// The node a device runs on is `node`, or a node a job or export uses is.
    fn node_exists(&self, g: &Graph<'_>, node: &str) -> Result<(), (&'static str, String)> {
        match g.nodes.iter().any(|n| n.node_name == node) {
            true => Ok(()),
            false => Err(generic(format!(
                "Cannot find device='' nor node-name='{node}'"
            ))),
        }
    }

    /// A job the user verbs: QEMU's verb table, and what each does.
    fn job_verb(
        &mut self,
        g: &mut Graph<'_>,
        id: Result<&str, (&'static str, String)>,
        verb: &str,
    ) -> Reply {
        let id = id?;
        let job = self.job(id)?.clone();
        let allowed = match verb {
            "pause" | "resume" => {
                ["created", "running", "paused", "ready", "standby"].contains(&job.status.as_str())
            }
            "complete" => ["ready", "standby"].contains(&job.status.as_str()),
            "soft-cancel" | "cancel" => job.status != "concluded" && job.status != "aborting",
            "finalize" => job.status == "pending",
            "dismiss" => job.status == "concluded",
            _ => false,
        };
        if !allowed {
            let verb = if verb == "soft-cancel" {
                "cancel"
            } else {
                verb
            };
            return Err(generic(format!(
                "Job '{id}' in state '{}' cannot accept command verb '{verb}'",
                job.status
            )));
        }
        match verb {
            "pause" => {
                self.set_job(id, |j| j.paused = true);
                let to = if job.status == "ready" {
                    "standby"
                } else {
                    "paused"
                };
                self.move_job(g, id, to);
            }
            "resume" => {
                self.set_job(id, |j| j.paused = false);
                let to = if job.status == "standby" {
                    "ready"
                } else {
                    "running"
                };
                self.move_job(g, id, to);
            }
            "complete" => self.finish_job(g, id, true),
            "soft-cancel" if job.status == "ready" || job.status == "standby" => {
                self.finish_job(g, id, false)
            }
            "soft-cancel" | "cancel" => self.abort_job(g, id, None),
            "finalize" => self.conclude_job(g, id, true),
            "dismiss" => {
                self.jobs.retain(|j| j.id != id);
                g.emit("JOB_STATUS_CHANGE", json!({"id": id, "status": "null"}));
            }
            _ => unreachable!("checked above"),
        }
        Ok(json!({}))
    }

    fn set_job(&mut self, id: &str, change: impl FnOnce(&mut MockJob)) {
        if let Some(job) = self.jobs.iter_mut().find(|j| j.id == id) {
            change(job);
        }
    }

    fn move_job(&mut self, g: &mut Graph<'_>, id: &str, status: &str) {
        self.set_job(id, |j| j.status = status.to_owned());
        g.emit("JOB_STATUS_CHANGE", json!({"id": id, "status": status}));
    }

    /// Waiting, pending, and concluded unless the job waits to be finalized; `pivot`: its graph
    /// change is made (a completed mirror pivots; a soft-cancelled one does not).
    fn finish_job(&mut self, g: &mut Graph<'_>, id: &str, pivot: bool) {
        if !pivot {
            self.set_job(id, |j| j.effect = Effect::None);
        }
        self.move_job(g, id, "waiting");
        self.move_job(g, id, "pending");
        let auto = self.job(id).map(|j| j.auto_finalize).unwrap_or(true);
        if auto {
            self.conclude_job(g, id, true);
        }
    }

    /// The job concludes; `ok`: its change is made.
    fn conclude_job(&mut self, g: &mut Graph<'_>, id: &str, ok: bool) {
        let Ok(job) = self.job(id).cloned() else {
            return;
        };
        if ok {
            match &job.effect {
                Effect::Pivot { from, to } => {
                    for d in g.devices.iter_mut() {
                        if d.drive.as_deref() == Some(from.as_str()) {
                            d.drive = Some(to.clone());
                        }
                    }
                }
                Effect::Rebase { node, backing } => {
                    if let Some(n) = g.nodes.iter_mut().find(|n| &n.node_name == node) {
                        n.backing = backing.clone();
                    }
                }
                Effect::None | Effect::Endless => {}
            }
        }
        self.release_bitmap(&job);
        let event = if job.error.is_some() || !ok {
            "BLOCK_JOB_CANCELLED"
        } else {
            "BLOCK_JOB_COMPLETED"
        };
        if job.kind != "create" {
            let mut data =
                json!({"type": job.kind, "device": id, "len": 1, "offset": 1, "speed": 0});
            if let (Some(error), "BLOCK_JOB_COMPLETED") = (&job.error, event) {
                data["error"] = json!(error);
            }
            g.emit(event, data);
        }
        self.move_job(g, id, "concluded");
    }

    fn release_bitmap(&mut self, job: &MockJob) {
        if let Some((node, name)) = &job.bitmap {
            for b in self.bitmaps.iter_mut() {
                if &b.node == node && &b.name == name {
                    b.busy = false;
                }
            }
        }
    }

    /// Aborting, then concluded: with `error` (a failure), or QEMU's cancel.
    fn abort_job(&mut self, g: &mut Graph<'_>, id: &str, error: Option<String>) {
        let error = error.unwrap_or_else(|| "Operation canceled".into());
        self.set_job(id, |j| {
            j.error = Some(error);
            j.effect = Effect::None;
        });
        self.move_job(g, id, "aborting");
        self.conclude_job(g, id, false);
    }

    /// Moves every job as far as it goes without the user: called after each reply.
    pub(crate) fn advance_jobs(&mut self, g: &mut Graph<'_>) {
        let ids: Vec<String> = self.jobs.iter().map(|j| j.id.clone()).collect();
        for id in ids {
            let Ok(job) = self.job(&id).cloned() else {
                continue;
            };
            if job.status == "created" {
                self.move_job(g, &id, "running");
            }
            if !matches!(job.status.as_str(), "created" | "running") {
                continue;
            }
            if let Some(at) = self.failing.iter().position(|(j, _)| *j == id) {
                let (_, error) = self.failing.remove(at);
                self.abort_job(g, &id, Some(error));
                continue;
            }
            if job.paused || self.hold || self.held_kinds.contains(&job.kind) {
                continue;
            }
            let needs_complete = matches!(job.effect, Effect::Pivot { .. });
            if needs_complete {
                self.move_job(g, &id, "ready");
                g.emit(
                    "BLOCK_JOB_READY",
                    json!({"type": job.kind, "device": id, "len": 1, "offset": 1, "speed": 0}),
                );
            } else if job.effect != Effect::Endless {
                self.finish_job(g, &id, true);
            }
        }
    }

    /// A new job: `created`, then [`advance_jobs`](Model::advance_jobs) after the reply.
    fn add_job(
        &mut self,
        g: &mut Graph<'_>,
        id: &str,
        kind: &str,
        effect: Effect,
        auto_finalize: bool,
    ) -> Reply {
        if id.is_empty() {
            return Err(generic("Invalid job ID ''"));
        }
        if self.jobs.iter().any(|j| j.id == id) {
            return Err(generic(format!("Job ID '{id}' already in use")));
        }
        self.jobs.push(MockJob {
            id: id.into(),
            kind: kind.into(),
            status: "created".into(),
            error: None,
            auto_finalize,
            effect,
            paused: false,
            bitmap: None,
        });
        g.emit("JOB_STATUS_CHANGE", json!({"id": id, "status": "created"}));
        Ok(json!({}))
    }

    /// A device's root node is busy with a job already: QEMU's "Need a root block node" is for
    /// a node under a filter; two jobs on one device are refused as in use.
    fn check_no_job_on(&self, node: &str) -> Result<(), (&'static str, String)> {
        let busy = self.jobs.iter().any(|j| {
            j.status != "concluded"
                && matches!(&j.effect, Effect::Pivot { from, .. } if from == node)
        });
        match busy {
            true => Err(generic(format!(
                "Node '{node}' is busy: block device is in use by block job"
            ))),
            false => Ok(()),
        }
    }

    fn start_job(&mut self, g: &mut Graph<'_>, name: &str, args: &Value) -> Reply {
        let id = required(args, "job-id").unwrap_or("");
        let device = required(args, "device")?;
        self.node_exists(g, device)?;
        self.check_no_job_on(device)?;
        let auto_finalize = args
            .get("auto-finalize")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        match name {
            "blockdev-mirror" => {
                let target = required(args, "target")?;
                self.node_exists(g, target)?;
                let effect = Effect::Pivot {
                    from: device.into(),
                    to: target.into(),
                };
                self.add_job(g, id, "mirror", effect, auto_finalize)
            }
            "block-commit" => {
                let top = str_arg(args, "top-node").unwrap_or(device);
                let base = required(args, "base-node")?;
                self.node_exists(g, top)?;
                self.node_exists(g, base)?;
                let effect = if top == device {
                    Effect::Pivot {
                        from: device.into(),
                        to: base.into(),
                    }
                } else {
                    let above = g
                        .nodes
                        .iter()
                        .find(|n| n.backing.as_deref() == Some(top))
                        .map(|n| n.node_name.clone())
                        .ok_or_else(|| {
                            generic(format!("'{top}' is not in the backing chain of '{device}'"))
                        })?;
                    Effect::Rebase {
                        node: above,
                        backing: Some(base.into()),
                    }
                };
                self.add_job(g, id, "commit", effect, auto_finalize)
            }
            "block-stream" => {
                let effect = Effect::Rebase {
                    node: device.into(),
                    backing: None,
                };
                self.add_job(g, id, "stream", effect, auto_finalize)
            }
            _ => {
                let target = required(args, "target")?;
                self.node_exists(g, target)?;
                let sync = str_arg(args, "sync").unwrap_or("full");
                let bitmap = str_arg(args, "bitmap");
                if sync == "incremental" && bitmap.is_none() {
                    return Err(generic(
                        "Must provide a valid bitmap name for 'incremental' sync mode",
                    ));
                }
                if let Some(name) = bitmap {
                    let b = self.bitmap(g, device, name)?;
                    if b.busy {
                        return Err(in_use(name));
                    }
                }
                let effect = if sync == "none" {
                    Effect::Endless
                } else {
                    Effect::None
                };
                self.add_job(g, id, "backup", effect, auto_finalize)?;
                if let Some(name) = bitmap {
                    self.set_bitmap(device, name, |b| b.busy = true);
                    self.set_job(id, |j| j.bitmap = Some((device.into(), name.into())));
                }
                Ok(json!({}))
            }
        }
    }

    /// `blockdev-create` of a qcow2 image on a protocol node: QEMU writes its header (the magic
    /// and the virtual size, as qcow2's header has them) through the node's fd.
    fn blockdev_create(&mut self, g: &mut Graph<'_>, args: &Value) -> Reply {
        let id = required(args, "job-id").unwrap_or("");
        let options = args.get("options").cloned().unwrap_or(Value::Null);
        let driver = options.get("driver").and_then(Value::as_str).unwrap_or("");
        if driver != "qcow2" {
            return Err(generic(format!(
                "Driver '{driver}' does not support image creation"
            )));
        }
        let file = options
            .get("file")
            .and_then(Value::as_str)
            .ok_or_else(|| generic("Parameter 'file' is missing"))?;
        let size = options.get("size").and_then(Value::as_u64).unwrap_or(0);
        let fd = g
            .nodes
            .iter()
            .find(|n| n.node_name == file)
            .ok_or_else(|| generic(format!("Cannot find device='' nor node-name='{file}'")))?
            .fd();
        if let Some(fd) = fd {
            let file = std::fs::File::from(fd.try_clone().map_err(|e| generic(e.to_string()))?);
            let mut header = [0u8; 32];
            header[..4].copy_from_slice(b"QFI\xfb");
            header[4..8].copy_from_slice(&3u32.to_be_bytes());
            header[24..32].copy_from_slice(&size.to_be_bytes());
            file.write_all_at(&header, 0)
                .map_err(|e| generic(format!("Could not write qcow2 header: {e}")))?;
            // As long as QEMU's own new image (64 KiB clusters: the header, refcount table and
            // block clusters, then a 512-byte L1 table, enough up to 32 GiB).
            file.set_len(3 * 65536 + 512)
                .map_err(|e| generic(format!("Could not write qcow2 header: {e}")))?;
        }
        self.add_job(g, id, "create", Effect::None, true)
    }

    /// `blockdev-snapshot`: devices on `node` move to `overlay`, which stands on `node`, now
    /// read-only.
    fn blockdev_snapshot(&mut self, g: &mut Graph<'_>, args: &Value) -> Reply {
        let node = required(args, "node")?;
        let overlay = required(args, "overlay")?;
        self.node_exists(g, node)?;
        self.node_exists(g, overlay)?;
        let over = g
            .nodes
            .iter()
            .find(|n| n.node_name == overlay)
            .expect("checked");
        if over.backing.is_some() {
            return Err(generic("The overlay already has a backing image"));
        }
        if g.devices
            .iter()
            .any(|d| d.drive.as_deref() == Some(overlay))
        {
            return Err(generic(format!(
                "The overlay '{overlay}' is already in use"
            )));
        }
        for d in g.devices.iter_mut() {
            if d.drive.as_deref() == Some(node) {
                d.drive = Some(overlay.into());
            }
        }
        for n in g.nodes.iter_mut() {
            if n.node_name == overlay {
                n.backing = Some(node.into());
            }
            if n.node_name == node {
                n.read_only = true;
            }
        }
        Ok(json!({}))
    }

    /// `transaction`: every action or none; QEMU's refusal of `completion-mode: grouped` beside
    /// a bitmap action first.
    fn transaction(&mut self, g: &mut Graph<'_>, args: &Value) -> Reply {
        let actions = args
            .get("actions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let grouped = args
            .pointer("/properties/completion-mode")
            .and_then(Value::as_str)
            == Some("grouped");
        for action in &actions {
            let kind = action.get("type").and_then(Value::as_str).unwrap_or("");
            if grouped && BITMAP_ACTIONS.contains(&kind) {
                return Err(generic(format!(
                    "Action '{kind}' does not support Transaction property completion-mode = grouped"
                )));
            }
        }
        let saved = (g.nodes.clone(), g.devices.clone(), self.clone());
        let mut held = Vec::new();
        let mut inner = Graph {
            nodes: &mut *g.nodes,
            devices: &mut *g.devices,
            events: &mut held,
        };
        for action in &actions {
            let kind = action.get("type").and_then(Value::as_str).unwrap_or("");
            let data = action.get("data").cloned().unwrap_or(json!({}));
            let done = match kind {
                "blockdev-snapshot"
                | "blockdev-backup"
                | "block-dirty-bitmap-add"
                | "block-dirty-bitmap-remove"
                | "block-dirty-bitmap-merge"
                | "block-dirty-bitmap-enable"
                | "block-dirty-bitmap-disable" => self
                    .command(&mut inner, kind, &data)
                    .expect("a storage command"),
                other => Err(generic(format!(
                    "Invalid parameter type for 'type', expected: {other}"
                ))),
            };
            if let Err(e) = done {
                (*g.nodes, *g.devices, *self) = saved;
                return Err(e);
            }
        }
        g.events.append(&mut held);
        Ok(json!({}))
    }

    fn bitmap(
        &self,
        g: &Graph<'_>,
        node: &str,
        name: &str,
    ) -> Result<&MockBitmap, (&'static str, String)> {
        self.node_exists(g, node)?;
        self.bitmaps
            .iter()
            .find(|b| b.node == node && b.name == name)
            .ok_or_else(|| generic(format!("Dirty bitmap '{name}' not found")))
    }

    fn set_bitmap(&mut self, node: &str, name: &str, change: impl FnOnce(&mut MockBitmap)) {
        if let Some(b) = self
            .bitmaps
            .iter_mut()
            .find(|b| b.node == node && b.name == name)
        {
            change(b);
        }
    }

    fn bitmap_add(&mut self, g: &mut Graph<'_>, args: &Value) -> Reply {
        let node = required(args, "node")?;
        let name = required(args, "name")?;
        self.node_exists(g, node)?;
        if self.bitmap(g, node, name).is_ok() {
            return Err(generic(format!("Bitmap already exists: {name}")));
        }
        let persistent = args.get("persistent").and_then(Value::as_bool) == Some(true);
        let driver = g
            .nodes
            .iter()
            .find(|n| n.node_name == node)
            .map(|n| n.driver.clone())
            .unwrap_or_default();
        if persistent && driver != "qcow2" {
            return Err(generic(format!(
                "Can't make bitmap '{name}' persistent in '{node}': Cannot store dirty bitmaps in {driver} format"
            )));
        }
        self.bitmaps.push(MockBitmap {
            node: node.into(),
            name: name.into(),
            recording: args.get("disabled").and_then(Value::as_bool) != Some(true),
            persistent,
            busy: false,
        });
        Ok(json!({}))
    }

    fn bitmap_remove(&mut self, g: &mut Graph<'_>, args: &Value) -> Reply {
        let node = required(args, "node")?;
        let name = required(args, "name")?;
        if self.bitmap(g, node, name)?.busy {
            return Err(in_use(name));
        }
        self.bitmaps.retain(|b| !(b.node == node && b.name == name));
        Ok(json!({}))
    }

    fn bitmap_merge(&mut self, g: &mut Graph<'_>, args: &Value) -> Reply {
        let node = required(args, "node")?;
        let target = required(args, "target")?;
        if self.bitmap(g, node, target)?.busy {
            return Err(in_use(target));
        }
        for source in args
            .get("bitmaps")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            let (on, name) = match &source {
                Value::String(name) => (node.to_owned(), name.clone()),
                other => (
                    str_arg(other, "node").unwrap_or(node).to_owned(),
                    str_arg(other, "name").unwrap_or("").to_owned(),
                ),
            };
            self.bitmap(g, &on, &name)?;
        }
        Ok(json!({}))
    }

    fn bitmap_record(&mut self, g: &mut Graph<'_>, args: &Value, on: bool) -> Reply {
        let node = required(args, "node")?;
        let name = required(args, "name")?;
        if self.bitmap(g, node, name)?.busy {
            return Err(in_use(name));
        }
        self.set_bitmap(node, name, |b| b.recording = on);
        Ok(json!({}))
    }

    /// The dirty bitmaps on node `node`, as `query-block` shows them.
    pub(crate) fn bitmaps_json(&self, node: &str) -> Value {
        // Newest first, as QEMU lists them.
        Value::Array(
            self.bitmaps
                .iter()
                .rev()
                .filter(|b| b.node == node)
                .map(|b| {
                    json!({"name": b.name, "recording": b.recording, "persistent": b.persistent,
                           "busy": b.busy, "granularity": 65536, "count": 0})
                })
                .collect(),
        )
    }

    fn nbd_server_start(&mut self) -> Reply {
        if self.nbd_server {
            return Err(generic("NBD server already running"));
        }
        self.nbd_server = true;
        Ok(json!({}))
    }

    fn nbd_server_stop(&mut self, g: &mut Graph<'_>) -> Reply {
        if !self.nbd_server {
            return Err(generic("NBD server not running"));
        }
        self.nbd_server = false;
        for export in std::mem::take(&mut self.exports) {
            g.emit("BLOCK_EXPORT_DELETED", json!({"id": export.id}));
        }
        Ok(json!({}))
    }

    fn export_add(&mut self, g: &mut Graph<'_>, args: &Value) -> Reply {
        if !self.nbd_server {
            return Err(generic("NBD server not running"));
        }
        let id = required(args, "id")?;
        let node = required(args, "node-name")?;
        if self.exports.iter().any(|e| e.id == id) {
            return Err(generic(format!("Block export id '{id}' is already in use")));
        }
        self.node_exists(g, node)?;
        for bitmap in args
            .get("bitmaps")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            // QEMU looks for it down the node's backing chain (a pull backup exports the
            // scratch, which stands on the disk's node).
            let name = bitmap.as_str().unwrap_or("");
            let mut on = Some(node.to_owned());
            let mut found = false;
            while let Some(at) = on {
                found |= self.bitmap(g, &at, name).is_ok();
                on = g
                    .nodes
                    .iter()
                    .find(|n| n.node_name == at)
                    .and_then(|n| n.backing.clone());
            }
            if !found {
                return Err(generic(format!("Bitmap '{name}' is not found")));
            }
        }
        self.exports.push(MockExport {
            id: id.into(),
            node: node.into(),
            name: str_arg(args, "name").unwrap_or(node).into(),
            writable: args.get("writable").and_then(Value::as_bool) == Some(true),
        });
        Ok(json!({}))
    }

    fn export_del(&mut self, g: &mut Graph<'_>, args: &Value) -> Reply {
        let id = required(args, "id")?;
        let before = self.exports.len();
        self.exports.retain(|e| e.id != id);
        if self.exports.len() == before {
            return Err(generic(format!("Export '{id}' is not found")));
        }
        g.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
        Ok(json!({}))
    }

    /// Whether a job, a bitmap's job or an export holds node `node` (so it cannot be deleted).
    pub(crate) fn holds(&self, g: &Graph<'_>, node: &str) -> bool {
        self.exports.iter().any(|e| e.node == node)
            || g.nodes.iter().any(|n| n.backing.as_deref() == Some(node))
            || self.jobs.iter().any(|j| {
                j.status != "concluded"
                    && matches!(&j.effect, Effect::Pivot { to, .. } if to == node)
            })
    }
}

fn in_use(name: &str) -> (&'static str, String) {
    generic(format!(
        "Bitmap '{name}' is currently in use by another operation and cannot be used"
    ))
}

/// The virtual size a qcow2 header written by [`Model::blockdev_create`] (or `qemu-img`) gives.
pub(crate) fn qcow2_size(file: &std::fs::File) -> Option<u64> {
    let mut size = [0u8; 8];
    file.read_exact_at(&mut size, 24).ok()?;
    Some(u64::from_be_bytes(size))
}
