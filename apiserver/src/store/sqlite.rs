//! The SQLite store: kine's revision log in one table.
//!
//! Every create, update and delete inserts a row; the row id is the revision. `prev_revision`
//! links a row to the one it replaced, and `UNIQUE(name, prev_revision)` makes two writers
//! racing from the same revision collide. The current value of each key is cached in memory;
//! history stays in the table until compaction, so a watch resumes from any kept revision by
//! reading rows. WAL with `synchronous=FULL`: a write is on disk before it is acknowledged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::mpsc;

use super::{Event, KeyValue, ListPage, Result, Revision, Store, StoreError, Watch};

/// Live events a watcher may fall behind by before it is dropped (it then re-watches).
const WATCH_BUFFER: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    value BLOB,
    old_value BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS kine_name_prev_revision_uindex ON kine(name, prev_revision);
CREATE INDEX IF NOT EXISTS kine_name_id_index ON kine(name, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

pub struct SqliteStore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("revision", &self.current_revision()).finish()
    }
}

struct Inner {
    conn: Connection,
    current: BTreeMap<String, KeyValue>,
    revision: Revision,
    compacted: Revision,
    watchers: Vec<Watcher>,
}

/// One row of the revision log, before insertion.
struct Row<'a> {
    name: &'a str,
    created: bool,
    deleted: bool,
    create_revision: Revision,
    prev_revision: Revision,
    value: &'a [u8],
    old_value: Option<&'a [u8]>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Event>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "busy_timeout", 30_000)?;
        conn.execute_batch(SCHEMA)?;
        let revision: Revision = conn
            .query_row("SELECT seq FROM sqlite_sequence WHERE name = 'kine'", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let compacted: Revision = conn
            .query_row("SELECT value FROM meta WHERE key = 'compact_rev'", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let mut current = BTreeMap::new();
        {
            let mut stmt = conn.prepare(
                "SELECT k.name, k.value, k.create_revision, k.id FROM kine k
                 JOIN (SELECT name, MAX(id) AS id FROM kine GROUP BY name) m ON k.id = m.id
                 WHERE k.deleted = 0",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(KeyValue {
                    key: r.get(0)?,
                    value: r.get::<_, Option<Vec<u8>>>(1)?.unwrap_or_default(),
                    create_revision: r.get(2)?,
                    mod_revision: r.get(3)?,
                })
            })?;
            for kv in rows {
                let kv = kv?;
                current.insert(kv.key.clone(), kv);
            }
        }
        tracing::debug!(path = %path.display(), revision, keys = current.len(), "opened sqlite store");
        Ok(SqliteStore {
            inner: Mutex::new(Inner { conn, current, revision, compacted, watchers: Vec::new() }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the cache consistent with the last commit
        // (it is updated only after a commit), so a poisoned lock is safe to take over.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    /// Inserts one log row in its own durable transaction and returns its revision.
    fn append(&mut self, row: Row<'_>) -> Result<Revision> {
        let Row { name, created, deleted, create_revision, prev_revision, value, old_value } = row;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, value, old_value)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![name, created, deleted, create_revision, prev_revision, value, old_value],
        )?;
        let id = tx.last_insert_rowid();
        if created {
            // A created row is its own create revision.
            tx.execute("UPDATE kine SET create_revision = ?1 WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        self.revision = id;
        Ok(id)
    }

    fn notify(&mut self, event: &Event) {
        self.watchers.retain(|w| {
            if !event.key().starts_with(&w.prefix) {
                return !w.tx.is_closed();
            }
            match w.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(prefix = %w.prefix, "watcher fell behind; closing it");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn history(&self, prefix: &str, after: Revision) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, name, created, deleted, create_revision, prev_revision, value, old_value
             FROM kine WHERE id > ?1 AND name >= ?2 AND name < ?3 ORDER BY id",
        )?;
        let end = format!("{prefix}\u{7f}");
        let rows = stmt.query_map(params![after, prefix, end], |r| {
            let id: Revision = r.get(0)?;
            let name: String = r.get(1)?;
            let created: bool = r.get(2)?;
            let deleted: bool = r.get(3)?;
            let create_revision: Revision = r.get(4)?;
            let prev_revision: Revision = r.get(5)?;
            let value: Vec<u8> = r.get::<_, Option<Vec<u8>>>(6)?.unwrap_or_default();
            let old_value: Option<Vec<u8>> = r.get(7)?;
            let prev = old_value.map(|old| KeyValue {
                key: name.clone(),
                value: old,
                create_revision,
                mod_revision: prev_revision,
            });
            Ok(if deleted {
                let prev = KeyValue { key: name, value, create_revision, mod_revision: prev_revision };
                Event::Delete { prev, revision: id }
            } else {
                let kv = KeyValue { key: name, value, create_revision, mod_revision: id };
                Event::Put { kv, prev: if created { None } else { prev } }
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

impl Store for SqliteStore {
    fn current_revision(&self) -> Revision {
        self.lock().revision
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.lock().current.get(key).cloned())
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        let inner = self.lock();
        let start = match start_after {
            Some(after) => std::ops::Bound::Excluded(after.to_string()),
            None => std::ops::Bound::Included(prefix.to_string()),
        };
        let mut items = Vec::new();
        let mut more_after = None;
        for (key, kv) in inner.current.range((start, std::ops::Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if limit > 0 && items.len() == limit {
                more_after = items.last().map(|kv: &KeyValue| kv.key.clone());
                break;
            }
            items.push(kv.clone());
        }
        Ok(ListPage { items, revision: inner.revision, more_after })
    }

    fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue> {
        let mut inner = self.lock();
        if inner.current.contains_key(key) {
            return Err(StoreError::AlreadyExists(key.to_string()));
        }
        // After a delete the tombstone is the predecessor, so the CAS index sees a new row.
        let last: Revision = inner.conn.query_row(
            "SELECT COALESCE(MAX(id), 0) FROM kine WHERE name = ?1",
            params![key],
            |r| r.get(0),
        )?;
        let rev = inner.append(Row {
            name: key,
            created: true,
            deleted: false,
            create_revision: 0,
            prev_revision: last,
            value: &value,
            old_value: None,
        })?;
        let kv = KeyValue { key: key.to_string(), value, create_revision: rev, mod_revision: rev };
        inner.current.insert(key.to_string(), kv.clone());
        inner.notify(&Event::Put { kv: kv.clone(), prev: None });
        Ok(kv)
    }

    fn update(&self, key: &str, expected: Revision, value: Vec<u8>) -> Result<KeyValue> {
        let mut inner = self.lock();
        let prev = inner.current.get(key).cloned().ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        if prev.mod_revision != expected {
            return Err(StoreError::Conflict { key: key.to_string(), expected, current: prev.mod_revision });
        }
        let rev = inner.append(Row {
            name: key,
            created: false,
            deleted: false,
            create_revision: prev.create_revision,
            prev_revision: prev.mod_revision,
            value: &value,
            old_value: Some(&prev.value),
        })?;
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision: prev.create_revision,
            mod_revision: rev,
        };
        inner.current.insert(key.to_string(), kv.clone());
        inner.notify(&Event::Put { kv: kv.clone(), prev: Some(prev) });
        Ok(kv)
    }

    fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Event> {
        let mut inner = self.lock();
        let prev = inner.current.get(key).cloned().ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        if let Some(expected) = expected
            && prev.mod_revision != expected
        {
            return Err(StoreError::Conflict { key: key.to_string(), expected, current: prev.mod_revision });
        }
        let rev = inner.append(Row {
            name: key,
            created: false,
            deleted: true,
            create_revision: prev.create_revision,
            prev_revision: prev.mod_revision,
            value: &prev.value,
            old_value: None,
        })?;
        inner.current.remove(key);
        let event = Event::Delete { prev, revision: rev };
        inner.notify(&event);
        Ok(event)
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        let mut inner = self.lock();
        if after < inner.compacted {
            return Err(StoreError::Compacted { requested: after, compacted: inner.compacted });
        }
        // Under the lock no write can slip between the history read and registration.
        let history = inner.history(prefix, after)?;
        let (tx, rx) = mpsc::channel(history.len() + WATCH_BUFFER);
        for event in history {
            tx.try_send(event).expect("channel sized for the history");
        }
        inner.watchers.push(Watcher { prefix: prefix.to_string(), tx });
        Ok(Watch { events: rx })
    }

    fn compact(&self, revision: Revision) -> Result<()> {
        let mut inner = self.lock();
        let revision = revision.min(inner.revision);
        if revision <= inner.compacted {
            return Ok(());
        }
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Rows replaced by a write at or before `revision`, then tombstones up to it.
        let superseded = tx.execute(
            "DELETE FROM kine WHERE id IN
               (SELECT prev_revision FROM kine WHERE id <= ?1 AND prev_revision != 0)",
            params![revision],
        )?;
        let tombstones = tx.execute("DELETE FROM kine WHERE id <= ?1 AND deleted = 1", params![revision])?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('compact_rev', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![revision],
        )?;
        tx.commit()?;
        inner.compacted = revision;
        tracing::debug!(revision, superseded, tombstones, "compacted store");
        Ok(())
    }

    fn compacted_revision(&self) -> Revision {
        self.lock().compacted
    }
}
