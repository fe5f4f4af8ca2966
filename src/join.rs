//! Join tokens: what `kpve token create --node NAME` prints for a new agent. It carries the
//! server's CA certificate beside the node's bearer token, so `kpve agent --token T` trusts the
//! right server without a separate file and without trusting the network on first contact:
//! `kpve-join.<base64url(ca.crt)>.<bearer token>`.
//!
//! The agent keeps both in its state directory (`DATA_DIR/agent/token`, `ca.crt`, mode 0600)
//! and authenticates as that node from then on, without the flag.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const PREFIX: &str = "kpve-join.";

pub fn encode(ca_pem: &[u8], bearer: &str) -> String {
    format!("{PREFIX}{}.{bearer}", URL_SAFE_NO_PAD.encode(ca_pem))
}

/// The CA (PEM) and bearer token of a join token; None for anything else.
pub fn decode(text: &str) -> Option<(Vec<u8>, String)> {
    let rest = text.trim().strip_prefix(PREFIX)?;
    let (ca, bearer) = rest.split_once('.')?;
    let ca = URL_SAFE_NO_PAD.decode(ca).ok()?;
    (!bearer.is_empty() && ca.starts_with(b"-----BEGIN")).then(|| (ca, bearer.to_string()))
}

/// What an agent authenticates with (no Debug: it holds a secret).
pub struct Credentials {
    pub bearer: String,
    pub ca_file: PathBuf,
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    // A leftover temporary file could carry a looser mode through the rename.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Resolves the agent's credentials: `--token`, else `--token-file`, else what an earlier
/// join left in `agent_dir`. A join token is remembered there; a bare bearer token needs
/// `--ca-file` (or a CA remembered from an earlier join).
pub fn agent_credentials(
    agent_dir: &Path,
    token: Option<&str>,
    token_file: Option<&Path>,
    ca_file: Option<&Path>,
) -> Result<Credentials> {
    std::fs::create_dir_all(agent_dir).with_context(|| format!("creating {}", agent_dir.display()))?;
    let kept_token = agent_dir.join("token");
    let kept_ca = agent_dir.join("ca.crt");
    let text = match (token, token_file) {
        (Some(t), _) => t.to_string(),
        (None, Some(file)) => std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
        (None, None) => std::fs::read_to_string(&kept_token).with_context(|| {
            format!(
                "no credentials: pass --token with the join token `kpve token create --node NAME` prints on the server \
                 ({} does not exist yet)",
                kept_token.display()
            )
        })?,
    };
    if let Some((ca, bearer)) = decode(&text) {
        write_private(&kept_ca, &ca)?;
        write_private(&kept_token, bearer.as_bytes())?;
        let ca_file = ca_file.map(Path::to_path_buf).unwrap_or(kept_ca);
        return Ok(Credentials { bearer, ca_file });
    }
    if text.trim().starts_with(PREFIX) {
        anyhow::bail!("the join token is damaged (it should read kpve-join.<CA>.<token>): copy it again");
    }
    let bearer = text.trim().to_string();
    let ca_file = match ca_file {
        Some(f) => f.to_path_buf(),
        None if kept_ca.exists() => kept_ca,
        None => anyhow::bail!(
            "a bare token needs --ca-file (the server's DATA_DIR/ca.crt); a join token carries it"
        ),
    };
    Ok(Credentials { bearer, ca_file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_token_carries_the_ca_and_is_remembered_privately() {
        let dir = tempfile::tempdir().unwrap();
        let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let token = encode(pem, "secret123");
        assert_eq!(decode(&token), Some((pem.to_vec(), "secret123".to_string())));
        assert_eq!(decode("secret123"), None);

        let agent = dir.path().join("agent");
        let c = agent_credentials(&agent, Some(&token), None, None).unwrap();
        assert_eq!(c.bearer, "secret123");
        assert_eq!(std::fs::read(&c.ca_file).unwrap(), pem);
        use std::os::unix::fs::PermissionsExt;
        for f in ["token", "ca.crt"] {
            let mode = std::fs::metadata(agent.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        // From then on, no flags.
        let again = agent_credentials(&agent, None, None, None).unwrap();
        assert_eq!(again.bearer, "secret123");

        let damaged = agent_credentials(&agent, Some("kpve-join.!!!.x"), None, None);
        assert!(damaged.err().unwrap().to_string().contains("damaged"));
        let fresh = dir.path().join("fresh");
        let bare = agent_credentials(&fresh, Some("plain"), None, None);
        assert!(bare.err().unwrap().to_string().contains("--ca-file"));
        let none = agent_credentials(&fresh, None, None, None);
        assert!(none.err().unwrap().to_string().contains("no credentials"));
    }
}
