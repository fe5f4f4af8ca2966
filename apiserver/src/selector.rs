//! Label and field selectors of list and watch requests (`labelSelector=` and `fieldSelector=`, already
//! URL-decoded): parsing with apimachinery's syntax (`labels.Parse`, `fields.ParseSelector`) and error
//! texts, and matching against stored objects. Which fields a kind can select on comes from
//! `ResourceType::selectable_fields`.

use std::borrow::Cow;

use serde_json::Value;

use crate::resources::ResourceType;

/// A selector the server cannot use -> 400 BadRequest.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectorError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> SelectorError {
    SelectorError::Invalid(message.into())
}

/// A parsed `labelSelector`: every requirement must hold (comma = AND).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: LabelOp,
    values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelOp {
    Equals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

impl LabelSelector {
    /// Parses apimachinery `labels.Parse` syntax: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
    /// `k`, `!k`, `k>1`, `k<1`; comma = AND; whitespace between tokens is ignored; an empty string
    /// selects everything.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut parser = Parser { tokens: lex(s), pos: 0 };
        let mut requirements = Vec::new();
        if parser.peek() == &Token::End {
            return Ok(LabelSelector { requirements });
        }
        loop {
            requirements.push(parser.requirement()?);
            match parser.next() {
                Token::Comma => {}
                Token::End => return Ok(LabelSelector { requirements }),
                other => return Err(parse_error(&other, "',' or 'end of string'")),
            }
        }
    }

    /// Matches against `metadata.labels` of a whole object; no labels is the empty set.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.get("metadata").and_then(|m| m.get("labels"));
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|r| {
            let value = label(&r.key);
            let is_in = || value.is_some_and(|v| r.values.iter().any(|w| w == v));
            let number = || value.and_then(|v| v.parse::<i64>().ok());
            let bound = || r.values.first().and_then(|v| v.parse::<i64>().ok());
            match r.op {
                LabelOp::Equals | LabelOp::In => is_in(),
                // As in apimachinery, an absent label satisfies != and notin.
                LabelOp::NotEquals | LabelOp::NotIn => !is_in(),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
                LabelOp::GreaterThan => matches!((number(), bound()), (Some(n), Some(b)) if n > b),
                LabelOp::LessThan => matches!((number(), bound()), (Some(n), Some(b)) if n < b),
            }
        })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Not,
    Equals,
    DoubleEquals,
    NotEquals,
    In,
    NotIn,
    Greater,
    Less,
    Open,
    Close,
    Comma,
    End,
}

impl Token {
    fn literal(&self) -> &str {
        match self {
            Token::Ident(s) => s,
            Token::Not => "!",
            Token::Equals => "=",
            Token::DoubleEquals => "==",
            Token::NotEquals => "!=",
            Token::In => "in",
            Token::NotIn => "notin",
            Token::Greater => ">",
            Token::Less => "<",
            Token::Open => "(",
            Token::Close => ")",
            Token::Comma => ",",
            Token::End => "",
        }
    }
}

fn is_special(c: char) -> bool {
    matches!(c, '=' | '!' | '(' | ')' | ',' | '>' | '<')
}

fn lex(s: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '(' => Token::Open,
            ')' => Token::Close,
            ',' => Token::Comma,
            '>' => Token::Greater,
            '<' => Token::Less,
            '=' if chars.next_if_eq(&'=').is_some() => Token::DoubleEquals,
            '=' => Token::Equals,
            '!' if chars.next_if_eq(&'=').is_some() => Token::NotEquals,
            '!' => Token::Not,
            c => {
                let mut word = c.to_string();
                while let Some(c) = chars.next_if(|c| !c.is_whitespace() && !is_special(*c)) {
                    word.push(c);
                }
                match word.as_str() {
                    "in" => Token::In,
                    "notin" => Token::NotIn,
                    _ => Token::Ident(word),
                }
            }
        };
        tokens.push(token);
    }
    tokens.push(Token::End);
    tokens
}

