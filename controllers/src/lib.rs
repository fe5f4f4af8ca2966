//! kpve's reconcilers. Built so far: the [`scheduler`] (initial placement of VMs and
//! containers), the [`guest`] controller (the deletion finalizer) and the [`ha`] cluster
//! resource manager. Still to come: vmid, storage, firewall (docs/ARCHITECTURE.md §8).
//!
//! Controllers talk to the API server only through the `kube` crate, re-exported from
//! `kpve_crds`, so they run the same against kpve's own server and a real kube-apiserver.

pub mod guest;
mod guest_kind;
pub mod ha;
pub mod scheduler;

use std::fmt::Debug;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kpve_crds::kube::Client;
use kpve_crds::kube::Resource;
use kpve_crds::kube::runtime::controller::{self, Action};
use kpve_crds::kube::runtime::reflector::ObjectRef;
use kpve_crds::kube::runtime::watcher;

pub use guest_kind::GuestKind;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A controller's watch stream ended; the process should restart it.
    #[error("the {0} stopped")]
    Stopped(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings shared by the controllers.
#[derive(Clone, Debug)]
pub struct ControllersConfig {
    /// A Hypervisor whose agent has not reported for longer is not ready: nothing new is
    /// placed on it.
    pub heartbeat_timeout: Duration,
}

impl Default for ControllersConfig {
    fn default() -> Self {
        ControllersConfig { heartbeat_timeout: Duration::from_secs(30) }
    }
}

/// Runs the scheduler and the guest controller until one of them stops.
pub async fn run(client: Client, config: ControllersConfig) -> Result<()> {
    tokio::select! {
        result = scheduler::run(client.clone(), &config) => result,
        result = guest::run(client.clone()) => result,
        result = ha::run(client) => result,
    }
}

/// Logs what a controller's reconciles came to. `expected` picks the reconcile errors that
/// are part of normal operation (logged at debug, not warn).
async fn drain<K, E>(
    controller: &'static str,
    results: impl Stream<Item = Result<(ObjectRef<K>, Action), controller::Error<E, watcher::Error>>>,
    expected: impl Fn(&E) -> bool,
) where
    K: Resource,
    K::DynamicType: Debug,
    E: std::error::Error + 'static,
{
    results
        .for_each(|result| {
            match result {
                Ok((object, _)) => tracing::trace!(controller, %object, "reconciled"),
                Err(controller::Error::ObjectNotFound(object)) => {
                    tracing::debug!(controller, %object, "object gone before its reconcile")
                }
                Err(controller::Error::ReconcilerFailed(error, object)) if expected(&error) => {
                    tracing::debug!(controller, %object, error = %error, "waiting")
                }
                Err(controller::Error::ReconcilerFailed(error, object)) => {
                    tracing::warn!(controller, %object, error = %chain(&error), "reconcile failed")
                }
                Err(error) => tracing::warn!(controller, error = %chain(&error), "controller error"),
            }
            futures::future::ready(())
        })
        .await
}

/// An error with its sources, `a: b: c`. kube-runtime's errors already print their source,
/// so a source whose text ends the message so far is not repeated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

/// RFC 3339 to the second, as Kubernetes writes condition times.
fn now_rfc3339() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).expect("now is in range").to_string()
}
