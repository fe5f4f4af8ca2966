//! The SQLite store as the API server uses it: revisions, compare-and-swap, paging, watch
//! history and live events, compaction, restart, concurrent writers and kill -9.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kpve_apiserver::store::sqlite::SqliteStore;
use kpve_apiserver::store::{Event, Store, StoreError, Watch};

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("state.db")).unwrap()
}

#[test]
fn create_update_delete_with_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let a = store.create("/registry/vms/default/a", b"1".to_vec()).unwrap();
    assert_eq!((a.create_revision, a.mod_revision), (1, 1));
    assert!(matches!(
        store.create("/registry/vms/default/a", b"x".to_vec()),
        Err(StoreError::AlreadyExists(_))
    ));
    let a2 = store.update("/registry/vms/default/a", 1, b"2".to_vec()).unwrap();
    assert_eq!((a2.create_revision, a2.mod_revision), (1, 2));
    match store.update("/registry/vms/default/a", 1, b"3".to_vec()) {
        Err(StoreError::Conflict { expected: 1, current: 2, .. }) => {}
        other => panic!("stale update must conflict: {other:?}"),
    }
    assert!(matches!(store.delete("/registry/vms/default/a", Some(1)), Err(StoreError::Conflict { .. })));
    let event = store.delete("/registry/vms/default/a", Some(2)).unwrap();
    assert_eq!(event.revision(), 3);
    assert_eq!(store.get("/registry/vms/default/a").unwrap(), None);
    assert!(matches!(
        store.update("/registry/vms/default/a", 2, b"4".to_vec()),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.current_revision(), 3);
    // A re-created key starts a new life with a new create revision.
    let again = store.create("/registry/vms/default/a", b"5".to_vec()).unwrap();
    assert_eq!(again.create_revision, 4);
}

#[test]
fn list_pages_in_key_order_within_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    for i in 0..25 {
        store.create(&format!("/registry/vms/ns/vm{i:02}"), vec![i]).unwrap();
    }
    store.create("/registry/vmsx/ns/other", b"no".to_vec()).unwrap();
    store.create("/registry/cts/ns/c", b"no".to_vec()).unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list("/registry/vms/", after.as_deref(), 10).unwrap();
        assert_eq!(page.revision, 27);
        seen.extend(page.items.iter().map(|kv| kv.key.clone()));
        match page.more_after {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    let want: Vec<String> = (0..25).map(|i| format!("/registry/vms/ns/vm{i:02}")).collect();
    assert_eq!(seen, want);
}

async fn next(watch: &mut Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(5), watch.events.recv())
        .await
        .expect("event within the deadline")
        .expect("watch still open")
}

#[tokio::test]
async fn watch_replays_history_then_delivers_live_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create("/registry/vms/a", b"1".to_vec()).unwrap(); // rev 1
    store.create("/registry/cts/x", b"c".to_vec()).unwrap(); // rev 2, other prefix
    store.update("/registry/vms/a", 1, b"2".to_vec()).unwrap(); // rev 3
    let mut watch = store.watch("/registry/vms/", 1).unwrap();
    store.delete("/registry/vms/a", None).unwrap(); // rev 4, live
    match next(&mut watch).await {
        Event::Put { kv, prev: Some(prev) } => {
            assert_eq!((kv.mod_revision, kv.value.as_slice()), (3, &b"2"[..]));
            assert_eq!((prev.mod_revision, prev.value.as_slice()), (1, &b"1"[..]));
        }
        other => panic!("expected the update from history, got {other:?}"),
    }
    match next(&mut watch).await {
        Event::Delete { prev, revision } => {
            assert_eq!(revision, 4);
            assert_eq!(prev.value, b"2");
        }
        other => panic!("expected the live delete, got {other:?}"),
    }
    store.create("/registry/cts/y", b"c".to_vec()).unwrap();
    store.create("/registry/vms/b", b"b".to_vec()).unwrap();
    assert_eq!(next(&mut watch).await.key(), "/registry/vms/b", "events of other prefixes are not delivered");
}

