//! The `/api2/json` envelope: `{"data": …}` on success; on error the status code, a reason
//! phrase that is the message's first line (clients show and match it: `500 VM 100 already
//! running`), and `{"data":null,"message":"…\n"}` with an `errors` map for parameter errors.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const CONTENT_TYPE: &str = "application/json;charset=UTF-8";

/// A successful result.
pub fn ok(data: Value) -> Response {
    with_body(StatusCode::OK, None, json!({ "data": data }))
}

/// A successful result whose `data` is already JSON text (large listings are assembled
/// from cached pieces rather than built as one value).
pub fn ok_raw(data_json: &str) -> Response {
    let mut response = (StatusCode::OK, format!("{{\"data\":{data_json}}}")).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

/// An error as the Proxmox API reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PveError {
    pub status: u16,
    pub message: String,
    /// Parameter name → what is wrong with it.
    pub errors: BTreeMap<String, String>,
}

impl PveError {
    pub fn new(status: u16, message: impl Into<String>) -> PveError {
        PveError { status, message: message.into(), errors: BTreeMap::new() }
    }

    /// `400 Parameter verification failed.` with one message per parameter.
    pub fn parameters(errors: BTreeMap<String, String>) -> PveError {
        PveError { status: 400, message: "Parameter verification failed.".into(), errors }
    }

    /// `500` for a failed read of the resources behind an endpoint.
    pub fn read_failed(e: kube::Error) -> PveError {
        PveError::new(500, format!("reading resources failed: {e}"))
    }

    /// A failed write of a resource: the server's refusal (`422` → 400 with its message), a
    /// conflict as Proxmox's "detected modified configuration", anything else a 500.
    pub fn write_failed(e: kube::Error) -> PveError {
        match e {
            kube::Error::Api(ae) if ae.code == 422 => PveError::new(400, ae.message),
            kube::Error::Api(ae) if ae.code == 409 => {
                PveError::new(500, "detected modified configuration - file changed by other user? Try again.")
            }
            kube::Error::Api(ae) => PveError::new(500, ae.message),
            e => PveError::new(500, e.to_string()),
        }
    }

    /// `501 Method 'GET /x' not implemented`.
    pub fn not_implemented(method: &str, path: &str) -> PveError {
        PveError::new(501, format!("Method '{method} {path}' not implemented"))
    }

    /// `403 Permission check failed (/vms/100, VM.PowerMgmt)`.
    pub fn permission(path: &str, privilege: &str) -> PveError {
        PveError::new(403, format!("Permission check failed ({path}, {privilege})"))
    }
}

impl IntoResponse for PveError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let first = self.message.lines().next().unwrap_or("").trim().to_string();
        let mut body = json!({"data": null, "message": format!("{}\n", self.message.trim_end())});
        if !self.errors.is_empty() {
            body["errors"] = json!(self.errors);
        }
        with_body(status, Some(&first), body)
    }
}

/// A 401 the way Proxmox answers unauthenticated requests: the reason phrase only, no body.
pub fn unauthorized(reason: &str) -> Response {
    let mut response = StatusCode::UNAUTHORIZED.into_response();
    set_reason(&mut response, reason);
    response
}

fn with_body(status: StatusCode, reason: Option<&str>, body: Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if let Some(reason) = reason {
        set_reason(&mut response, reason);
    }
    response
}

/// HTTP/1.1 carries a custom reason phrase (HTTP/2 has none). Characters a status line cannot
/// carry are replaced, so the phrase never breaks the response.
fn set_reason(response: &mut Response, reason: &str) {
    let clean: String =
        reason.chars().map(|c| if c == '\t' || (' '..='~').contains(&c) { c } else { '?' }).collect();
    if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(clean.into_bytes()) {
        response.extensions_mut().insert(phrase);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(r: Response) -> Value {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn reason(r: &Response) -> String {
        String::from_utf8(r.extensions().get::<hyper::ext::ReasonPhrase>().unwrap().as_bytes().to_vec())
            .unwrap()
    }

    #[tokio::test]
    async fn errors_carry_the_first_line_as_reason_and_the_message_in_the_body() {
        let r = PveError::new(500, "VM 100 already running\nsecond line").into_response();
        assert_eq!(r.status(), 500);
        assert_eq!(reason(&r), "VM 100 already running");
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(body(r).await, json!({"data": null, "message": "VM 100 already running\nsecond line\n"}));

        let mut errors = BTreeMap::new();
        errors.insert("vmid".to_string(), "type check ('integer') failed - got 'abc'".to_string());
        let r = PveError::parameters(errors).into_response();
        assert_eq!((r.status().as_u16(), reason(&r)), (400, "Parameter verification failed.".to_string()));
        assert_eq!(
            body(r).await,
            json!({"data": null, "errors": {"vmid": "type check ('integer') failed - got 'abc'"}, "message": "Parameter verification failed.\n"})
        );
        let r = PveError::not_implemented("GET", "/nope").into_response();
        assert_eq!(
            (r.status().as_u16(), reason(&r)),
            (501, "Method 'GET /nope' not implemented".to_string())
        );
    }

    #[tokio::test]
    async fn success_is_the_data_envelope() {
        let r = ok(json!("100"));
        assert_eq!(r.status(), 200);
        assert_eq!(body(r).await, json!({"data": "100"}));
        let r = unauthorized("No ticket");
        assert_eq!((r.status().as_u16(), reason(&r)), (401, "No ticket".to_string()));
    }
}
