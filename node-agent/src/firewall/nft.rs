//! The one client of the `nft` tool: loads a JSON document in one transaction (`nft -j -f -`),
//! so a ruleset is either wholly in force or not at all.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft could not be run: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Rejected(String),
}

/// Applies a document atomically.
pub async fn apply(document: &Value) -> Result<(), NftError> {
    apply_bytes(&serde_json::to_vec(document).expect("JSON values serialize")).await
}

/// Applies an already serialized document (what `nft -j -f FILE` would read).
pub async fn apply_bytes(bytes: &[u8]) -> Result<(), NftError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let (written, out) = tokio::join!(
        async move {
            let r = stdin.write_all(bytes).await;
            drop(stdin);
            r
        },
        child.wait_with_output()
    );
    let out = out.map_err(NftError::Spawn)?;
    if !out.status.success() || written.is_err() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("exited with an error");
        return Err(NftError::Rejected(first.trim().to_string()));
    }
    Ok(())
}

/// Whether kpve's tables (`inet kpve`, `bridge kpve`) are both loaded.
pub async fn kpve_tables() -> Result<bool, NftError> {
    let out = tokio::process::Command::new("nft")
        .args(["-j", "list", "tables"])
        .output()
        .await
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Rejected(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ours = |family: &str| {
        listed["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["table"]["family"] == family && e["table"]["name"] == super::TABLE)
    };
    Ok(ours("inet") && ours("bridge"))
}
