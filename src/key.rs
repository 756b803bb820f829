//! Parsing and validating the `Idempotency-Key` value.
//!
//! The IETF draft writes the key as a Structured Field string (`"abc-123"`); Stripe writes it
//! bare (`abc-123`). Both forms are accepted and mean the same key. After unquoting, a key is
//! 1 to [`MAX_KEY_LEN`] bytes, each a visible ASCII character (`0x21..=0x7E`).

use std::fmt;

use http::{HeaderMap, HeaderName};

/// The longest key accepted, in bytes (after unquoting).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1 to 255 visible ASCII bytes.
///
/// `Debug` does not print the key itself: keys are bearer-like secrets that should not end up
/// in logs. Use [`IdempotencyKey::as_str`] when you really mean to read it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Box<str>);

impl IdempotencyKey {
    /// Parses a header value in either accepted form: a Structured Field string
    /// (`"abc-123"`) or a bare value (`abc-123`).
    pub fn parse(value: &[u8]) -> Result<Self, InvalidKey> {
        let bare = match value.first() {
            Some(b'"') => return unquote(value),
            _ => value,
        };
        validate(bare)?;
        // `validate` proved every byte is visible ASCII, so this cannot fail.
        let text = std::str::from_utf8(bare).map_err(|_| InvalidKey::InvalidByte)?;
        Ok(Self(text.into()))
    }

    /// A key from a string the caller has already validated (client-side generators).
    pub(crate) fn from_valid(key: String) -> Self {
        debug_assert!(validate(key.as_bytes()).is_ok());
        Self(key.into_boxed_str())
    }

    /// The key's bytes as a string (the unquoted form).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reads the key from `headers` under `name`.
    ///
    /// `Ok(None)` when the header is absent; an error when it is present more than once or its
    /// value is not a valid key.
    pub fn from_headers(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Self>, InvalidKey> {
        let mut values = headers.get_all(name).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(InvalidKey::Repeated);
        }
        Self::parse(first.as_bytes()).map(Some)
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({} bytes)", self.0.len())
    }
}

impl std::str::FromStr for IdempotencyKey {
    type Err = InvalidKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.as_bytes())
    }
}

/// Why a key was rejected. Every case answers `400` with the `invalid-key` problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The key is empty (or the quoted string is `""`).
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    TooLong,
    /// The key holds a byte that is not visible ASCII: a space, a control or a non-ASCII byte.
    InvalidByte,
    /// The value starts with `"` but is not a well-formed Structured Field string.
    MalformedQuotedString,
    /// More than one `Idempotency-Key` field was sent.
    Repeated,
}

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "the idempotency key is empty",
            Self::TooLong => "the idempotency key is longer than 255 bytes",
            Self::InvalidByte => "the idempotency key may only hold visible ASCII characters",
            Self::MalformedQuotedString => "the idempotency key is a malformed quoted string",
            Self::Repeated => "more than one idempotency key was sent",
        })
    }
}

impl std::error::Error for InvalidKey {}

/// Checks the unquoted form: 1..=255 bytes of `0x21..=0x7E`.
pub(crate) fn validate(key: &[u8]) -> Result<(), InvalidKey> {
    if key.is_empty() {
        return Err(InvalidKey::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(InvalidKey::TooLong);
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(InvalidKey::InvalidByte);
    }
    Ok(())
}

/// Unquotes an RFC 8941 sf-string (`DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE`)
/// and validates the result. Parameters after the closing quote are not accepted.
fn unquote(value: &[u8]) -> Result<IdempotencyKey, InvalidKey> {
    let inner = match value {
        [b'"', inner @ .., b'"'] if value.len() >= 2 => inner,
        _ => return Err(InvalidKey::MalformedQuotedString),
    };
    let mut out = String::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        let c = match b {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => escaped,
                _ => return Err(InvalidKey::MalformedQuotedString),
            },
            // An unescaped quote before the end means the string closed early.
            b'"' => return Err(InvalidKey::MalformedQuotedString),
            // sf-string allows only printable ASCII (0x20..=0x7E) inside the quotes.
            0x20..=0x7e => b,
            _ => return Err(InvalidKey::InvalidByte),
        };
        out.push(char::from(c));
    }
    validate(out.as_bytes())?;
    Ok(IdempotencyKey(out.into_boxed_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<String, InvalidKey> {
        IdempotencyKey::parse(s).map(|k| k.as_str().to_owned())
    }

    #[test]
    fn both_forms_are_one_key() {
        assert_eq!(parse(b"abc-123").unwrap(), "abc-123");
        assert_eq!(parse(b"\"abc-123\"").unwrap(), "abc-123");
        assert_eq!(parse(br#""a\"b\\c""#).unwrap(), r#"a"b\c"#);
    }

    #[test]
    fn length_bounds() {
        assert_eq!(parse(b""), Err(InvalidKey::Empty));
        assert_eq!(parse(b"\"\""), Err(InvalidKey::Empty));
        assert!(parse(&[b'a'; 255]).is_ok());
        assert_eq!(parse(&[b'a'; 256]), Err(InvalidKey::TooLong));
    }

    #[test]
    fn rejects_invisible_and_non_ascii_bytes() {
        assert_eq!(parse(b"a b"), Err(InvalidKey::InvalidByte));
        assert_eq!(parse(b"a\tb"), Err(InvalidKey::InvalidByte));
        assert_eq!(parse(b"a\x7fb"), Err(InvalidKey::InvalidByte));
        assert_eq!(parse("é".as_bytes()), Err(InvalidKey::InvalidByte));
        assert_eq!(parse(b"\"a b\""), Err(InvalidKey::InvalidByte));
    }

    #[test]
    fn rejects_malformed_quoted_strings() {
        for bad in [&b"\""[..], b"\"abc", b"\"a\"b\"", b"\"ab\\\"", b"\"a\\nb\"", b"\"abc\";p=1"] {
            assert_eq!(parse(bad), Err(InvalidKey::MalformedQuotedString), "{bad:?}");
        }
    }

    #[test]
    fn repeated_header_is_rejected() {
        let name = HeaderName::from_static("idempotency-key");
        let mut headers = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&headers, &name), Ok(None));
        headers.append(&name, "a".parse().unwrap());
        assert!(IdempotencyKey::from_headers(&headers, &name).unwrap().is_some());
        headers.append(&name, "a".parse().unwrap());
        assert_eq!(IdempotencyKey::from_headers(&headers, &name), Err(InvalidKey::Repeated));
    }

    #[test]
    fn debug_hides_the_key() {
        let key: IdempotencyKey = "secret-key".parse().unwrap();
        assert!(!format!("{key:?}").contains("secret"));
    }
}
