//! JSON request bodies (feature `json`): [`JsonPointer`] (RFC 6901), and the canonical form
//! (RFC 8785, the JSON Canonicalization Scheme) a route can fingerprint its body by
//! ([`BodyFingerprint::canonical_json`](crate::BodyFingerprint::canonical_json)).
//!
//! The canonical form is written by the `serde_json_canonicalizer` crate (member names sorted
//! by their UTF-16 code units, no whitespace, numbers as ECMAScript writes a double, strings
//! with the fewest escapes), tested here against RFC 8785's own examples. What this module
//! adds: the body is I-JSON (RFC 7493), as RFC 8785 requires, so a member name given twice
//! is refused rather than silently resolved, and the listed members are left out first.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::ConfigError;

/// A JSON Pointer (RFC 6901): `/client_time`, `/meta/trace_id`, `/items/0/note`. `~1` stands
/// for `/` and `~0` for `~` inside a name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonPointer {
    text: String,
    /// The reference tokens, unescaped.
    tokens: Vec<String>,
}

impl JsonPointer {
    /// Parses `pointer`: empty (the whole document) or `/`-separated reference tokens, each
    /// escaping `~` and `/` as `~0` and `~1`.
    pub fn parse(pointer: &str) -> Result<Self, ConfigError> {
        let invalid = || ConfigError::InvalidJsonPointer(pointer.to_owned());
        if pointer.is_empty() {
            return Ok(Self { text: String::new(), tokens: Vec::new() });
        }
        let Some(rest) = pointer.strip_prefix('/') else { return Err(invalid()) };
        let tokens = rest
            .split('/')
            .map(|token| {
                let mut out = String::with_capacity(token.len());
                let mut chars = token.chars();
                while let Some(c) = chars.next() {
                    match c {
                        '~' => match chars.next() {
                            Some('0') => out.push('~'),
                            Some('1') => out.push('/'),
                            _ => return None,
                        },
                        c => out.push(c),
                    }
                }
                Some(out)
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(invalid)?;
        Ok(Self { text: pointer.to_owned(), tokens })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value it points at in `document`, if there is one.
    pub(crate) fn get<'v>(&self, document: &'v Value) -> Option<&'v Value> {
        self.tokens.iter().try_fold(document, |value, token| match value {
            Value::Object(members) => members.get(token),
            Value::Array(items) => items.get(index(token)?),
            _ => None,
        })
    }

    /// Removes the object member it points at in `document`, if there is one. A pointer whose
    /// last token indexes an array removes nothing: leaving an element out would move the
    /// ones after it.
    pub(crate) fn remove(&self, document: &mut Value) {
        let Some((last, parents)) = self.tokens.split_last() else { return };
        let mut value = document;
        for token in parents {
            value = match value {
                Value::Object(members) => match members.get_mut(token) {
                    Some(value) => value,
                    None => return,
                },
                Value::Array(items) => match index(token).and_then(|i| items.get_mut(i)) {
                    Some(value) => value,
                    None => return,
                },
                _ => return,
            };
        }
        if let Value::Object(members) = value {
            members.remove(last);
        }
    }
}

/// An array index as RFC 6901 writes it: `0`, or digits without a leading zero.
fn index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

impl fmt::Debug for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonPointer({:?})", self.text)
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A body that is not I-JSON: not UTF-8, not JSON, a member name given twice in one object, a
/// number out of a double's range, or a lone surrogate.
#[derive(Debug)]
pub(crate) struct NotJson;

/// Parses `body` as I-JSON (refusing a member name given twice in one object).
pub(crate) fn parse(body: &[u8]) -> Result<Value, NotJson> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = Strict.deserialize(&mut deserializer).map_err(|_| NotJson)?;
    deserializer.end().map_err(|_| NotJson)?;
    Ok(value)
}

/// The canonical form (RFC 8785) of `body` without the members `excluded` points at.
pub(crate) fn canonical(body: &[u8], excluded: &[JsonPointer]) -> Result<Vec<u8>, NotJson> {
    let mut value = parse(body)?;
    for pointer in excluded {
        pointer.remove(&mut value);
    }
    Ok(canonical_form(&value))
}

/// The canonical form (RFC 8785) of a parsed `value`: member names sorted, no insignificant
/// space, numbers as ECMAScript writes them.
pub(crate) fn canonical_form(value: &Value) -> Vec<u8> {
    // A `Value` always serializes (its map keys are strings, its numbers finite).
    serde_json_canonicalizer::to_vec(value).unwrap_or_default()
}

