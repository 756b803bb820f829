//! The live log of a lock: [`LiveLog`], the optional store capability that waiting and joining
//! need, and the values it carries ([`LiveEvent`], [`LiveCursor`], [`Followed`]).

use std::{future::Future, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::{DecodeError, Fingerprint, IdempotencyStore, LockToken, StoreError, StoreKey, StoredResponse};
use crate::Origin;

/// The live log of each lock: what a store needs so that duplicates of a request in flight can
/// wait for it or join its response as it is produced. An optional capability: a store that
/// implements only [`IdempotencyStore`] is complete, and its duplicates in flight get `409`
/// (the layer's default); waiting and joining
/// ([`IdempotencyLayer::with_duplicates`](crate::IdempotencyLayer::with_duplicates)) need this
/// trait too, which the compiler checks. The crate's stores all implement it.
///
/// # The contract
///
/// - **One log per lock.** `begin` starting a lock starts its log, empty. The executing request
///   [`publish`](Self::publish)es its response into it as it is produced: first its head
///   ([`LiveEvent::Head`], once), then its body in pieces ([`LiveEvent::Data`]), with the end of
///   each `text/event-stream` event that has an `id:` ([`LiveEvent::EventEnd`]).
/// - **Idempotent appends.** Each publish says the index of its first event; an index already in
///   the log is not appended again, so a publish sent again after a lost answer duplicates
///   nothing. Only the lock's owner appends (the token fences it, as every write).
/// - **Woken, not polled.** A [`follow`](Self::follow) with nothing new to read waits until
///   something is published, or the log ends, or its timeout, and is woken by the store (a
///   notification, a blocking read): never by asking the store again every few milliseconds.
///   A backend without any push channel polls instead, at a bounded interval its docs state
///   with its cost (`DynamoDbStore`: every 250 ms by default).
/// - **The end.** `complete`, `release` and the lease running out end the log and wake its
///   followers, who learn whether a record replaced the lock ([`Followed::Ended`]); a follower
///   then reads the rest of the response from the record (with `begin`).
/// - **Bounded and short-lived.** The layer never publishes more than its record limit of body
///   bytes into one log (a response past the limit stops being published, and is not
///   retained). A store may bound a log more tightly (by what it costs the store): a publish
///   past its bound fails with [`StoreError::capacity`], and the layer then keeps the response
///   as not retained, as past the record limit. A log lives no longer than its lock, plus
///   whatever short grace a store needs to tell late followers it ended.
///
/// The conformance suite checks all of it: `conformance::run_live`
/// (feature `conformance`).
pub trait LiveLog: IdempotencyStore {
    /// Appends `events` to the live log of the caller's lock: join mode publishes a response as
    /// it is produced, for duplicates to follow.
    ///
    /// `from` is the index in the log of `events[0]`. A store keeps each index once, so a
    /// publish sent again after a lost answer appends nothing twice. Nothing is written, and
    /// `Ok(())` returned, when the lock is no longer held.
    fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads the live log of the key's lock for `fingerprint` after `cursor` (`None`: the log
    /// of whichever lock holds the key now, from its start), waiting up to `timeout` for a new
    /// event or for the log to end.
    ///
    /// A `timeout` of zero reads without waiting: the events after `cursor` the store has (a
    /// store woken by notifications may answer "nothing new" from having had none since its
    /// last read; it never answers so merely because the wait is over).
    ///
    /// The wait is woken by the store, not by asking it again every few milliseconds:
    /// `publish`, `complete`, `release` and the lease running out each wake the lock's
    /// followers. [`Followed::Ended`] when the log of `cursor`'s lock ended, or no live lock
    /// for `fingerprint` holds the key.
    fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Followed, StoreError>> + Send;
}

/// One piece of a response in flight, as the executing request publishes it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LiveEvent {
    /// The status and the headers a replay would send, and where the response comes from.
    /// Always the first event, and only once.
    Head {
        /// The response status.
        status: StatusCode,
        /// The headers kept for a replay (hop-by-hop, `Content-Length`, `Date` removed).
        headers: HeaderMap,
        /// The trace contexts of the request in flight (its caller's `traceparent`, its span
        /// as the layer's [`TraceHook`](crate::TraceHook) named it; no completion time yet): a
        /// joined request's span links to it, as a replay's links to its record's. Empty in a
        /// head published before heads carried it.
        origin: Origin,
    },
    /// The next bytes of the body.
    Data(Bytes),
    /// A `text/event-stream` event whose `id:` is this value ended where the body published so
    /// far ends (a duplicate sending `Last-Event-ID` with this value resumes there).
    EventEnd(Bytes),
}

