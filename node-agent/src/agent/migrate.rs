//! Live migration, the agents' part (the protocol is described on
//! [`kpve_crds::Migration`]; the QMP side is [`crate::qemu::migration`]).
//!
//! - **Target** ([`incoming`]): a watch on the VMs whose `status.migration.target` is this
//!   node. A `Pending` order gets volumes (local disks freshly allocated), a QEMU started
//!   with `-incoming defer` in the guest's run directory (checkpointed like any start, HA
//!   marked, so fencing covers it), NBD exports and a migration port: `TargetReady`. A
//!   `Failed` order takes all of it away again; a `Completed` one only stops the exports.
//! - **Source** ([`Agent::migration_hold`], first thing in the guest's reconcile): while a
//!   migration of the guest is under way, its reconcile does nothing else. On `TargetReady`
//!   it sends the guest (holding the guest's reconcile slot throughout) and writes
//!   `Completed` (with QEMU's downtime) or `Failed`. A `Completed` guest is left alone until
//!   the migration controller binds it to the target; the source then lets it go, freeing the
//!   copied local disks.
//!
//! Every write is a merge patch carrying the resourceVersion of a fresh read that showed the
//! same migration id, so a writer never acts on an order that changed under it.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use kpve_crds::common::GuestObject;
use kpve_crds::{Migration, MigrationPhase, VirtualMachine};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::vm::{self, Qemu};
use super::{Agent, Incoming, Runtime, read_checkpoint};
use crate::qemu::argv::LaunchPaths;
use crate::qemu::migration;

/// Marks a run directory whose guest went to another node (its disks there are stale copies):
/// the migration's id and outcome, so the `Completed` record can be written again.
const MIGRATED_MARKER: &str = "migrated";
/// Marks a run directory prepared to receive a guest: the migration's id.
pub(super) const INCOMING_MARKER: &str = "incoming";

/// What a source keeps of a migration it completed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Handed {
    id: String,
    target: String,
    downtime_ms: u64,
    total_ms: u64,
    transferred: u64,
    /// The CRM's move this was (acknowledged as `haLrm.stoppedFor`).
    ha: Option<u64>,
}

fn read_handed(run: &Path) -> Option<Handed> {
    serde_json::from_slice(&std::fs::read(run.join(MIGRATED_MARKER)).ok()?).ok()
}

pub(super) fn incoming_id(run: &Path) -> Option<String> {
    std::fs::read_to_string(run.join(INCOMING_MARKER)).ok()
}

/// An incoming migration this agent prepared.
#[derive(Debug, Clone)]
pub(crate) struct IncomingRun {
    pub id: String,
    pub vmid: u32,
}

/// The patch that fails a migration, saying why.
pub(super) fn failed(message: &str) -> Value {
    json!({"phase": "Failed", "finished": now(), "message": message})
}

/// Makes `run` a fresh run directory of an incoming guest of `engine`, marked with migration
/// `id`: nothing of an earlier stay of the guest on this node counts.
pub(super) fn fresh_incoming_run(run: &Path, id: &str, engine: &str) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(run);
    std::fs::create_dir_all(run)
        .and_then(|()| std::fs::write(run.join("engine"), engine))
        .and_then(|()| std::fs::write(run.join(INCOMING_MARKER), id))
        .map_err(|e| format!("{}: {e}", run.display()))
}

pub(super) fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Millisecond).expect("in range").to_string()
}

impl Agent {
    fn migration_params(&self) -> PatchParams {
        PatchParams {
            field_manager: Some(format!("kpve-migration-{}", self.node())),
            ..PatchParams::default()
        }
    }

