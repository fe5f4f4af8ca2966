//! `fieldValidation=Strict` also refuses duplicate fields (`{"cores":1,"cores":2}`), which a
//! plain decode into `serde_json::Value` silently resolves to the last one. This walks the
//! document once more with a visitor that only remembers keys.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// `Err(path)` naming the first duplicated field, e.g. `spec.cpu.cores`.
pub fn check_duplicates(body: &[u8]) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match (Checker { path: String::new() }).deserialize(&mut de) {
        Ok(()) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            match text.split_once("duplicate field ") {
                Some((_, rest)) => {
                    Err(rest.split(" at line").next().unwrap_or(rest).trim_matches('"').to_string())
                }
                // Not a duplicate (the regular decode reports syntax errors).
                None => Ok(()),
            }
        }
    }
}

struct Checker {
    path: String,
}

impl<'de> DeserializeSeed<'de> for Checker {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checker {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq.next_element_seed(Checker { path: format!("{}[{i}]", self.path) })?.is_some() {
            i += 1;
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() { key.clone() } else { format!("{}.{key}", self.path) };
            if !seen.insert(key) {
                return Err(de::Error::custom(format!("duplicate field \"{path}\"")));
            }
            map.next_value_seed(Checker { path })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_duplicate_and_its_path() {
        assert_eq!(
            check_duplicates(br#"{"spec":{"cpu":{"cores":1,"cores":2}}}"#),
            Err("spec.cpu.cores".into())
        );
        assert_eq!(check_duplicates(br#"{"a":[{"x":1},{"x":2,"x":3}]}"#), Err("a[1].x".into()));
        assert_eq!(check_duplicates(br#"{"spec":{"a":1,"b":{"a":2}}}"#), Ok(()));
        assert_eq!(check_duplicates(b"not json"), Ok(()));
    }
}
