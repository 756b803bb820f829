//! Keys read from a JSON body (feature `json`), and JSON-RPC 2.0: the key of a request, what
//! its fingerprint leaves out, and the retry's `id` set on what the layer answers with (a
//! replay, a joined response, the layer's own errors).
//!
//! A JSON-RPC replay must carry the retry's `id`, not the original's: the client matches the
//! answer to its call by it. The record keeps the original's response as it was sent; the id
//! is changed on the way out, in an `application/json` body (one message) and in each event
//! of a `text/event-stream` body (MCP's Streamable HTTP), as the events pass.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, header};
use http_body::Body;
use serde_json::Value;

use crate::{
    IdempotencyKey, InvalidKey, KeySource, Outcome,
    key::Source,
    layer::{
        body::{ResponseBody, Rewrite},
        sse::{EventScanner, is_event_stream},
    },
    problem::{Problem, ProblemKind},
};

/// What a request body says about its key.
#[derive(Debug)]
pub(crate) enum BodyKey {
    /// A key; for a JSON-RPC request, the bytes to fingerprint instead of the body (the
    /// request without its `id` and its `params._meta`).
    Key(IdempotencyKey, Option<Vec<u8>>),
    /// No key (the key policy decides).
    Missing,
    /// Not a call the layer guards: a JSON-RPC notification or response, or a batch without
    /// keys where keys are optional. It runs through.
    Through,
    /// Refused at once, with this answer.
    Refuse(Problem),
}

/// What a JSON-RPC request is answered with: its `id`, and the progress token of its
/// `params._meta`, set on the progress notifications of a stream replayed or joined to it.
#[derive(Debug, PartialEq)]
pub(crate) struct Reply {
    pub(crate) id: Value,
    progress_token: Option<Value>,
}

/// Reads the key of a request whose key `source` says is in its `body`; `required`: the route
/// requires keys. Also gives what a JSON-RPC request is answered with.
pub(crate) fn read(source: &KeySource, body: &[u8], required: bool) -> (BodyKey, Option<Reply>) {
    // Strictly: a member name given twice is not JSON here either (serde_json would keep the
    // last, and two bodies differing there would share a fingerprint).
    let Ok(value) = crate::json::parse(body) else {
        return (BodyKey::Refuse(Problem::new(ProblemKind::RequestBodyNotJson, None)), None);
    };
    match &source.0 {
        Source::Header => (BodyKey::Missing, None),
        Source::Json(pointer) => (key_in(pointer.get(&value)), None),
        Source::JsonRpc => json_rpc(value, required),
    }
}

/// What a key field holds: absent or `null` is no key, a string is checked, anything else is
/// invalid.
fn key_in(field: Option<&Value>) -> BodyKey {
    match field {
        None | Some(Value::Null) => BodyKey::Missing,
        Some(Value::String(key)) => match IdempotencyKey::from_body(key) {
            Ok(key) => BodyKey::Key(key, None),
            Err(invalid) => {
                tracing::debug!(reason = %invalid, "idempotency: invalid key in the body");
                BodyKey::Refuse(Problem::invalid_key(invalid))
            }
        },
        Some(_) => BodyKey::Refuse(Problem::invalid_key(InvalidKey::NotAString)),
    }
}

/// A member of a JSON-RPC call's `params._meta`: `idempotencyKey` (at
/// [`JSON_RPC_KEY_POINTER`](crate::JSON_RPC_KEY_POINTER)) or `progressToken`.
fn meta<'v>(call: &'v Value, member: &str) -> Option<&'v Value> {
    call.get("params")?.get("_meta")?.get(member)
}

