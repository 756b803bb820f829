//! A replay: the recorded response sent back with `Idempotent-Replayed: true`.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header, response};
use http_body::Body;

use crate::{
    IDEMPOTENT_REPLAYED, Outcome, ResponseBody,
    layer::sse::{resume_in_body, resumes_after},
    store::StoredResponse,
};

/// The recorded response, replayed to a request whose headers are `request`: the inner
/// service is not called. An event stream replayed to a request with `Last-Event-ID` starts
/// after the event with that id, found in the record's event marks; an id it does not know
/// gives the whole stream.
pub(crate) fn replay<B: Body>(record: Arc<StoredResponse>, request: &HeaderMap) -> Response<ResponseBody<B>> {
    let resumed = resumes_after(request, &record.headers)
        .and_then(|id| resume_in_body(&record.body, &record.marks, id.as_bytes()));
    let record = match resumed {
        Some(body) => {
            let mut resumed = Arc::unwrap_or_clone(record);
            resumed.body = body;
            Arc::new(resumed)
        }
        None => record,
    };
    let (mut head, body, trailers) = parts(record);
    head.extensions.insert(Outcome::Replayed);
    Response::from_parts(head, ResponseBody::full(body, trailers))
}

/// The replay: same status, headers and body bytes (shared, not copied), plus
/// `Idempotent-Replayed: true` and a recomputed `Content-Length`. The headers are moved out
/// when no one else holds the record (a store that decodes a record per lookup), cloned
/// otherwise.
///
/// No `Content-Length` where it does not belong: on `1xx`, `204` and `304`
/// (RFC 9110 8.6), and on a replay with trailers, so that HTTP/1.1 sends it chunked, the
/// only framing that carries trailers.
pub(crate) fn parts(record: Arc<StoredResponse>) -> (response::Parts, Bytes, Option<HeaderMap>) {
    let StoredResponse { status, mut headers, body, trailers, .. } = Arc::unwrap_or_clone(record);
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    let without_content =
        status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if without_content || trailers.is_some() {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.headers = headers;
    (parts, body, trailers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(status: u16, body: &'static [u8], trailers: Option<HeaderMap>) -> Arc<StoredResponse> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let status = StatusCode::from_u16(status).unwrap();
        Arc::new(StoredResponse { trailers, ..StoredResponse::new(status, headers, Bytes::from_static(body)) })
    }

    #[test]
    fn replay_recomputes_content_length_where_the_status_allows_a_body() {
        for (status, body) in [(200, &b"{\"id\":1}"[..]), (201, b""), (202, b"x"), (404, b"missing")] {
            let (head, got, trailers) = parts(stored(status, body, None));
            assert_eq!(head.status, status);
            assert_eq!(head.headers[header::CONTENT_LENGTH], body.len().to_string().as_str(), "{status}");
            assert_eq!(head.headers[IDEMPOTENT_REPLAYED], "true");
            assert_eq!(head.headers[header::CONTENT_TYPE], "text/plain");
            assert_eq!(&got[..], body);
            assert!(trailers.is_none());
        }
    }

    /// `Content-Length` is never added to `1xx`, `204` or `304` (RFC 9110 8.6: a
    /// server must not send it on `1xx` or `204`; on `304` it would describe another response).
    #[test]
    fn replay_adds_no_content_length_to_a_status_without_content() {
        for status in [100, 103, 204, 304] {
            let (head, body, _) = parts(stored(status, b"", None));
            assert_eq!(head.status, status);
            assert!(!head.headers.contains_key(header::CONTENT_LENGTH), "{status}: {:?}", head.headers);
            assert_eq!(head.headers[IDEMPOTENT_REPLAYED], "true");
            assert!(body.is_empty());
        }
        // Nor keeps one a record should not hold.
        let mut record = Arc::unwrap_or_clone(stored(204, b"", None));
        record.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let (head, _, _) = parts(Arc::new(record));
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH), "{:?}", head.headers);
    }

    /// With trailers, no `Content-Length`: HTTP/1.1 then sends the replay chunked, the only
    /// framing that carries trailers.
    #[test]
    fn replay_with_trailers_has_no_content_length() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        for body in [&b"\x00\x00\x00\x00\x02hi"[..], b""] {
            let (head, got, replayed_trailers) = parts(stored(200, body, Some(trailers.clone())));
            assert!(!head.headers.contains_key(header::CONTENT_LENGTH), "{:?}", head.headers);
            assert_eq!(head.headers[IDEMPOTENT_REPLAYED], "true");
            assert_eq!(&got[..], body);
            assert_eq!(replayed_trailers.as_ref(), Some(&trailers));
        }
    }
}