#[test]
fn compaction_expires_old_revisions_but_keeps_current_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create("/registry/vms/a", b"1".to_vec()).unwrap();
    for rev in 1..50 {
        store.update("/registry/vms/a", rev, format!("{}", rev + 1).into_bytes()).unwrap();
    }
    store.create("/registry/vms/gone", b"x".to_vec()).unwrap();
    store.delete("/registry/vms/gone", None).unwrap();
    store.compact(40).unwrap();
    assert!(matches!(
        store.watch("/registry/vms/", 10),
        Err(StoreError::Compacted { requested: 10, compacted: 40 })
    ));
    let mut w = store.watch("/registry/vms/", 40).unwrap();
    let mut revs = Vec::new();
    while let Ok(e) = w.events.try_recv() {
        revs.push(e.revision());
    }
    assert_eq!(revs, (41..=52).collect::<Vec<_>>());
    assert_eq!(store.get("/registry/vms/a").unwrap().unwrap().value, b"50");
}

#[test]
fn state_and_revision_survive_reopen_even_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir);
        store.create("/registry/a", b"1".to_vec()).unwrap();
        store.create("/registry/b", b"1".to_vec()).unwrap();
        store.delete("/registry/b", None).unwrap();
        store.update("/registry/a", 1, b"2".to_vec()).unwrap();
        store.compact(4).unwrap();
    }
    let store = open(&dir);
    assert_eq!(store.current_revision(), 4);
    assert_eq!(store.compacted_revision(), 4);
    assert_eq!(store.get("/registry/a").unwrap().unwrap().value, b"2");
    assert_eq!(store.get("/registry/b").unwrap(), None);
    assert_eq!(store.create("/registry/c", vec![]).unwrap().mod_revision, 5, "revisions never go back");
}

#[test]
fn eight_concurrent_writers_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    store.create("/registry/counter", b"0".to_vec()).unwrap();
    let per_writer = 50;
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut conflicts = 0u64;
                for _ in 0..per_writer {
                    loop {
                        let kv = store.get("/registry/counter").unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                        let next = (n + 1).to_string().into_bytes();
                        match store.update("/registry/counter", kv.mod_revision, next) {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let kv = store.get("/registry/counter").unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&kv.value).unwrap(), (8 * per_writer).to_string());
    eprintln!("{conflicts} conflicts retried");
}

/// Child half of the kill -9 test: writes keys forever, printing each acknowledged one.
/// Does nothing unless started by `acknowledged_writes_survive_kill_9`.
#[test]
fn durability_child() {
    let Ok(path) = std::env::var("KPVE_STORE_CHILD_DB") else { return };
    let store = SqliteStore::open(std::path::Path::new(&path)).unwrap();
    for i in 0.. {
        let kv = store.create(&format!("/registry/k/{i:08}"), format!("v{i}").into_bytes()).unwrap();
        println!("ACK {i} {}", kv.mod_revision);
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "durability_child", "--nocapture", "--test-threads=1"])
        .env("KPVE_STORE_CHILD_DB", &db)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while acked.len() < 300 {
        let line = lines.next().expect("child still writing").unwrap();
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (i, rev) = rest.split_once(' ').unwrap();
            acked.push((i.parse::<u64>().unwrap(), rev.parse::<i64>().unwrap()));
        }
    }
    // SIGKILL in the middle of the write loop: nothing is flushed or closed.
    child.kill().unwrap();
    child.wait().unwrap();
    let store = SqliteStore::open(&db).unwrap();
    for (i, rev) in &acked {
        let kv = store
            .get(&format!("/registry/k/{i:08}"))
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged write {i} lost"));
        assert_eq!(kv.value, format!("v{i}").into_bytes());
        assert_eq!(kv.mod_revision, *rev);
    }
    assert!(store.current_revision() >= acked.last().unwrap().1);
}
