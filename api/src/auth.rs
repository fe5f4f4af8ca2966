//! Who is asking: tickets (cookie `PVEAuthCookie`, or `Authorization: PVEAuthCookie=`), API
//! tokens (`Authorization: PVEAPIToken=user@realm!id=secret`), and the password check behind
//! `POST /access/ticket` (root@pam: the generated password file; realm `pve`: the user's
//! SHA-crypt hash). Users must exist, be enabled and not expired; failures say only
//! `Authentication failed!` as Proxmox does (the reason is logged).

use std::collections::BTreeMap;

use axum::http::HeaderMap;

use crate::access::{AccessStore, Principal, ROOT, token_hash};
use crate::ticket::Keys;

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `%XX` escapes (clients escape `:` `@` `!` in tickets, UPIDs and volume ids).
pub fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = segment.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `NAME=value` (or `NAME value`) from a header of `;`-separated pairs, URI-unescaped as
/// Proxmox does (a `+` stays a plus: signatures are base64).
pub fn auth_value(header: &str, name: &str) -> Option<String> {
    header.split(';').map(str::trim).find_map(|part| {
        let rest = part.strip_prefix(name)?;
        let value = rest.strip_prefix('=').or_else(|| rest.strip_prefix(' '))?;
        Some(percent_decode(value))
    })
}

/// How a request authenticated.
pub enum Credential {
    Ticket(String),
    Token(String),
    None,
}

pub fn credential(headers: &HeaderMap) -> Credential {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(t) = auth_value(header("cookie"), "PVEAuthCookie")
        .or_else(|| auth_value(header("authorization"), "PVEAuthCookie"))
    {
        return Credential::Ticket(t);
    }
    match auth_value(header("authorization"), "PVEAPIToken") {
        Some(t) => Credential::Token(t),
        None => Credential::None,
    }
}

/// A user who may act now: root@pam, or an enabled, unexpired PVEUser.
fn user_active(store: &AccessStore, userid: &str, at: i64) -> Result<(), String> {
    if userid == ROOT {
        return Ok(());
    }
    let user = store.user(userid).ok_or_else(|| format!("no such user ('{userid}')"))?;
    if !user.spec.enable {
        return Err(format!("user '{userid}' is disabled"));
    }
    if user.spec.expire > 0 && user.spec.expire < at {
        return Err(format!("user '{userid}' access expired"));
    }
    Ok(())
}

/// A ticket's user, if the ticket is valid and the user may act.
pub fn verify_ticket(keys: &Keys, store: &AccessStore, ticket: &str) -> Result<Principal, String> {
    let at = now();
    let user = keys.verify_ticket(ticket, at).map_err(|e| format!("invalid ticket: {e}"))?;
    user_active(store, &user, at)?;
    Ok(Principal::user(&user))
}

/// `user@realm!tokenid=secret`, split at the last `=`.
pub fn verify_token(store: &AccessStore, value: &str) -> Result<Principal, String> {
    let (id, secret) = value.rsplit_once('=').ok_or("no tokenid specified")?;
    let (userid, token) = id.split_once('!').ok_or_else(|| {
        format!("'{id}' is not a valid token ID - not able to split into user and token parts")
    })?;
    let at = now();
    user_active(store, userid, at)?;
    let user = store.user(userid).ok_or_else(|| format!("no such user ('{userid}')"))?;
    let info = user
        .spec
        .tokens
        .iter()
        .find(|t| t.id == token)
        .ok_or_else(|| format!("no such token '{token}' for user '{userid}'"))?;
    if info.expire > 0 && info.expire < at {
        return Err(format!("token '{token}' access expired"));
    }
    if !constant_time_eq(token_hash(secret).as_bytes(), info.secret_hash.as_bytes()) {
        return Err("invalid token value!".into());
    }
    Ok(Principal { user: userid.to_string(), token: Some(token.to_string()) })
}

/// The user id a login names (`username` plus an optional `realm`).
pub fn login_userid(params: &BTreeMap<String, String>) -> String {
    let username = params.get("username").cloned().unwrap_or_default();
    match params.get("realm") {
        Some(realm) if !username.contains('@') => format!("{username}@{realm}"),
        _ => username,
    }
}

/// Checks a login's password (a valid ticket of the same user also counts, which is how
/// clients renew tickets).
pub fn check_password(
    keys: &Keys,
    store: &AccessStore,
    root_password: &str,
    userid: &str,
    password: &str,
) -> Result<(), String> {
    let at = now();
    if password.is_empty() {
        return Err("no password".into());
    }
    if keys.verify_ticket(password, at).is_ok_and(|u| u == userid) {
        return user_active(store, userid, at);
    }
    if userid == ROOT {
        return if constant_time_eq(password.as_bytes(), root_password.as_bytes()) {
            Ok(())
        } else {
            Err("invalid password".into())
        };
    }
    user_active(store, userid, at)?;
    let user = store.user(userid).ok_or_else(|| format!("no such user ('{userid}')"))?;
    let hash = user.spec.password_hash.as_deref().ok_or("no password set")?;
    let ok = if hash.starts_with("$6$") {
        sha_crypt::sha512_check(password, hash).is_ok()
    } else {
        sha_crypt::sha256_check(password, hash).is_ok()
    };
    if ok { Ok(()) } else { Err("invalid password".into()) }
}

/// A SHA-crypt (`$5$`, 5000 rounds) hash of a new password.
pub fn hash_password(password: &str) -> Result<String, String> {
    let params = sha_crypt::Sha256Params::new(5000).map_err(|e| format!("{e:?}"))?;
    sha_crypt::sha256_simple(password, &params).map_err(|e| format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_values_come_from_cookies_and_authorization_headers() {
        assert_eq!(
            auth_value("foo=1; PVEAuthCookie=PVE%3Aroot%40pam%3A1::sig", "PVEAuthCookie").unwrap(),
            "PVE:root@pam:1::sig"
        );
        assert_eq!(auth_value("PVEAuthCookie=PVE:x::y", "PVEAuthCookie").unwrap(), "PVE:x::y");
        assert_eq!(auth_value("PVEAPIToken root@pam!ci=abc", "PVEAPIToken").unwrap(), "root@pam!ci=abc");
        assert!(auth_value("other=1", "PVEAuthCookie").is_none());
        assert_eq!(auth_value("PVEAuthCookie=PVE:a::x+y/z=", "PVEAuthCookie").unwrap(), "PVE:a::x+y/z=");
    }

    #[test]
    fn passwords_hash_as_sha_crypt_and_openssl_hashes_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$5$"));
        assert!(sha_crypt::sha256_check("s3cret", &h).is_ok());
        assert!(sha_crypt::sha256_check("wrong", &h).is_err());
        // `openssl passwd -5 -salt saltsalt s3cret` (OpenSSL 3.0 on this machine).
        let openssl = "$5$saltsalt$i1q2ZQzc.tl/BQ6CHiENAcVDvEY6nJ1OWlWXKh94b1.";
        assert!(sha_crypt::sha256_check("s3cret", openssl).is_ok());
        assert!(sha_crypt::sha256_check("other", openssl).is_err());
    }
}
