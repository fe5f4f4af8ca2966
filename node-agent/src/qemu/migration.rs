//! Live migration through QMP, both ends.
//!
//! - The target's QEMU runs the same command line plus `-incoming defer`: it has the devices
//!   but runs no guest code. [`listen`] exports its local disks over NBD (writable) and starts
//!   waiting for the guest's state on a TCP port.
//! - The source's [`send`] mirrors each local disk into the target's export (`drive-mirror`,
//!   which keeps copying the guest's writes once in sync), then migrates memory and devices
//!   with `pause-before-switchover`: when QEMU has paused the guest for the last round, the
//!   mirrors are finished (`block-job-cancel` on a ready mirror completes the copy and leaves the
//!   source on its own disk), then the switch-over continues. The target resumes the guest by
//!   itself once the state is in; the source's QEMU stays paused (`postmigrate`) for good.
//!
//! QEMU 9.1 removed the old `blk` block migration; this is how Proxmox VE migrates local disks.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::qmp::Qmp;

/// Where the target waits: the migration URI and the NBD server (if disks are copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub uri: String,
    pub nbd: Option<String>,
}

/// What QEMU measured for a completed migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The guest was paused for this long (QEMU's `downtime`), ms.
    pub downtime_ms: u64,
    /// From `migrate` to completion (QEMU's `total-time`), ms.
    pub total_ms: u64,
    /// RAM and device state sent, bytes.
    pub transferred: u64,
}

/// How a failed send left the source.
#[derive(Debug)]
pub struct SendError {
    pub message: String,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// How long a mirror or the migration may go without progress before it is abandoned.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// How long a whole send may take (a guest dirtying memory faster than it can be sent never
/// converges; QEMU's auto-converge throttles it meanwhile).
const SEND_LIMIT: Duration = Duration::from_secs(600);
/// The pause QEMU aims for in the final round, ms (its default is 300).
const DOWNTIME_LIMIT_MS: u64 = 30;

fn free_port(host: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(SocketAddr::new(host, 0))?.local_addr()?.port())
}

fn host_port(host: IpAddr, port: u16) -> String {
    SocketAddr::new(host, port).to_string()
}

/// The NBD export of disk `id` (QEMU names an export after its device by default).
pub fn export_name(id: &str) -> String {
    format!("drive-{id}")
}

/// On the target (QEMU started with `-incoming defer`): exports `disks` writable over NBD and
/// waits for the guest's state on a free TCP port of `host`.
pub async fn listen(qmp: &mut Qmp, host: IpAddr, disks: &[String]) -> Result<Incoming, String> {
    let mut nbd = None;
    if !disks.is_empty() {
        let port = free_port(host).map_err(|e| format!("no free port for NBD on {host}: {e}"))?;
        qmp.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "inet", "data": {"host": host.to_string(), "port": port.to_string()}}})),
        )
        .await
        .map_err(|e| e.to_string())?;
        for id in disks {
            qmp.execute("nbd-server-add", Some(json!({"device": export_name(id), "writable": true})))
                .await
                .map_err(|e| e.to_string())?;
        }
        nbd = Some(host_port(host, port));
    }
    let port = free_port(host).map_err(|e| format!("no free port for the migration on {host}: {e}"))?;
    let uri = format!("tcp:{}", host_port(host, port));
    qmp.execute("migrate-incoming", Some(json!({"uri": uri}))).await.map_err(|e| e.to_string())?;
    Ok(Incoming { uri, nbd })
}

/// On the target, once the guest runs there: the disks need no export any more.
pub async fn stop_exports(qmp: &mut Qmp) {
    let _ = qmp.execute("nbd-server-stop", None).await;
}

fn job_id(id: &str) -> String {
    format!("kpve-mirror-{id}")
}

