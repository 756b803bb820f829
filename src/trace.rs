//! Trace contexts: the W3C `traceparent` a request arrived with, and the ids of the span it ran
//! in, kept in its record so that a replay points at the work it replays, and in the head it
//! publishes while in flight so that a joined request points at the work it follows.

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::HeaderMap;

use crate::headers::TRACEPARENT;

/// A W3C trace context: a trace id, the id of a span in it, and the trace flags — the fields
/// of a version-`00` `traceparent` header (`tracestate` is not kept).
///
/// ```
/// use tower_idempotency::TraceContext;
///
/// let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let context = TraceContext::parse(header).unwrap();
/// assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(context.is_sampled());
/// assert_eq!(context.to_string(), header);
/// assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// The bytes a [`TraceContext`] takes in a record.
pub(crate) const ENCODED_LEN: usize = 25;

impl TraceContext {
    /// A context from its ids and flags; `None` if either id is all zeros (invalid in W3C
    /// Trace Context).
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Option<Self> {
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(Self { trace_id, span_id, flags })
    }

    /// Reads a `traceparent` header value: `00-{32 hex}-{16 hex}-{2 hex}` (a later version's
    /// value is read by its first four fields, as the W3C recommendation asks). `None` for
    /// anything else.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let bytes = traceparent.trim().as_bytes();
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let version = hex::<1>(&bytes[..2])?[0];
        // Version 00 is exactly 55 bytes; a later one may add fields after a dash; ff is invalid.
        if version == 0xff || (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return None;
        }
        Self::new(hex(&bytes[3..35])?, hex(&bytes[36..52])?, hex::<1>(&bytes[53..55])?[0])
    }

    /// The trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The trace id in lowercase hex, as trace viewers show it.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The span id (the `parent-id` of a `traceparent`).
    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// The span id in lowercase hex.
    pub fn span_id_hex(&self) -> String {
        to_hex(&self.span_id)
    }

    /// The trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the `sampled` flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 != 0
    }

    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.trace_id);
        out.extend_from_slice(&self.span_id);
        out.push(self.flags);
    }

    /// Reads what `encode_into` wrote (exactly [`ENCODED_LEN`] bytes).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; ENCODED_LEN] = bytes.try_into().ok()?;
        let (trace_id, rest) = bytes.split_at(16);
        let (span_id, flags) = rest.split_at(8);
        Self::new(trace_id.try_into().ok()?, span_id.try_into().ok()?, flags[0])
    }
}

/// How the layer meets the application's tracing system, which it does not depend on: it
/// names the span a request executes in (kept in its record, with the caller's
/// `traceparent`, and in the head it publishes for joiners while in flight), and links a
/// replayed or joined request's span to that span. Set with
/// [`IdempotencyLayer::with_trace_hook`](crate::IdempotencyLayer::with_trace_hook).
///
/// Both methods are called inside the layer's `idempotency` span, the current span then. With
/// `tracing-opentelemetry`, a hook is a few lines:
///
/// ```text
/// use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
/// use tracing_opentelemetry::OpenTelemetrySpanExt;
///
/// struct Otel;
///
/// impl TraceHook for Otel {
///     fn current(&self) -> Option<TraceContext> {
///         let context = tracing::Span::current().context();
///         let span = context.span();
///         let span = span.span_context();
///         TraceContext::new(span.trace_id().to_bytes(), span.span_id().to_bytes(), span.trace_flags().to_u8())
///     }
///
///     fn link(&self, origin: &Origin) {
///         if let Some(original) = origin.span.or(origin.caller) {
///             let (trace, span) = (TraceId::from_bytes(original.trace_id()), SpanId::from_bytes(original.span_id()));
///             let flags = TraceFlags::new(original.flags());
///             let context = SpanContext::new(trace, span, flags, true, TraceState::default());
///             tracing::Span::current().add_link(context);
///         }
///     }
/// }
/// ```
///
/// (`tests/otel.rs` runs this one against a real OpenTelemetry pipeline.)
pub trait TraceHook: Send + Sync + 'static {
    /// The context of the span the handler is about to run in; `None` if there is none.
    fn current(&self) -> Option<TraceContext>;

    /// A replayed or joined request's span is current: link it to `origin`, the request that
    /// executed (a replay's record) or is executing (a joined response's head; its
    /// `completed_at` is `None`). The default does nothing (the span's fields carry the
    /// original's ids anyway).
    fn link(&self, origin: &Origin) {
        let _ = origin;
    }
}

/// Marks the current span (a replay's or a joiner's `idempotency` span) with the trace of the
/// request that executed or is executing, and hands it to the hook to link. The one place both
/// paths link, so that they cannot differ.
pub(crate) fn link(hook: Option<&dyn TraceHook>, origin: &Origin) {
    let Some(original) = origin.span.or(origin.caller) else { return };
    let span = tracing::Span::current();
    // The id written out only for a span someone records (no hex string per replay otherwise).
    if !span.is_disabled() {
        span.record("original_trace_id", tracing::field::display(original.trace_id_hex()));
        span.record("original_traceparent", tracing::field::display(original));
    }
    if let Some(hook) = hook {
        hook.link(origin);
    }
}

/// The caller's trace context: a request's valid `traceparent` header.
pub(crate) fn caller(headers: &HeaderMap) -> Option<TraceContext> {
    TraceContext::parse(headers.get(TRACEPARENT)?.to_str().ok()?)
}

/// The `traceparent` header value (version `00`).
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", to_hex(&self.trace_id), to_hex(&self.span_id), self.flags)
    }
}

fn hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None, // W3C Trace Context: lowercase only
        }
    }
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 15)] as char]).collect()
}

/// Where a record came from: when it was completed, and the trace contexts of the request
/// that executed. A replay carries them on its span, so that a trace viewer goes from the retry
/// to the work it replays; an operator reads them when looking at a key. A response in flight
/// publishes them in its head ([`LiveEvent::Head`](crate::store::LiveEvent::Head), without
/// `completed_at`), so that a joined request's span points at the work it follows.
///
/// The layer fills it for every response it records or publishes. A record (or head) written
/// before this existed, or by a store's own code, has the default: nothing known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Origin {
    /// When the response was recorded, by the clock of the process that executed it
    /// (millisecond precision).
    pub completed_at: Option<SystemTime>,
    /// The `traceparent` header the executing request arrived with: the caller's span.
    pub caller: Option<TraceContext>,
    /// The span the handler ran in, as the layer's [`TraceHook`] named it (without a hook,
    /// `None`: the layer itself knows only `tracing`'s process-local span ids).
    pub span: Option<TraceContext>,
}

impl Origin {
    /// The trace the executing request belonged to: its span's, else its caller's.
    pub fn trace_id(&self) -> Option<[u8; 16]> {
        self.span.or(self.caller).map(|context| context.trace_id)
    }

    /// Whether nothing is known (a record from before origins were kept).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Now, as a record's completed-at keeps it (milliseconds).
pub(crate) fn completed_now() -> SystemTime {
    let now = SystemTime::now();
    let millis = now.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis());
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}
