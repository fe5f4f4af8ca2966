//! `kpve validate`: check manifests against the CRD schemas before applying them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use kpve_crds::validation::KindValidators;
use serde::Deserialize;

pub fn run(paths: &[PathBuf]) -> Result<ExitCode> {
    let validators = KindValidators::new()?;
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files)?;
    }
    let mut failed = 0usize;
    let mut checked = 0usize;
    for file in &files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for (index, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    eprintln!("{}: document {}: invalid YAML: {e}", file.display(), index + 1);
                    failed += 1;
                    continue;
                }
            };
            let object: serde_json::Value = serde_json::to_value(&value).with_context(|| {
                format!("{}: document {} is not JSON-compatible", file.display(), index + 1)
            })?;
            checked += 1;
            let errors = validators.validate(&object);
            let kind = object.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
            let name = object.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or("?");
            if errors.is_empty() {
                println!("{}: {kind}/{name}: valid", file.display());
            } else {
                failed += 1;
                for e in errors {
                    eprintln!("{}: {kind}/{name}: {e}", file.display());
                }
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {checked} documents invalid");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        entries.sort();
        out.extend(entries);
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}