fn json_rpc(mut value: Value, required: bool) -> (BodyKey, Option<Reply>) {
    let request = match &mut value {
        Value::Array(calls) => {
            let keyed = calls.iter().any(|call| !matches!(key_in(meta(call, "idempotencyKey")), BodyKey::Missing));
            if keyed || required {
                tracing::debug!(keyed, "idempotency: a JSON-RPC batch on a route with keys: refused");
                return (BodyKey::Refuse(Problem::invalid_key(InvalidKey::NotAString)), None);
            }
            return (BodyKey::Through, None);
        }
        Value::Object(request) if request.contains_key("method") => request,
        // A response from the client, or not JSON-RPC at all: the handler's to answer.
        _ => return (BodyKey::Through, None),
    };
    // A notification has no `id` and gets no answer: nothing to replay or to refuse with.
    let Some(id) = request.remove("id") else { return (BodyKey::Through, None) };
    let request = Value::Object(std::mem::take(request));
    let reply = Reply { id, progress_token: meta(&request, "progressToken").cloned() };
    match key_in(meta(&request, "idempotencyKey")) {
        BodyKey::Key(key, _) => (BodyKey::Key(key, Some(fingerprinted(request))), Some(reply)),
        other => (other, Some(reply)),
    }
}

/// A JSON-RPC request's fingerprinted form: without `id` and `params._meta`, in the canonical
/// form canonical-JSON fingerprints use (RFC 8785).
fn fingerprinted(mut request: Value) -> Vec<u8> {
    if let Some(Value::Object(params)) = request.get_mut("params") {
        params.remove("_meta");
    }
    crate::json::canonical_form(&request)
}

/// `response`, answering a JSON-RPC request: a replay, a joined response or one of the layer's
/// own answers gets the request's `id` in its JSON-RPC responses (and its progress token in
/// its progress notifications); the handler's own response is left alone.
pub(crate) fn with_reply_id<B: Body>(response: Response<ResponseBody<B>>, id: Reply) -> Response<ResponseBody<B>> {
    if matches!(Outcome::of(&response), Outcome::Executed | Outcome::Bypassed | Outcome::Unprotected) {
        return response;
    }
    let (mut head, body) = response.into_parts();
    let Some(rewrite) = IdRewrite::new(&head.headers, id) else { return Response::from_parts(head, body) };
    let (body, len) = body.rewritten(Box::new(rewrite));
    if let Some(len) = len.filter(|_| head.headers.contains_key(header::CONTENT_LENGTH)) {
        head.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(head, body)
}

/// Sets an `id` on the JSON-RPC responses of a body: one JSON message, or events.
struct IdRewrite {
    id: Reply,
    /// For an event stream, what finds its event ends: the scanner that marks them for a
    /// resume, so both read the same grammar.
    events: Option<EventScanner>,
    /// The message, or the event, not yet ended.
    pending: BytesMut,
}

impl IdRewrite {
    /// For a body of type `application/json` (or `+json`) or `text/event-stream`; `None` for
    /// any other.
    fn new(headers: &HeaderMap, id: Reply) -> Option<Self> {
        let events = is_event_stream(headers).then(EventScanner::default);
        if events.is_none() && !is_json(headers) {
            return None;
        }
        Some(Self { id, events, pending: BytesMut::new() })
    }
}

/// Whether the headers announce JSON: `application/json` or `application/*+json`.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return false };
    let essence = value.as_bytes().split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
    let (application, json) = (b"application/".as_slice(), b"+json".as_slice());
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() >= application.len() + json.len()
            && essence[..application.len()].eq_ignore_ascii_case(application)
            && essence[essence.len() - json.len()..].eq_ignore_ascii_case(json))
}

impl Rewrite for IdRewrite {
    fn feed(&mut self, chunk: Bytes, out: &mut VecDeque<Bytes>) {
        let Some(scanner) = &mut self.events else {
            self.pending.extend_from_slice(&chunk);
            return;
        };
        // Each event goes out as it ends; one that lies whole in the chunk is a slice of it.
        let (base, mut taken) = (scanner.offset(), 0);
        let (pending, id) = (&mut self.pending, &self.id);
        scanner.scan(&chunk, |end, _| {
            let mut end = usize::try_from(end - base).map_or(chunk.len(), |end| end.min(chunk.len()));
            // The event ended at the CR of a CRLF: its LF, here too, goes with it.
            if chunk[end - 1] == b'\r' && chunk.get(end) == Some(&b'\n') {
                end += 1;
            }
            let event = if pending.is_empty() {
                chunk.slice(taken..end)
            } else {
                pending.extend_from_slice(&chunk[taken..end]);
                pending.split().freeze()
            };
            out.push_back(rewrite_event(event, id));
            taken = end;
        });
        self.pending.extend_from_slice(&chunk[taken..]);
    }

    fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        let rest = self.pending.split().freeze();
        if rest.is_empty() {
            return;
        }
        out.push_back(match self.events {
            Some(_) => rewrite_event(rest, &self.id),
            None => rewrite_message(&rest, &self.id).map_or(rest, Bytes::from),
        });
    }
}

/// One event: if its data is a JSON-RPC response, the same event with `id` in it (its data in
/// one `data:` line where the first was); any other event as it was.
fn rewrite_event(event: Bytes, id: &Reply) -> Bytes {
    let lines = lines(&event);
    let data: Vec<&[u8]> = lines.iter().filter_map(|&(start, end, _)| data_value(&event[start..end])).collect();
    if data.is_empty() {
        return event;
    }
    let Some(message) = rewrite_message(&data.join(&b'\n'), id) else { return event };
    let mut out = Vec::with_capacity(event.len() + 16);
    let mut first = true;
    for &(start, end, line_end) in &lines {
        if data_value(&event[start..end]).is_none() {
            out.extend_from_slice(&event[start..line_end]);
        } else if std::mem::take(&mut first) {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&message);
            out.extend_from_slice(&event[end..line_end]);
        }
    }
    Bytes::from(out)
}

/// The lines of `event`: (start, end of content, end with its line ending).
fn lines(event: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut lines = Vec::new();
    let (mut at, mut start) = (0, 0);
    while at < event.len() {
        match event[at] {
            b'\r' | b'\n' => {
                let crlf = event[at] == b'\r' && event.get(at + 1) == Some(&b'\n');
                let next = at + 1 + usize::from(crlf);
                lines.push((start, at, next));
                (at, start) = (next, next);
            }
            _ => at += 1,
        }
    }
    if start < event.len() {
        lines.push((start, event.len(), event.len()));
    }
    lines
}

/// The value of a `data` field line (one space after the colon stripped).
fn data_value(line: &[u8]) -> Option<&[u8]> {
    if line == b"data" {
        return Some(b"");
    }
    let value = line.strip_prefix(b"data:")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// A JSON-RPC response (an object with `id` and `result` or `error`, no `method`) with the
/// reply's `id` in it, or a progress notification with its progress token; `None` for
/// anything else, or when nothing changes.
fn rewrite_message(message: &[u8], reply: &Reply) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(message).ok()?;
    let object = value.as_object_mut()?;
    let changed = match object.get("method") {
        None if object.contains_key("result") || object.contains_key("error") => set(object, "id", &reply.id),
        Some(method) if method == "notifications/progress" => {
            match (&reply.progress_token, object.get_mut("params").and_then(Value::as_object_mut)) {
                (Some(token), Some(params)) => set(params, "progressToken", token),
                _ => false,
            }
        }
        _ => false,
    };
    if !changed {
        return None;
    }
    serde_json::to_vec(&value).ok()
}

