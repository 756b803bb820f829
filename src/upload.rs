//! Resumable uploads (the IETF draft "Resumable Uploads for HTTP",
//! draft-ietf-httpbis-resumable-upload): what both halves leave alone.
//!
//! The draft makes an upload resumable with requests of its own: the creation request
//! (`POST`, answered early with `104 (Upload Resumption Supported)` interim responses naming
//! the upload resource), offset retrieval (`HEAD`) and **upload appends**: `PATCH` to the
//! upload resource with `Upload-Offset` and the content type `application/partial-upload`.
//! An append is made safe to repeat by the draft itself: it carries its offset, the server
//! refuses a wrong one, and a client that lost an answer asks the offset again rather than
//! replaying the request. Recording appends would keep a copy of every chunk's answer under
//! a key, and a replayed answer would hide the offset the server really has.
//!
//! So, by default, an upload append passes the server layer untouched (like an uncovered
//! method: nothing buffered, locked or recorded; [`Outcome::Bypassed`](crate::Outcome)), and
//! the client's stamping layer gives it no key (so the retry policy does not repeat it
//! blindly either). Interim responses are the transport's: the layer never sees them, and
//! the client half hands the request's extensions (hyper's `on_informational` callback
//! among them) to every attempt, so a `104` reaches the application on a retry too.

use http::{HeaderMap, HeaderName, Method, header::CONTENT_TYPE};

/// `Upload-Offset`: the offset an upload append starts at.
pub(crate) const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");

/// The media type of an upload append's body.
const PARTIAL_UPLOAD: &str = "application/partial-upload";

/// What the layers do with upload appends of the resumable-upload draft: `PATCH` with
/// `Upload-Offset` or a body of type `application/partial-upload`. Default:
/// [`UploadAppends::Pass`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UploadAppends {
    /// Pass them through untouched: not fingerprinted, locked or recorded by the server
    /// layer, not stamped with a key by the client.
    #[default]
    Pass,
    /// Treat them as any other request of their method.
    Guard,
}

impl UploadAppends {
    /// Whether a request with this method and these headers passes as an upload append.
    pub(crate) fn passes(self, method: &Method, headers: &HeaderMap) -> bool {
        self == Self::Pass && is_append(method, headers)
    }
}

/// An upload append: `PATCH` with `Upload-Offset`, or with the content type
/// `application/partial-upload` (its parameters aside, in any case).
fn is_append(method: &Method, headers: &HeaderMap) -> bool {
    if method != Method::PATCH {
        return false;
    }
    if headers.contains_key(UPLOAD_OFFSET) {
        return true;
    }
    headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|value| {
        let essence = value.split(';').next().unwrap_or_default().trim();
        essence.eq_ignore_ascii_case(PARTIAL_UPLOAD)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(n, v)| (HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn appends_are_patch_with_an_offset_or_a_partial_upload() {
        let pass = |method: Method, pairs: &[(&str, &str)]| UploadAppends::Pass.passes(&method, &headers(pairs));
        assert!(pass(Method::PATCH, &[("upload-offset", "100")]));
        assert!(pass(Method::PATCH, &[("content-type", "application/partial-upload")]));
        assert!(pass(Method::PATCH, &[("content-type", "Application/Partial-Upload; x=1")]));
        assert!(!pass(Method::PATCH, &[("content-type", "application/json")]));
        assert!(!pass(Method::PATCH, &[]));
        assert!(!pass(Method::POST, &[("upload-offset", "0")]));
        assert!(!UploadAppends::Guard.passes(&Method::PATCH, &headers(&[("upload-offset", "100")])));
    }
}
