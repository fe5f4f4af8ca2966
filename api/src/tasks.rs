//! Proxmox tasks for asynchronous operations. A task is a small record in
//! `DATA_DIR/pve-tasks/` (so it survives a restart of the API): which guest, which state was
//! asked for, when. Its status is decided when read: `running` until the guest reaches the
//! state, then `stopped` with `exitstatus` `OK`, or the error (the guest's Stalled condition,
//! its disappearance, ten minutes without getting there). The log ends with `TASK OK` or
//! `TASK ERROR: …` as Proxmox's does.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use kpve_crds::common::{ConditionStatus, GuestPhase};
use serde_json::{Value, json};

use crate::envelope::PveError;
use crate::guests::{self, Guests, Kind};
use crate::upid::Upid;

/// How long a task may wait for its guest.
const TASK_TIMEOUT: i64 = 600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Running,
    Stopped,
    Paused,
    /// The guest's resource no longer exists (deleted).
    Gone,
    /// The guest's agent has seen this generation of the spec (a config change applied).
    Observed(i64),
    /// The volume `Task::volume` is no longer in its node's storage content.
    VolumeGone,
    /// Live migration `status.migration.id` ended (Completed or Failed).
    Migrated(String),
    /// A reboot or reset: the guest runs again as a new process (its pid is not this one); a
    /// stall fails it only if it differs from the one the guest had when asked (given here).
    Restarted(Option<u32>, Option<String>),
}

/// A task to record.
pub struct Task<'a> {
    pub node: &'a str,
    /// Task type (`qmstart`, `qmsnapshot`).
    pub kind: &'a str,
    pub guest_kind: Kind,
    /// The guest whose state the task follows.
    pub vmid: u32,
    /// The UPID's id field, when not `vmid` (a clone's is the source's VMID).
    pub id: Option<String>,
    pub target: Target,
    pub user: &'a str,
    /// The first log line, when not the generic one.
    pub log: Option<String>,
    /// Proxmox reports some refusals from inside the worker: the task ends at once with this.
    pub error: Option<String>,
    /// For [`Target::VolumeGone`]: the volume id.
    pub volume: Option<String>,
}

pub struct Tasks {
    dir: PathBuf,
    counter: AtomicU64,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The first line of the guest's Stalled condition, when it is stalled.
pub(crate) fn stalled(status: &kpve_crds::common::GuestStatus) -> Option<String> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled" && c.status == ConditionStatus::True)
        .map(|c| c.message.lines().next().unwrap_or("").to_string())
}

/// What a task's log says of its guest as last seen: phase, node, process, a stall.
fn progress(g: &guests::Guest) -> String {
    let s = &g.status;
    let mut line = format!("{:?}", s.phase).to_lowercase();
    match &s.node {
        Some(node) => line.push_str(&format!(" on node {node}")),
        None => line.push_str(", not scheduled yet"),
    }
    if let Some(pid) = s.pid.filter(|_| s.phase != GuestPhase::Stopped) {
        line.push_str(&format!(", pid {pid}"));
    }
    if let Some(reason) = stalled(s) {
        line.push_str(&format!(": {reason}"));
    }
    line
}

fn bad_upid(message: &str) -> PveError {
    let mut errors = std::collections::BTreeMap::new();
    errors.insert("upid".to_string(), message.to_string());
    PveError::parameters(errors)
}

impl Tasks {
    pub fn new(dir: PathBuf) -> std::io::Result<Tasks> {
        std::fs::create_dir_all(&dir)?;
        // Unique process-start field per task, also across restarts of the API.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Ok(Tasks { dir, counter: AtomicU64::new(seed & 0xFFFF_FFFF) })
    }

    fn path(&self, upid: &str) -> PathBuf {
        self.dir.join(upid.replace([':', '/', '@', '!'], "_"))
    }

