//! Durable single-object writes per second through kpve's SQLite store, side by side with a
//! bare rusqlite INSERT under the same settings (WAL, synchronous=FULL) in the same run.
//!
//! Usage: cargo run --release -p kpve-bench --bin store_writes [-- ROUNDS WRITES]

use std::time::{Duration, Instant};

use kpve_apiserver::store::Store;
use kpve_apiserver::store::sqlite::SqliteStore;
use kpve_bench::{median, percentile};

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let writes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let value = vec![b'x'; 1500]; // about the size of a VirtualMachine object in JSON
    let (mut kpve_rates, mut raw_rates) = (Vec::new(), Vec::new());
    let (mut kpve_lat, mut raw_lat) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        store.create("/registry/bench/obj", value.clone()).unwrap();
        let start = Instant::now();
        let mut rev = store.current_revision();
        for _ in 0..writes {
            let t = Instant::now();
            rev = store.update("/registry/bench/obj", rev, value.clone()).unwrap().mod_revision;
            kpve_lat.push(t.elapsed());
        }
        kpve_rates.push(writes as f64 / start.elapsed().as_secs_f64());

        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("raw.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, value BLOB)")
            .unwrap();
        let start = Instant::now();
        for _ in 0..writes {
            let t = Instant::now();
            conn.execute("INSERT INTO t (name, value) VALUES ('/registry/bench/obj', ?1)", [&value]).unwrap();
            raw_lat.push(t.elapsed());
        }
        raw_rates.push(writes as f64 / start.elapsed().as_secs_f64());
    }
    kpve_lat.sort();
    raw_lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("rounds={rounds} writes/round={writes} value=1500B");
    println!(
        "kpve SqliteStore.update : {:>8.0} writes/s (median of rounds)  p50 {:.3} ms  p95 {:.3} ms  p99 {:.3} ms",
        median(kpve_rates.clone()),
        ms(percentile(&kpve_lat, 50.0)),
        ms(percentile(&kpve_lat, 95.0)),
        ms(percentile(&kpve_lat, 99.0))
    );
    println!(
        "raw rusqlite INSERT     : {:>8.0} writes/s (median of rounds)  p50 {:.3} ms  p95 {:.3} ms  p99 {:.3} ms",
        median(raw_rates.clone()),
        ms(percentile(&raw_lat, 50.0)),
        ms(percentile(&raw_lat, 95.0)),
        ms(percentile(&raw_lat, 99.0))
    );
    println!("ratio kpve/raw          : {:.2}", median(kpve_rates) / median(raw_rates));
}
