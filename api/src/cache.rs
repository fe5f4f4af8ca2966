//! Watch-driven caches of resources (kube-rs reflectors) for the REST layer: requests read
//! them instead of listing through the API server, and writes wait until the cache shows
//! their result, so a client reads its own writes.

use std::time::Duration;

use futures::StreamExt;
use kube::Resource;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};

/// A cache of every `K`, kept current by a watch in a background task.
pub fn watch<K>(client: &kube::Client) -> Store<K>
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
            .default_backoff()
            .applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, kind = %K::kind(&()), "watching resources");
            }
        }
    });
    reader
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
    let error = |e: kube::Error| match e {
        kube::Error::Api(ae) if ae.code == 422 => PveError::new(400, ae.message),
        kube::Error::Api(ae) if ae.code == 409 => {
            PveError::new(500, "detected modified configuration - file changed by other user? Try again.")
        }
        kube::Error::Api(ae) => PveError::new(500, ae.message),
        e => PveError::new(500, e.to_string()),
    };
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