fn parse_error(found: &Token, expected: &str) -> SelectorError {
    invalid(format!("unable to parse requirement: found '{}', expected: {expected}", found.literal()))
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        self.tokens.get(self.pos).unwrap_or(&Token::End)
    }

    fn next(&mut self) -> Token {
        let token = self.peek().clone();
        self.pos += 1;
        token
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        let (key, negated) = match self.next() {
            Token::Not => match self.next() {
                Token::Ident(key) => (key, true),
                other => return Err(parse_error(&other, "identifier")),
            },
            Token::Ident(key) => (key, false),
            other => return Err(parse_error(&other, "! or identifier")),
        };
        validate_key(&key)?;
        if negated || matches!(self.peek(), Token::Comma | Token::End) {
            let op = if negated { LabelOp::DoesNotExist } else { LabelOp::Exists };
            return Ok(Requirement { key, op, values: Vec::new() });
        }
        let op = match self.next() {
            Token::Equals | Token::DoubleEquals => LabelOp::Equals,
            Token::NotEquals => LabelOp::NotEquals,
            Token::In => LabelOp::In,
            Token::NotIn => LabelOp::NotIn,
            Token::Greater => LabelOp::GreaterThan,
            Token::Less => LabelOp::LessThan,
            other => return Err(parse_error(&other, "in, notin, =, ==, !=, gt, lt")),
        };
        let values = match op {
            LabelOp::In | LabelOp::NotIn => self.value_set()?,
            _ => vec![self.exact_value()?],
        };
        if matches!(op, LabelOp::GreaterThan | LabelOp::LessThan) && values[0].parse::<i64>().is_err() {
            return Err(invalid(format!(
                "unable to parse requirement: for 'gt', 'lt' operators, the value must be an integer, got {:?}",
                values[0]
            )));
        }
        for (i, value) in values.iter().enumerate() {
            validate_value(&key, i, value)?;
        }
        Ok(Requirement { key, op, values })
    }

    /// A single value; `k=` (nothing before the comma or end) is the empty value.
    fn exact_value(&mut self) -> Result<String, SelectorError> {
        match self.peek() {
            Token::Comma | Token::End => Ok(String::new()),
            // Keywords are ordinary values here: `tier=in` selects the value "in".
            Token::Ident(_) | Token::In | Token::NotIn => Ok(self.next().literal().to_string()),
            other => Err(parse_error(other, "identifier")),
        }
    }

    /// `( a, b )`; an empty slot, as in `()` or `(a,)`, is the empty value, as in apimachinery.
    fn value_set(&mut self) -> Result<Vec<String>, SelectorError> {
        match self.next() {
            Token::Open => {}
            other => return Err(parse_error(&other, "'('")),
        }
        let mut values = Vec::new();
        loop {
            let value = match self.peek() {
                Token::Ident(_) | Token::In | Token::NotIn => self.next().literal().to_string(),
                Token::Comma | Token::Close => String::new(),
                other => return Err(parse_error(other, "',', ')' or identifier")),
            };
            if !values.contains(&value) {
                values.push(value);
            }
            match self.next() {
                Token::Comma => {}
                Token::Close => return Ok(values),
                other => return Err(parse_error(&other, "',' or ')'")),
            }
        }
    }
}

const NAME_RULE: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with \
                         an alphanumeric character";

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, the shape of label names and values.
fn is_label_token(s: &str) -> bool {
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// A lowercase RFC 1123 subdomain, the shape of a key prefix such as `kpve.io`.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

fn validate_key(key: &str) -> Result<(), SelectorError> {
    let bad = |why: &str| invalid(format!("unable to parse requirement: key: Invalid value: {key:?}: {why}"));
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err(bad("prefix part must be non-empty"));
        }
        if !is_dns_subdomain(prefix) {
            return Err(bad(
                "prefix part must be a lowercase RFC 1123 subdomain (lowercase alphanumerics, '-' and '.')",
            ));
        }
    }
    if name.is_empty() {
        return Err(bad("name part must be non-empty"));
    }
    if name.len() > 63 {
        return Err(bad("name part must be no more than 63 characters"));
    }
    if !is_label_token(name) {
        return Err(bad(&format!("name part {NAME_RULE}")));
    }
    Ok(())
}

