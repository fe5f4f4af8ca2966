//! The file structure shared by qemu-server and pve-container configs.
//!
//! A file is a main section followed by named sections (`[PENDING]`, `[special:cloudinit]`,
//! snapshots). Each section may start with `#` comment lines, which Proxmox uses for the
//! description (percent-encoded), then `key: value` lines. Proxmox writes keys sorted; raw
//! `lxc.*` keys may repeat and keep their order after the sorted keys.

use std::collections::BTreeMap;

use super::{CodecError, Result};

/// A parsed config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFile {
    pub main: Section,
    /// Named sections in file order.
    pub sections: Vec<Section>,
}

/// One section: description, sorted keys, and ordered raw `lxc.*` lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Section {
    /// `None` for the main section.
    pub name: Option<String>,
    pub description: Option<String>,
    pub entries: BTreeMap<String, String>,
    pub raw_lxc: Vec<(String, String)>,
}

impl Section {
    pub fn named(name: impl Into<String>) -> Self {
        Section { name: Some(name.into()), ..Section::default() }
    }
}

impl ConfigFile {
    /// Parses config text. Duplicate keys, malformed lines and bad section headers are errors.
    pub fn parse(text: &str) -> Result<Self> {
        let mut file = ConfigFile::default();
        let mut current = Section::default();
        let mut in_main = true;
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let line = raw.trim_end();
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let text = decode_text(comment);
                match &mut current.description {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&text);
                    }
                    None => current.description = Some(text),
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix('[') {
                let name = rest.strip_suffix(']').ok_or_else(|| CodecError::Syntax {
                    line: line_no,
                    message: format!("section header {line:?} is missing its closing ']'"),
                })?;
                if !valid_section_name(name) {
                    return Err(CodecError::Syntax {
                        line: line_no,
                        message: format!(
                            "invalid section name {name:?}: allowed are PENDING, special:<name> and snapshot names [a-zA-Z][a-zA-Z0-9_-]*"
                        ),
                    });
                }
                let done = std::mem::replace(&mut current, Section::named(name));
                if in_main {
                    file.main = done;
                    in_main = false;
                } else {
                    file.sections.push(done);
                }
                continue;
            }
            let (key, value) = line.split_once(':').ok_or_else(|| CodecError::Syntax {
                line: line_no,
                message: format!("expected 'key: value', found {line:?}"),
            })?;
            let key = key.trim();
            let value = value.trim();
            if key.starts_with("lxc.") {
                current.raw_lxc.push((key.to_string(), value.to_string()));
                continue;
            }
            if !valid_key(key) {
                return Err(CodecError::Syntax {
                    line: line_no,
                    message: format!(
                        "invalid key {key:?}: keys are lower-case letters, '-', '_' and a trailing number"
                    ),
                });
            }
            if current.entries.insert(key.to_string(), value.to_string()).is_some() {
                return Err(CodecError::invalid(key, format!("duplicate key (line {line_no})")));
            }
        }
        if in_main {
            file.main = current;
        } else {
            file.sections.push(current);
        }
        Ok(file)
    }

    /// Writes the file as Proxmox does: description comments, sorted keys, raw lxc lines,
    /// then each named section after a blank line.
    pub fn print(&self) -> String {
        let mut out = String::new();
        print_section(&mut out, &self.main);
        for section in &self.sections {
            out.push('\n');
            out.push('[');
            out.push_str(section.name.as_deref().unwrap_or_default());
            out.push_str("]\n");
            print_section(&mut out, section);
        }
        out
    }

    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name.as_deref() == Some(name))
    }
}

fn print_section(out: &mut String, section: &Section) {
    if let Some(description) = &section.description {
        // An empty description is one bare `#` line, as Proxmox writes it.
        for line in description.split('\n') {
            out.push('#');
            out.push_str(&encode_text(line));
            out.push('\n');
        }
    }
    for (key, value) in &section.entries {
        out.push_str(key);
        out.push_str(": ");
        out.push_str(value);
        out.push('\n');
    }
    for (key, value) in &section.raw_lxc {
        out.push_str(key);
        out.push_str(": ");
        out.push_str(value);
        out.push('\n');
    }
}

fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn valid_section_name(name: &str) -> bool {
    if name == "PENDING" {
        return true;
    }
    let name = name.strip_prefix("special:").unwrap_or(name);
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Proxmox's `encode_text`: control characters, non-ASCII bytes and ':' are percent-encoded.
pub fn encode_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b':' && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Proxmox's `decode_text`: percent-decoding, UTF-8.
pub fn decode_text(text: &str) -> String {
    String::from_utf8_lossy(&percent_decode(text)).into_owned()
}

/// Percent-decodes; a malformed escape is kept literally, as URI::Escape does.
pub fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// URI-escapes everything but unreserved characters (Proxmox `sshkeys`).
pub fn uri_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_is_percent_encoded() {
        let text = "#Web server%3A frontend\n#second line\nmemory: 512\n";
        let file = ConfigFile::parse(text).unwrap();
        assert_eq!(file.main.description.as_deref(), Some("Web server: frontend\nsecond line"));
        assert_eq!(file.print(), text);
    }

    #[test]
    fn duplicate_key_names_the_key() {
        let err = ConfigFile::parse("memory: 512\nmemory: 1024\n").unwrap_err();
        assert_eq!(err.key(), Some("memory"));
    }

    #[test]
    fn malformed_line_names_the_line() {
        let err = ConfigFile::parse("memory 512\n").unwrap_err();
        assert!(matches!(err, CodecError::Syntax { line: 1, .. }), "{err}");
    }

    #[test]
    fn sections_keep_order() {
        let text = "cores: 1\n\n[PENDING]\ncores: 2\n\n[snap1]\ncores: 1\nsnaptime: 1700000000\n";
        let file = ConfigFile::parse(text).unwrap();
        assert_eq!(file.sections.len(), 2);
        assert_eq!(file.print(), text);
    }
}