    /// Writes `patch` into `status.migration` (and `extra` into `status`) of the guest, if a
    /// fresh read still shows migration `id` (in phase `from`, when given). Whether it was
    /// written.
    pub(crate) async fn migration_write<K: GuestObject>(
        &self,
        namespace: &str,
        name: &str,
        id: &str,
        from: Option<MigrationPhase>,
        patch: Value,
        extra: Value,
    ) -> bool {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        for _ in 0..10 {
            let Ok(Some(fresh)) = api.get_opt(name).await else { return false };
            let current = fresh.guest_status().and_then(|s| s.migration.clone());
            let Some(current) = current.filter(|m| m.id == id) else { return false };
            if from.is_some_and(|f| current.phase != f) {
                return false;
            }
            let mut status = extra.clone();
            status["migration"] = patch.clone();
            let body = json!({"metadata": {"resourceVersion": fresh.resource_version()}, "status": status});
            match api.patch_status(name, &self.migration_params(), &Patch::Merge(&body)).await {
                Ok(_) => return true,
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => {
                    tracing::warn!(guest = name, migration = id, error = %e, "migration status not written");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
        false
    }

    /// The source's part of a migration of this guest, if one is under way (Some: the
    /// reconcile ends here).
    pub(crate) async fn migration_hold<R: Runtime>(
        &self,
        guest: &R::Guest,
        vmid: u32,
        run: &Path,
    ) -> Option<anyhow::Result<()>> {
        // The guest left this node (whatever the record says now): nothing here runs it again;
        // the record of the hand-over is written until it stands.
        if let Some(handed) = read_handed(run) {
            if R::observe(self, vmid, run).await.is_some() {
                R::stop(self, vmid, run, std::time::Duration::ZERO).await;
            }
            let current = guest.guest_status().and_then(|s| s.migration.as_ref());
            if current.is_some_and(|m| m.id == handed.id && m.phase != MigrationPhase::Completed) {
                self.record_completed::<R>(guest, &handed).await;
            }
            return Some(Ok(()));
        }
        let status = guest.guest_status()?;
        let m = status.migration.as_ref()?;
        if m.source != self.node() || status.node.as_deref() != Some(self.node()) {
            return None;
        }
        let uid = guest.uid().unwrap_or_default();
        // A send this agent recorded as failed (the watch may lag its own writes); a completed
        // one left its marker, looked at above.
        let failed = self.failed_sends.lock().expect("failed sends lock").get(&uid) == Some(&m.id);
        match if failed { MigrationPhase::Failed } else { m.phase } {
            MigrationPhase::Failed => None,
            // Completed by another run of this agent that left no marker: nothing to run here.
            MigrationPhase::Completed => Some(Ok(())),
            MigrationPhase::Pending => {
                // A container moves stopped or running (it is stopped for the copy).
                if R::LIVE_MIGRATION && R::observe(self, vmid, run).await.is_none() {
                    let message = format!(
                        "the guest is not running on {}: only a running guest migrates live",
                        self.node()
                    );
                    self.fail_migration::<R>(guest, m, &message).await;
                }
                // Running: wait for the target.
                Some(Ok(()))
            }
            MigrationPhase::TargetReady => Some(self.send_guest::<R>(guest, vmid, run, m).await),
            MigrationPhase::Migrating => {
                // This agent was sending it when it stopped (a send holds the reconcile slot
                // until it has written the outcome). QEMU knows how that ended.
                Some(self.send_guest::<R>(guest, vmid, run, m).await)
            }
        }
    }

    /// Orders a live migration of a guest bound here (an HA move).
    pub(crate) async fn order_migration<R: Runtime>(
        &self,
        guest: &R::Guest,
        id: &str,
        target: &str,
        by: &str,
    ) {
        let order = Migration {
            id: id.to_string(),
            source: self.node().to_string(),
            target: target.to_string(),
            phase: MigrationPhase::Pending,
            requested_by: Some(by.to_string()),
            started: Some(now()),
            ..Migration::default()
        };
        let body = json!({
            "metadata": {"resourceVersion": guest.resource_version()},
            "status": {"migration": order.to_merge_value()},
        });
        let api: Api<R::Guest> = Api::namespaced(self.client.clone(), &guest.namespace().unwrap_or_default());
        match api.patch_status(&guest.name_any(), &self.migration_params(), &Patch::Merge(&body)).await {
            Ok(_) => {
                tracing::info!(vmid = ?guest.guest_spec().vmid(), migration = id, target, "live migration ordered")
            }
            Err(e) => tracing::debug!(error = %e, "migration order not written (retried next pass)"),
        }
    }

    async fn fail_migration<R: Runtime>(&self, guest: &R::Guest, m: &Migration, message: &str) {
        tracing::warn!(vmid = ?guest.guest_spec().vmid(), migration = %m.id, message, "migration failed");
        let patch = failed(message);
        let ns = guest.namespace().unwrap_or_default();
        if self.migration_write::<R::Guest>(&ns, &guest.name_any(), &m.id, None, patch, json!({})).await {
            self.failed_sends
                .lock()
                .expect("failed sends lock")
                .insert(guest.uid().unwrap_or_default(), m.id.clone());
        }
    }

    /// Sends the guest to the target that said it is ready, and records the outcome.
    async fn send_guest<R: Runtime>(
        &self,
        guest: &R::Guest,
        vmid: u32,
        run: &Path,
        m: &Migration,
    ) -> anyhow::Result<()> {
        let ns = guest.namespace().unwrap_or_default();
        let name = guest.name_any();
        if m.phase == MigrationPhase::TargetReady {
            let claim = json!({"phase": "Migrating"});
            if !self
                .migration_write::<R::Guest>(
                    &ns,
                    &name,
                    &m.id,
                    Some(MigrationPhase::TargetReady),
                    claim,
                    json!({}),
                )
                .await
            {
                return Ok(());
            }
        }
        if R::LIVE_MIGRATION && R::observe(self, vmid, run).await.is_none() {
            self.fail_migration::<R>(guest, m, "the guest stopped before it could be sent").await;
            return Ok(());
        }
        tracing::info!(vmid, migration = %m.id, target = %m.target, disks = ?m.disks, "sending the guest");
        match R::migrate_send(self, guest, vmid, run, m).await {
            Ok(outcome) => {
                // From here on the target runs the guest: remember it on disk first.
                let handed = Handed {
                    id: m.id.clone(),
                    target: m.target.clone(),
                    downtime_ms: outcome.downtime_ms,
                    total_ms: outcome.total_ms,
                    transferred: outcome.transferred,
                    ha: m.id.strip_prefix("ha-").and_then(|i| i.parse::<u64>().ok()),
                };
                std::fs::write(run.join(MIGRATED_MARKER), serde_json::to_vec(&handed)?)?;
                let written = self.record_completed::<R>(guest, &handed).await;
                tracing::info!(
                    vmid, migration = %m.id, target = %m.target, downtime_ms = outcome.downtime_ms,
                    total_ms = outcome.total_ms, recorded = written, "guest migrated"
                );
                R::stop(self, vmid, run, std::time::Duration::ZERO).await;
            }
            Err(message) => self.fail_migration::<R>(guest, m, &message).await,
        }
        Ok(())
    }

    /// Writes the `Completed` record of a hand-over (retrying a while; the reconcile writes
    /// it again while it does not stand). Whether it was written.
    async fn record_completed<R: Runtime>(&self, guest: &R::Guest, handed: &Handed) -> bool {
        let (ns, name) = (guest.namespace().unwrap_or_default(), guest.name_any());
        // The receiver's address (a container's carries its token) is no use any more.
        let patch = json!({
            "phase": "Completed", "finished": now(), "uri": null,
            "downtimeMs": handed.downtime_ms, "totalMs": handed.total_ms,
            "transferredBytes": handed.transferred,
            "message": format!("running on {} after {} ms of downtime", handed.target, handed.downtime_ms),
        });
        // A guest that moved stopped (a container) shows stopped until the target started it.
        let mut extra = if R::LIVE_MIGRATION { json!({}) } else { json!({"phase": "Stopped"}) };
        // An HA move: the LRM's acknowledgement lets the CRM rebind the guest.
        if let Some(ha_id) = handed.ha {
            let uid = guest.uid().unwrap_or_default();
            let mut reports = self.lrm_reports.lock().expect("lrm reports lock");
            let stored =
                guest.guest_status().and_then(|s| s.ha_lrm.as_ref()).map(kpve_ha::crm::LrmReport::from);
            let report = reports.entry(uid).or_insert_with(|| {
                stored.unwrap_or_else(|| kpve_ha::crm::LrmReport {
                    node: self.node().to_string(),
                    ..Default::default()
                })
            });
            report.stopped_for = Some(ha_id);
            extra["haLrm"] = serde_json::to_value(kpve_crds::HaLrmStatus::from(&*report)).unwrap_or_default();
        }
        for attempt in 0..10u64 {
            if self
                .migration_write::<R::Guest>(&ns, &name, &handed.id, None, patch.clone(), extra.clone())
                .await
            {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 * (attempt + 1))).await;
        }
        false
    }

    /// Whether a run directory belongs to a guest that migrated away (its local disks here
    /// are stale copies).
    pub(crate) fn migrated_away(run: &Path) -> bool {
        run.join(MIGRATED_MARKER).exists()
    }

    /// Whether `vmid` is a migration this agent is receiving or preparing to (its run
    /// directory is not an orphan).
    pub(crate) fn receiving(&self, vmid: u32) -> bool {
        self.incoming.lock().expect("incoming lock").values().any(|i| i.vmid == vmid)
            || incoming_id(&self.run_dir(vmid)).is_some()
    }
}

/// The target's side: watches the VMs coming to this node.
pub(crate) async fn incoming(agent: Arc<Agent>) -> anyhow::Result<()> {
    watch_incoming::<VirtualMachine, _, _>(
        agent,
        |agent, vm| async move { agent.receive(&vm).await },
        |agent, vm, vmid, id| async move { agent.drop_incoming(&vm, vmid, &id).await },
    )
    .await
}

/// Watches the guests of kind `K` coming to this node: `apply` sees each change, `dropped`
/// those no longer coming (ordered elsewhere, or deleted) with their vmid and migration id.
pub(super) async fn watch_incoming<K, A, D>(
    agent: Arc<Agent>,
    apply: impl Fn(Arc<Agent>, K) -> A,
    dropped: impl Fn(Arc<Agent>, K, u32, String) -> D,
) -> anyhow::Result<()>
where
    K: GuestObject + 'static,
    A: std::future::Future<Output = ()>,
    D: std::future::Future<Output = ()>,
{
    let api: Api<K> = Api::all(agent.client.clone());
    let selector = format!("status.migration.target={}", agent.node());
    let mut stream = watcher(api, watcher::Config::default().fields(&selector)).boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(g) | watcher::Event::InitApply(g)) => apply(agent.clone(), g).await,
            Ok(watcher::Event::Delete(g)) => {
                let vmid = g.guest_spec().vmid();
                let id = g.guest_status().and_then(|s| s.migration.as_ref()).map(|m| m.id.clone());
                if let (Some(vmid), Some(id)) = (vmid, id) {
                    dropped(agent.clone(), g, vmid, id).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "incoming migration watch error")
            }
        }
    }
    anyhow::bail!("incoming migration watch ended")
}