    /// Replaces a task's record atomically (a reader never sees half a file).
    fn save(&self, upid: &str, record: &Value) -> std::io::Result<()> {
        let path = self.path(upid);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("task");
        // Hidden: listings skip names starting with a dot.
        let tmp = self.dir.join(format!(".{name}.{}", self.counter.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&tmp, record.to_string())?;
        std::fs::rename(&tmp, &path)
    }

    /// Records a task waiting for guest `vmid` to reach `target`; returns its UPID.
    pub fn create(
        &self,
        node: &str,
        kind: &str,
        guest_kind: Kind,
        vmid: u32,
        target: Target,
        user: &str,
    ) -> std::io::Result<String> {
        self.record(Task {
            node,
            kind,
            guest_kind,
            vmid,
            id: None,
            target,
            user,
            log: None,
            error: None,
            volume: None,
        })
    }

    /// Records a task as `task` describes it (its UPID id, first log line, or an error it
    /// already ended with); returns its UPID.
    pub fn record(&self, task: Task<'_>) -> std::io::Result<String> {
        let upid = Upid {
            node: task.node.into(),
            pid: std::process::id(),
            pstart: self.counter.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF,
            starttime: now() as u32,
            kind: task.kind.into(),
            id: task.id.unwrap_or_else(|| task.vmid.to_string()),
            user: task.user.into(),
        }
        .to_string();
        let target = task.target;
        let what = match target {
            Target::Running => "start",
            Target::Stopped => "stop",
            Target::Paused => "suspend",
            Target::Gone => "destroy",
            Target::Observed(_) => "config",
            Target::VolumeGone => "imgdel",
            Target::Migrated(_) => "migrate",
            Target::Restarted(..) => "restart",
        };
        let vmid = task.vmid;
        let first = task.log.unwrap_or_else(|| {
            format!(
                "{what} {} {}: {} declared",
                if task.guest_kind == Kind::Qemu { "VM" } else { "CT" },
                vmid,
                match target {
                    Target::Running => "powerState Running",
                    Target::Stopped => "powerState Stopped",
                    Target::Paused => "powerState Paused",
                    Target::Gone => "deletion",
                    Target::Observed(_) => "configuration update",
                    Target::VolumeGone => "volume removal",
                    Target::Migrated(_) => "migration",
                    Target::Restarted(..) => "restart annotation",
                }
            )
        });
        let mut record = json!({
            "upid": upid, "vmid": vmid, "guest": if task.guest_kind == Kind::Qemu { "qemu" } else { "lxc" },
            "target": what, "started": now(), "status": "running",
            "log": first.lines().collect::<Vec<_>>(),
        });
        if let Target::Observed(generation) = target {
            record["generation"] = json!(generation);
        }
        if let Target::Migrated(id) = &target {
            record["migration"] = json!(id);
        }
        if let Target::Restarted(pid, stall) = &target {
            record["pid"] = json!(pid);
            record["stall"] = json!(stall);
        }
        if let Some(volume) = task.volume {
            record["volume"] = json!(volume);
            record["node"] = json!(task.node);
        }
        if let Some(error) = task.error {
            record["log"].as_array_mut().expect("a list").push(json!(format!("TASK ERROR: {error}")));
            record["exitstatus"] = json!(error);
            record["status"] = json!("stopped");
        }
        self.save(&upid, &record)?;
        Ok(upid)
    }

    /// A task (`<qm|vz><op>`) following the generation `outcome` carries, or one that already
    /// ended with the refusal in it (Proxmox reports these from inside its worker).
    pub fn for_outcome(
        &self,
        node: &str,
        g: &guests::Guest,
        op: &str,
        log: String,
        outcome: Result<i64, String>,
        user: &str,
    ) -> Result<Value, PveError> {
        let (target, error) = match outcome {
            Ok(generation) => (Target::Observed(generation), None),
            Err(e) => (Target::Observed(i64::MAX), Some(e)),
        };
        let kind = format!("{}{op}", g.kind.task_prefix());
        let task = Task {
            node,
            kind: &kind,
            guest_kind: g.kind,
            vmid: g.vmid,
            id: None,
            target,
            user,
            log: Some(log),
            error,
            volume: None,
        };
        self.record(task).map(Value::from).map_err(|e| PveError::new(500, e.to_string()))
    }

    fn load(&self, upid: &str) -> Result<(Upid, Value), PveError> {
        let parsed: Upid = upid.parse().map_err(|_| bad_upid("unable to parse worker upid"))?;
        let text = std::fs::read_to_string(self.path(upid)).map_err(|_| bad_upid("no such task"))?;
        let record = serde_json::from_str(&text).map_err(|_| bad_upid("no such task"))?;
        Ok((parsed, record))
    }

    /// Brings a running task's record up to date with its guest.
    async fn settle(&self, guests: &Guests, upid: &str, record: &mut Value) {
        if record["status"] != "running" {
            return;
        }
        if record["target"] == "imgdel" {
            return self.settle_volume(guests, upid, record).await;
        }
        let kind = if record["guest"] == "qemu" { Kind::Qemu } else { Kind::Lxc };
        let vmid = record["vmid"].as_u64().unwrap_or(0) as u32;
        let want = match record["target"].as_str() {
            Some("start") => GuestPhase::Running,
            Some("suspend") => GuestPhase::Paused,
            _ => GuestPhase::Stopped,
        };
        let Ok(list) = guests::list(guests, Some(kind)).await else { return };
        let found = list.into_iter().find(|g| g.vmid == vmid);
        let elapsed = now() - record["started"].as_i64().unwrap_or(0);
        // The log follows the guest: a line each time what is seen of it changes.
        let mut seen_new = false;
        if let Some(g) = &found {
            let line = progress(g);
            if record["seen"].as_str() != Some(line.as_str()) {
                if let Some(log) = record["log"].as_array_mut() {
                    log.push(json!(line));
                }
                record["seen"] = json!(line);
                seen_new = true;
            }
        }
        let outcome: Option<Result<(), String>> = match found {
            None if record["target"] == "destroy" => Some(Ok(())),
            Some(g) if record["target"] == "migrate" => {
                let id = record["migration"].as_str().unwrap_or("");
                match crate::migrate::outcome(&g, id) {
                    Some(Ok(line)) => {
                        if let Some(log) = record["log"].as_array_mut() {
                            log.push(json!(line));
                        }
                        Some(Ok(()))
                    }
                    Some(Err(e)) => Some(Err(e)),
                    None if elapsed > TASK_TIMEOUT => {
                        Some(Err(format!("timeout waiting for the migration of guest {vmid}")))
                    }
                    None => None,
                }
            }
            None => Some(Err(format!("guest {vmid} no longer exists"))),
            Some(_) if record["target"] == "destroy" => (elapsed > TASK_TIMEOUT)
                .then(|| Err(format!("timeout waiting for guest {vmid} to be deleted"))),
            Some(g) if record["target"] == "config" => {
                let wanted = record["generation"].as_i64().unwrap_or(0);
                if g.status.observed_generation.unwrap_or(0) >= wanted {
                    // The agent saw the change and could not apply it (a refused shrink, a
                    // failed resize): the task ends with its reason.
                    match stalled(&g.status) {
                        Some(reason) => Some(Err(reason)),
                        None => Some(Ok(())),
                    }
                } else if elapsed > TASK_TIMEOUT {
                    Some(Err(format!("timeout waiting for guest {vmid} to apply its configuration")))
                } else {
                    None
                }
            }
            Some(g) if record["target"] == "restart" => {
                let before = record["pid"].as_u64().map(|p| p as u32);
                // Without a pid known before, a running guest is all that can be waited for.
                let new_process = before.is_none() || (g.status.pid.is_some() && g.status.pid != before);
                if g.status.phase == GuestPhase::Running && new_process {
                    Some(Ok(()))
                } else if let Some(reason) =
                    stalled(&g.status).filter(|r| record["stall"].as_str() != Some(r))
                {
                    Some(Err(reason))
                } else if elapsed > TASK_TIMEOUT {
                    Some(Err(format!("timeout waiting for guest {vmid} to restart")))
                } else {
                    None
                }
            }
            Some(g) if g.status.phase == want => Some(Ok(())),
            Some(g) => match stalled(&g.status) {
                Some(reason) if want == GuestPhase::Running => Some(Err(reason)),
                _ if elapsed > TASK_TIMEOUT => {
                    Some(Err(format!("timeout waiting for guest {vmid} to reach {want:?}")))
                }
                _ => None,
            },
        };
        match outcome {
            Some(outcome) => self.finish(upid, record, outcome),
            None if seen_new => {
                // Only over a record still running: a concurrent read may have finished it.
                let running = std::fs::read_to_string(self.path(upid))
                    .ok()
                    .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                    .is_some_and(|r| r["status"] == "running");
                if running {
                    let _ = self.save(upid, record);
                }
            }
            None => {}
        }
    }

    /// A volume removal is done once its node's agent no longer reports the volume.
    async fn settle_volume(&self, guests: &Guests, upid: &str, record: &mut Value) {
        let volume = record["volume"].as_str().unwrap_or("").to_string();
        let node = record["node"].as_str().unwrap_or("").to_string();
        let storage = volume.split(':').next().unwrap_or("");
        let api: kube::Api<kpve_crds::StoragePool> = kube::Api::all(guests.client.clone());
        let Ok(pool) = api.get(storage).await else { return };
        let listed = pool
            .status
            .as_ref()
            .and_then(|s| s.nodes.iter().find(|n| n.node == node))
            .is_some_and(|n| n.content.contains(&volume));
        if !listed {
            if let Some(log) = record["log"].as_array_mut() {
                log.push(json!(format!("Removed volume '{volume}'")));
            }
            self.finish(upid, record, Ok(()));
        } else if now() - record["started"].as_i64().unwrap_or(0) > 60 {
            self.finish(
                upid,
                record,
                Err(format!("volume '{volume}' was not removed within 60 s (in use?)")),
            );
        }
    }

    fn finish(&self, upid: &str, record: &mut Value, outcome: Result<(), String>) {
        let (line, exit) = match outcome {
            Ok(()) => ("TASK OK".to_string(), "OK".to_string()),
            Err(e) => (format!("TASK ERROR: {e}"), e),
        };
        if let Some(log) = record["log"].as_array_mut() {
            log.push(json!(line));
        }
        record["exitstatus"] = json!(exit);
        record["status"] = json!("stopped");
        let _ = self.save(upid, record);
    }

    /// `GET /nodes/{node}/tasks/{upid}/status`.
    pub async fn status(&self, guests: &Guests, upid: &str) -> Result<Value, PveError> {
        let (u, mut record) = self.load(upid)?;
        self.settle(guests, upid, &mut record).await;
        let mut out = json!({
            "upid": upid, "node": u.node, "pid": u.pid, "pstart": u.pstart, "starttime": u.starttime,
            "type": u.kind, "id": u.id, "user": u.user, "status": record["status"],
        });
        if let Some((user, token)) = u.user.split_once('!') {
            out["user"] = json!(user);
            out["tokenid"] = json!(token);
        }
        if record["status"] == "stopped" {
            out["exitstatus"] = record["exitstatus"].clone();
        }
        Ok(out)
    }

    /// `GET /nodes/{node}/tasks`: the node's tasks, newest first (`start`, `limit`,
    /// `errors`, `vmid`, `typefilter`, `source=active` as Proxmox filters them).
    pub async fn list(
        &self,
        guests: &Guests,
        node: &str,
        params: &std::collections::BTreeMap<String, String>,
    ) -> Result<Value, PveError> {
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| PveError::new(500, e.to_string()))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
            let Ok(record) = serde_json::from_str::<Value>(&text) else { continue };
            let Some(upid) = record["upid"].as_str().map(str::to_string) else { continue };
            let Ok(u) = upid.parse::<Upid>() else { continue };
            if u.node == node {
                records.push((u, upid, record));
            }
        }
        records.sort_by_key(|r| std::cmp::Reverse((r.0.starttime, r.0.pstart)));
        let start: usize = params.get("start").and_then(|v| v.parse().ok()).unwrap_or(0);
        let limit: usize = params.get("limit").and_then(|v| v.parse().ok()).unwrap_or(50);
        let mut out = Vec::new();
        for (u, upid, mut record) in records {
            if params.get("vmid").is_some_and(|v| *v != u.id)
                || params.get("typefilter").is_some_and(|t| *t != u.kind)
                || params.get("userfilter").is_some_and(|f| !u.user.contains(f.as_str()))
            {
                continue;
            }
            self.settle(guests, &upid, &mut record).await;
            let running = record["status"] == "running";
            if params.get("source").is_some_and(|s| s == "active") && !running {
                continue;
            }
            if params.get("errors").is_some_and(|e| e == "1") && (running || record["exitstatus"] == "OK") {
                continue;
            }
            let mut e = json!({"upid": upid, "node": u.node, "pid": u.pid, "pstart": u.pstart,
                               "starttime": u.starttime, "type": u.kind, "id": u.id, "user": u.user});
            if !running {
                e["status"] = record["exitstatus"].clone();
            }
            out.push(e);
        }
        Ok(Value::Array(out.into_iter().skip(start).take(limit).collect()))
    }

    /// `GET /nodes/{node}/tasks/{upid}/log`.
    pub async fn log(&self, guests: &Guests, upid: &str) -> Result<Value, PveError> {
        let (_, mut record) = self.load(upid)?;
        self.settle(guests, upid, &mut record).await;
        let lines = record["log"].as_array().cloned().unwrap_or_default();
        Ok(Value::Array(lines.iter().enumerate().map(|(i, t)| json!({"n": i + 1, "t": t})).collect()))
    }
}
