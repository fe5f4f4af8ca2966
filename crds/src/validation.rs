//! Validation of objects against their CRD's OpenAPI schema, the way the API server does it:
//! a real JSON-schema validator, one error per offending field path, and unknown fields
//! reported as `field not declared in schema` (Kubernetes' strict field validation).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Kubernetes-style path: `spec.cpu.cores`, `spec.disks[0].id`.
    pub field: String,
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueTypeInvalid`
    /// or `FieldValueUnknown` (an undeclared field).
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("CRD {crd} has no schema for version {version}")]
    NoSchema { crd: String, version: String },
    #[error("CRD {crd}: schema does not compile: {message}")]
    Compile { crd: String, message: String },
}

/// A compiled validator for one kind and version.
pub struct SchemaValidator {
    strict: jsonschema::Validator,
}

impl std::fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SchemaValidator")
    }
}

impl SchemaValidator {
    /// Compiles the schema of `version` of `crd`.
    pub fn for_crd(crd: &CustomResourceDefinition, version: &str) -> Result<Self, SchemaError> {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let schema = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == version)
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| SchemaError::NoSchema { crd: name.clone(), version: version.to_string() })?;
        let mut schema = serde_json::to_value(schema).expect("schemas serialize");
        // Kubernetes declares apiVersion, kind and metadata implicitly for every kind.
        if let Some(Value::Object(props)) = schema.get_mut("properties") {
            for (name, sub) in [
                ("apiVersion", serde_json::json!({"type": "string"})),
                ("kind", serde_json::json!({"type": "string"})),
                ("metadata", serde_json::json!({"type": "object"})),
            ] {
                props.entry(name).or_insert(sub);
            }
        }
        to_json_schema(&mut schema, true);
        let strict = jsonschema::validator_for(&schema)
            .map_err(|e| SchemaError::Compile { crd: name, message: e.to_string() })?;
        Ok(SchemaValidator { strict })
    }

    /// All schema violations of `object`, unknown fields included, sorted by field path.
    pub fn validate(&self, object: &Value) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for error in self.strict.iter_errors(object) {
            let base = pointer_to_field(&error.instance_path().to_string());
            use jsonschema::error::ValidationErrorKind as K;
            match error.kind() {
                K::AdditionalProperties { unexpected } => {
                    for name in unexpected {
                        errors.push(FieldError {
                            field: join(&base, name),
                            reason: "FieldValueUnknown",
                            message: "field not declared in schema".to_string(),
                        });
                    }
                }
                K::Required { property } => {
                    let name = property.as_str().unwrap_or_default();
                    errors.push(FieldError {
                        field: join(&base, name),
                        reason: "FieldValueRequired",
                        message: "Required value".to_string(),
                    });
                }
                K::Enum { options } => errors.push(FieldError {
                    field: base,
                    reason: "FieldValueNotSupported",
                    message: format!(
                        "Unsupported value: {}: supported values: {}",
                        error.instance(),
                        enum_list(options)
                    ),
                }),
                K::Type { .. } => errors.push(FieldError {
                    field: base,
                    reason: "FieldValueTypeInvalid",
                    message: format!("Invalid value: {}: {}", error.instance(), error),
                }),
                _ => errors.push(FieldError {
                    field: base,
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: {}: {}", error.instance(), error),
                }),
            }
        }
        errors.sort_by(|a, b| a.field.cmp(&b.field));
        errors.dedup();
        errors
    }
}

fn enum_list(options: &Value) -> String {
    match options {
        Value::Array(values) => {
            values.iter().filter(|v| !v.is_null()).map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
        }
        other => other.to_string(),
    }
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() { name.to_string() } else { format!("{base}.{name}") }
}

/// `/spec/disks/0/id` → `spec.disks[0].id`.
fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.bytes().all(|b| b.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// Turns a structural OpenAPI v3 schema into plain JSON Schema: `nullable` becomes a null
/// type, and (when `strict`) objects with declared properties refuse undeclared ones unless
/// they preserve unknown fields. `metadata` is left open; the API server checks it itself.
fn to_json_schema(schema: &mut Value, strict: bool) {
    let Value::Object(map) = schema else { return };
    if map.remove("nullable") == Some(Value::Bool(true)) {
        if let Some(Value::String(t)) = map.get("type").cloned() {
            map.insert("type".into(), Value::Array(vec![Value::String(t), Value::String("null".into())]));
        }
        if let Some(Value::Array(values)) = map.get_mut("enum")
            && !values.contains(&Value::Null)
        {
            values.push(Value::Null);
        }
    }
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if let Some(Value::Object(props)) = map.get_mut("properties") {
        for (name, sub) in props.iter_mut() {
            if name == "metadata" {
                continue;
            }
            to_json_schema(sub, strict);
        }
        if strict && !preserve && !map.contains_key("additionalProperties") {
            map.insert("additionalProperties".into(), Value::Bool(false));
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(sub) = map.get_mut(key) {
            to_json_schema(sub, strict);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = map.get_mut(key) {
            subs.iter_mut().for_each(|s| to_json_schema(s, strict));
        }
    }
}

/// Validators for every kpve kind, keyed by kind.
#[derive(Debug)]
pub struct KindValidators {
    by_kind: Vec<(String, SchemaValidator)>,
}

impl KindValidators {
    /// Compiles the schema of every kpve CRD.
    pub fn new() -> Result<Self, SchemaError> {
        let mut by_kind = Vec::new();
        for crd in crate::crdgen::all() {
            let validator = SchemaValidator::for_crd(&crd, crate::VERSION)?;
            by_kind.push((crd.spec.names.kind.clone(), validator));
        }
        Ok(KindValidators { by_kind })
    }

    /// Validates one manifest document: apiVersion, kind, metadata.name, then the schema.
    pub fn validate(&self, object: &Value) -> Vec<FieldError> {
        let want = format!("{}/{}", crate::GROUP, crate::VERSION);
        let mut errors = Vec::new();
        match object.get("apiVersion").and_then(Value::as_str) {
            Some(v) if v == want => {}
            Some(v) => errors.push(FieldError {
                field: "apiVersion".into(),
                reason: "FieldValueNotSupported",
                message: format!("Unsupported value: {v:?}: supported values: {want:?}"),
            }),
            None => errors.push(FieldError {
                field: "apiVersion".into(),
                reason: "FieldValueRequired",
                message: "Required value".into(),
            }),
        }
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or_default();
        let Some((_, validator)) = self.by_kind.iter().find(|(k, _)| k == kind) else {
            let kinds: Vec<&str> = self.by_kind.iter().map(|(k, _)| k.as_str()).collect();
            errors.push(FieldError {
                field: "kind".into(),
                reason: "FieldValueNotSupported",
                message: format!("Unsupported value: {kind:?}: supported values: {}", kinds.join(", ")),
            });
            return errors;
        };
        match object.pointer("/metadata/name").and_then(Value::as_str) {
            Some(name) if is_dns_subdomain(name) => {}
            Some(name) => errors.push(FieldError {
                field: "metadata.name".into(),
                reason: "FieldValueInvalid",
                message: format!(
                    "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            }),
            None => errors.push(FieldError {
                field: "metadata.name".into(),
                reason: "FieldValueRequired",
                message: "Required value: name is required".into(),
            }),
        }
        errors.extend(validator.validate(object));
        errors
    }
}

/// A DNS-1123 subdomain: ≤ 253 characters of `[a-z0-9.-]`, alphanumeric at both ends.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}