/// On the source: copies `disks` into the target's NBD exports at `nbd`, then migrates to
/// `uri`. On success the source's QEMU is paused for good (`postmigrate`) and the guest runs on
/// the target. On failure everything is cancelled and the guest runs here as before.
pub async fn send(
    qmp: &mut Qmp,
    uri: &str,
    nbd: Option<&str>,
    disks: &[String],
) -> Result<Outcome, SendError> {
    // A migration an earlier run of the agent started (it stopped while sending).
    let prior = qmp.execute("query-migrate", None).await.ok();
    match prior.as_ref().and_then(|p| p["status"].as_str()) {
        // Sent already, right before the agent stopped: this QEMU is done.
        Some("completed") => return Ok(outcome_of(prior.as_ref().expect("some"))),
        // Past the switch-over: QEMU decides.
        Some("device") => {
            return settle(qmp)
                .await
                .ok_or_else(|| SendError { message: "the interrupted migration failed".into() });
        }
        // Before it: undo it (a guest paused before the switch-over was running) and report.
        Some("setup" | "active" | "pre-switchover" | "cancelling") => {
            abort(qmp, disks, true).await;
            return Err(SendError {
                message: "the agent stopped while sending; the migration was cancelled".into(),
            });
        }
        _ => {}
    }
    if qmp.query_status().await.is_ok_and(|s| s == "postmigrate") {
        return Err(SendError {
            message: "the source QEMU already handed the guest over (postmigrate)".into(),
        });
    }
    let was_running = qmp.query_status().await.is_ok_and(|s| s == "running");
    let mut switching = false;
    match send_inner(qmp, uri, nbd, disks, &mut switching).await {
        Ok(outcome) => Ok(outcome),
        Err(message) => {
            // The migration may have completed after all (an error reading its status): then
            // the target runs the guest and this QEMU must never run again.
            if let Ok(done) = qmp.execute("query-migrate", None).await
                && done["status"] == "completed"
            {
                return Ok(outcome_of(&done));
            }
            if switching {
                // Past the switch-over QEMU decides alone: cancelling or resuming here could
                // run the guest on both nodes. Wait for its verdict.
                return match settle(qmp).await {
                    Some(done) => Ok(done),
                    None => Err(SendError { message }),
                };
            }
            abort(qmp, disks, was_running).await;
            Err(SendError { message })
        }
    }
}

