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
    #[error("nft did not finish within a minute")]
    TimedOut,
}

/// Applies a document atomically.
pub async fn apply(document: &Value) -> Result<(), NftError> {
    apply_bytes(&serde_json::to_vec(document).expect("JSON values serialize")).await
}

/// Applies an already serialized document (what `nft -j -f FILE` would read).
pub async fn apply_bytes(bytes: &[u8]) -> Result<(), NftError> {
    run(&["-j", "-f", "-"], Some(bytes)).await.map(|_| ())
}

/// A hung `nft` must not stop the agent's firewall loop.
const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `nft ARGS` with `stdin`; its stdout, or the first line of its complaint.
async fn run(args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, NftError> {
    let mut child = tokio::process::Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(NftError::Spawn)?;
    let input = child.stdin.take();
    let work = async {
        tokio::join!(
            async move {
                match (input, stdin) {
                    (Some(mut pipe), Some(bytes)) => pipe.write_all(bytes).await,
                    _ => Ok(()),
                }
            },
            child.wait_with_output()
        )
    };
    let (written, out) = tokio::time::timeout(NFT_TIMEOUT, work).await.map_err(|_| NftError::TimedOut)?;
    let out = out.map_err(NftError::Spawn)?;
    if !out.status.success() || written.is_err() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("exited with an error");
        return Err(NftError::Rejected(first.trim().to_string()));
    }
    Ok(out.stdout)
}

/// How many rules kpve's tables hold (`None`: neither table is loaded). The agent compares
/// it with what it loaded to notice a flushed or replaced table.
pub async fn kpve_rules() -> Result<Option<u32>, NftError> {
    let mut total = None;
    for family in ["inet", "bridge"] {
        let out = run(&["-j", "list", "table", family, super::TABLE], None).await;
        let out = match out {
            Ok(out) => out,
            // "No such file or directory": the table is not there.
            Err(NftError::Rejected(e)) if e.contains("No such file") => continue,
            Err(e) => return Err(e),
        };
        let listed: Value = serde_json::from_slice(&out).unwrap_or_default();
        let rules =
            listed["nftables"].as_array().into_iter().flatten().filter(|e| e.get("rule").is_some()).count();
        *total.get_or_insert(0) += rules as u32;
    }
    Ok(total)
}