fn validate_value(key: &str, index: usize, value: &str) -> Result<(), SelectorError> {
    let why = if value.len() > 63 {
        "must be no more than 63 characters".to_string()
    } else if !value.is_empty() && !is_label_token(value) {
        format!("a valid label must be an empty string or {NAME_RULE}")
    } else {
        return Ok(());
    };
    Err(invalid(format!(
        "unable to parse requirement: values[{index}][{key}]: Invalid value: {value:?}: {why}"
    )))
}

/// A parsed `fieldSelector`: every term must hold (comma = AND).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    /// Where the value lives in the object; usually `field` split on dots.
    path: Vec<String>,
    equals: bool,
    value: String,
}

impl FieldSelector {
    /// Whether every term is on `metadata.name` / `metadata.namespace`, which a store key
    /// already tells (the server then skips decoding objects).
    pub fn only_name_and_namespace(&self) -> bool {
        self.terms.iter().all(|t| t.field == "metadata.name" || t.field == "metadata.namespace")
    }

    /// `f=v`, `f==v`, `f!=v`, comma = AND, empty = everything. Fields are `metadata.name`,
    /// `metadata.namespace` and `rt.selectable_fields`; values may escape `\,` `\=` `\\`.
    pub fn parse(s: &str, rt: &ResourceType) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for part in split_terms(s) {
            if part.trim().is_empty() {
                continue;
            }
            let (lhs, equals, rhs) = split_term(part)
                .ok_or_else(|| invalid(format!("invalid selector: '{s}'; can't understand '{part}'")))?;
            let value = unescape_value(rhs)?;
            let field = lhs.trim();
            let known = field == "metadata.name"
                || field == "metadata.namespace"
                || rt.selectable_fields.iter().any(|f| f == field);
            if !known {
                return Err(invalid(format!("field label not supported: {field}")));
            }
            terms.push(FieldTerm { field: field.to_string(), path: field_path(rt, field), equals, value });
        }
        Ok(FieldSelector { terms })
    }

    /// A field's value is the string form of the JSON at its path: strings as they are, numbers and
    /// booleans printed, missing or null as "" (so a cluster-scoped object's namespace is "").
    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|t| (field_value(object, &t.path) == t.value) == t.equals)
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The name a `metadata.name=` term pins, which lets the server read one object instead of a list.
    pub fn pinned_name(&self) -> Option<&str> {
        self.terms.iter().find(|t| t.equals && t.field == "metadata.name").map(|t| t.value.as_str())
    }
}

/// kube-apiserver selects core/v1 Events on `source` by the reporting component, not the object.
fn field_path(rt: &ResourceType, field: &str) -> Vec<String> {
    if rt.group.is_empty() && rt.kind == "Event" && field == "source" {
        return vec!["source".into(), "component".into()];
    }
    field.split('.').map(String::from).collect()
}

fn field_value<'a>(object: &'a Value, path: &[String]) -> Cow<'a, str> {
    match path.iter().try_fold(object, |node, segment| node.get(segment.as_str())) {
        None | Some(Value::Null) => Cow::Borrowed(""),
        Some(Value::String(s)) => Cow::Borrowed(s),
        Some(other) => Cow::Owned(other.to_string()),
    }
}

