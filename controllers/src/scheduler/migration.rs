//! The migration controller: the cluster's part of a migration — a VM's live migration, a
//! container's restart migration (the protocol is on [`kpve_crds::Migration`]; the agents do
//! the moving).
//!
//! - **Orders** one when a running guest's placement no longer allows its node (someone
//!   changed `spec.placement`): the target is the node the scheduler would pick now.
//! - **Binds** the guest to the target once the source reports `Completed` — agents never
//!   write `status.node`.
//! - **Times out** an order neither end took up.
//!
//! HA-managed guests are the CRM's: it orders their moves (through the source's LRM).
//! Every write is a merge patch carrying the resourceVersion the decision was made on.

use std::sync::Arc;
use std::time::Duration;

use kpve_crds::kube::ResourceExt;
use kpve_crds::kube::api::{Api, Patch, PatchParams};
use kpve_crds::{HaState, Migration, MigrationPhase, PowerState};
use serde_json::json;

use super::{Context, disallowed, place};
use crate::guest_kind::GuestKind;

/// Field manager of the migration controller's writes.
pub const FIELD_MANAGER: &str = "kpve-migration";
const TICK: Duration = Duration::from_millis(200);
/// An order still Pending or TargetReady after this long is given up.
const ORDER_TIMEOUT: Duration = Duration::from_secs(60);
/// After a failed migration, the placement is retried this much later.
const RETRY_AFTER: Duration = Duration::from_secs(30);

fn age(time: Option<&str>) -> Option<Duration> {
    let t = time?.parse::<jiff::Timestamp>().ok()?;
    let ms = jiff::Timestamp::now().as_millisecond() - t.as_millisecond();
    Some(Duration::from_millis(ms.max(0) as u64))
}

fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Millisecond).expect("in range").to_string()
}

pub(super) async fn run(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ctx.wait_for_caches().await.is_err() {
            continue;
        }
        for vm in ctx.vms.store.state() {
            if let Err(e) = step(&ctx, &*vm).await {
                tracing::debug!(vm = %vm.name_any(), error = %e, "migration write failed (retried)");
            }
        }
        for ct in ctx.cts.store.state() {
            if let Err(e) = step(&ctx, &*ct).await {
                tracing::debug!(ct = %ct.name_any(), error = %e, "migration write failed (retried)");
            }
        }
    }
}

async fn write<K: GuestKind>(
    ctx: &Context,
    guest: &K,
    status: serde_json::Value,
) -> Result<(), kpve_crds::kube::Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &guest.namespace().unwrap_or_default());
    let body = json!({"metadata": {"resourceVersion": guest.resource_version()}, "status": status});
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
    api.patch_status(&guest.name_any(), &params, &Patch::Merge(&body)).await.map(|_| ())
}

async fn step<K: GuestKind>(ctx: &Context, guest: &K) -> Result<(), kpve_crds::kube::Error> {
    if guest.meta().deletion_timestamp.is_some() {
        return Ok(());
    }
    let Some(node) = guest.node() else { return Ok(()) };
    let status = guest.guest_status().cloned().unwrap_or_default();
    if let Some(m) = &status.migration {
        match m.phase {
            // An HA move ("ha-<id>") is bound by the CRM once the LRM acknowledged it.
            MigrationPhase::Completed if node == m.source && !m.id.starts_with("ha-") => {
                write(ctx, guest, json!({"node": m.target})).await?;
                tracing::info!(guest = %guest.name_any(), from = %m.source, to = %m.target, downtime_ms = ?m.downtime_ms, "migrated");
                return Ok(());
            }
            MigrationPhase::Pending | MigrationPhase::TargetReady
                if age(m.started.as_deref()).is_some_and(|a| a > ORDER_TIMEOUT) =>
            {
                let message = match m.phase {
                    MigrationPhase::Pending => format!("target {} did not get ready", m.target),
                    _ => format!("source {} did not start sending", m.source),
                };
                let message = format!("{message} within {}s", ORDER_TIMEOUT.as_secs());
                write(
                    ctx,
                    guest,
                    json!({"migration": {"phase": "Failed", "finished": now(), "message": message}}),
                )
                .await?;
                return Ok(());
            }
            phase if !phase.is_final() => return Ok(()),
            MigrationPhase::Failed if age(m.finished.as_deref()).is_none_or(|a| a < RETRY_AFTER) => {
                return Ok(());
            }
            _ => {}
        }
    }
    // A placement change moves a running guest.
    let spec = guest.guest_spec();
    if spec.ha().is_some_and(|h| h.state != HaState::Ignored)
        || spec.power_state() == PowerState::Stopped
        || status.phase != kpve_crds::GuestPhase::Running
    {
        return Ok(());
    }
    let target = {
        let mut assumed = ctx.assumed.lock().expect("assume cache lock poisoned");
        let views = ctx.node_views(&mut assumed);
        let Some(here) = views.iter().find(|v| v.name == node) else { return Ok(()) };
        if disallowed(spec.placement(), here).is_none() {
            return Ok(());
        }
        let others: Vec<_> = views.iter().filter(|v| v.name != node).cloned().collect();
        match place(&guest.demand(), &others) {
            Ok(target) => target,
            Err(why) => {
                tracing::debug!(guest = %guest.name_any(), %why, "placement excludes the node, but no node can take the guest");
                return Ok(());
            }
        }
    };
    let order = Migration {
        id: format!("m-{}", jiff::Timestamp::now().as_millisecond()),
        source: node.to_string(),
        target: target.clone(),
        phase: MigrationPhase::Pending,
        requested_by: Some("placement".into()),
        started: Some(now()),
        ..Migration::default()
    };
    write(ctx, guest, json!({"migration": order.to_merge_value()})).await?;
    tracing::info!(guest = %guest.name_any(), from = node, to = %target, "placement changed: migration ordered");
    Ok(())
}
