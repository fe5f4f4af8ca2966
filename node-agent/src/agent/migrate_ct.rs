//! The target's part of a container's restart migration (the source's part is shared with
//! VMs in [`super::migrate`]: it stops the container and sends its volumes,
//! [`super::ct::Lxc`]'s `migrate_send`).
//!
//! A watch on the containers whose `status.migration.target` is this node. A `Pending` order
//! gets a receiver for the volumes on the local pool ([`crate::lxc::transfer`]), and
//! `TargetReady` with its address and the volumes it waits for (none when the pool is
//! shared). Nothing starts here: the container runs here once the migration controller bound
//! it, and this node's ordinary reconcile starts it on the volumes received. A `Failed`
//! order takes away what was received; a `Completed` one only the receiver. A receiver does
//! not survive a restart of the agent: an order it was waiting for fails (the source starts
//! the container again).

use std::sync::Arc;

use kpve_crds::{LinuxContainer, MigrationPhase};
use kube::ResourceExt;
use serde_json::json;

use super::migrate::{INCOMING_MARKER, IncomingRun, failed, fresh_incoming_run, incoming_id, watch_incoming};
use super::{Agent, Runtime, ct::Lxc, read_checkpoint};
use crate::lxc::transfer;

/// Watches the containers coming to this node.
pub(crate) async fn incoming(agent: Arc<Agent>) -> anyhow::Result<()> {
    watch_incoming::<LinuxContainer, _, _>(
        agent,
        |agent, ct| async move { agent.receive_ct(&ct).await },
        |agent, ct, vmid, id| async move { agent.drop_incoming_ct(&ct, vmid, &id).await },
    )
    .await
}

impl Agent {
    async fn receive_ct(&self, ct: &LinuxContainer) {
        let Some(m) =
            ct.status.as_ref().and_then(|s| s.migration.as_ref()).filter(|m| m.target == self.node())
        else {
            return;
        };
        let Some(vmid) = ct.spec.vmid else { return };
        let uid = ct.uid().unwrap_or_default();
        let (ns, name) = (ct.namespace().unwrap_or_default(), ct.name_any());
        let prepared = incoming_id(&self.run_dir(vmid));
        let listening =
            self.ct_receivers.lock().expect("receivers lock").get(&uid).is_some_and(|(id, _)| *id == m.id);
        match m.phase {
            MigrationPhase::Pending if prepared.as_deref() != Some(m.id.as_str()) => {
                if let Some(old) = prepared {
                    self.drop_incoming_ct(ct, vmid, &old).await;
                }
                self.incoming
                    .lock()
                    .expect("incoming lock")
                    .insert(uid.clone(), IncomingRun { id: m.id.clone(), vmid });
                let result = self.prepare_incoming_ct(ct, vmid, &m.id).await;
                self.incoming.lock().expect("incoming lock").remove(&uid);
                let patch = match &result {
                    Ok(uri) => json!({"phase": "TargetReady", "uri": uri}),
                    Err(message) => {
                        tracing::warn!(vmid, migration = %m.id, %message, "cannot receive the container");
                        failed(&format!("target {}: {message}", self.node()))
                    }
                };
                let written = self
                    .migration_write::<LinuxContainer>(
                        &ns,
                        &name,
                        &m.id,
                        Some(MigrationPhase::Pending),
                        patch,
                        json!({}),
                    )
                    .await;
                if let Ok(uri) = &result {
                    let copy = uri.is_some();
                    tracing::info!(vmid, migration = %m.id, copy, written, "waiting for the container's volumes");
                }
                if result.is_err() || !written {
                    self.drop_incoming_ct(ct, vmid, &m.id).await;
                }
            }
            MigrationPhase::TargetReady | MigrationPhase::Migrating
                if prepared.as_deref() == Some(m.id.as_str()) && !listening && m.uri.is_some() =>
            {
                // Prepared by an earlier run of this agent: its receiver is gone.
                let message = format!(
                    "target {}: its agent restarted while waiting for the container's volumes",
                    self.node()
                );
                let patch = failed(&message);
                self.migration_write::<LinuxContainer>(&ns, &name, &m.id, Some(m.phase), patch, json!({}))
                    .await;
            }
            MigrationPhase::Completed if prepared.as_deref() == Some(m.id.as_str()) => {
                // The volumes are in place: the container is this node's once bound here.
                self.ct_receivers.lock().expect("receivers lock").remove(&uid);
                let _ = std::fs::remove_file(self.run_dir(vmid).join(INCOMING_MARKER));
            }
            MigrationPhase::Failed if prepared.as_deref() == Some(m.id.as_str()) => {
                self.drop_incoming_ct(ct, vmid, &m.id).await;
            }
            _ => {}
        }
    }

