//! `text/event-stream` event boundaries, found while a response is recorded, so that a
//! duplicate sending `Last-Event-ID` resumes after the event with that id without a second
//! parse.
//!
//! The grammar is the HTML standard's (`9.2.6 Interpreting an event stream`): lines end with
//! CRLF, LF or CR; an empty line ends an event; a line `id: X` (one space after the colon
//! stripped) gives the event its id. An event id containing NUL is ignored, as browsers do.
//!
//! An event ends at the line ending of its empty line. When that line ending is a CR, the
//! event is marked at the CR, at once (a CR that ends a chunk is not held until the next byte
//! says whether an LF follows); a resumed stream then skips the LF that may follow it, the
//! second half of that same CRLF ([`skips_lf`]).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

use crate::{headers::LAST_EVENT_ID, store::EventMark};

/// The longest `id:` line kept (longer ids are not resumable; their events still pass).
const MAX_ID_LINE: usize = 3 + 1024;

/// Where a duplicate resumes the response whose headers are `response`: after the event its
/// request names in `Last-Event-ID`, if the response is an event stream (the one rule of a
/// replay and of a joined response).
pub(crate) fn resumes_after<'a>(request: &'a HeaderMap, response: &HeaderMap) -> Option<&'a HeaderValue> {
    request.get(LAST_EVENT_ID).filter(|_| is_event_stream(response))
}

/// Whether the headers announce an event stream.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(';').next().is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/event-stream"))
    })
}

/// Finds event ends in a body fed to it chunk by chunk.
#[derive(Debug, Default)]
pub(crate) struct EventScanner {
    /// Bytes fed so far.
    offset: u64,
    /// The current line, while it may still be an `id:` line.
    line: Vec<u8>,
    /// The current line is not an `id:` line we keep (too long, or another field).
    line_ignored: bool,
    /// The current line has at least one byte.
    line_started: bool,
    /// The last byte fed was a CR (an LF right after it ends no second line).
    after_cr: bool,
    /// The id of the event being read, if it has an `id:` line.
    id: Option<Bytes>,
}

impl EventScanner {
    /// Feeds the next chunk; calls `found` with each end it completes of an event with an id.
    pub(crate) fn feed(&mut self, chunk: &[u8], mut found: impl FnMut(EventMark)) {
        self.scan(chunk, |end, id| {
            if let Some(id) = id {
                found(EventMark { id, end });
            }
        });
    }

    /// How many bytes it was fed.
    #[cfg(feature = "json")]
    pub(crate) const fn offset(&self) -> u64 {
        self.offset
    }

    /// Feeds the next chunk; calls `ended` with each event end it completes: the offset just
    /// past the CR or LF that ends the event's empty line (for a CRLF, its CR: see the module
    /// docs), counted from the first byte ever fed, and the event's id if it has one.
    pub(crate) fn scan(&mut self, chunk: &[u8], mut ended: impl FnMut(u64, Option<Bytes>)) {
        for &byte in chunk {
            self.offset += 1;
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = byte == b'\r';
                    self.end_line(&mut ended);
                }
                _ => {
                    self.after_cr = false;
                    self.line_started = true;
                    if !self.line_ignored {
                        self.line.push(byte);
                        let n = self.line.len().min(3);
                        if self.line[..n] != b"id:"[..n] || self.line.len() > MAX_ID_LINE {
                            self.line_ignored = true;
                            self.line.clear();
                        }
                    }
                }
            }
        }
    }

    fn end_line(&mut self, ended: &mut impl FnMut(u64, Option<Bytes>)) {
        if !self.line_started {
            // An empty line: the event ends here.
            ended(self.offset, self.id.take());
        } else if !self.line_ignored && self.line.len() >= 3 {
            let value = &self.line[3..];
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if !value.contains(&0) {
                self.id = Some(Bytes::copy_from_slice(value));
            }
        }
        self.line.clear();
        self.line_ignored = false;
        self.line_started = false;
    }
}

/// The event marks of a whole body: none unless `headers` announce an event stream.
/// (Transactional mode buffers its responses whole.)
#[cfg(any(feature = "postgres", test))]
pub(crate) fn marks_of(headers: &HeaderMap, body: &[u8]) -> Vec<EventMark> {
    let mut marks = Vec::new();
    if is_event_stream(headers) {
        let mut scanner = EventScanner::default();
        scanner.feed(body, |mark| marks.push(mark));
    }
    marks
}

/// Where to resume after the event whose id is `last`: the end of its last occurrence.
pub(crate) fn resume_offset(marks: &[EventMark], last: &[u8]) -> Option<u64> {
    marks.iter().rev().find(|mark| mark.id == last).map(|mark| mark.end)
}

/// Whether a stream resumed at an event end skips the byte there: `before`, the byte just
/// before the end, is the CR of the event's empty line, and `at`, the byte at the end, is an
/// LF, the rest of that CRLF (it would end no line of the resumed stream's own).
pub(crate) fn skips_lf(before: Option<u8>, at: u8) -> bool {
    before == Some(b'\r') && at == b'\n'
}

