//! Proxmox property strings: `head,key=value,key=value`.
//!
//! Proxmox prints the default key's value first (without `key=`), then required keys
//! sorted, then the remaining keys sorted; booleans as `1`/`0`, sizes with the largest exact
//! unit. Parsing accepts any order.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CodecError, Result};

/// A parsed property string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyString {
    /// The value given without `key=` (the format's default key).
    pub head: Option<String>,
    pub pairs: BTreeMap<String, String>,
}

impl PropertyString {
    /// Parses `text`; `key` names the config key in errors.
    pub fn parse(key: &str, text: &str) -> Result<Self> {
        let mut out = PropertyString::default();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            match part.split_once('=') {
                Some((k, v)) => {
                    if out.pairs.insert(k.trim().to_string(), v.trim().to_string()).is_some() {
                        return Err(CodecError::invalid(key, format!("property '{k}' given twice")));
                    }
                }
                None if out.head.is_none() => out.head = Some(part.to_string()),
                None => {
                    return Err(CodecError::invalid(
                        key,
                        format!("value '{part}' without a property name; expected name=value"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Removes and returns a property.
    pub fn take(&mut self, name: &str) -> Option<String> {
        self.pairs.remove(name)
    }

    /// Fails on any property left unconsumed, naming it and what is allowed.
    pub fn finish(self, key: &str, allowed: &[&str]) -> Result<BTreeMap<String, String>> {
        let mut extra = BTreeMap::new();
        for (k, v) in self.pairs {
            if allowed.contains(&k.as_str()) {
                extra.insert(k, v);
            } else {
                return Err(CodecError::invalid(
                    format!("{key}.{k}"),
                    format!("unknown property; allowed: {}", allowed.join(", ")),
                ));
            }
        }
        Ok(extra)
    }
}

/// Builds a property string in Proxmox's canonical order.
#[derive(Debug, Default)]
pub struct PropertyWriter {
    head: Option<String>,
    required: BTreeMap<String, String>,
    rest: BTreeMap<String, String>,
}

impl PropertyWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn head(mut self, value: impl Into<String>) -> Self {
        self.head = Some(value.into());
        self
    }
    pub fn required(mut self, key: &str, value: impl Into<String>) -> Self {
        self.required.insert(key.to_string(), value.into());
        self
    }
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.rest.insert(key.to_string(), value.into());
    }
    pub fn opt(&mut self, key: &str, value: Option<impl ToString>) {
        if let Some(v) = value {
            self.set(key, v.to_string());
        }
    }
    /// Writes `key=1` when `value` differs from the default, `key=0` likewise.
    pub fn flag(&mut self, key: &str, value: bool, default: bool) {
        if value != default {
            self.set(key, bool_str(value));
        }
    }
    pub fn extend(&mut self, extra: &BTreeMap<String, String>) {
        for (k, v) in extra {
            self.set(k, v.clone());
        }
    }
    pub fn is_empty(&self) -> bool {
        self.head.is_none() && self.required.is_empty() && self.rest.is_empty()
    }
    pub fn finish(self) -> String {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(self.head);
        parts.extend(self.required.into_iter().map(|(k, v)| format!("{k}={v}")));
        parts.extend(self.rest.into_iter().map(|(k, v)| format!("{k}={v}")));
        parts.join(",")
    }
}

/// Whether `key` is `prefix` followed by a number in `0..=max` (`net0`, `scsi12`).
pub fn numbered(key: &str, prefix: &str, max: u32) -> bool {
    key.strip_prefix(prefix)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .filter(|n| n.len() == 1 || !n.starts_with('0'))
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n <= max)
}

/// Whether `key` is one of `families`, alone or followed by a number (`serial0`).
pub fn in_key_families(key: &str, families: &[&str]) -> bool {
    families.iter().any(|f| {
        key == *f
            || key.strip_prefix(f).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

pub fn bool_str(value: bool) -> &'static str {
    if value { "1" } else { "0" }
}

/// Parses a Proxmox boolean (`1/0`, `yes/no`, `on/off`, `true/false`).
pub fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "yes" | "on" | "true" => Ok(true),
        "0" | "no" | "off" | "false" => Ok(false),
        _ => Err(CodecError::invalid(key, format!("'{value}' is not a boolean; allowed: 0, 1"))),
    }
}

/// Parses an unsigned integer within `[min, max]`.
pub fn parse_uint<T>(key: &str, value: &str, min: u64, max: u64) -> Result<T>
where
    T: TryFrom<u64>,
{
    let n: u64 = value.parse().map_err(|_| {
        CodecError::invalid(key, format!("'{value}' is not an integer; allowed: {min}..={max}"))
    })?;
    if n < min || n > max {
        return Err(CodecError::invalid(key, format!("{n} is out of range; allowed: {min}..={max}")));
    }
    T::try_from(n).map_err(|_| CodecError::invalid(key, format!("{n} is out of range")))
}

/// Parses a non-negative number within `[min, max]`.
pub fn parse_number(key: &str, value: &str, min: f64, max: f64) -> Result<f64> {
    let n: f64 = value.parse().map_err(|_| {
        CodecError::invalid(key, format!("'{value}' is not a number; allowed: {min}..={max}"))
    })?;
    if !(min..=max).contains(&n) {
        return Err(CodecError::invalid(key, format!("{n} is out of range; allowed: {min}..={max}")));
    }
    Ok(n)
}

/// Formats a number as Proxmox does (no trailing `.0`).
pub fn number_str(n: f64) -> String {
    if n.fract() == 0.0 { format!("{}", n as i64) } else { format!("{n}") }
}

/// Parses a value of a serde enum, listing the allowed values (taken from its schema).
pub fn parse_enum<T: DeserializeOwned + JsonSchema>(key: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|_| {
        CodecError::invalid(
            key,
            format!("unknown value '{value}'; allowed: {}", enum_values::<T>().join(", ")),
        )
    })
}

/// The wire name of a serde enum value.
pub fn enum_str<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => panic!("enum_str: not a unit enum value: {other:?}"),
    }
}