/// Sets the member `name` of `object` to `value` if it is there with another value.
fn set(object: &mut serde_json::Map<String, Value>, name: &str, value: &Value) -> bool {
    match object.get_mut(name) {
        Some(old) if old != value => {
            *old = value.clone();
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_rpc_source() -> KeySource {
        KeySource::json_rpc()
    }

    fn all(rewrite: &mut IdRewrite, chunks: &[&[u8]]) -> String {
        let mut out = VecDeque::new();
        for chunk in chunks {
            rewrite.feed(Bytes::copy_from_slice(chunk), &mut out);
        }
        rewrite.finish(&mut out);
        out.iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect()
    }

    fn rewrite(content_type: &str, id: Value) -> IdRewrite {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        IdRewrite::new(&headers, Reply { id, progress_token: None }).unwrap()
    }

    #[test]
    fn a_json_response_gets_the_new_id() {
        let body = br#"{"jsonrpc":"2.0","id":1,"result":{"charge":"rpc_1"}}"#;
        let got = all(&mut rewrite("application/json", Value::from(7)), &[&body[..10], &body[10..]]);
        let got: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(got, serde_json::json!({"jsonrpc":"2.0","id":7,"result":{"charge":"rpc_1"}}));
        // An error response too; a request or a notification is left as it was.
        let error = br#"{"jsonrpc":"2.0","id":"a","error":{"code":1,"message":"m"}}"#;
        let got = all(&mut rewrite("application/json; charset=utf-8", Value::from("b")), &[error]);
        assert_eq!(serde_json::from_str::<Value>(&got).unwrap()["id"], "b");
        for other in [&br#"{"jsonrpc":"2.0","id":1,"method":"x"}"#[..], br#"{"jsonrpc":"2.0","method":"x"}"#, b"[1]"] {
            assert_eq!(all(&mut rewrite("application/json", Value::from(7)), &[other]).as_bytes(), other);
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(IdRewrite::new(&headers, Reply { id: Value::Null, progress_token: None }).is_none());
    }

    #[test]
    fn json_is_application_json_or_a_json_suffix_in_any_case() {
        let json = |content_type: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
            is_json(&headers)
        };
        for yes in
            ["application/json", "Application/JSON; charset=utf-8", " application/vnd.api+JSON ", "application/+json"]
        {
            assert!(json(yes), "{yes}");
        }
        for no in ["text/json", "application/jsonx", "application/json-seq", "application/x+jso", "json", ""] {
            assert!(!json(no), "{no}");
        }
    }

    #[test]
    fn each_response_event_of_a_stream_gets_the_new_id_at_any_split() {
        let stream = concat!(
            "id: 0\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\n\n",
            ": a comment\r\n\r\n",
            "id: 1\r\ndata: {\"id\":\"call-1\",\r\ndata: \"jsonrpc\":\"2.0\",\"result\":{\"content\":[]}}\r\n\r\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":\"srv-1\",\"method\":\"sampling/createMessage\"}\r\r",
        );
        let expected = concat!(
            "id: 0\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\n\n",
            ": a comment\r\n\r\n",
            "id: 1\r\ndata: {\"id\":\"call-2\",\"jsonrpc\":\"2.0\",\"result\":{\"content\":[]}}\r\n\r\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":\"srv-1\",\"method\":\"sampling/createMessage\"}\r\r",
        );
        let id = Value::from("call-2");
        assert_eq!(all(&mut rewrite("text/event-stream", id.clone()), &[stream.as_bytes()]), expected);
        for at in 0..stream.len() {
            let (a, b) = stream.as_bytes().split_at(at);
            assert_eq!(all(&mut rewrite("text/event-stream", id.clone()), &[a, b]), expected, "split at {at}");
        }
        let bytes: Vec<&[u8]> = stream.as_bytes().chunks(1).collect();
        assert_eq!(all(&mut rewrite("text/event-stream", id), &bytes), expected);
    }

    #[test]
    fn the_json_rpc_key_is_where_its_pointer_says() {
        let call: Value = serde_json::from_str(
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"_meta":{"idempotencyKey":"k","progressToken":"p"}}}"#,
        )
        .unwrap();
        let pointer = crate::json::JsonPointer::parse(crate::JSON_RPC_KEY_POINTER).unwrap();
        assert_eq!(meta(&call, "idempotencyKey"), pointer.get(&call));
        assert_eq!(meta(&call, "idempotencyKey"), Some(&Value::from("k")));
    }

    #[test]
    fn events_whole_in_a_chunk_go_out_as_slices_of_it() {
        let chunk = Bytes::from_static(b": one\n\n: two\r\n\r\n: th");
        let mut rewrite = rewrite("text/event-stream", Value::from(1));
        let mut out = VecDeque::new();
        rewrite.feed(chunk.clone(), &mut out);
        assert_eq!(out, [": one\n\n", ": two\r\n\r\n"]);
        let within = chunk.as_ptr_range();
        assert!(out.iter().all(|event| within.contains(&event.as_ptr())), "copied");
        rewrite.feed(Bytes::from_static(b"ree\n\n"), &mut out);
        assert_eq!(out[2], ": three\n\n");
        // A CRLF stream written an event per chunk: each goes out as its own chunk.
        let mut out = VecDeque::new();
        let chunks = [": a\r\n\r\n", "id: 1\r\n: b\r\n\r\n"].map(Bytes::from);
        for chunk in &chunks {
            rewrite.feed(chunk.clone(), &mut out);
        }
        assert_eq!(out.len(), 2);
        for (event, chunk) in out.iter().zip(&chunks) {
            assert_eq!(event.as_ptr(), chunk.as_ptr(), "copied");
            assert_eq!(event, chunk);
        }
        // An event whose CR ends a chunk goes out at once; the LF opens the next chunk's.
        let mut out = VecDeque::new();
        for chunk in [": c\r\n\r", "\n: d\r\n\r\n"].map(Bytes::from) {
            rewrite.feed(chunk, &mut out);
        }
        assert_eq!(out, [": c\r\n\r", "\n: d\r\n\r\n"]);
    }

    #[test]
    fn an_event_whose_final_cr_ends_a_chunk_goes_out_at_once() {
        // CR-only line endings: the blank line that ends the event is its last byte, and a
        // joiner gets the event then, not when the generator's next chunk comes.
        let event = "id: 4\rdata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\r\r";
        let mut rewrite = rewrite("text/event-stream", Value::from(2));
        let mut out = VecDeque::new();
        for chunk in [&event[..5], &event[5..]] {
            rewrite.feed(Bytes::copy_from_slice(chunk.as_bytes()), &mut out);
        }
        let got: String = out.iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect();
        assert_eq!(got, "id: 4\rdata: {\"id\":2,\"jsonrpc\":\"2.0\",\"result\":{}}\r\r");
    }

    #[test]
    fn a_member_name_given_twice_is_not_json_on_every_body_key_route() {
        // serde_json keeps the last of two: `amount` 5 then 6 would fingerprint as 6 alone.
        let call =
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"amount":5,"amount":6,"_meta":{"idempotencyKey":"k"}}}"#;
        let (key, _) = read(&json_rpc_source(), call.as_bytes(), false);
        assert!(matches!(key, BodyKey::Refuse(p) if p.kind() == ProblemKind::RequestBodyNotJson), "{key:?}");
        let source = KeySource::json_pointer("/key").unwrap();
        let (key, _) = read(&source, br#"{"key":"k","amount":5,"amount":6}"#, false);
        assert!(matches!(key, BodyKey::Refuse(p) if p.kind() == ProblemKind::RequestBodyNotJson), "{key:?}");
    }

    #[test]
    fn an_invalid_body_key_is_refused_naming_the_rule_it_broke() {
        let rule = |body: &str| match read(&json_rpc_source(), body.as_bytes(), true).0 {
            BodyKey::Refuse(problem) => problem.key_rule(),
            other => panic!("{other:?}"),
        };
        let call = |key: &str| {
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"m","params":{{"_meta":{{"idempotencyKey":{key}}}}}}}"#)
        };
        assert_eq!(rule(&call(r#""a b""#)), Some(InvalidKey::InvalidByte));
        assert_eq!(rule(&call(r#""""#)), Some(InvalidKey::Empty));
        assert_eq!(rule(&call("5")), Some(InvalidKey::NotAString));
        assert_eq!(rule(&format!("[{}]", call(r#""k""#))), Some(InvalidKey::NotAString));
    }

    #[test]
    fn progress_notifications_get_the_retrys_progress_token() {
        let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"_meta":{"idempotencyKey":"k","progressToken":"p-2"}}}"#;
        let (_, reply) = read(&json_rpc_source(), call.as_bytes(), false);
        let reply = reply.unwrap();
        assert_eq!(reply.progress_token, Some(Value::from("p-2")));
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
        let mut rewrite = IdRewrite::new(&headers, reply).unwrap();
        let stream = concat!(
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1,\"progressToken\":\"p-1\"}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"progressToken\":\"p-1\"}}\n\n",
            "data: {\"id\":1,\"jsonrpc\":\"2.0\",\"result\":{}}\n\n",
        );
        let got = all(&mut rewrite, &[stream.as_bytes()]);
        let expected = concat!(
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1,\"progressToken\":\"p-2\"}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"progressToken\":\"p-1\"}}\n\n",
            "data: {\"id\":2,\"jsonrpc\":\"2.0\",\"result\":{}}\n\n",
        );
        assert_eq!(got, expected);
    }

    #[test]
    fn json_rpc_requests_notifications_responses_and_batches() {
        let read = |body: &str, required| read(&json_rpc_source(), body.as_bytes(), required);
        let call =
            r#"{"jsonrpc":"2.0","id":3,"method":"charge","params":{"_meta":{"idempotencyKey":"k-1"},"amount":5}}"#;
        let (key, id) = read(call, false);
        assert!(matches!(key, BodyKey::Key(ref key, _) if key.as_str() == "k-1"), "{key:?}");
        assert_eq!(id, Some(Reply { id: Value::from(3), progress_token: None }));
        // No key: the policy decides, and the answer carries the id.
        let (key, id) = read(r#"{"jsonrpc":"2.0","id":"x","method":"charge","params":{}}"#, true);
        assert!(matches!(key, BodyKey::Missing));
        assert_eq!(id.map(|reply| reply.id), Some(Value::from("x")));
        for bad in [r#""""#, r#""a b""#, "5", "{}"] {
            let body =
                format!(r#"{{"jsonrpc":"2.0","id":1,"method":"m","params":{{"_meta":{{"idempotencyKey":{bad}}}}}}}"#);
            assert!(matches!(read(&body, false).0, BodyKey::Refuse(p) if p.kind() == ProblemKind::InvalidKey), "{bad}");
        }
        // A notification, even keyed, and a client's response run through.
        let notification = r#"{"jsonrpc":"2.0","method":"m","params":{"_meta":{"idempotencyKey":"k"}}}"#;
        assert!(matches!(read(notification, true), (BodyKey::Through, None)));
        assert!(matches!(read(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#, true), (BodyKey::Through, None)));
        // A batch: through without keys where they are optional, refused otherwise.
        let unkeyed = r#"[{"jsonrpc":"2.0","id":1,"method":"m"},{"jsonrpc":"2.0","method":"n"}]"#;
        assert!(matches!(read(unkeyed, false), (BodyKey::Through, None)));
        assert!(matches!(read(unkeyed, true), (BodyKey::Refuse(p), None) if p.kind() == ProblemKind::InvalidKey));
        let keyed = format!("[{call}]");
        assert!(matches!(read(&keyed, false), (BodyKey::Refuse(p), None) if p.kind() == ProblemKind::InvalidKey));
        assert!(
            matches!(read("{nope", false), (BodyKey::Refuse(p), None) if p.kind() == ProblemKind::RequestBodyNotJson)
        );
    }

    #[test]
    fn a_retry_with_another_id_and_meta_fingerprints_the_same() {
        let print = |body: &str| match read(&json_rpc_source(), body.as_bytes(), false).0 {
            BodyKey::Key(_, Some(bytes)) => bytes,
            other => panic!("{other:?}"),
        };
        let first = print(
            r#"{"jsonrpc":"2.0","id":1,"method":"charge","params":{"amount":5,"_meta":{"idempotencyKey":"k","progressToken":1}}}"#,
        );
        let retry = print(
            r#"{ "method":"charge","params":{"_meta":{"progressToken":9,"idempotencyKey":"k"},"amount":5},"jsonrpc":"2.0","id":"r"}"#,
        );
        assert_eq!(first, retry);
        let other =
            print(r#"{"jsonrpc":"2.0","id":1,"method":"charge","params":{"amount":6,"_meta":{"idempotencyKey":"k"}}}"#);
        assert_ne!(first, other);
    }

    #[test]
    fn keys_at_a_json_pointer() {
        let source = KeySource::json_pointer("/meta/key").unwrap();
        let read = |body: &str| read(&source, body.as_bytes(), false).0;
        assert!(matches!(read(r#"{"meta":{"key":"k"}}"#), BodyKey::Key(ref key, None) if key.as_str() == "k"));
        assert!(matches!(read(r#"{"meta":{"key":null}}"#), BodyKey::Missing));
        assert!(matches!(read(r#"{"meta":{}}"#), BodyKey::Missing));
        assert!(matches!(read(r#"{"meta":{"key":1}}"#), BodyKey::Refuse(p) if p.kind() == ProblemKind::InvalidKey));
        assert!(matches!(read(""), BodyKey::Refuse(p) if p.kind() == ProblemKind::RequestBodyNotJson));
    }
}
