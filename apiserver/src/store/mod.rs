//! The storage interface of the API server: a key/value store with one global, monotonic
//! revision (the Kubernetes resourceVersion), compare-and-swap writes, history for watch
//! resume, and compaction. Keys are `/registry/<group>/<resource>/<namespace>/<name>`.
//!
//! [`sqlite::SqliteStore`] is the single-machine engine (kine's revision-log layout);
//! an etcd engine can implement the same trait.

pub mod sqlite;

use tokio::sync::mpsc;

/// A store revision. Revisions start at 1 and only grow.
pub type Revision = i64;

/// One stored value at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key.
    pub create_revision: Revision,
    /// Revision of the write that produced this value.
    pub mod_revision: Revision,
}

/// A change, as delivered to watchers in revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Created (`prev` is `None`) or updated.
    Put { kv: KeyValue, prev: Option<KeyValue> },
    /// Deleted at `revision`; `prev` is the last value.
    Delete { prev: KeyValue, revision: Revision },
}

impl Event {
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put { kv, .. } => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Event::Put { kv, .. } => &kv.key,
            Event::Delete { prev, .. } => &prev.key,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    /// The key's current revision is not the one the write was based on.
    #[error("key {key} was modified: expected revision {expected}, current {current}")]
    Conflict { key: String, expected: Revision, current: Revision },
    /// The requested revision has been compacted away.
    #[error("revision {requested} is compacted (oldest available: {compacted})")]
    Compacted { requested: Revision, compacted: Revision },
    #[error("storage: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub items: Vec<KeyValue>,
    /// The store revision the list was read at.
    pub revision: Revision,
    /// Set when more items follow: pass it as `start_after` to continue.
    pub more_after: Option<String>,
}

/// A live watch: history first, then new events, in revision order.
#[derive(Debug)]
pub struct Watch {
    pub events: mpsc::Receiver<Event>,
}

/// The storage interface of the API server.
pub trait Store: Send + Sync + 'static {
    /// The revision of the latest write.
    fn current_revision(&self) -> Revision;
    fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Current values under `prefix`, in key order, after `start_after`, at most `limit`
    /// (0 = no limit).
    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage>;
    /// Creates a key; fails with `AlreadyExists` when it exists.
    fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue>;
    /// Replaces a key's value if its current revision is `expected`.
    fn update(&self, key: &str, expected: Revision, value: Vec<u8>) -> Result<KeyValue>;
    /// Deletes a key, if its current revision is `expected` when given. Returns the
    /// deletion event.
    fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Event>;
    /// Events under `prefix` with revision > `after`, then live ones. Fails with
    /// `Compacted` when `after` is older than the kept history.
    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch>;
    /// Forgets history at and before `revision` (current values are kept).
    fn compact(&self, revision: Revision) -> Result<()>;
    /// The oldest revision watch can still start after.
    fn compacted_revision(&self) -> Revision;
}
