//! Parsing and validating the `Idempotency-Key` value.
//!
//! The IETF draft writes the key as a Structured Field string (`"abc-123"`); Stripe writes it
//! bare (`abc-123`). Both forms are accepted and mean the same key. After unquoting, a key is
//! 1 to [`MAX_KEY_LEN`] bytes, each a visible ASCII character (`0x21..=0x7E`).

use std::fmt;

use http::{HeaderMap, HeaderName};

#[cfg(feature = "json")]
use crate::error::ConfigError;

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

    /// A key read from a request body (a JSON string): the same rules as the header's bare
    /// form, 1 to 255 visible ASCII bytes (no quoted form: the JSON string is the value).
    #[cfg_attr(not(feature = "json"), allow(dead_code))]
    pub(crate) fn from_body(value: &str) -> Result<Self, InvalidKey> {
        validate(value.as_bytes())?;
        Ok(Self(value.into()))
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
    /// The key in a JSON body is not a string, or is in a JSON-RPC batch (one key cannot
    /// stand for several calls).
    NotAString,
}

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "the idempotency key is empty",
            Self::TooLong => "the idempotency key is longer than 255 bytes",
            Self::InvalidByte => "the idempotency key may only hold visible ASCII characters",
            Self::MalformedQuotedString => "the idempotency key is a malformed quoted string",
            Self::Repeated => "more than one idempotency key was sent",
            Self::NotAString => "the idempotency key in the body is not a string, or is in a batch",
        })
    }
}

impl std::error::Error for InvalidKey {}

/// Where a route reads its idempotency key. Default: [`KeySource::header`].
///
/// A key from the body has every guarantee a header key has (scope, fingerprint, lock, wait,
/// join, replay, streaming) and the same rules (1 to 255 visible ASCII bytes); only where it is
/// read differs. Reading it needs the body, so on such a route every request of a covered
/// method is buffered (up to
/// [`with_max_request_body`](crate::IdempotencyLayer::with_max_request_body)) and parsed as
/// JSON, keyed or not; a body that is not JSON gets `400`
/// [`request-body-not-json`](crate::problem::REQUEST_BODY_NOT_JSON). A field that is absent or
/// `null` is no key (the [`KeyPolicy`](crate::KeyPolicy) decides); any other value than a
/// string is an invalid key.
///
/// Set it with [`IdempotencyLayer::with_key_source`](crate::IdempotencyLayer::with_key_source).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeySource(pub(crate) Source);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Source {
    #[default]
    Header,
    /// The string at this JSON Pointer in a JSON body, parsed once.
    #[cfg(feature = "json")]
    Json(crate::json::JsonPointer),
    /// A JSON-RPC 2.0 request's key, at [`JSON_RPC_KEY_POINTER`].
    #[cfg(feature = "json")]
    JsonRpc,
}

/// Where MCP carries an idempotency key in a JSON-RPC request: `params._meta.idempotencyKey`.
pub const JSON_RPC_KEY_POINTER: &str = "/params/_meta/idempotencyKey";

impl KeySource {
    /// The request header named by
    /// [`with_header_name`](crate::IdempotencyLayer::with_header_name) (default
    /// `Idempotency-Key`). A request without it is not buffered unless it is guarded.
    pub const fn header() -> Self {
        Self(Source::Header)
    }

    /// The string at `pointer` (RFC 6901, such as `/idempotency_key` or `/meta/key`) in a JSON
    /// request body. The body is fingerprinted as the layer's fingerprint setting says (the
    /// key in it is the same for every retry). Feature `json`.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, KeySource};
    ///
    /// let layer = IdempotencyLayer::new().with_key_source(KeySource::json_pointer("/idempotency_key")?);
    /// # let _ = layer;
    /// assert!(KeySource::json_pointer("idempotency_key").is_err());
    /// # Ok::<(), tower_idempotency::ConfigError>(())
    /// ```
    #[cfg(feature = "json")]
    pub fn json_pointer(pointer: &str) -> Result<Self, ConfigError> {
        Ok(Self(Source::Json(crate::json::JsonPointer::parse(pointer)?)))
    }