impl Agent {
    /// Whether what this node prepared for migration `id` of `guest` is still wanted: the
    /// guest is bound here now, or the server still shows that migration coming here. None
    /// when the server cannot say.
    pub(super) async fn still_incoming<K: GuestObject>(&self, guest: &K, id: &str) -> Option<bool> {
        let api: Api<K> = Api::namespaced(self.client.clone(), &guest.namespace().unwrap_or_default());
        match api.get_opt(&guest.name_any()).await {
            Ok(Some(fresh)) if fresh.uid() == guest.uid() => {
                let status = fresh.guest_status().cloned().unwrap_or_default();
                Some(
                    status.node.as_deref() == Some(self.node())
                        || status.migration.is_some_and(|m| {
                            m.id == id && m.target == self.node() && m.phase != MigrationPhase::Failed
                        }),
                )
            }
            Ok(_) => Some(false),
            Err(_) => None,
        }
    }

    async fn receive(&self, vm: &VirtualMachine) {
        let Some(status) = vm.status.as_ref() else { return };
        let Some(m) = status.migration.as_ref().filter(|m| m.target == self.node()) else { return };
        let Some(vmid) = vm.spec.vmid else { return };
        let uid = vm.uid().unwrap_or_default();
        let run = self.run_dir(vmid);
        let prepared = incoming_id(&run);
        let preparing = self.incoming.lock().expect("incoming lock").get(&uid).is_some_and(|i| i.id == m.id);
        match m.phase {
            MigrationPhase::Pending if !preparing && prepared.as_deref() != Some(m.id.as_str()) => {
                if let Some(old) = prepared {
                    self.drop_incoming(vm, vmid, &old).await;
                }
                let ns = vm.namespace().unwrap_or_default();
                let name = vm.name_any();
                self.incoming
                    .lock()
                    .expect("incoming lock")
                    .insert(uid.clone(), IncomingRun { id: m.id.clone(), vmid });
                let result = self.prepare_incoming(vm, vmid, &m.id).await;
                self.incoming.lock().expect("incoming lock").remove(&uid);
                match result {
                    Ok((ready, disks)) => {
                        let patch = json!({"phase": "TargetReady", "uri": ready.uri, "nbd": ready.nbd, "disks": disks});
                        let written = self
                            .migration_write::<VirtualMachine>(
                                &ns,
                                &name,
                                &m.id,
                                Some(MigrationPhase::Pending),
                                patch,
                                json!({}),
                            )
                            .await;
                        tracing::info!(vmid, migration = %m.id, uri = %ready.uri, written, "waiting for the incoming guest");
                        if !written {
                            self.drop_incoming(vm, vmid, &m.id).await;
                        }
                    }
                    Err(message) => {
                        tracing::warn!(vmid, migration = %m.id, %message, "cannot receive the guest");
                        self.drop_incoming(vm, vmid, &m.id).await;
                        let patch = failed(&format!("target {}: {message}", self.node()));
                        self.migration_write::<VirtualMachine>(&ns, &name, &m.id, None, patch, json!({}))
                            .await;
                    }
                }
            }
            MigrationPhase::Completed if prepared.as_deref() == Some(m.id.as_str()) => {
                // The guest runs here: the disks need no export, and the run directory is the
                // guest's own now.
                if let Some(mut q) = vm::qmp(&LaunchPaths::new(&run)).await {
                    migration::stop_exports(&mut q).await;
                }
                let _ = std::fs::remove_file(run.join(INCOMING_MARKER));
            }
            MigrationPhase::Failed if prepared.as_deref() == Some(m.id.as_str()) => {
                self.drop_incoming(vm, vmid, &m.id).await;
            }
            _ => {}
        }
    }

