//! The guest controller: owns the `kpve.io/guest` finalizer of every VM and container, so a
//! deleted guest stays (Terminating) until the agent of its node has released the host
//! resources (QEMU or the container stopped, volumes freed) and says so with `Released=True`.
//! A guest that was never scheduled has nothing on any host and goes at once.

use std::sync::Arc;
use std::time::Duration;

use kpve_crds::kube::api::Api;
use kpve_crds::kube::runtime::controller::{Action, Controller};
use kpve_crds::kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kpve_crds::kube::runtime::watcher;
use kpve_crds::kube::{Client, ResourceExt};
use kpve_crds::{ConditionStatus, LinuxContainer, VirtualMachine, condition_type, find_condition};

use crate::drain;
use crate::guest_kind::GuestKind;

/// The finalizer that keeps a guest until its node has released it.
pub const FINALIZER: &str = "kpve.io/guest";
/// Field manager for the guest controller's status writes (none yet: the finalizer patches come
/// from kube-runtime's `finalizer()` helper, which names no field manager).
pub const FIELD_MANAGER: &str = "kpve-guest-controller";
/// How often a Terminating guest is re-checked besides the watch event of the agent's write.
pub const RELEASE_RECHECK: Duration = Duration::from_secs(30);

const ERROR_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Not a failure: the finalizer stays until the agent reports `Released=True`.
    #[error("waiting for node {node} to release the guest (condition Released=True)")]
    AwaitingRelease { node: String },
    #[error("reading the guest")]
    Kube(#[from] kpve_crds::kube::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Finalizer(#[from] Box<finalizer::Error<CleanupError>>),
    #[error("the object has no namespace")]
    NoNamespace,
}

impl Error {
    /// True while a deleted guest waits for its node, which is the normal course of a deletion.
    pub fn is_awaiting_release(&self) -> bool {
        matches!(
            self,
            Error::Finalizer(e) if matches!(**e, finalizer::Error::CleanupFailed(CleanupError::AwaitingRelease { .. }))
        )
    }
}

pub struct Context {
    client: Client,
}

pub async fn reconcile<K: GuestKind>(guest: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = guest.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, guest, |event| async {
        match event {
            // What the node must do is read from spec by its agent; nothing to record yet.
            Finalizer::Apply(_) => Ok(Action::await_change()),
            Finalizer::Cleanup(guest) => cleanup(&api, &*guest).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Ok (the finalizer goes) once nothing is left on any host.
async fn cleanup<K: GuestKind>(api: &Api<K>, guest: &K) -> Result<Action, CleanupError> {
    let fresh;
    let guest = match guest.node() {
        Some(_) => guest,
        None => {
            // The cache may lag a binding the scheduler has just written; ask the server before
            // letting go of a guest whose agent might already be starting it.
            fresh = api.get_opt(&guest.name_any()).await?;
            match &fresh {
                Some(fresh) => fresh,
                None => return Ok(Action::await_change()),
            }
        }
    };
    let Some(node) = guest.node() else {
        return Ok(Action::await_change());
    };
    let released = guest
        .guest_status()
        .and_then(|s| find_condition(&s.conditions, condition_type::RELEASED))
        .is_some_and(|c| c.status == ConditionStatus::True);
    if released {
        tracing::info!(%node, "released by its node; removing the finalizer");
        Ok(Action::await_change())
    } else {
        Err(CleanupError::AwaitingRelease { node: node.to_string() })
    }
}

pub fn error_policy<K: GuestKind>(_guest: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_awaiting_release() { Action::requeue(RELEASE_RECHECK) } else { Action::requeue(ERROR_RETRY) }
}

/// Runs the guest controller for VMs and containers until one of its watches ends.
pub async fn run(client: Client) -> crate::Result<()> {
    let ctx = Arc::new(Context { client: client.clone() });
    let vms = Controller::new(Api::<VirtualMachine>::all(client.clone()), watcher::Config::default()).run(
        reconcile::<VirtualMachine>,
        error_policy::<VirtualMachine>,
        ctx.clone(),
    );
    let cts = Controller::new(Api::<LinuxContainer>::all(client), watcher::Config::default()).run(
        reconcile::<LinuxContainer>,
        error_policy::<LinuxContainer>,
        ctx,
    );
    tokio::select! {
        () = drain("guest", vms, Error::is_awaiting_release) => Err(crate::Error::Stopped("VirtualMachine guest controller")),
        () = drain("guest", cts, Error::is_awaiting_release) => Err(crate::Error::Stopped("LinuxContainer guest controller")),
    }
}