/// Splits on commas that are not escaped with a backslash.
fn split_terms(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The first operator wins, as in apimachinery: field names cannot contain escapes.
fn split_term(term: &str) -> Option<(&str, bool, &str)> {
    term.char_indices().find_map(|(i, _)| {
        let rest = &term[i..];
        [("!=", false), ("==", true), ("=", true)]
            .into_iter()
            .find_map(|(op, equals)| rest.strip_prefix(op).map(|rhs| (&term[..i], equals, rhs)))
    })
}

fn unescape_value(s: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                Some(e) => {
                    return Err(invalid(format!("invalid field selector: invalid escape sequence: \\{e}")));
                }
                None => return Err(invalid("invalid field selector: invalid escape sequence: \\")),
            },
            ',' | '=' => {
                return Err(invalid(format!("invalid field selector: unescaped character in value: {c}")));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::resources::builtins;

    fn rt(group: &str, kind: &str) -> ResourceType {
        builtins().into_iter().find(|t| t.group == group && t.kind == kind).expect("builtin exists")
    }

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "vm1", "namespace": "default", "labels": labels}})
    }

    /// Which of a fixed set of objects a label selector picks, by name.
    fn picks(selector: &str) -> Vec<&'static str> {
        let objects = [
            ("web", labelled(json!({"app": "web", "tier": "front", "replicas": "3"}))),
            ("db", labelled(json!({"app": "db", "tier": "back", "replicas": "1", "kpve.io/pinned": ""}))),
            ("bare", json!({"metadata": {"name": "bare"}})),
        ];
        let sel = LabelSelector::parse(selector).unwrap_or_else(|e| panic!("{selector:?}: {e}"));
        objects.iter().filter(|(_, o)| sel.matches(o)).map(|(n, _)| *n).collect()
    }

    fn label_err(selector: &str) -> String {
        match LabelSelector::parse(selector) {
            Err(SelectorError::Invalid(message)) => message,
            Ok(sel) => panic!("{selector:?} parsed as {sel:?}"),
        }
    }

    #[test]
    fn label_operators() {
        assert_eq!(picks("app=web"), ["web"]);
        assert_eq!(picks("app==web"), ["web"]);
        assert_eq!(picks("app!=web"), ["db", "bare"]);
        assert_eq!(picks("app in (web,db)"), ["web", "db"]);
        assert_eq!(picks("app notin (web)"), ["db", "bare"]);
        assert_eq!(picks("tier"), ["web", "db"]);
        assert_eq!(picks("!tier"), ["bare"]);
        assert_eq!(picks("replicas>1"), ["web"]);
        assert_eq!(picks("replicas<3"), ["db"]);
        assert_eq!(picks("replicas>0"), ["web", "db"]);
        assert_eq!(picks("kpve.io/pinned"), ["db"]);
        assert_eq!(picks("kpve.io/pinned="), ["db"]);
        assert_eq!(picks("app in ()"), Vec::<&str>::new());
        assert_eq!(picks("kpve.io/pinned in (,x)"), ["db"]);
    }

    #[test]
    fn label_and_whitespace_and_empty() {
        assert_eq!(picks("app=web,tier=front"), ["web"]);
        assert_eq!(picks("app=web,tier=back"), Vec::<&str>::new());
        assert_eq!(picks("  app  in ( web , db ) ,  tier != front , !nope "), ["db"]);
        assert_eq!(picks(""), ["web", "db", "bare"]);
        assert_eq!(picks("   "), ["web", "db", "bare"]);
        assert!(LabelSelector::parse("").unwrap().is_empty());
        assert!(!LabelSelector::parse("a").unwrap().is_empty());
        assert!(LabelSelector::parse(" ").unwrap().matches(&json!({})));
    }

    #[test]
    fn label_values_may_be_keywords() {
        let sel = LabelSelector::parse("mode=in,other notin (notin)").unwrap();
        assert!(sel.matches(&labelled(json!({"mode": "in"}))));
        assert!(!sel.matches(&labelled(json!({"mode": "in", "other": "notin"}))));
    }

    #[test]
    fn label_syntax_errors() {
        assert_eq!(label_err("app in (a"), "unable to parse requirement: found '', expected: ',' or ')'");
        assert_eq!(label_err("app in a"), "unable to parse requirement: found 'a', expected: '('");
        assert_eq!(
            label_err("app=a b"),
            "unable to parse requirement: found 'b', expected: ',' or 'end of string'"
        );
        assert_eq!(label_err("app=web,"), "unable to parse requirement: found '', expected: ! or identifier");
        assert_eq!(label_err("=web"), "unable to parse requirement: found '=', expected: ! or identifier");
        assert_eq!(label_err("!"), "unable to parse requirement: found '', expected: identifier");
        assert_eq!(
            label_err("!app=web"),
            "unable to parse requirement: found '=', expected: ',' or 'end of string'"
        );
        assert_eq!(
            label_err("app (x)"),
            "unable to parse requirement: found '(', expected: in, notin, =, ==, !=, gt, lt"
        );
        assert_eq!(label_err("app=(x)"), "unable to parse requirement: found '(', expected: identifier");
        assert_eq!(
            label_err("replicas>many"),
            "unable to parse requirement: for 'gt', 'lt' operators, the value must be an integer, got \"many\""
        );
        assert!(label_err("replicas<").contains("must be an integer, got \"\""));
        // As in apimachinery, the bound must also be a valid label value, so it cannot be negative.
        assert!(label_err("replicas>-1").contains("values[0][replicas]: Invalid value: \"-1\""));
    }

    #[test]
    fn label_key_and_value_validation() {
        assert!(LabelSelector::parse("example.com/app=web").is_ok());
        assert!(LabelSelector::parse("app.kubernetes.io/name in (kpve-controller)").is_ok());
        assert!(label_err("-app=x").contains("key: Invalid value: \"-app\": name part must consist of"));
        assert!(
            label_err("Example.com/app=x").contains("prefix part must be a lowercase RFC 1123 subdomain")
        );
        assert!(label_err("/app=x").contains("prefix part must be non-empty"));
        assert!(label_err("kpve.io/=x").contains("name part must be non-empty"));
        assert!(label_err("a/b/c").contains("name part must consist of"));
        assert!(label_err(&format!("{}=x", "k".repeat(64))).contains("no more than 63 characters"));
        assert_eq!(
            label_err("app in (ok,-bad)"),
            "unable to parse requirement: values[1][app]: Invalid value: \"-bad\": a valid label must be an empty \
             string or must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an \
             alphanumeric character"
        );
        assert!(label_err(&format!("app={}", "v".repeat(64))).contains("must be no more than 63 characters"));
    }

    #[test]
    fn labels_that_are_not_strings_do_not_match() {
        let sel = LabelSelector::parse("n=1").unwrap();
        assert!(!sel.matches(&labelled(json!({"n": 1}))));
        assert!(LabelSelector::parse("!n").unwrap().matches(&json!({"metadata": {"labels": null}})));
    }

    fn event() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "vm1.17f", "namespace": "default"},
            "involvedObject": {"kind": "VirtualMachine", "namespace": "default", "name": "vm1", "uid": "u-1"},
            "reason": "Started",
            "type": "Normal",
            "count": 3,
            "source": {"component": "kpve-controller"}
        })
    }

    #[test]
    fn field_selector_like_kubectl_describe() {
        let core = rt("", "Event");
        // What the server sees after URL-decoding
        // `involvedObject.name%3Dvm1%2CinvolvedObject.namespace%3Ddefault%2C…`.
        let sel = FieldSelector::parse(
            "involvedObject.name=vm1,involvedObject.namespace=default,involvedObject.kind=VirtualMachine,\
             involvedObject.uid=u-1",
            &core,
        )
        .unwrap();
        assert!(sel.matches(&event()));
        let mut other = event();
        other["involvedObject"]["name"] = json!("vm2");
        assert!(!sel.matches(&other));
        assert_eq!(sel.pinned_name(), None);
    }

    #[test]
    fn field_operators() {
        let core = rt("", "Event");
        let matches = |s: &str| FieldSelector::parse(s, &core).unwrap().matches(&event());
        assert!(matches("reason=Started"));
        assert!(matches("reason==Started"));
        assert!(!matches("reason!=Started"));
        assert!(matches("type!=Warning"));
        assert!(matches("metadata.name=vm1.17f,metadata.namespace=default"));
        assert!(matches("involvedObject.fieldPath="));
        assert!(!matches("involvedObject.fieldPath!="));
        assert!(matches("source=kpve-controller"));
        assert!(matches(""));
        assert!(matches(",reason=Started,"));
        // Spaces around the field name are dropped; the value is taken literally.
        assert!(matches(" reason =Started"));
        assert!(!matches("reason= Started"));
        assert!(FieldSelector::parse("", &core).unwrap().is_empty());
        assert!(!FieldSelector::parse("reason=x", &core).unwrap().is_empty());
    }

    #[test]
    fn field_values_of_non_strings() {
        let mut rt = rt("", "Namespace");
        rt.selectable_fields = vec!["spec.replicas".into(), "spec.enabled".into(), "status.phase".into()];
        let object = json!({
            "metadata": {"name": "a"},
            "spec": {"replicas": 3, "enabled": true},
            "status": {"phase": null}
        });
        let matches = |s: &str| FieldSelector::parse(s, &rt).unwrap().matches(&object);
        assert!(matches("spec.replicas=3"));
        assert!(matches("spec.enabled=true"));
        assert!(matches("status.phase="));
        // Namespaces are cluster-scoped: their namespace is "".
        assert!(matches("metadata.namespace="));
        assert!(!matches("metadata.namespace=default"));
        assert!(matches("metadata.namespace!=default"));
    }

    #[test]
    fn field_events_k8s_io_view() {
        let events = rt("events.k8s.io", "Event");
        let object = json!({
            "metadata": {"name": "e"},
            "regarding": {"uid": "u-1", "name": "vm1"},
            "reportingController": "kpve"
        });
        let sel = FieldSelector::parse("regarding.uid=u-1,reportingController=kpve", &events).unwrap();
        assert!(sel.matches(&object));
        // The core-only name is unknown on this view.
        assert_eq!(
            FieldSelector::parse("involvedObject.name=vm1", &events),
            Err(SelectorError::Invalid("field label not supported: involvedObject.name".into()))
        );
    }

    #[test]
    fn unknown_field_error_text() {
        let ns = rt("", "Namespace");
        assert_eq!(
            FieldSelector::parse("spec.foo=bar", &ns),
            Err(SelectorError::Invalid("field label not supported: spec.foo".into()))
        );
        assert_eq!(
            FieldSelector::parse("metadata.name=a,metadata.uid=x", &ns),
            Err(SelectorError::Invalid("field label not supported: metadata.uid".into()))
        );
        assert!(FieldSelector::parse("status.phase=Active", &ns).is_ok());
        assert_eq!(
            FieldSelector::parse("metadata.name", &ns),
            Err(SelectorError::Invalid(
                "invalid selector: 'metadata.name'; can't understand 'metadata.name'".into()
            ))
        );
    }

    #[test]
    fn field_value_escapes() {
        let mut ns = rt("", "Namespace");
        ns.selectable_fields = vec!["spec.text".into()];
        let object = json!({"metadata": {"name": "a"}, "spec": {"text": r"a,b=c\d"}});
        let sel = FieldSelector::parse(r"spec.text=a\,b\=c\\d,metadata.name=a", &ns).unwrap();
        assert!(sel.matches(&object));
        assert_eq!(sel.terms.len(), 2);
        assert_eq!(
            FieldSelector::parse(r"spec.text=a\x", &ns),
            Err(SelectorError::Invalid(r"invalid field selector: invalid escape sequence: \x".into()))
        );
        assert_eq!(
            FieldSelector::parse(r"spec.text=a\", &ns),
            Err(SelectorError::Invalid(r"invalid field selector: invalid escape sequence: \".into()))
        );
        assert_eq!(
            FieldSelector::parse("spec.text=a=b", &ns),
            Err(SelectorError::Invalid("invalid field selector: unescaped character in value: =".into()))
        );
        // `!=` is found before `=`, so the value here is "=x" and is rejected.
        assert!(FieldSelector::parse("spec.text!==x", &ns).is_err());
    }

    #[test]
    fn pinned_name() {
        let ns = rt("", "Namespace");
        let pinned = |s: &str| FieldSelector::parse(s, &ns).unwrap().pinned_name().map(String::from);
        assert_eq!(pinned("metadata.name=team-a"), Some("team-a".into()));
        assert_eq!(pinned("status.phase=Active,metadata.name==team-b"), Some("team-b".into()));
        assert_eq!(pinned("metadata.name!=team-a"), None);
        assert_eq!(pinned("status.phase=Active"), None);
        assert_eq!(pinned(""), None);
    }

    #[test]
    fn selectable_fields_of_crds() {
        let mut vm = rt("", "Namespace");
        vm.group = "kpve.io".into();
        vm.kind = "VirtualMachine".into();
        vm.selectable_fields = vec!["status.node".into()];
        let object = json!({"metadata": {"name": "vm1", "namespace": "default"}, "status": {"node": "pve1"}});
        assert!(FieldSelector::parse("status.node=pve1", &vm).unwrap().matches(&object));
        assert!(!FieldSelector::parse("status.node=pve2", &vm).unwrap().matches(&object));
        assert!(FieldSelector::parse("spec.node=pve1", &vm).is_err());
    }
}