    /// Volumes, a waiting QEMU and its exports for an incoming guest: where it can be sent,
    /// and which disks are to be copied.
    async fn prepare_incoming(
        &self,
        vm: &VirtualMachine,
        vmid: u32,
        id: &str,
    ) -> Result<(migration::Incoming, Vec<String>), String> {
        if !self.holds_lease() {
            return Err("the node does not hold its lease".into());
        }
        let run = self.run_dir(vmid);
        if vm::running_pid(&LaunchPaths::new(&run), vmid).is_some() {
            return Err(format!("VMID {vmid} already runs here"));
        }
        let shared =
            self.pool_shared().ok_or("the pool's StoragePool has not been read yet (shared or not)")?;
        let status = vm.status.clone().unwrap_or_default();
        if !shared && (!vm.spec.snapshots.is_empty() || !status.snapshots.is_empty()) {
            return Err("the guest has snapshots: internal snapshots of local disks do not migrate".into());
        }
        // A fresh start: nothing of an earlier stay of this guest here counts.
        fresh_incoming_run(&run, id, Qemu::ENGINE)?;
        if !shared {
            // Disks held by a QEMU on this host are not stale copies: the pool is shared with
            // the source after all (the same directory), and copying would clobber them.
            let held = crate::storage::guest_images_in_use(&self.pool(), vmid).await;
            if let Some(path) = held.first() {
                return Err(format!(
                    "{} is in use on this host: is pool {:?} shared with the source? Declare it spec.shared: true",
                    path.display(),
                    self.pool().name
                ));
            }
            if let Err(e) = self.pool().free_guest(vmid) {
                return Err(format!("removing stale copies of the disks: {e}"));
            }
            self.forget_guest_images(vmid);
        }
        // A rollback the source applied stays applied.
        if let (Some(r), Some(applied)) = (&vm.spec.rollback, &status.rollback)
            && r.id == *applied
        {
            std::fs::create_dir_all(&run)
                .and_then(|()| std::fs::write(run.join("rollback"), applied))
                .map_err(|e| e.to_string())?;
        }
        let prepared = Qemu::prepare(self, vm, vmid, &run).await.map_err(|s| s.message)?;
        let disks: Vec<String> = if shared {
            Vec::new()
        } else {
            vm.spec
                .disks
                .iter()
                .filter(|d| !d.is_media() && prepared.plan.disks.iter().any(|r| r.id == d.id))
                .map(|d| d.id.clone())
                .collect()
        };
        let started_at = crate::host::unix_now().saturating_sub(status.uptime.unwrap_or(0));
        // The restart annotation in force goes along: it is no new restart on this node.
        let restart_token = vm.annotations().get(super::RESTART_ANNOTATION).cloned();
        self.start::<Qemu>(vm, vmid, &run, &prepared, restart_token, Some(Incoming { started_at }))
            .await
            .map_err(|e| format!("QEMU did not start: {e:#}"))?;
        let mut q =
            vm::qmp(&LaunchPaths::new(&run)).await.ok_or("QMP of the waiting QEMU is not answering")?;
        let ready = migration::listen(&mut q, self.config.migration_address, &disks).await?;
        Ok((ready, disks))
    }

