//! Proxmox authentication tickets and CSRF prevention tokens.
//!
//! A ticket is `PVE:<user>:<8 hex digits of its issue time>::<signature>` (clients split it on
//! `:` and read the user at index 1); it is valid for two hours. The CSRF token is
//! `<8 hex time>:<signature>` and binds the time to the user. Proxmox signs tickets with RSA
//! so every node can verify them with the public key; kpve signs with HMAC-SHA256 under a key
//! held by the API process, because the API is served from one place. Keys rotate: tickets
//! signed with the previous key stay valid until they expire.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a ticket is accepted (Proxmox's `$ticket_lifetime`).
pub const TICKET_LIFETIME: i64 = 2 * 3600;
/// How far in the future a ticket's time may be (clock skew between nodes).
const MAX_SKEW: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("invalid ticket")]
    Malformed,
    #[error("invalid ticket signature")]
    BadSignature,
    #[error("ticket expired")]
    Expired,
}

/// The signing keys: tickets are signed with `current` and accepted under either.
#[derive(Clone)]
pub struct Keys {
    pub current: [u8; 32],
    pub previous: Option<[u8; 32]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(…)")
    }
}

impl Keys {
    pub fn generate() -> Keys {
        Keys { current: rand::random(), previous: None }
    }

    /// A new current key; the old one still verifies what it signed.
    pub fn rotate(&mut self) {
        self.previous = Some(std::mem::replace(&mut self.current, rand::random()));
    }

    fn sign(key: &[u8; 32], purpose: &str, data: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data.as_bytes());
        STANDARD.encode(mac.finalize().into_bytes())
    }

    fn verify(&self, purpose: &str, data: &str, signature: &str) -> bool {
        let Ok(raw) = STANDARD.decode(signature) else { return false };
        [Some(&self.current), self.previous.as_ref()].into_iter().flatten().any(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
            mac.update(purpose.as_bytes());
            mac.update(&[0]);
            mac.update(data.as_bytes());
            mac.verify_slice(&raw).is_ok()
        })
    }

    /// A ticket for `user` (`root@pam`) issued at `now` (Unix seconds).
    pub fn ticket(&self, user: &str, now: i64) -> String {
        let data = format!("PVE:{user}:{now:08X}");
        let signature = Keys::sign(&self.current, "ticket", &data);
        format!("{data}::{signature}")
    }

    /// The user a ticket was issued to, if it is genuine and not expired at `now`.
    pub fn verify_ticket(&self, ticket: &str, now: i64) -> Result<String, TicketError> {
        let (data, signature) = ticket.split_once("::").ok_or(TicketError::Malformed)?;
        let mut parts = data.split(':');
        let (Some("PVE"), Some(user), Some(time), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TicketError::Malformed);
        };
        let issued = i64::from_str_radix(time, 16).map_err(|_| TicketError::Malformed)?;
        if time.len() != 8 || user.is_empty() {
            return Err(TicketError::Malformed);
        }
        if !self.verify("ticket", data, signature) {
            return Err(TicketError::BadSignature);
        }
        let age = now - issued;
        if !(-MAX_SKEW..=TICKET_LIFETIME).contains(&age) {
            return Err(TicketError::Expired);
        }
        Ok(user.to_string())
    }

    /// The CSRF prevention token that goes with `user`'s tickets.
    pub fn csrf_token(&self, user: &str, now: i64) -> String {
        let time = format!("{now:08X}");
        format!("{time}:{}", Keys::sign(&self.current, "csrf", &format!("{time}:{user}")))
    }

    /// Whether `token` is `user`'s CSRF token and still within a ticket's lifetime.
    pub fn verify_csrf(&self, user: &str, token: &str, now: i64) -> bool {
        let Some((time, signature)) = token.split_once(':') else { return false };
        let Ok(issued) = i64::from_str_radix(time, 16) else { return false };
        let age = now - issued;
        time.len() == 8
            && (-MAX_SKEW..=TICKET_LIFETIME).contains(&age)
            && self.verify("csrf", &format!("{time}:{user}"), signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn tickets_look_like_proxmox_and_verify() {
        let keys = Keys::generate();
        let ticket = keys.ticket("root@pam", NOW);
        let parts: Vec<&str> = ticket.split(':').collect();
        assert!(
            parts.len() > 3 && parts[0] == "PVE" && parts[1] == "root@pam" && parts[2] == "6B49D200",
            "{ticket}"
        );
        assert_eq!(parts[3], "", "the empty field before the signature, as in PVE:user:TIME::SIG");
        assert_eq!(keys.verify_ticket(&ticket, NOW + 60).unwrap(), "root@pam");
        assert_eq!(keys.verify_ticket(&ticket, NOW + TICKET_LIFETIME + 1), Err(TicketError::Expired));
        let forged = ticket.replace("root@pam", "admin@pve");
        assert_eq!(keys.verify_ticket(&forged, NOW), Err(TicketError::BadSignature));
        assert_eq!(Keys::generate().verify_ticket(&ticket, NOW), Err(TicketError::BadSignature));
        assert_eq!(keys.verify_ticket("PVE:root@pam", NOW), Err(TicketError::Malformed));
    }

    #[test]
    fn rotation_keeps_old_tickets_until_they_expire() {
        let mut keys = Keys::generate();
        let old = keys.ticket("root@pam", NOW);
        keys.rotate();
        assert!(keys.verify_ticket(&old, NOW + 10).is_ok());
        keys.rotate();
        assert_eq!(keys.verify_ticket(&old, NOW + 10), Err(TicketError::BadSignature));
    }

    #[test]
    fn csrf_tokens_bind_user_and_time() {
        let keys = Keys::generate();
        let token = keys.csrf_token("root@pam", NOW);
        assert!(token.starts_with("6B49D200:"), "{token}");
        assert!(keys.verify_csrf("root@pam", &token, NOW + 5));
        assert!(!keys.verify_csrf("other@pve", &token, NOW + 5));
        assert!(!keys.verify_csrf("root@pam", &token, NOW + TICKET_LIFETIME + 1));
        assert!(!keys.verify_csrf("root@pam", "6B49D200:AAAA", NOW));
    }
}
