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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Running,
    Stopped,
    Paused,
    /// The guest's resource no longer exists (deleted).
    Gone,
    /// The guest's agent has seen this generation of the spec (a config change applied).
    Observed(i64),
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
        let upid = Upid {
            node: node.into(),
            pid: std::process::id(),
            pstart: self.counter.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF,
            starttime: now() as u32,
            kind: kind.into(),
            id: vmid.to_string(),
            user: user.into(),
        }
        .to_string();
        let what = match target {
            Target::Running => "start",
            Target::Stopped => "stop",
            Target::Paused => "suspend",
            Target::Gone => "destroy",
            Target::Observed(_) => "config",
        };
        let record = json!({
            "upid": upid, "vmid": vmid, "guest": if guest_kind == Kind::Qemu { "qemu" } else { "lxc" },
            "target": what, "started": now(), "status": "running",
            "log": [format!("{what} {} {}: {} declared", if guest_kind == Kind::Qemu { "VM" } else { "CT" }, vmid,
                             match target {
                                 Target::Running => "powerState Running",
                                 Target::Stopped => "powerState Stopped",
                                 Target::Paused => "powerState Paused",
                                 Target::Gone => "deletion",
                                 Target::Observed(_) => "configuration update",
                             })],
        });
        let mut record = record;
        if let Target::Observed(generation) = target {
            record["generation"] = json!(generation);
        }
        std::fs::write(self.path(&upid), record.to_string())?;
        Ok(upid)
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
        let kind = if record["guest"] == "qemu" { Kind::Qemu } else { Kind::Lxc };
        let vmid = record["vmid"].as_u64().unwrap_or(0) as u32;
        let want = match record["target"].as_str() {
            Some("start") => GuestPhase::Running,
            Some("suspend") => GuestPhase::Paused,
            _ => GuestPhase::Stopped,
        };
        let outcome: Option<Result<(), String>> = match guests::list(guests, Some(kind)).await {
            Err(_) => None,
            Ok(list) => match list.into_iter().find(|g| g.vmid == vmid) {
                None if record["target"] == "destroy" => Some(Ok(())),
                None => Some(Err(format!("guest {vmid} no longer exists"))),
                Some(_) if record["target"] == "destroy" => (now() - record["started"].as_i64().unwrap_or(0)
                    > TASK_TIMEOUT)
                    .then(|| Err(format!("timeout waiting for guest {vmid} to be deleted"))),
                Some(g) if record["target"] == "config" => {
                    let wanted = record["generation"].as_i64().unwrap_or(0);
                    let stalled = g
                        .status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Stalled" && c.status == ConditionStatus::True);
                    if g.status.observed_generation.unwrap_or(0) >= wanted {
                        match stalled {
                            // The agent saw the change and could not apply it (a refused shrink,
                            // a failed resize): the task ends with its reason.
                            Some(c) => Some(Err(c.message.lines().next().unwrap_or("").to_string())),
                            None => Some(Ok(())),
                        }
                    } else if now() - record["started"].as_i64().unwrap_or(0) > TASK_TIMEOUT {
                        Some(Err(format!("timeout waiting for guest {vmid} to apply its configuration")))
                    } else {
                        None
                    }
                }
                Some(g) if g.status.phase == want => Some(Ok(())),
                Some(g) => {
                    let stalled = g
                        .status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Stalled" && c.status == ConditionStatus::True);
                    match stalled {
                        Some(c) if want == GuestPhase::Running => {
                            Some(Err(c.message.lines().next().unwrap_or("").to_string()))
                        }
                        _ if now() - record["started"].as_i64().unwrap_or(0) > TASK_TIMEOUT => {
                            Some(Err(format!("timeout waiting for guest {vmid} to reach {want:?}")))
                        }
                        _ => None,
                    }
                }
            },
        };
        let Some(outcome) = outcome else { return };
        let (line, exit) = match outcome {
            Ok(()) => ("TASK OK".to_string(), "OK".to_string()),
            Err(e) => (format!("TASK ERROR: {e}"), e),
        };
        if let Some(log) = record["log"].as_array_mut() {
            log.push(json!(line));
        }
        record["exitstatus"] = json!(exit);
        record["status"] = json!("stopped");
        let _ = std::fs::write(self.path(upid), record.to_string());
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