    /// Takes away what this agent prepared to receive migration `id` — unless the guest is
    /// bound here now, or the server still shows that migration coming here.
    async fn drop_incoming(&self, vm: &VirtualMachine, vmid: u32, id: &str) {
        let run = self.run_dir(vmid);
        if incoming_id(&run).as_deref() != Some(id) {
            return;
        }
        // Cannot tell: leave it (a restarted agent sorts run directories out).
        let Some(keep) = self.still_incoming(vm, id).await else { return };
        // Only what this agent started for the guest (its checkpoint names it).
        if keep || read_checkpoint(&run).is_some_and(|cp| Some(cp.uid) != vm.uid()) {
            return;
        }
        Qemu::stop(self, vmid, &run, std::time::Duration::ZERO).await;
        // Copies nothing else holds (a disk still in use is the source's, in a directory the
        // two nodes share).
        let held = crate::storage::guest_images_in_use(&self.pool(), vmid).await;
        if self.pool_shared() == Some(false)
            && held.is_empty()
            && let Err(e) = self.pool().free_guest(vmid)
        {
            tracing::warn!(vmid, error = %e, "freeing the copies of an incoming guest failed");
        }
        let _ = std::fs::remove_dir_all(&run);
        tracing::info!(vmid, copies_freed = held.is_empty(), "incoming migration abandoned: QEMU stopped");
    }
}