    /// A receiver for the container's volumes on this node's pool (none when the pool is
    /// shared): its address.
    async fn prepare_incoming_ct(
        &self,
        ct: &LinuxContainer,
        vmid: u32,
        id: &str,
    ) -> Result<Option<String>, String> {
        if !self.holds_lease() {
            return Err("the node does not hold its lease".into());
        }
        let run = self.run_dir(vmid);
        if Lxc::observe(self, vmid, &run).await.is_some()
            || read_checkpoint(&run).is_some_and(|cp| Some(cp.uid) != ct.uid())
        {
            return Err(format!("VMID {vmid} is in use on this node"));
        }
        if let Some(mp) =
            ct.spec.mount_points.iter().find(|mp| mp.volume.as_deref().is_some_and(|v| v.starts_with('/')))
        {
            return Err(format!("cannot migrate local bind mount point '{}'", mp.id));
        }
        let shared =
            self.pool_shared().ok_or("the pool's StoragePool has not been read yet (shared or not)")?;
        // Stale volumes are replaced as the new ones arrive.
        fresh_incoming_run(&run, id, Lxc::ENGINE)?;
        if shared {
            return Ok(None);
        }
        let pool = self.pool();
        pool.activate().map_err(|e| e.to_string())?;
        let dir = pool.path.join("images").join(vmid.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pool_id = pool.identity().map_err(|e| e.to_string())?;
        let receiver = transfer::listen(self.config.migration_address, dir, &pool_id)
            .await
            .map_err(|e| format!("listening on {}: {e}", self.config.migration_address))?;
        let uri = transfer::uri(receiver.address, &receiver.token);
        self.ct_receivers
            .lock()
            .expect("receivers lock")
            .insert(ct.uid().unwrap_or_default(), (id.to_string(), receiver));
        Ok(Some(uri))
    }

    /// Takes away what this agent received for migration `id` — unless the container is bound
    /// here now, or the server still shows that migration coming here.
    async fn drop_incoming_ct(&self, ct: &LinuxContainer, vmid: u32, id: &str) {
        let run = self.run_dir(vmid);
        if incoming_id(&run).as_deref() != Some(id) {
            return;
        }
        if self.still_incoming(ct, id).await != Some(false) {
            return;
        }
        let receiver = {
            let mut receivers = self.ct_receivers.lock().expect("receivers lock");
            match receivers.get(&ct.uid().unwrap_or_default()) {
                Some((rid, _)) if rid == id => receivers.remove(&ct.uid().unwrap_or_default()),
                _ => None,
            }
        };
        // Only what arrived for this migration (a volume at the same path that did not
        // arrive may be the source's own, in a directory both nodes use).
        let received = receiver.as_ref().map(|(_, r)| r.received()).unwrap_or_default();
        drop(receiver);
        for path in &received {
            if let Err(e) = std::fs::remove_dir_all(path) {
                tracing::warn!(vmid, path = %path.display(), error = %e, "removing a received volume failed");
            }
        }
        let _ = std::fs::remove_dir_all(&run);
        tracing::info!(
            vmid,
            migration = id,
            removed = received.len(),
            "incoming container migration abandoned"
        );
    }
}