fn enum_values<T: JsonSchema>() -> Vec<String> {
    let schema = schemars::SchemaGenerator::default().into_root_schema_for::<T>();
    let mut out = Vec::new();
    collect_enum(&serde_json::to_value(&schema).unwrap_or_default(), &mut out);
    out
}

fn collect_enum(schema: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(values) = schema.get("enum").and_then(|e| e.as_array()) {
        out.extend(values.iter().filter_map(|v| v.as_str().map(str::to_string)));
    }
    if let Some(c) = schema.get("const").and_then(|c| c.as_str()) {
        out.push(c.to_string());
    }
    for key in ["oneOf", "anyOf"] {
        for sub in schema.get(key).and_then(|s| s.as_array()).into_iter().flatten() {
            collect_enum(sub, out);
        }
    }
}

/// Parses a disk size into bytes: a plain number is bytes when it is a Proxmox size
/// property, `K/M/G/T` (and `Ki/Mi/Gi/Ti`) are binary multiples.
pub fn parse_size(key: &str, value: &str) -> Result<u64> {
    let bad = || {
        CodecError::invalid(
            key,
            format!("'{value}' is not a size; expected a number with an optional K, M, G or T suffix"),
        )
    };
    let trimmed = value.trim_end_matches('i');
    let (num, unit) = match trimmed.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&trimmed[..i], Some(c.to_ascii_uppercase())),
        _ => (trimmed, None),
    };
    if value.ends_with('i') && unit.is_none() {
        return Err(bad());
    }
    let factor: u64 = match unit {
        None => 1,
        Some('K') => 1 << 10,
        Some('M') => 1 << 20,
        Some('G') => 1 << 30,
        Some('T') => 1 << 40,
        Some(_) => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    if n < 0.0 || !n.is_finite() {
        return Err(bad());
    }
    Ok((n * factor as f64).round() as u64)
}

/// Formats bytes with the largest unit that divides them exactly (Proxmox `format_size`).
pub fn format_size(bytes: u64) -> String {
    for (unit, factor) in [("T", 1u64 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    bytes.to_string()
}

/// Normalises a spec size string (`32G`, `40Gi`, `1.5T`) to Proxmox's form.
pub fn normalize_size(key: &str, value: &str) -> Result<String> {
    parse_size(key, value).map(format_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::CacheMode;

    #[test]
    fn canonical_order_is_head_required_rest() {
        let mut w = PropertyWriter::new().head("local:vm-100-disk-0").required("mp", "/data");
        w.set("size", "8G");
        w.set("backup", "1");
        assert_eq!(w.finish(), "local:vm-100-disk-0,mp=/data,backup=1,size=8G");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("size", "32G").unwrap(), 32 << 30);
        assert_eq!(parse_size("size", "40Gi").unwrap(), 40 << 30);
        assert_eq!(parse_size("size", "1.5T").unwrap(), 3 << 39);
        assert_eq!(format_size(3 << 39), "1536G");
        assert_eq!(format_size(4 << 20), "4M");
        assert_eq!(format_size(1000), "1000");
        assert!(parse_size("size", "12X").is_err());
        assert!(parse_size("size", "big").is_err());
    }

    #[test]
    fn enum_error_lists_allowed_values() {
        let err = parse_enum::<CacheMode>("scsi0.cache", "fast").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("scsi0.cache: unknown value 'fast'"), "{text}");
        assert!(text.contains("writeback"), "{text}");
    }

    #[test]
    fn unknown_property_is_named() {
        let p = PropertyString::parse("net0", "virtio,bogus=1").unwrap();
        let err = p.finish("net0", &["bridge"]).unwrap_err();
        assert_eq!(err.key(), Some("net0.bogus"));
    }
}