/// After the switch-over began: waits for QEMU's own end of the migration (completed: the
/// outcome; failed: None, and QEMU resumed the guest here itself if it could).
async fn settle(qmp: &mut Qmp) -> Option<Outcome> {
    let deadline = Instant::now() + STALL_LIMIT;
    while Instant::now() < deadline {
        match qmp.execute("query-migrate", None).await {
            Ok(state) if state["status"] == "completed" => return Some(outcome_of(&state)),
            Ok(state) if state["status"] == "failed" || state["status"] == "cancelled" => return None,
            Ok(_) => {}
            Err(_) => return None,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

async fn send_inner(
    qmp: &mut Qmp,
    uri: &str,
    nbd: Option<&str>,
    disks: &[String],
    switching: &mut bool,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let qmp_err = |e: super::qmp::QmpError| e.to_string();
    if !disks.is_empty() {
        let nbd = nbd.ok_or("local disks to copy, but the target exports none")?;
        for id in disks {
            let target = format!("nbd://{nbd}/{}", export_name(id));
            qmp.execute(
                "drive-mirror",
                Some(json!({
                    "device": format!("drive-{id}"), "job-id": job_id(id), "target": target,
                    "sync": "full", "mode": "existing", "format": "raw",
                })),
            )
            .await
            .map_err(|e| format!("copying disk {id}: {e}"))?;
        }
        wait_mirrors_ready(qmp, disks).await?;
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": !disks.is_empty()},
            // The source calls it done only once the target loaded the state.
            {"capability": "return-path", "state": true},
            {"capability": "auto-converge", "state": true},
        ]})),
    )
    .await
    .map_err(qmp_err)?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": 8u64 << 30})),
    )
    .await
    .map_err(qmp_err)?;
    qmp.execute("migrate", Some(json!({"uri": uri}))).await.map_err(qmp_err)?;
    let mut last_progress = (Instant::now(), 0u64);
    loop {
        let state = qmp.execute("query-migrate", None).await.map_err(qmp_err)?;
        match state["status"].as_str().unwrap_or("") {
            "completed" => return Ok(outcome_of(&state)),
            "failed" | "cancelled" => {
                return Err(format!(
                    "migration {}: {}",
                    state["status"].as_str().unwrap_or(""),
                    state["error-desc"].as_str().unwrap_or("QEMU gave no reason")
                ));
            }
            "pre-switchover" if !*switching => {
                // The guest is paused: finish the disk copies, then switch over.
                for id in disks {
                    qmp.execute("block-job-cancel", Some(json!({"device": job_id(id)})))
                        .await
                        .map_err(|e| format!("finishing the copy of disk {id}: {e}"))?;
                }
                wait_mirrors_gone(qmp, disks).await?;
                *switching = true;
                qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
                    .await
                    .map_err(qmp_err)?;
            }
            // The target may be loading the state from here on.
            "device" => *switching = true,
            _ if *switching => {}
            _ => {
                let sent = state.pointer("/ram/transferred").and_then(Value::as_u64).unwrap_or(0);
                if started.elapsed() > SEND_LIMIT {
                    return Err(format!("migration did not finish within {}s", SEND_LIMIT.as_secs()));
                }
                if sent > last_progress.1 {
                    last_progress = (Instant::now(), sent);
                } else if last_progress.0.elapsed() > STALL_LIMIT {
                    return Err(format!("migration made no progress for {}s", STALL_LIMIT.as_secs()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn outcome_of(state: &Value) -> Outcome {
    Outcome {
        downtime_ms: state["downtime"].as_u64().unwrap_or(0),
        total_ms: state["total-time"].as_u64().unwrap_or(0),
        transferred: state.pointer("/ram/transferred").and_then(Value::as_u64).unwrap_or(0),
    }
}

async fn mirror_jobs(qmp: &mut Qmp, disks: &[String]) -> Result<Vec<Value>, String> {
    let jobs = qmp.execute("query-block-jobs", None).await.map_err(|e| e.to_string())?;
    let ours: Vec<String> = disks.iter().map(|d| job_id(d)).collect();
    Ok(jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["device"].as_str().is_some_and(|d| ours.iter().any(|o| o == d)))
        .cloned()
        .collect())
}

/// Waits until every mirror copied the whole disk and keeps up with the guest's writes.
async fn wait_mirrors_ready(qmp: &mut Qmp, disks: &[String]) -> Result<(), String> {
    let mut last_progress = (Instant::now(), 0u64);
    loop {
        let jobs = mirror_jobs(qmp, disks).await?;
        if jobs.len() < disks.len() {
            // A mirror that ended before it was ready failed (BLOCK_JOB_COMPLETED with an error).
            let why = qmp
                .take_events()
                .into_iter()
                .filter(|e| e["event"] == "BLOCK_JOB_COMPLETED" || e["event"] == "BLOCK_JOB_ERROR")
                .filter_map(|e| e.pointer("/data/error").and_then(Value::as_str).map(str::to_string))
                .next()
                .unwrap_or_else(|| "the copy ended early".into());
            return Err(format!("copying disks: {why}"));
        }
        if let Some(bad) = jobs.iter().find(|j| j["io-status"].as_str().is_some_and(|s| s != "ok")) {
            return Err(format!("copying disks: {} has i/o status {}", bad["device"], bad["io-status"]));
        }
        if jobs.iter().all(|j| j["ready"] == true) {
            return Ok(());
        }
        let done: u64 = jobs.iter().filter_map(|j| j["offset"].as_u64()).sum();
        if done > last_progress.1 {
            last_progress = (Instant::now(), done);
        } else if last_progress.0.elapsed() > STALL_LIMIT {
            return Err(format!("copying disks made no progress for {}s", STALL_LIMIT.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the finished mirrors are gone, and checks they ended without an error (a copy
/// that failed at the end must not be switched over to).
async fn wait_mirrors_gone(qmp: &mut Qmp, disks: &[String]) -> Result<(), String> {
    let deadline = Instant::now() + STALL_LIMIT;
    while !mirror_jobs(qmp, disks).await?.is_empty() {
        if Instant::now() > deadline {
            return Err("the disk copies did not finish".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ours: Vec<String> = disks.iter().map(|d| job_id(d)).collect();
    for event in qmp.take_events() {
        let name = event["event"].as_str().unwrap_or("");
        let device = event.pointer("/data/device").and_then(Value::as_str).unwrap_or("");
        if !ours.iter().any(|o| o == device) {
            continue;
        }
        if name == "BLOCK_JOB_ERROR" {
            return Err(format!("copying disks: i/o error on {device}"));
        }
        if name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED" {
            let data = &event["data"];
            if let Some(error) = data["error"].as_str() {
                return Err(format!("copying disks: {device}: {error}"));
            }
            if data["offset"].as_u64() != data["len"].as_u64() {
                return Err(format!(
                    "copying disks: {device} ended at {} of {} bytes",
                    data["offset"], data["len"]
                ));
            }
        }
    }
    Ok(())
}

/// Undoes a send that failed: no migration, no mirrors, the guest running as before.
async fn abort(qmp: &mut Qmp, disks: &[String], was_running: bool) {
    let _ = qmp.execute("migrate_cancel", None).await;
    for id in disks {
        let _ = qmp.execute("block-job-cancel", Some(json!({"device": job_id(id), "force": true}))).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while mirror_jobs(qmp, disks).await.is_ok_and(|j| !j.is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Cancelling in pre-switchover can leave the guest paused. Only resume a guest whose
    // migration QEMU says is over without success.
    let status = qmp.query_status().await.unwrap_or_default();
    let over = qmp
        .execute("query-migrate", None)
        .await
        .is_ok_and(|m| matches!(m["status"].as_str(), Some("failed" | "cancelled") | None));
    if was_running && status == "paused" && over {
        let _ = qmp.cont().await;
    }
}