    /// A JSON-RPC 2.0 request's `params._meta.idempotencyKey`, where MCP tool calls carry it
    /// ([`JSON_RPC_KEY_POINTER`]). Feature `json`. What such a route does:
    ///
    /// - A request (an object with `method` and `id`) with a key is guarded. Its fingerprint
    ///   is the request without its `id` and without `params._meta` (a retry carries a new
    ///   `id`, and MCP clients put per-attempt data such as a progress token in `_meta`), as
    ///   compact JSON with sorted member names, so whitespace and member order do not matter
    ///   either.
    /// - A replay, and a joined response, answer with the retry's `id`: in an
    ///   `application/json` body, and in each JSON-RPC response of a `text/event-stream` body
    ///   (MCP's Streamable HTTP), and progress notifications there carry the retry's
    ///   `params._meta.progressToken` (if it sent one). Server-to-client requests and other
    ///   notifications in the stream pass as recorded.
    /// - Notifications (no `id`) and client responses (no `method`) run through unguarded,
    ///   even when they carry a key and even under [`KeyPolicy::Required`](crate::KeyPolicy):
    ///   JSON-RPC gives them no answer to replay or to refuse with.
    /// - A batch (an array) runs through unguarded when none of its calls carries a key; one
    ///   that carries a key, or any batch where keys are required, is refused with `400`
    ///   `invalid-key` (JSON-RPC `-32602`): one key cannot stand for several calls, and
    ///   MCP no longer has batches.
    /// - The layer's own answers are JSON-RPC error responses
    ///   ([`JsonRpc`](crate::problem::JsonRpc) becomes the problem renderer; a later
    ///   [`with_problem_renderer`](crate::IdempotencyLayer::with_problem_renderer) replaces
    ///   it) carrying the request's `id` (`null` where it could not be read), with the HTTP
    ///   status and retry hints of the problem.
    #[cfg(feature = "json")]
    pub fn json_rpc() -> Self {
        Self(Source::JsonRpc)
    }

    /// Whether the key is in the request body.
    pub(crate) fn in_body(&self) -> bool {
        !matches!(self.0, Source::Header)
    }

    /// Where a client puts the key, for a header source named `header`.
    pub(crate) fn place(&self, header: &http::HeaderName) -> crate::problem::KeyPlace {
        use crate::problem::KeyPlace;
        match self.0 {
            Source::Header if header == crate::headers::IDEMPOTENCY_KEY => KeyPlace::Header,
            Source::Header => KeyPlace::OtherHeader,
            #[cfg(feature = "json")]
            Source::Json(_) => KeyPlace::Body,
            #[cfg(feature = "json")]
            Source::JsonRpc => KeyPlace::JsonRpc,
        }
    }
}

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
    fn body_keys_follow_the_bare_rules() {
        assert_eq!(IdempotencyKey::from_body("abc-123").unwrap().as_str(), "abc-123");
        assert_eq!(IdempotencyKey::from_body("\"abc\"").unwrap().as_str(), "\"abc\"");
        assert_eq!(IdempotencyKey::from_body(""), Err(InvalidKey::Empty));
        assert_eq!(IdempotencyKey::from_body("a b"), Err(InvalidKey::InvalidByte));
        assert_eq!(IdempotencyKey::from_body(&"a".repeat(256)), Err(InvalidKey::TooLong));
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_pointers() {
        for good in ["", "/", "/a", "/a/b", "/a~0b/~1c", "/params/_meta/idempotencyKey"] {
            assert!(KeySource::json_pointer(good).is_ok(), "{good}");
        }
        for bad in ["a", "a/b", "/a~", "/a~2", "~0"] {
            assert_eq!(KeySource::json_pointer(bad), Err(ConfigError::InvalidJsonPointer(bad.into())), "{bad}");
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let key: IdempotencyKey = "secret-key".parse().unwrap();
        assert!(!format!("{key:?}").contains("secret"));
    }
}
