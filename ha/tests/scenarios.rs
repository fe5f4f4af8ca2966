//! The HA scenario suite: every `scenarios/*.txt` is a script of faults for the simulated
//! cluster (see `kpve_ha::sim`), followed by `---` and the log it must produce. No scenario may
//! ever show a guest running on two nodes.
//!
//! After a deliberate change of behaviour, `KPVE_BLESS=1 cargo test -p kpve-ha` rewrites the
//! expected logs; read the diff before committing it.

use std::path::Path;

#[test]
fn every_scenario_logs_what_it_expects_and_never_runs_a_guest_twice() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let bless = std::env::var_os("KPVE_BLESS").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "txt"));
    files.sort();
    assert!(files.len() >= 30, "the suite has {} scenarios; it must cover at least 30", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(path).unwrap();
        let (script, expected) = text.split_once("\n---\n").unwrap_or((&text, ""));
        let log = match kpve_ha::sim::run(script) {
            Ok(log) => log,
            Err(e) => {
                failures.push(format!("{name}: bad scenario: {e}"));
                continue;
            }
        };
        if kpve_ha::sim::has_violation(&log) {
            failures.push(format!("{name}: a guest ran on two nodes:\n{log}"));
        }
        if bless {
            std::fs::write(path, format!("{}\n---\n{log}", script.trim_end())).unwrap();
        } else if log != expected {
            failures.push(format!("{name}: log differs.\n--- expected\n{expected}--- got\n{log}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
