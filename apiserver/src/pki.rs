//! First-start credentials: a CA, the serving certificate (SANs localhost, 127.0.0.1, ::1 and
//! the host name), bearer tokens and `DATA_DIR/kubeconfig`. Everything secret is written 0600
//! and never logged.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use rand::Rng;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const TOKENS: &str = "tokens.csv";
pub const KUBECONFIG: &str = "kubeconfig";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(String),
}

type Result<T, E = PkiError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// Writes `contents` to `path` with mode `mode`, atomically (temp file + rename).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A random token: 32 bytes, URL-safe base64.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn validity(params: &mut rcgen::CertificateParams) {
    let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
    let start = now.checked_sub(jiff::Span::new().days(1)).expect("date in range");
    params.not_before = rcgen::date_time_ymd(start.year().into(), start.month() as u8, start.day() as u8);
    params.not_after =
        rcgen::date_time_ymd(i32::from(now.year()) + 10, now.month() as u8, now.day().min(28) as u8);
}

/// Creates the CA and the serving certificate unless both exist.
pub fn ensure_certificates(dir: &Path) -> Result<()> {
    if [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY].iter().all(|f| dir.join(f).exists()) {
        return Ok(());
    }
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "kpve-ca");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let server_key = rcgen::KeyPair::generate()?;
    let sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into(), host_name()];
    let mut params = rcgen::CertificateParams::new(sans)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "kpve-apiserver");
    params.key_usages =
        vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write_file(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), 0o644)?;
    write_file(&dir.join(SERVER_KEY), server_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(SERVER_CERT), server_cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// The DER certificates in a PEM file's text (e.g. `ca.crt`, for a client's trust root).
pub fn pem_certs(pem: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
    rustls_pemfile::certs(&mut &*pem).map(|c| c.map(|c| c.to_vec())).collect()
}

/// The rustls configuration for a listener: the serving certificate, HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_tls_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>> {
    tls_config_from(&dir.join(SERVER_CERT), &dir.join(SERVER_KEY))
}

/// Writes a self-signed serving certificate and its key (0600) unless both exist — what a
/// listener without a CA of its own (the standalone Proxmox API) uses on first start.
pub fn ensure_self_signed(cert_path: &Path, key_path: &Path, common_name: &str) -> Result<()> {
    if cert_path.exists() && key_path.exists() {
        return Ok(());
    }
    let key = rcgen::KeyPair::generate()?;
    let sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into(), host_name()];
    let mut params = rcgen::CertificateParams::new(sans)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params);
    let cert = params.self_signed(&key)?;
    write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// The rustls configuration for a listener from PEM files of a certificate chain and its key.
pub fn tls_config_from(cert_path: &Path, key_path: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let (cert_path, key_path) = (cert_path.to_path_buf(), key_path.to_path_buf());
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut std::fs::read(&cert_path).map_err(io_err(&cert_path))?.as_slice())
            .collect::<std::result::Result<_, _>>()
            .map_err(io_err(&cert_path))?;
    let key =
        rustls_pemfile::private_key(&mut std::fs::read(&key_path).map_err(io_err(&key_path))?.as_slice())
            .map_err(io_err(&key_path))?
            .ok_or_else(|| PkiError::Tls(format!("{}: no private key", key_path.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Writes a kubeconfig for `server` authenticating with `token`, trusting the CA in `dir`.
pub fn write_kubeconfig(dir: &Path, path: &Path, server: &str, user: &str, token: &str) -> Result<()> {
    let ca_path = dir.join(CA_CERT);
    let ca = std::fs::read(&ca_path).map_err(io_err(&ca_path))?;
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca);
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: kpve\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_data}\n\
         users:\n\
         - name: {user}\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: kpve\n  context:\n    cluster: kpve\n    user: {user}\n    namespace: default\n\
         current-context: kpve\n"
    );
    write_file(path, text.as_bytes(), 0o600)
}
