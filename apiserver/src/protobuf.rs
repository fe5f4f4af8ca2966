//! The one protobuf body kubectl sends without a JSON fallback: `kubectl create namespace`
//! writes a `v1.Namespace` through its typed client in Kubernetes' protobuf envelope. This
//! decodes exactly that (the `k8s\0` magic, `runtime.Unknown`, and the ObjectMeta fields a
//! create can carry); every other protobuf body gets 415 and clients use JSON.

use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

struct Reader<'a> {
    buf: &'a [u8],
}

enum Field<'a> {
    /// A varint or fixed-width scalar; no decoded field needs its value.
    Scalar,
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.buf.split_first()?;
            self.buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// The next (field number, value); fixed-width fields are skipped over.
    fn next(&mut self) -> Option<Option<(u64, Field<'a>)>> {
        if self.buf.is_empty() {
            return Some(None);
        }
        let key = self.varint()?;
        let (number, wire) = (key >> 3, key & 7);
        let field = match wire {
            0 => {
                self.varint()?;
                Field::Scalar
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                if len > self.buf.len() {
                    return None;
                }
                let (bytes, rest) = self.buf.split_at(len);
                self.buf = rest;
                Field::Bytes(bytes)
            }
            1 => {
                self.buf = self.buf.get(8..)?;
                Field::Scalar
            }
            5 => {
                self.buf = self.buf.get(4..)?;
                Field::Scalar
            }
            _ => return None,
        };
        Some(Some((number, field)))
    }
}

fn fields(buf: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    let mut reader = Reader { buf };
    let mut out = Vec::new();
    while let Some(field) = reader.next()? {
        out.push(field);
    }
    Some(out)
}

fn string(bytes: &[u8]) -> Option<Value> {
    std::str::from_utf8(bytes).ok().map(|s| Value::String(s.to_string()))
}

fn map_entry(bytes: &[u8]) -> Option<(String, Value)> {
    let (mut key, mut value) = (String::new(), Value::String(String::new()));
    for (number, field) in fields(bytes)? {
        match (number, field) {
            (1, Field::Bytes(b)) => key = std::str::from_utf8(b).ok()?.to_string(),
            (2, Field::Bytes(b)) => value = string(b)?,
            _ => {}
        }
    }
    Some((key, value))
}

fn object_meta(bytes: &[u8]) -> Option<Value> {
    let mut meta = Map::new();
    let (mut labels, mut annotations, mut finalizers) = (Map::new(), Map::new(), Vec::new());
    for (number, field) in fields(bytes)? {
        match (number, field) {
            (1, Field::Bytes(b)) => {
                meta.insert("name".into(), string(b)?);
            }
            (2, Field::Bytes(b)) => {
                meta.insert("generateName".into(), string(b)?);
            }
            (3, Field::Bytes(b)) => {
                meta.insert("namespace".into(), string(b)?);
            }
            (11, Field::Bytes(b)) => {
                let (k, v) = map_entry(b)?;
                labels.insert(k, v);
            }
            (12, Field::Bytes(b)) => {
                let (k, v) = map_entry(b)?;
                annotations.insert(k, v);
            }
            (14, Field::Bytes(b)) => finalizers.push(string(b)?),
            _ => {}
        }
    }
    if !labels.is_empty() {
        meta.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        meta.insert("annotations".into(), Value::Object(annotations));
    }
    if !finalizers.is_empty() {
        meta.insert("finalizers".into(), Value::Array(finalizers));
    }
    Some(Value::Object(meta))
}

/// A protobuf-encoded `v1.Namespace` as JSON; `None` if the body is anything else.
pub fn decode_namespace(body: &[u8]) -> Option<Value> {
    let unknown = body.strip_prefix(MAGIC)?;
    let mut raw = None;
    let mut kind = None;
    for (number, field) in fields(unknown)? {
        match (number, field) {
            (1, Field::Bytes(type_meta)) => {
                for (n, f) in fields(type_meta)? {
                    if let (2, Field::Bytes(k)) = (n, f) {
                        kind = Some(std::str::from_utf8(k).ok()?.to_string());
                    }
                }
            }
            (2, Field::Bytes(r)) => raw = Some(r),
            _ => {}
        }
    }
    if kind.as_deref() != Some("Namespace") {
        return None;
    }
    let mut object = json!({"apiVersion": "v1", "kind": "Namespace"});
    for (number, field) in fields(raw?)? {
        if let (1, Field::Bytes(meta)) = (number, field) {
            object["metadata"] = object_meta(meta)?;
        }
    }
    Some(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_field(number: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_what_kubectl_create_namespace_sends() {
        let label = [bytes_field(1, b"team"), bytes_field(2, b"infra")].concat();
        let meta = [bytes_field(1, b"foo"), bytes_field(11, &label)].concat();
        let namespace = [bytes_field(1, &meta), bytes_field(2, b""), bytes_field(3, b"")].concat();
        let type_meta = [bytes_field(1, b"v1"), bytes_field(2, b"Namespace")].concat();
        let unknown = [bytes_field(1, &type_meta), bytes_field(2, &namespace)].concat();
        let body = [MAGIC, &unknown].concat();
        let object = decode_namespace(&body).unwrap();
        assert_eq!(object["metadata"]["name"], "foo");
        assert_eq!(object["metadata"]["labels"]["team"], "infra");
        assert!(decode_namespace(b"{\"kind\":\"Namespace\"}").is_none());
        assert!(decode_namespace(&body[..body.len() - 3]).is_none(), "truncated input is refused");
    }
}
