//! Watch-driven caches of resources (kube-rs reflectors) for the REST layer: requests read
//! them instead of listing through the API server, and writes wait until the cache shows
//! their result, so a client reads its own writes.

use std::time::Duration;

use futures::StreamExt;
use kube::Resource;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Whether a watch is current: it is not once it has been failing (errors, no delivery since)
/// for longer than [`STALE_AFTER`], so decisions are not made on a cache that stopped
/// following. A watch that errs and re-lists at once (an expired watch) stays current.
/// It also counts the events the cache applied, so that what is derived from a cache can be
/// kept until it changes.
#[derive(Clone, Default)]
pub struct Health {
    failing_since: Arc<AtomicI64>,
    changes: Arc<AtomicU64>,
}

/// How long a watch may fail before its cache counts as stale.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Health {
    pub fn current(&self) -> bool {
        let since = self.failing_since.load(Ordering::Relaxed);
        since == 0 || unix_now() - since < STALE_AFTER.as_secs() as i64
    }

    /// How many events the cache has applied: read before deriving something from the
    /// cache, a later different count means the derived thing may be out of date.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }
}

/// A cache of every `K`, kept current by a watch in a background task, and its health.
pub fn watch<K>(client: &kube::Client) -> (Store<K>, Health)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(Api::<K>::all(client.clone()), watcher::Config::default()))
            .default_backoff();
    let health = Health::default();
    let flag = health.failing_since.clone();
    let changes = health.changes.clone();
    let probe = Api::<K>::all(client.clone());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    None => break,
                    Some(Ok(_)) => {
                        flag.store(0, Ordering::Relaxed);
                        changes.fetch_add(1, Ordering::Release);
                    }
                    Some(Err(e)) => {
                        // Failing since the first error after the last delivery.
                        let _ = flag.compare_exchange(0, unix_now(), Ordering::Relaxed, Ordering::Relaxed);
                        tracing::warn!(error = %e, kind = %K::kind(&()), "watching resources");
                    }
                },
                // A watch resumed after an outage delivers nothing until something changes:
                // while failing, ask the server directly whether it answers again.
                _ = tick.tick(), if flag.load(Ordering::Relaxed) != 0 => {
                    if probe.list(&kube::api::ListParams::default().limit(1)).await.is_ok() {
                        flag.store(0, Ordering::Relaxed);
                    }
                }
            }
        }
    });
    (reader, health)
}

/// Waits (up to 5 s) until the cache shows object `name` (in `namespace`) at resource
/// version `version` or later, or no longer has it when `version` is `None`.
pub async fn settle<K>(store: &Store<K>, namespace: Option<&str>, name: &str, version: Option<&str>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut key = ObjectRef::<K>::new(name);
    if let Some(ns) = namespace {
        key = key.within(ns);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let done = match (version, store.get(&key)) {
            (None, None) => true,
            (Some(v), Some(o)) => {
                let have = o.meta().resource_version.as_deref().unwrap_or("");
                have == v || matches!((have.parse::<u64>(), v.parse::<u64>()), (Ok(a), Ok(b)) if a >= b)
            }
            _ => false,
        };
        if done || tokio::time::Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads `name`, applies `edit` and replaces it; on a conflict (an agent's status write bumped
/// the resource version meanwhile) reads and applies again. Clients' own races on the spec
/// are caught earlier by Proxmox's `digest`.
pub async fn replace_retrying<K>(
    api: &Api<K>,
    name: &str,
    mut edit: impl FnMut(&mut K) -> Result<(), crate::envelope::PveError>,
) -> Result<K, crate::envelope::PveError>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    use crate::envelope::PveError;
    let error = PveError::write_failed;
    let mut attempt = 0;
    loop {
        let mut object = api.get(name).await.map_err(error)?;
        edit(&mut object)?;
        object.meta_mut().managed_fields = None;
        match api.replace(name, &PostParams::default(), &object).await {
            Ok(saved) => return Ok(saved),
            Err(kube::Error::Api(ae)) if ae.code == 409 && attempt < 5 => attempt += 1,
            Err(e) => return Err(error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_is_stale_only_after_failing_for_a_while() {
        let h = Health::default();
        assert!(h.current(), "delivering");
        h.failing_since.store(unix_now() - 3, Ordering::Relaxed);
        assert!(h.current(), "a brief failure (an expired watch re-listing) is tolerated");
        h.failing_since.store(unix_now() - STALE_AFTER.as_secs() as i64 - 1, Ordering::Relaxed);
        assert!(!h.current(), "failing for longer than STALE_AFTER");
    }
}