/// Where a follower stands in a lock's log: the lock's token id, and how many events it has
/// read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LiveCursor {
    lock: u128,
    read: u64,
}

impl LiveCursor {
    /// A cursor in the log of lock `lock` (a [`LockToken::id`](super::LockToken::id)), after its
    /// first `read` events.
    pub const fn new(lock: u128, read: u64) -> Self {
        Self { lock, read }
    }

    /// The token id of the lock whose log this is.
    pub const fn lock(&self) -> u128 {
        self.lock
    }

    /// How many events of the log were read.
    pub const fn read(&self) -> u64 {
        self.read
    }
}

/// What [`LiveLog::follow`] found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Followed {
    /// The lock is live: the events after the cursor (none if the wait timed out first), and
    /// the cursor after them.
    Live {
        /// The new events, in order.
        events: Vec<LiveEvent>,
        /// Where the next `follow` starts.
        cursor: LiveCursor,
    },
    /// The log followed has ended, or the key holds no live lock for the fingerprint.
    /// `completed`: a record replaced the lock (ask `begin` for it). Otherwise the lock was
    /// released, expired, or taken over.
    Ended {
        /// Whether a record replaced the lock.
        completed: bool,
    },
}

/// Appends a [`LiveEvent::Head`] as a store keeps it: a record ([`StoredResponse::encode_into`])
/// with the head's status, headers and origin, and an empty body. Every store that encodes its
/// log writes heads with this and reads them with [`decode_head`], so that their layouts
/// cannot drift apart. `None` for a head too large for the layout (more than 65 535 header
/// fields, a value over 4 GiB): like its record, which is then not retained, it cannot be
/// published.
#[cfg_attr(not(any(feature = "redis", feature = "postgres", feature = "dynamodb")), allow(dead_code))]
pub(crate) fn encode_head(status: StatusCode, headers: HeaderMap, origin: Origin, out: &mut Vec<u8>) -> Option<()> {
    let head = StoredResponse::new(status, headers, Bytes::new()).with_origin(origin);
    out.reserve(head.encoded_len());
    head.encode_into(out)
}

/// Reads back a head [`encode_head`] wrote. A head written before heads carried an origin (the
/// same layout without it) reads with an empty one.
#[cfg_attr(not(any(feature = "redis", feature = "postgres", feature = "dynamodb")), allow(dead_code))]
pub(crate) fn decode_head(encoded: Bytes) -> Result<LiveEvent, DecodeError> {
    let head = StoredResponse::decode(encoded)?;
    if !head.body.is_empty() || head.trailers.is_some() || !head.marks.is_empty() {
        return Err(DecodeError("a live head with a body"));
    }
    Ok(LiveEvent::Head { status: head.status, headers: head.headers, origin: head.origin })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use http::HeaderValue;

    use super::*;
    use crate::TraceContext;

    fn headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        headers
    }

    fn encoded(status: StatusCode, headers: HeaderMap, origin: Origin) -> Bytes {
        let mut out = Vec::new();
        encode_head(status, headers, origin, &mut out).unwrap();
        Bytes::from(out)
    }

    #[test]
    fn a_head_round_trips_with_its_origin() {
        let caller = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let span = TraceContext::new([0xab; 16], [0xcd; 8], 1);
        for origin in [
            Origin { caller, span, completed_at: None },
            Origin { caller: None, span, completed_at: None },
            Origin { caller, span: None, completed_at: Some(UNIX_EPOCH + Duration::from_millis(5)) },
            Origin::default(),
        ] {
            let head = decode_head(encoded(StatusCode::OK, headers(), origin)).unwrap();
            assert_eq!(head, LiveEvent::Head { status: StatusCode::OK, headers: headers(), origin });
        }
    }

    #[test]
    fn a_head_without_an_origin_is_written_and_read_as_before() {
        // The layout of a head from before heads carried an origin: status, no headers, flags.
        let old = Bytes::from_static(&[0, 200, 0, 0, 0]);
        assert_eq!(encoded(StatusCode::OK, HeaderMap::new(), Origin::default()), old);
        let head = decode_head(old).unwrap();
        assert_eq!(
            head,
            LiveEvent::Head { status: StatusCode::OK, headers: HeaderMap::new(), origin: Origin::default() }
        );
    }

    #[test]
    fn a_head_with_a_body_or_damaged_is_an_error() {
        let mut with_body = Vec::new();
        StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"body"))
            .encode_into(&mut with_body)
            .unwrap();
        for damaged in [&with_body[..], b"", b"\x00", b"\x00\xc8\x00\x00\x04"] {
            assert!(decode_head(Bytes::copy_from_slice(damaged)).is_err(), "{damaged:?}");
        }
    }
}