/// The body of a whole record resumed after the event whose id is `last` (the end of its last
/// occurrence, an LF completing its CRLF skipped): `None` when no event has that id.
pub(crate) fn resume_in_body(body: &Bytes, marks: &[EventMark], last: &[u8]) -> Option<Bytes> {
    let end = usize::try_from(resume_offset(marks, last)?).unwrap_or(usize::MAX).min(body.len());
    let before = end.checked_sub(1).map(|at| body[at]);
    let skip = usize::from(body.get(end).is_some_and(|&at| skips_lf(before, at)));
    Some(body.slice(end + skip..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(chunks: &[&[u8]]) -> Vec<(String, u64)> {
        let mut scanner = EventScanner::default();
        let mut found = Vec::new();
        let mut push = |mark: EventMark| found.push((String::from_utf8(mark.id.to_vec()).unwrap(), mark.end));
        for chunk in chunks {
            scanner.feed(chunk, &mut push);
        }
        found
    }

    #[test]
    fn finds_the_end_of_each_event_with_an_id() {
        let body = b"id: 0\ndata: 0\n\nid: 1\ndata: 1\n\n";
        assert_eq!(marks(&[body]), vec![("0".into(), 15), ("1".into(), 30)]);
    }

    #[test]
    fn every_line_ending_and_any_split() {
        let lf = b"id: a\ndata: x\n\ndata: no id\n\nid:b\n\n".to_vec();
        let crlf = b"id: a\r\ndata: x\r\n\r\ndata: no id\r\n\r\nid:b\r\n\r\n".to_vec();
        let cr = b"id: a\rdata: x\r\rdata: no id\r\rid:b\r\r".to_vec();
        for body in [lf, crlf, cr] {
            let whole = marks(&[&body]);
            assert_eq!(whole.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["a", "b"], "{body:?}");
            // Split at every byte, and one byte at a time: the same marks.
            for at in 0..body.len() {
                assert_eq!(marks(&[&body[..at], &body[at..]]), whole, "split at {at} of {body:?}");
            }
            let bytes: Vec<&[u8]> = body.chunks(1).collect();
            assert_eq!(marks(&bytes), whole);
            // Resumed after each: the next event exactly, with no stray LF.
            let found = marks_of_stream(&body);
            let body = Bytes::from(body);
            let after_a = resume_in_body(&body, &found, b"a").unwrap();
            assert!(after_a.starts_with(b"data: no id"), "{after_a:?}");
            assert_eq!(resume_in_body(&body, &found, b"b").unwrap(), "");
            assert_eq!(resume_in_body(&body, &found, b"c"), None);
        }
    }

    fn marks_of_stream(body: &[u8]) -> Vec<EventMark> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
        marks_of(&headers, body)
    }

    /// An event whose empty line's CR ends a chunk is marked with that chunk, not when the
    /// next byte comes (a client that saw it may reconnect while the stream pauses there).
    #[test]
    fn a_cr_that_ends_a_chunk_marks_its_event_at_once() {
        for (first, rest) in [(&b"id: 1\rdata: a\r\r"[..], &b"id: 2\r\r"[..]), (b"id: 1\r\n\r", b"\nid: 2\r\n\r\n")] {
            let mut scanner = EventScanner::default();
            let mut found = Vec::new();
            scanner.feed(first, |mark| found.push(mark));
            assert_eq!(found, [EventMark { id: Bytes::from_static(b"1"), end: first.len() as u64 }]);
            scanner.feed(rest, |mark| found.push(mark));
            assert_eq!(found.len(), 2);
            let body = Bytes::from([first, rest].concat());
            assert!(resume_in_body(&body, &found, b"1").unwrap().starts_with(b"id: 2"));
        }
    }

    #[test]
    fn other_fields_comments_and_odd_ids() {
        // `idx:` is another field; a comment is ignored; an id with NUL is ignored; the id is
        // the event's last `id:` line; an empty id is an id.
        let body = b"idx: 9\n\n: comment id: 3\n\nid: 1\nid: 2\ndata\n\nid: a\0b\n\nid:\n\n";
        assert_eq!(marks(&[body]), vec![("2".into(), 43), (String::new(), body.len() as u64)]);
    }

    #[test]
    fn marks_of_a_whole_body_only_for_an_event_stream() {
        let body = b"id: 1\ndata: a\n\nid: 2\r\r";
        let mut headers = HeaderMap::new();
        assert!(marks_of(&headers, body).is_empty());
        headers.insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
        let ends: Vec<u64> = marks_of(&headers, body).iter().map(|mark| mark.end).collect();
        assert_eq!(ends, [15, body.len() as u64]);
    }

    #[test]
    fn resumes_after_the_last_event_with_the_id() {
        let found = [
            EventMark { id: Bytes::from_static(b"1"), end: 10 },
            EventMark { id: Bytes::from_static(b"2"), end: 20 },
            EventMark { id: Bytes::from_static(b"1"), end: 30 },
        ];
        assert_eq!(resume_offset(&found, b"2"), Some(20));
        assert_eq!(resume_offset(&found, b"1"), Some(30));
        assert_eq!(resume_offset(&found, b"3"), None);
    }

    #[test]
    fn event_stream_content_types() {
        for (value, yes) in [
            ("text/event-stream", true),
            ("text/event-stream; charset=utf-8", true),
            ("Text/Event-Stream", true),
            ("text/plain", false),
            ("text/event-streams", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            assert_eq!(is_event_stream(&headers), yes, "{value}");
        }
        assert!(!is_event_stream(&HeaderMap::new()));
    }
}