/// `serde_json::Value`'s own deserialization, but a member name given twice is an error
/// (serde_json keeps the last one), as I-JSON and so RFC 8785 require: two bodies that differ
/// only there must not share one canonical form.
#[derive(Clone, Copy)]
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Strict)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value_seed(Strict)?;
            if members.insert(name, value).is_some() {
                return Err(de::Error::custom("a member name given twice"));
            }
        }
        Ok(Value::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(body: &str) -> String {
        String::from_utf8(canonical(body.as_bytes(), &[]).unwrap()).unwrap()
    }

    /// RFC 8785, section 3.2.2: the example's input and its canonical form.
    #[test]
    fn rfc8785_example() {
        let input = r#"{
  "numbers": [333333333.33333329, 1E30, 4.50,
              2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"#;
        let expected = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
        assert_eq!(canon(input), expected);
    }

    /// RFC 8785, section 3.2.3: members sorted by their UTF-16 code units.
    #[test]
    fn rfc8785_sorting() {
        let input = "{\n  \"\\u20ac\": \"Euro Sign\",\n  \"\\r\": \"Carriage Return\",\n  \"\\ufb33\": \"Hebrew Letter Dalet With Dagesh\",\n  \"1\": \"One\",\n  \"\\ud83d\\ude00\": \"Emoji: Grinning Face\",\n  \"\\u0080\": \"Control\",\n  \"\\u00f6\": \"Latin Small Letter O With Diaeresis\"\n}";
        let expected = "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}";
        assert_eq!(canon(input), expected);
    }

    /// RFC 8785, appendix B: IEEE 754 doubles (given by their bits) and the text ECMAScript
    /// writes for them.
    #[test]
    fn rfc8785_numbers() {
        let cases: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for &(bits, expected) in cases {
            let value = f64::from_bits(bits);
            // As a client would send it: Rust's shortest round-trip text of the same double.
            let body = format!("[{value:e}]");
            assert_eq!(canon(&body), format!("[{expected}]"), "{bits:#018x} sent as {body}");
        }
    }

    #[test]
    fn order_whitespace_and_number_spelling_do_not_matter() {
        let one = canon(r#"{"amount": 10.0, "currency": "EUR", "items": [1, 2e0]}"#);
        assert_eq!(one, canon(r#"{"items":[1.0,2],"currency":"EUR","amount":1e1}"#));
        assert_eq!(one, r#"{"amount":10,"currency":"EUR","items":[1,2]}"#);
        assert_ne!(one, canon(r#"{"items":[2,1],"currency":"EUR","amount":10}"#));
    }

    #[test]
    fn not_i_json_is_refused() {
        for body in
            ["", "{", "{\"a\":1}x", "{\"a\":1,\"a\":1}", "[{\"b\":{\"c\":1,\"c\":2}}]", "1e400", "\"\\ud800\"", "NaN"]
        {
            assert!(canonical(body.as_bytes(), &[]).is_err(), "{body:?}");
        }
        assert!(canonical(b"\xff", &[]).is_err());
        assert_eq!(canon("  null "), "null");
    }

    #[test]
    fn excluded_members_are_left_out() {
        let excluded = ["/client_time", "/meta/trace~1id", "/items/0/note", "/items/1", "/absent/x"]
            .map(|p| JsonPointer::parse(p).unwrap());
        let body = r#"{"client_time":"12:00","meta":{"trace/id":"t1","tenant":"a"},"items":[{"note":"n","sku":1},"keep"],"n":1}"#;
        let canonical = String::from_utf8(canonical(body.as_bytes(), &excluded).unwrap()).unwrap();
        assert_eq!(canonical, r#"{"items":[{"sku":1},"keep"],"meta":{"tenant":"a"},"n":1}"#);
    }

    #[test]
    fn pointers_parse_as_rfc6901_writes_them() {
        let removed = |p: &str| {
            let mut doc: Value = serde_json::from_str(r#"{"a/b":{"m~n":[10,{"x":1,"y":2}]},"":1}"#).unwrap();
            JsonPointer::parse(p).unwrap().remove(&mut doc);
            doc.to_string()
        };
        assert_eq!(removed("/a~1b/m~0n/1/x"), r#"{"":1,"a/b":{"m~n":[10,{"y":2}]}}"#);
        assert_eq!(removed("/"), r#"{"a/b":{"m~n":[10,{"x":1,"y":2}]}}"#);
        let unchanged = r#"{"":1,"a/b":{"m~n":[10,{"x":1,"y":2}]}}"#;
        for pointer in ["", "/a~1b/m~0n/01/x", "/a~1b/m~0n/2/x", "/a~1b/m~0n/0", "/a/b"] {
            assert_eq!(removed(pointer), unchanged, "{pointer}");
        }
        for invalid in ["a", "/~2", "/~"] {
            assert_eq!(JsonPointer::parse(invalid), Err(ConfigError::InvalidJsonPointer(invalid.to_owned())));
        }
        assert_eq!(JsonPointer::parse("/a~1b").unwrap().to_string(), "/a~1b");
    }

    #[test]
    fn pointers_find_what_rfc6901_says_they_point_at() {
        // RFC 6901, section 5: the document and what each pointer evaluates to.
        let doc: Value = serde_json::from_str(
            r#"{"foo":["bar","baz"],"":0,"a/b":1,"c%d":2,"e^f":3,"g|h":4,"i\\j":5,"k\"l":6," ":7,"m~n":8}"#,
        )
        .unwrap();
        let get = |p: &str| JsonPointer::parse(p).unwrap().get(&doc).cloned();
        assert_eq!(get(""), Some(doc.clone()));
        assert_eq!(get("/foo"), Some(serde_json::json!(["bar", "baz"])));
        assert_eq!(get("/foo/0"), Some(Value::from("bar")));
        let numbered = ["/", "/a~1b", "/c%d", "/e^f", "/g|h", "/i\\j", "/k\"l", "/ ", "/m~0n"];
        for (n, pointer) in numbered.into_iter().enumerate() {
            assert_eq!(get(pointer), Some(Value::from(n)), "{pointer}");
        }
        for absent in ["/foo/01", "/foo/2", "/foo/-", "/foo/0/x", "/bar", "/a~1b/c"] {
            assert_eq!(get(absent), None, "{absent}");
        }
        // serde_json's own evaluation agrees on every one.
        for pointer in ["", "/foo", "/foo/0", "/foo/01", "/foo/2", "/a~1b", "/m~0n", "/ ", "/bar"] {
            assert_eq!(get(pointer).as_ref(), doc.pointer(pointer), "{pointer}");
        }
    }
}
