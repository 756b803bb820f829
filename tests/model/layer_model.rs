//! Model-based test: random programs against the real layer, checked against a reference model.
//!
//! A program is a list of operations on a handful of keys in three scopes (two `Authorization`
//! values and the anonymous namespace): requests whose handler succeeds, answers `4xx` / `5xx`,
//! panics, errors, takes a while or hangs past several leases; clients that wait or drop the
//! request mid-handler; duplicates started while the first is still running; a crashed process
//! that took a lock and vanished; and clock advances past leases and TTLs.
//!
//! Responses come in every shape the end of a body can take: in memory, streamed in chunks,
//! streamed with a `Content-Length`, data then a trailers frame, a trailers frame only, over the
//! record limit. The "server" reads each one of two ways: to its end (`None`), or like hyper —
//! nothing once the body says it ended, nothing past `Content-Length` bytes or past the
//! trailers frame, then the body is dropped without being polled for its end. Clients wait for
//! the whole response, give up after a moment, or leave the moment the handler answered (with
//! the head, or before it when the head waits for the record), while the record's write may
//! still be under way. A program's setup picks the detach bound (the default, or
//! `with_max_detached(0)`) and whether each record's write takes a while (a slow store).
//!
//! Every program runs against the real stack — `CatchPanicLayer` outside `IdempotencyLayer` over
//! `MemoryStore`, on paused tokio time — and against [`Model`], a few lines per rule of the guide: a map
//! from (scope, key) to `Free | InFlight | Done`, and per execution when its key is decided and
//! how (a record, a not-retained record, or freed). Every observable outcome must agree: status,
//! `Idempotent-Replayed`, body, trailers, problem type, and how often the handler ran for each
//! (scope, key). A client that received a whole `2xx` the handler made sends the same request
//! again at once, before anything else runs: that retry must replay it (or, over the record
//! limit, get `409` response-not-retained), never find it in flight, under either way of
//! reading (guide, step 7). A client gone after the handler answered, during the write and with no
//! detach slot free, leaves its key recorded or marked not retained, never released. At the end, past
//! every lease and TTL, the store must be empty: no lock is ever left behind.
//!
//! Determinism by design: every request is spawned at a whole second of paused time and runs
//! until it blocks before the program goes on; handler delays end at whole or half seconds,
//! streamed bodies a quarter second after their head, slow writes 0.2 s after they start, and
//! clients give up 0.1 s after sending, so no two events the model orders can happen at the same
//! instant. A client that leaves when the handler answered is told so by the handler itself,
//! in the same poll.
//!
//! `PROPTEST_CASES=N cargo test --test model` runs more cases (default: 256 for `MemoryStore`).
//! With the `redis` feature the same model checks `RedisStore` in real time (see the `redis`
//! module at the end).

use crate::common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use common::outage::Outage;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use proptest::prelude::*;
use tokio::{sync::Notify, time::Instant};
use tower::{BoxError, ServiceBuilder, ServiceExt, util::BoxCloneService};
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, RequestBody,
    store::{Begin, Fingerprint, IdempotencyStore, MemoryStore, StoreKey},
};

/// The layer's lease: renewed every second while a handler runs.
const LEASE: Duration = Duration::from_secs(3);
/// The layer's record TTL.
const TTL: Duration = Duration::from_secs(20);
/// The layer's record limit; [`Outcome::Large`] bodies are over it.
const MAX_RECORD: usize = 256;
/// When an abandoning client drops its request (or the response body), after it was sent.
const ABANDON_AFTER: Duration = Duration::from_millis(100);
/// How long a streamed body takes from its first frame to its last.
const CHUNK_GAP: Duration = Duration::from_millis(250);
/// How long each record's (or not-retained record's) write takes with [`Writes::Slow`].
const WRITE: Duration = Duration::from_millis(200);
/// Marks the panics the test handler raises on purpose (the panic hook keeps them quiet).
const PANIC_MARK: &str = "model-handler-panic";
/// The trailer [`Outcome::Trailers`] and [`Outcome::TrailersOnly`] send.
const TRAILER: &str = "x-result";

const SCOPES: [Option<&str>; 3] = [Some("Bearer tenant-0"), Some("Bearer tenant-1"), None];
const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
const PAYLOADS: [&str; 2] = [r#"{"sku":"A"}"#, r#"{"sku":"B"}"#];

// ---------------------------------------------------------------------------------------------
// Programs

/// How the layer and its store are set up, for a whole program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Setup {
    detach: Detach,
    writes: Writes,
}

/// The bound on handlers and bodies finished for clients that went away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Detach {
    /// The default bound: every one is finished.
    #[default]
    Default,
    /// `with_max_detached(0)`: a handler still running is cancelled and its key freed; a body
    /// still streaming is not read on, and its key keeps a not-retained record. A write already started
    /// (a record, a not-retained record) is never bounded.
    Zero,
}

/// How long the store takes to write a record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Writes {
    #[default]
    Instant,
    /// Each `complete` (a record, a not-retained record) takes [`WRITE`] before it reaches the store;
    /// releases stay instant.
    Slow,
    /// A real store's round trip (Redis): no time to the model, but never done within the poll
    /// that starts it. Only the Redis programs use it.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    RoundTrip,
}

impl Setup {
    fn write(self) -> Duration {
        match self.writes {
            Writes::Instant | Writes::RoundTrip => Duration::ZERO,
            Writes::Slow => WRITE,
        }
    }

    fn layer<St: IdempotencyStore>(self, store: St, lease: Duration, ttl: Duration) -> IdempotencyLayer<St> {
        let layer = IdempotencyLayer::from_store(store)
            .with_secret(secret())
            .with_lease(lease)
            .with_ttl(ttl)
            .with_max_record(MAX_RECORD);
        match self.detach {
            Detach::Default => layer,
            Detach::Zero => layer.with_max_detached(0),
        }
    }
}

/// What the handler does once it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Created,
    /// `201` streamed in two chunks, the second [`CHUNK_GAP`] after the first.
    Streamed,
    /// `201` with `Content-Length`, streamed in three chunks over [`CHUNK_GAP`]; the body never
    /// says it ended before its `None`, so only the length tells.
    Sized,
    /// `201`: one chunk, then a trailers frame [`CHUNK_GAP`] later.
    Trailers,
    /// `201` with no data, only a trailers frame.
    TrailersOnly,
    /// `201` with a body over the record limit: only a not-retained record is kept.
    Large,
    ClientError,
    ServerError,
    Panic,
    Error,
}

impl Outcome {
    /// How long the body streams after the head.
    fn streams_for(self) -> Duration {
        match self {
            Self::Streamed | Self::Sized | Self::Trailers => CHUNK_GAP,
            _ => Duration::ZERO,
        }
    }

    /// A `2xx` recorded in full once its end is seen.
    fn is_recorded(self) -> bool {
        matches!(self, Self::Created | Self::Streamed | Self::Sized | Self::Trailers | Self::TrailersOnly)
    }
}

/// How long the handler takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delay {
    None,
    /// 1.5 s: shorter than a lease.
    Short,
    /// 10.5 s: more than three leases, so only renewal keeps the lock.
    Hang,
}

impl Delay {
    fn duration(self) -> Duration {
        match self {
            Self::None => Duration::ZERO,
            Self::Short => Duration::from_millis(1_500),
            Self::Hang => Duration::from_millis(10_500),
        }
    }
}

/// What the client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// Reads the whole response; if it was a `2xx` the handler made, sends the request again
    /// at once.
    Waits,
    /// Drops the request future [`ABANDON_AFTER`] after sending it.
    Abandons,
    /// Drops the request the moment the handler answered: with the head if the layer let it
    /// out by then (the body unread), before the head otherwise.
    Leaves,
}

/// How the server reads a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Polls it until `None`.
    ToEnd,
    /// Like hyper: not at all once it says it ended, not past `Content-Length` bytes nor past
    /// a trailers frame; then drops it without polling for its end.
    LikeHyper,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Req {
    scope: usize,
    key: usize,
    payload: usize,
    /// Sends the key as a Structured Field string (`"k0"`): the same key as the bare form.
    quoted: bool,
}

#[derive(Debug, Clone)]
enum Op {
    /// Spawns a request; its reply is checked at the end of the program.
    Send { req: Req, outcome: Outcome, delay: Delay, client: Client, read: Read },
    /// A process took the lock for this request through the store and crashed: nobody renews
    /// or releases it.
    Crash { req: Req },
    /// Moves the clock on by whole seconds; everything due meanwhile happens.
    Advance { secs: u64 },
}

#[derive(Debug, Clone)]
struct Program {
    setup: Setup,
    ops: Vec<Op>,
}

fn req() -> impl Strategy<Value = Req> {
    (0..SCOPES.len(), 0..KEYS.len(), 0..PAYLOADS.len(), proptest::bool::weighted(0.2))
        .prop_map(|(scope, key, payload, quoted)| Req { scope, key, payload, quoted })
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        5 => Just(Outcome::Created),
        1 => Just(Outcome::Streamed),
        2 => Just(Outcome::Sized),
        2 => Just(Outcome::Trailers),
        1 => Just(Outcome::TrailersOnly),
        1 => Just(Outcome::Large),
        1 => Just(Outcome::ClientError),
        1 => Just(Outcome::ServerError),
        1 => Just(Outcome::Panic),
        1 => Just(Outcome::Error),
    ]
}

fn delay() -> impl Strategy<Value = Delay> {
    prop_oneof![4 => Just(Delay::None), 3 => Just(Delay::Short), 1 => Just(Delay::Hang)]
}

fn client() -> impl Strategy<Value = Client> {
    prop_oneof![4 => Just(Client::Waits), 1 => Just(Client::Abandons), 1 => Just(Client::Leaves)]
}

fn read() -> impl Strategy<Value = Read> {
    prop_oneof![Just(Read::ToEnd), Just(Read::LikeHyper)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (req(), outcome(), delay(), client(), read())
            .prop_map(|(req, outcome, delay, client, read)| Op::Send { req, outcome, delay, client, read }),
        1 => req().prop_map(|req| Op::Crash { req }),
        4 => prop_oneof![Just(1u64), Just(2), Just(3), Just(5), Just(12), Just(25)]
            .prop_map(|secs| Op::Advance { secs }),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    let detach = prop_oneof![3 => Just(Detach::Default), 1 => Just(Detach::Zero)];
    let writes = prop_oneof![Just(Writes::Instant), Just(Writes::Slow)];
    (detach, writes).prop_map(|(detach, writes)| Setup { detach, writes })
}

fn program() -> impl Strategy<Value = Program> {
    (setup(), proptest::collection::vec(op(), 1..40)).prop_map(|(setup, ops)| Program { setup, ops })
}

// ---------------------------------------------------------------------------------------------
// The reference model, written from the guide, steps 5-8.

/// (scope, key) in the model.
type Slot = (usize, usize);

/// What a response carries that a replay must carry too: its body and its [`TRAILER`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Content {
    body: String,
    trailer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Free,
    /// Locked for `payload`. `exec: Some(n)`: execution `n` holds it and renews it while it
    /// runs. `exec: None`: a crashed owner's lock, free from `until` on.
    InFlight {
        payload: usize,
        exec: Option<usize>,
        until: Option<Instant>,
    },
    /// Completed: the recorded response (`None`: a not-retained record, the body was over the record
    /// limit or left unread), free from `expires` on.
    Done {
        payload: usize,
        content: Option<Content>,
        expires: Instant,
    },
}

/// What an execution leaves its key with, once decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Keep {
    Record(Content),
    NotRetained,
    Free,
}

/// What a request is expected to get.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// The handler ran and its own response came back; `retry`: what the same request sent
    /// the moment it had all of it gets.
    Executed { status: StatusCode, content: Content, retry: Option<Box<Expect>> },
    /// The handler ran and panicked: `CatchPanicLayer`'s `500`.
    Panicked,
    /// The handler ran and returned a service error.
    Failed,
    /// A replay of the completed record.
    Replayed(Content),
    /// A problem the layer made.
    Problem { status: u16, slug: &'static str },
    /// The client went away before the answer was complete.
    Dropped,
}

#[derive(Debug)]
struct Model {
    /// The layer's TTL and the lease a crashed owner took.
    ttl: Duration,
    lease: Duration,
    setup: Setup,
    slots: HashMap<Slot, State>,
    /// Handler executions so far, all keys.
    execs: usize,
    /// Handler executions per (scope, key).
    runs: HashMap<Slot, usize>,
    /// Executions whose key is not decided yet: (decided at, slot, exec, what it keeps), in
    /// the order they are decided.
    deciding: Vec<(Instant, Slot, usize, Keep)>,
}

impl Model {
    fn new(ttl: Duration, lease: Duration, setup: Setup) -> Self {
        Self { ttl, lease, setup, slots: HashMap::new(), execs: 0, runs: HashMap::new(), deciding: Vec::new() }
    }

    /// The state of `slot` at `now`: an expired record or abandoned lock is free.
    fn state(&self, slot: Slot, now: Instant) -> State {
        match self.slots.get(&slot).cloned().unwrap_or(State::Free) {
            State::InFlight { until: Some(until), .. } if until <= now => State::Free,
            State::Done { expires, .. } if expires <= now => State::Free,
            state => state,
        }
    }

    /// Guide, step 5: replay, 422, 409, or lock and execute.
    fn send(&mut self, r: Req, outcome: Outcome, delay: Delay, client: Client, now: Instant) -> Expect {
        let slot = (r.scope, r.key);
        match self.state(slot, now) {
            State::Done { payload, content: Some(content), .. } if payload == r.payload => Expect::Replayed(content),
            State::Done { payload, content: None, .. } if payload == r.payload => {
                Expect::Problem { status: 409, slug: "response-not-retained" }
            }
            State::InFlight { payload, .. } if payload == r.payload => {
                Expect::Problem { status: 409, slug: "in-flight" }
            }
            State::Done { .. } | State::InFlight { .. } => Expect::Problem { status: 422, slug: "key-reused" },
            State::Free => {
                self.execs += 1;
                let exec = self.execs;
                *self.runs.entry(slot).or_default() += 1;
                self.slots.insert(slot, State::InFlight { payload: r.payload, exec: Some(exec), until: None });
                self.execute(slot, exec, r.payload, (outcome, delay, client), now)
            }
        }
    }

    /// Guide, steps 6-7 for one execution: what its client gets, and when and how its key is
    /// decided.
    fn execute(
        &mut self,
        slot: Slot,
        exec: usize,
        payload: usize,
        run: (Outcome, Delay, Client),
        now: Instant,
    ) -> Expect {
        let (outcome, delay, client) = run;
        let content = response_content(exec, slot, payload, outcome);
        let answered = now + delay.duration();
        // The layer sees the body end (its `None`, its length, its trailers) as it is made.
        let end = answered + outcome.streams_for();
        // The record is written once the end is seen; a not-retained record as soon as the body is known
        // to be over the limit; anything else frees the key before the head goes out.
        let (mut at, mut keep) = match outcome {
            _ if outcome.is_recorded() => (end + self.setup.write(), Keep::Record(content.clone())),
            Outcome::Large => (answered + self.setup.write(), Keep::NotRetained),
            _ => (answered, Keep::Free),
        };
        // The last frame waits for the record (past the limit, the frame that passes it waits
        // for the not-retained record); the head waits for it too when the body is complete
        // before the head goes out (in memory, or nothing follows the head), or known to be
        // over the limit (head and body then leave in one write), and for the release of a key
        // it frees. A write is done at once only in an instant store ([`Writes::Slow`] slows
        // down records and not-retained records alone).
        let delivered = if outcome.is_recorded() || outcome == Outcome::Large { at } else { answered };
        let head_waits = match self.setup.writes {
            Writes::Instant => false,
            Writes::Slow => matches!(outcome, Outcome::Created | Outcome::TrailersOnly | Outcome::Large),
            Writes::RoundTrip => matches!(
                outcome,
                Outcome::Created | Outcome::TrailersOnly | Outcome::Large | Outcome::ClientError | Outcome::ServerError
            ),
        };
        let left = match client {
            Client::Waits => None,
            Client::Abandons => Some(now + ABANDON_AFTER).filter(|t| *t < delivered),
            Client::Leaves => Some(answered),
        };
        // Gone with no detach slot: a handler still running is cancelled (it never answered);
        // a body whose end was not seen is not read on, and keeps a not-retained record (the handler did
        // answer). Once the end was seen, the record is written whatever the client does.
        if let (Some(t), Detach::Zero) = (left, self.setup.detach) {
            if t < answered {
                (at, keep) = (t, Keep::Free);
            } else if t < end && outcome.is_recorded() {
                (at, keep) = (t + self.setup.write(), Keep::NotRetained);
            }
        }
        self.deciding.push((at, slot, exec, keep));
        self.deciding.sort_by_key(|(at, ..)| *at);
        if client == Client::Abandons && left.is_some() || client == Client::Leaves && head_waits {
            return Expect::Dropped;
        }
        // A client that has it all sends the request again at once (one that leaves has not).
        let retry = match outcome {
            _ if client == Client::Leaves => None,
            _ if outcome.is_recorded() => Some(Box::new(Expect::Replayed(content.clone()))),
            // Guide, step 7: the not-retained record, too, is written before the client sees the end.
            Outcome::Large => Some(Box::new(Expect::Problem { status: 409, slug: "response-not-retained" })),
            _ => None,
        };
        match outcome {
            Outcome::ClientError => Expect::Executed { status: StatusCode::NOT_FOUND, content, retry },
            Outcome::ServerError => Expect::Executed { status: StatusCode::BAD_GATEWAY, content, retry },
            Outcome::Panic => Expect::Panicked,
            Outcome::Error => Expect::Failed,
            _ => Expect::Executed { status: StatusCode::CREATED, content, retry },
        }
    }

    /// A crashed process's `begin` through the store: locks a free key for one lease.
    fn crash(&mut self, r: Req, now: Instant) -> &'static str {
        let slot = (r.scope, r.key);
        match self.state(slot, now) {
            State::Free => {
                self.slots
                    .insert(slot, State::InFlight { payload: r.payload, exec: None, until: Some(now + self.lease) });
                "execute"
            }
            State::Done { payload, .. } if payload == r.payload => "completed",
            State::InFlight { payload, .. } if payload == r.payload => "in-flight",
            _ => "mismatch",
        }
    }

    /// Guide, step 7: executions decided by `now` leave a record (TTL from its write), a not-retained record,
    /// or a free key.
    fn advance_to(&mut self, now: Instant) {
        while self.deciding.first().is_some_and(|(at, ..)| *at <= now) {
            let (at, slot, exec, keep) = self.deciding.remove(0);
            let held = self.slots.get(&slot).cloned();
            let Some(State::InFlight { payload, exec: Some(owner), .. }) = held else {
                panic!("model: slot {slot:?} not held by exec {exec} when it was decided: {held:?}");
            };
            assert_eq!(owner, exec, "model: a live lock was taken over");
            let next = match keep {
                Keep::Record(content) => State::Done { payload, content: Some(content), expires: at + self.ttl },
                Keep::NotRetained => State::Done { payload, content: None, expires: at + self.ttl },
                Keep::Free => State::Free,
            };
            self.slots.insert(slot, next);
        }
    }
}

/// The handler's response: which execution, for which (scope, key), of which payload.
fn response_content(exec: usize, (scope, key): Slot, payload: usize, outcome: Outcome) -> Content {
    let text = format!("exec {exec} {}/{}: {}", SCOPES[scope].unwrap_or("-"), KEYS[key], PAYLOADS[payload]);
    let body = |body: String| Content { body, trailer: None };
    match outcome {
        Outcome::Streamed => body(format!("{text};end")),
        Outcome::Sized => body(format!("{text};sized")),
        Outcome::Large => body(format!("{text}{}", ".".repeat(MAX_RECORD))),
        Outcome::Trailers => Content { trailer: Some(format!("{text};trailer")), body: text },
        Outcome::TrailersOnly => Content { body: String::new(), trailer: Some(text) },
        _ => body(text),
    }
}

// ---------------------------------------------------------------------------------------------
// The real stack

/// Handler executions seen by the test handler.
#[derive(Debug, Default)]
struct Log {
    execs: AtomicUsize,
    /// Handlers past their delay.
    finished: AtomicUsize,
    runs: Mutex<HashMap<Slot, usize>>,
}

/// A request extension: the handler notifies it as it hands back its response.
#[derive(Debug, Clone)]
struct Answered(Arc<Notify>);

fn slot_of(head: &http::request::Parts) -> Slot {
    let auth = head.headers.get("authorization").map(|v| v.to_str().unwrap());
    let scope = SCOPES.iter().position(|s| *s == auth).expect("a known scope");
    let key = IdempotencyKey::parse(head.headers["idempotency-key"].as_bytes()).expect("the layer let a valid key in");
    let key = KEYS.iter().position(|k| *k == key.as_str()).expect("a known key");
    (scope, key)
}

type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;
type Handler = BoxCloneService<Request<RequestBody<Full<Bytes>>>, Response<Body>, BoxError>;

/// The handler: counts its execution, waits `x-delay-ms`, then does what `x-outcome` says.
fn handler(log: Arc<Log>) -> Handler {
    BoxCloneService::new(tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let log = log.clone();
        async move {
            let exec = log.execs.fetch_add(1, Ordering::SeqCst) + 1;
            let (head, body) = request.into_parts();
            let slot = slot_of(&head);
            *log.runs.lock().unwrap().entry(slot).or_default() += 1;
            let body = body.collect().await?.to_bytes();
            let payload = PAYLOADS.iter().position(|p| p.as_bytes() == body).expect("a known payload");
            let header = |name: &str| head.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
            if let Some(ms) = header("x-delay-ms") {
                tokio::time::sleep(Duration::from_millis(ms.parse()?)).await;
            }
            log.finished.fetch_add(1, Ordering::SeqCst);
            let outcome = match header("x-outcome").as_deref() {
                Some("Created") => Outcome::Created,
                Some("Streamed") => Outcome::Streamed,
                Some("Sized") => Outcome::Sized,
                Some("Trailers") => Outcome::Trailers,
                Some("TrailersOnly") => Outcome::TrailersOnly,
                Some("Large") => Outcome::Large,
                Some("ClientError") => Outcome::ClientError,
                Some("ServerError") => Outcome::ServerError,
                Some("Panic") => panic!("{PANIC_MARK}"),
                Some("Error") => return Err::<_, BoxError>("the handler failed".into()),
                other => panic!("unknown outcome {other:?}"),
            };
            let status = match outcome {
                Outcome::ClientError => StatusCode::NOT_FOUND,
                Outcome::ServerError => StatusCode::BAD_GATEWAY,
                _ => StatusCode::CREATED,
            };
            let Content { body: text, trailer } = response_content(exec, slot, payload, outcome);
            let mut response = Response::builder()
                .status(status)
                .header("content-type", "text/plain")
                .header("set-cookie", format!("session=exec-{exec}"));
            let data = |range: std::ops::Range<usize>| Frame::data(Bytes::copy_from_slice(&text.as_bytes()[range]));
            let trailers = || {
                let mut trailers = HeaderMap::new();
                trailers.insert(TRAILER, HeaderValue::from_str(trailer.as_deref().unwrap()).unwrap());
                Frame::trailers(trailers)
            };
            let (len, third, gap) = (text.len(), text.len() / 3, CHUNK_GAP / 2);
            // Each frame with the pause before it.
            let frames = match outcome {
                Outcome::Streamed => vec![(Duration::ZERO, data(0..len - 3)), (CHUNK_GAP, data(len - 3..len))],
                Outcome::Sized => {
                    response = response.header("content-length", len);
                    vec![(Duration::ZERO, data(0..third)), (gap, data(third..2 * third)), (gap, data(2 * third..len))]
                }
                Outcome::Trailers => vec![(Duration::ZERO, data(0..len)), (CHUNK_GAP, trailers())],
                Outcome::TrailersOnly => vec![(Duration::ZERO, trailers())],
                _ => Vec::new(),
            };
            let body: Body = if frames.is_empty() {
                Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
            } else {
                // A first frame ready at once, whatever the clock (`sleep(ZERO)` may be pending).
                let frames = futures_util::stream::iter(frames).then(|(gap, frame)| async move {
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                    Ok::<_, BoxError>(frame)
                });
                BodyExt::boxed(http_body_util::StreamBody::new(frames))
            };
            let response = response.body(body)?;
            if let Some(Answered(answered)) = head.extensions.get() {
                answered.notify_one();
            }
            Ok(response)
        }
    }))
}

type App = BoxCloneService<Request<Full<Bytes>>, Response<UnsyncBoxBody<Bytes, BoxError>>, BoxError>;

fn app<St: IdempotencyStore>(layer: IdempotencyLayer<St>, log: Arc<Log>) -> App {
    let svc = ServiceBuilder::new().layer(CatchPanicLayer::new()).layer(layer).service(handler(log));
    BoxCloneService::new(svc.map_response(|r| r.map(|b| b.map_err(Into::<BoxError>::into).boxed_unsync())))
}

fn request(r: Req, outcome: Outcome, delay: Delay) -> Request<Full<Bytes>> {
    let key = if r.quoted { format!("\"{}\"", KEYS[r.key]) } else { KEYS[r.key].to_owned() };
    let mut builder = Request::post("/orders")
        .header("idempotency-key", key)
        .header("x-delay-ms", delay.duration().as_millis().to_string())
        .header("x-outcome", format!("{outcome:?}"));
    if let Some(auth) = SCOPES[r.scope] {
        builder = builder.header("authorization", auth);
    }
    builder.body(Full::new(Bytes::from_static(PAYLOADS[r.payload].as_bytes()))).unwrap()
}

/// What a request really got.
#[derive(Debug)]
enum Got {
    /// The whole response, and what the same request sent again the moment it was complete got
    /// (only after a `2xx` the handler made).
    Response {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
        retry: Option<Box<Got>>,
    },
    /// The head of a response whose client then left.
    Head {
        status: StatusCode,
        headers: HeaderMap,
    },
    Error,
    Dropped,
}

fn replayed(headers: &HeaderMap) -> bool {
    headers.get("idempotent-replayed") == Some(&HeaderValue::from_static("true"))
}

async fn run_request(app: App, r: Req, outcome: Outcome, delay: Delay, client: Client, read: Read) -> Got {
    match client {
        Client::Waits => exchange(app, r, outcome, delay, read).await,
        Client::Abandons => {
            tokio::time::timeout(ABANDON_AFTER, exchange(app, r, outcome, delay, read)).await.unwrap_or(Got::Dropped)
        }
        Client::Leaves => {
            let answered = Arc::new(Notify::new());
            let mut request = request(r, outcome, delay);
            request.extensions_mut().insert(Answered(answered.clone()));
            tokio::select! {
                biased;
                response = app.oneshot(request) => match response {
                    Ok(response) => Got::Head { status: response.status(), headers: response.headers().clone() },
                    Err(_) => Got::Error,
                },
                () = answered.notified() => Got::Dropped,
            }
        }
    }
}

/// Sends the request and reads the response as the server would; if it was a `2xx` the handler
/// made, sends the request again at once, before anything else runs.
async fn exchange(app: App, r: Req, outcome: Outcome, delay: Delay, read: Read) -> Got {
    let mut got = send_and_read(app.clone(), request(r, outcome, delay), read).await;
    if let Got::Response { status, headers, retry, .. } = &mut got {
        if status.is_success() && !replayed(headers) {
            *retry = Some(Box::new(send_and_read(app, request(r, outcome, delay), read).await));
        }
    }
    got
}

async fn send_and_read(app: App, request: Request<Full<Bytes>>, read: Read) -> Got {
    let Ok(response) = app.oneshot(request).await else { return Got::Error };
    let (head, mut body) = response.into_parts();
    let (body, trailers) = match read {
        Read::ToEnd => {
            let collected = body.collect().await.expect("the body reads to its end");
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers)
        }
        Read::LikeHyper => {
            let length: Option<usize> =
                head.headers.get("content-length").map(|v| v.to_str().unwrap().parse().unwrap());
            let (mut data, mut trailers) = (BytesMut::new(), None);
            while !body.is_end_stream() && length != Some(data.len()) {
                let Some(frame) = body.frame().await else { break };
                match frame.expect("the body reads to its end").into_data() {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        break;
                    }
                }
            }
            (data.freeze(), trailers)
        }
    };
    Got::Response { status: head.status, headers: head.headers, body, trailers, retry: None }
}

/// The secret of the layers under test (the Redis ones need one; the memory one too, so that
/// the probe computes the same digests).
fn secret() -> tower_idempotency::Secret {
    tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap()
}

/// The store key and fingerprint the layer computes for `r`.
async fn store_key(r: Req) -> (StoreKey, Fingerprint) {
    common::probe::store_key_of(Some(secret()), "/orders", SCOPES[r.scope], KEYS[r.key], PAYLOADS[r.payload].as_bytes())
        .await
}

fn begin_name(begin: &Begin) -> &'static str {
    match begin {
        Begin::Execute(_) => "execute",
        Begin::Completed(_) => "completed",
        Begin::Locked => "in-flight",
        Begin::Mismatch => "mismatch",
        other => unreachable!("a begin this model does not know: {other:?}"),
    }
}

/// Checks one reply against the model's expectation.
fn check(step: usize, expect: &Expect, got: &Got) -> Result<(), String> {
    let fail = |why: &str| Err(format!("step {step}: {why}\n  expected {expect:?}\n  got {got:?}"));
    let same = |content: &Content, body: &Bytes, trailers: &Option<HeaderMap>| {
        let trailer = trailers.as_ref().and_then(|t| t.get(TRAILER)).map(|v| v.to_str().unwrap());
        body == content.body.as_bytes() && trailer == content.trailer.as_deref()
    };
    let problem = |headers: &HeaderMap| headers.get("content-type").is_some_and(|v| v == "application/problem+json");
    match (expect, got) {
        (Expect::Dropped, Got::Dropped) | (Expect::Failed, Got::Error) => Ok(()),
        (
            Expect::Executed { status, content, retry },
            Got::Response { status: s, headers, body, trailers, retry: r },
        ) => {
            if s != status || !same(content, body, trailers) || replayed(headers) || !headers.contains_key("set-cookie")
            {
                return fail("not the handler's own response");
            }
            match (retry, r) {
                (None, None) => Ok(()),
                (Some(expect_retry), Some(got_retry)) => check(step, expect_retry, got_retry)
                    .map_err(|why| format!("{why}\n  in the retry sent once the client had all of {got:?}")),
                _ => fail("a retry where none was due, or none where one was"),
            }
        }
        (Expect::Panicked, Got::Response { status, headers, body, .. }) => {
            if *status != StatusCode::INTERNAL_SERVER_ERROR || replayed(headers) || body.starts_with(b"exec") {
                return fail("not CatchPanicLayer's 500");
            }
            Ok(())
        }
        (Expect::Replayed(content), Got::Response { status, headers, body, trailers, retry }) => {
            if *status != StatusCode::CREATED || !same(content, body, trailers) || !replayed(headers) || retry.is_some()
            {
                return fail("not a faithful replay");
            }
            if headers.contains_key("set-cookie") {
                return fail("a replay carries the first caller's cookie");
            }
            Ok(())
        }
        (Expect::Problem { status, slug }, Got::Response { status: s, headers, body, .. }) => {
            let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let type_ok = json["type"].as_str().is_some_and(|t| t.ends_with(&format!("#{slug}")));
            let retry_after = headers.contains_key("retry-after") == (*slug == "in-flight");
            if s.as_u16() != *status || !problem(headers) || !type_ok || !retry_after || replayed(headers) {
                return fail("not the expected problem");
            }
            Ok(())
        }
        // A client that left with the head: the head must be the expected one.
        (expect, Got::Head { status, headers }) => {
            let ok = match expect {
                Expect::Executed { status: s, .. } => {
                    s == status && !replayed(headers) && headers.contains_key("set-cookie")
                }
                Expect::Panicked => *status == StatusCode::INTERNAL_SERVER_ERROR && !replayed(headers),
                Expect::Replayed(_) => *status == StatusCode::CREATED && replayed(headers),
                Expect::Problem { status: s, .. } => status.as_u16() == *s && problem(headers),
                Expect::Failed | Expect::Dropped => false,
            };
            if ok { Ok(()) } else { fail("not the expected head") }
        }
        _ => fail("wrong kind of answer"),
    }
}

/// Runs `program` on paused time against `MemoryStore` (slowed down by [`Outage`] for
/// [`Writes::Slow`]) and the model.
async fn run_program(program: &Program) -> Result<(), String> {
    let memory = MemoryStore::new();
    match program.setup.writes {
        Writes::Instant | Writes::RoundTrip => run_on(memory.clone(), &memory, program).await,
        Writes::Slow => {
            let slow = Outage::new(memory.clone());
            slow.slow_completes(WRITE);
            run_on(slow, &memory, program).await
        }
    }
}

/// Runs `program` through a layer over `store`, which keeps its entries in `memory`.
async fn run_on<St: IdempotencyStore>(store: St, memory: &MemoryStore, program: &Program) -> Result<(), String> {
    let log = Arc::new(Log::default());
    let app = app(program.setup.layer(store, LEASE, TTL), log.clone());
    let mut model = Model::new(TTL, LEASE, program.setup);
    let mut pending = Vec::new();
    for (step, op) in program.ops.iter().enumerate() {
        let now = Instant::now();
        match *op {
            Op::Send { req, outcome, delay, client, read } => {
                let expect = model.send(req, outcome, delay, client, now);
                let task = tokio::spawn(run_request(app.clone(), req, outcome, delay, client, read));
                pending.push((step, expect, task));
            }
            Op::Crash { req } => {
                let (key, fingerprint) = store_key(req).await;
                let begin = memory.begin(&key, &fingerprint, LEASE).await.map_err(|e| format!("step {step}: {e}"))?;
                let expected = model.crash(req, now);
                if begin_name(&begin) != expected {
                    return Err(format!("step {step}: crash begin: expected {expected}, got {begin:?}"));
                }
            }
            Op::Advance { secs } => tokio::time::sleep(Duration::from_secs(secs)).await,
        }
        settle().await;
        model.advance_to(Instant::now());
    }
    // Past every handler, lease and TTL: every request has its answer and nothing is left.
    tokio::time::sleep(TTL + Delay::Hang.duration() + LEASE + Duration::from_secs(2)).await;
    model.advance_to(Instant::now());
    for (step, expect, task) in pending {
        let got = task.await.map_err(|e| format!("step {step}: the request task failed: {e}"))?;
        check(step, &expect, &got)?;
    }
    let runs = log.runs.lock().unwrap().clone();
    let expected_runs: HashMap<_, _> = model.runs.iter().filter(|(_, n)| **n > 0).map(|(k, v)| (*k, *v)).collect();
    if runs != expected_runs {
        return Err(format!("handler executions per (scope, key): expected {expected_runs:?}, got {runs:?}"));
    }
    if !memory.is_empty() || memory.bytes() != 0 {
        return Err(format!("after every lease and TTL the store still holds {} entries", memory.len()));
    }
    Ok(())
}

/// Lets every spawned task run until it blocks on a timer, without moving the clock.
async fn settle() {
    for _ in 0..32 {
        tokio::task::yield_now().await;
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

/// Keeps the handler's deliberate panics out of the test output.
fn quiet_deliberate_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let deliberate = info.payload().downcast_ref::<String>().is_some_and(|s| s.contains(PANIC_MARK));
            if !deliberate {
                default(info);
            }
        }));
    });
}

/// `default` cases, or `PROPTEST_CASES`; failures are kept in `tests/model/proptest-regressions/`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(default);
    let persistence =
        proptest::test_runner::FileFailurePersistence::Direct("tests/model/proptest-regressions/layer_model.txt");
    ProptestConfig {
        cases,
        max_shrink_iters: 4096,
        failure_persistence: Some(Box::new(persistence)),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn memory_store_behaves_like_the_model(program in program()) {
        quiet_deliberate_panics();
        let result = paused_runtime().block_on(run_program(&program));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Named regressions: programs the property shrank to while the test was built (against model
// mistakes and deliberately broken builds of the crate), kept so each stays checked by name.

fn run_named(ops: Vec<Op>) {
    run_named_with(Setup::default(), ops);
}

fn run_named_with(setup: Setup, ops: Vec<Op>) {
    quiet_deliberate_panics();
    if let Err(failure) = paused_runtime().block_on(run_program(&Program { setup, ops })) {
        panic!("{failure}");
    }
}

fn send(scope: usize, key: usize, payload: usize, outcome: Outcome, delay: Delay, client: Client) -> Op {
    send_read(scope, key, payload, outcome, delay, client, Read::ToEnd)
}

fn send_read(
    scope: usize,
    key: usize,
    payload: usize,
    outcome: Outcome,
    delay: Delay,
    client: Client,
    read: Read,
) -> Op {
    Op::Send { req: Req { scope, key, payload, quoted: false }, outcome, delay, client, read }
}

/// A `4xx` frees the key at once: the next request, at the same instant, executes.
#[test]
fn regression_a_rejected_response_frees_the_key_at_once() {
    run_named(vec![
        send(1, 2, 0, Outcome::ClientError, Delay::None, Client::Waits),
        send(1, 2, 0, Outcome::Created, Delay::None, Client::Waits),
        send(1, 2, 0, Outcome::Created, Delay::None, Client::Waits),
    ]);
}

/// A handler that runs past three leases keeps its key through renewal: duplicates get `409`,
/// never a second execution (fails when renewal is slower than the lease).
#[test]
fn regression_renewal_keeps_a_hanging_handlers_lock() {
    run_named(vec![
        send(0, 1, 0, Outcome::Created, Delay::Hang, Client::Waits),
        Op::Advance { secs: 5 },
        send(0, 1, 0, Outcome::Created, Delay::None, Client::Waits),
        Op::Advance { secs: 5 },
        send(0, 1, 1, Outcome::Created, Delay::None, Client::Waits),
        Op::Advance { secs: 1 },
        send(0, 1, 0, Outcome::Created, Delay::None, Client::Waits),
    ]);
}

/// A crashed owner's lock is free exactly one lease after it was taken, not a tick later
/// (fails when expiry is `<` instead of `<=`).
#[test]
fn regression_a_crashed_lock_frees_exactly_one_lease_later() {
    let req = Req { scope: 1, key: 1, payload: 0, quoted: false };
    run_named(vec![
        Op::Crash { req },
        Op::Advance { secs: 2 },
        send(1, 1, 0, Outcome::Created, Delay::None, Client::Waits),
        Op::Advance { secs: 1 },
        send(1, 1, 0, Outcome::Created, Delay::None, Client::Waits),
        Op::Crash { req },
    ]);
}

/// A client that drops a streamed response midway, or a request mid-handler: the handler
/// finishes, is recorded, and the retry replays it; a quoted key is the same key.
#[test]
fn regression_abandoned_requests_are_recorded_and_replayed() {
    run_named(vec![
        send(2, 0, 0, Outcome::Streamed, Delay::None, Client::Abandons),
        send(2, 3, 1, Outcome::Created, Delay::Short, Client::Abandons),
        Op::Advance { secs: 2 },
        Op::Send {
            req: Req { scope: 2, key: 0, payload: 0, quoted: true },
            outcome: Outcome::Panic,
            delay: Delay::None,
            client: Client::Waits,
            read: Read::ToEnd,
        },
        send(2, 3, 1, Outcome::Error, Delay::None, Client::Waits),
    ]);
}

/// A not-retained record answers `409 response-not-retained` until its TTL, then the key is free.
#[test]
fn regression_a_not_retained_record_lives_for_the_ttl() {
    run_named(vec![
        send(0, 2, 0, Outcome::Large, Delay::Short, Client::Waits),
        Op::Advance { secs: 2 },
        send(0, 2, 0, Outcome::Created, Delay::None, Client::Waits),
        send(0, 2, 1, Outcome::Created, Delay::None, Client::Waits),
        Op::Advance { secs: 25 },
        send(0, 2, 1, Outcome::Created, Delay::None, Client::Waits),
    ]);
}

/// A server that reads like hyper stops at `Content-Length` or at the trailers and never
/// polls for the end: each response is still recorded before the client has its last byte,
/// so the retry sent at once replays it, body and trailers, with no detach slot to lean on
/// and with a slow store alike.
#[test]
fn regression_a_response_read_like_hyper_is_recorded_before_its_end() {
    for writes in [Writes::Instant, Writes::Slow] {
        run_named_with(
            Setup { detach: Detach::Zero, writes },
            vec![
                send_read(0, 0, 0, Outcome::Sized, Delay::None, Client::Waits, Read::LikeHyper),
                send_read(0, 1, 0, Outcome::Trailers, Delay::Short, Client::Waits, Read::LikeHyper),
                send_read(0, 2, 0, Outcome::TrailersOnly, Delay::None, Client::Waits, Read::LikeHyper),
                send_read(0, 3, 0, Outcome::Created, Delay::None, Client::Waits, Read::LikeHyper),
                Op::Advance { secs: 2 },
                send_read(0, 1, 0, Outcome::Error, Delay::None, Client::Waits, Read::LikeHyper),
            ],
        );
    }
}

/// With no detach slot and a slow store, a client gone once the handler answered — with the
/// head, before the head (a body complete at once: the head waits for the record), or mid-write — leaves
/// its key recorded: the next request replays, the handler ran once.
#[test]
fn regression_a_client_gone_during_the_write_with_no_slot_leaves_a_record() {
    run_named_with(
        Setup { detach: Detach::Zero, writes: Writes::Slow },
        vec![
            send(1, 0, 0, Outcome::Created, Delay::None, Client::Leaves),
            send(1, 1, 0, Outcome::TrailersOnly, Delay::None, Client::Leaves),
            send(1, 2, 0, Outcome::Created, Delay::None, Client::Abandons),
            send(1, 3, 0, Outcome::Large, Delay::Short, Client::Leaves),
            Op::Advance { secs: 2 },
            send(1, 0, 0, Outcome::Panic, Delay::None, Client::Waits),
            send(1, 1, 0, Outcome::Panic, Delay::None, Client::Waits),
            send(1, 2, 0, Outcome::Panic, Delay::None, Client::Waits),
            send(1, 3, 0, Outcome::Panic, Delay::None, Client::Waits),
        ],
    );
}

/// With no detach slot, a handler still running when its client goes is cancelled and its key
/// freed (the retry runs it again); a body whose end was not seen yet is not read on, and its
/// key keeps a not-retained record (the handler did answer), never a release.
#[test]
fn regression_no_slot_cancels_a_running_handler_and_marks_an_unread_body_not_retained() {
    run_named_with(
        Setup { detach: Detach::Zero, writes: Writes::Instant },
        vec![
            send(2, 0, 0, Outcome::Created, Delay::Short, Client::Abandons),
            send(2, 1, 0, Outcome::Streamed, Delay::None, Client::Abandons),
            send(2, 2, 0, Outcome::Sized, Delay::Short, Client::Leaves),
            send(2, 3, 0, Outcome::Trailers, Delay::None, Client::Leaves),
            Op::Advance { secs: 2 },
            send(2, 0, 0, Outcome::Created, Delay::None, Client::Waits),
            send(2, 1, 0, Outcome::Created, Delay::None, Client::Waits),
            send(2, 2, 0, Outcome::Created, Delay::None, Client::Waits),
            send(2, 3, 0, Outcome::Created, Delay::None, Client::Waits),
        ],
    );
}

/// Found by this model: the guide (step 7) says a sequential retry sent after the client received a
/// whole response over the record limit gets `409` response-not-retained, never `409` in
/// flight. The layer used to start the not-retained record's write when the body passed the limit
/// without holding back the body's end for it, so with a store whose write takes a while (here
/// 0.2 s) the client had the whole response first, and its retry found the key in flight.
#[test]
fn a_not_retained_record_is_written_before_the_client_sees_the_end() {
    quiet_deliberate_panics();
    paused_runtime().block_on(async {
        let slow = Outage::new(MemoryStore::new());
        slow.slow_completes(WRITE);
        let app = app(Setup::default().layer(slow, LEASE, TTL), Arc::new(Log::default()));
        for (key, read) in [(0, Read::ToEnd), (1, Read::LikeHyper)] {
            let req = Req { scope: 0, key, payload: 0, quoted: false };
            let got = exchange(app.clone(), req, Outcome::Large, Delay::None, read).await;
            let expect = Expect::Executed {
                status: StatusCode::CREATED,
                content: response_content(key + 1, (0, key), 0, Outcome::Large),
                retry: Some(Box::new(Expect::Problem { status: 409, slug: "response-not-retained" })),
            };
            if let Err(failure) = check(key, &expect, &got) {
                panic!("{failure}");
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The same property against `RedisStore`.
//
// Redis keeps its own clock, so time is real and the program is sequential: every request is
// awaited, except that a slow request (longer than a lease, so renewal must keep it) can have
// duplicates sent while it runs, and its client can drop it mid-handler or leave when it
// answers. Before each step the runner waits out any record or crashed lock that could expire
// during that step, so the model never has to guess which side of an expiry a request falls
// on. Every record's write is a real round trip, so a client that leaves when the handler
// answered leaves during the write; the runner gives that write a moment before the next step.

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use crate::common::redis::{redis_url, run_prefix};
    use tower_idempotency::store::RedisStore;

    const LEASE: Duration = Duration::from_millis(1_000);
    const TTL: Duration = Duration::from_millis(3_000);
    /// Longest step: a slow request ([`Delay::Short`], 1.5 s) and its duplicates.
    const STEP: Duration = Duration::from_millis(2_000);
    /// Slack on either side of an expiry for the round trips and Redis's own clock.
    const SLACK: Duration = Duration::from_millis(300);
    /// How long a write started for a client that left is given before the next step.
    const LANDED: Duration = Duration::from_millis(100);

    #[derive(Debug, Clone)]
    enum RedisOp {
        /// A request whose handler answers at once, awaited.
        Send {
            req: Req,
            outcome: Outcome,
            client: Client,
            read: Read,
        },
        /// A slow request, duplicates of it (same and other payload) while it runs, then its end.
        Slow {
            req: Req,
            outcome: Outcome,
            client: Client,
            read: Read,
        },
        Crash {
            req: Req,
        },
        /// Waits past a crashed lock's lease, or past the TTL.
        Wait {
            past_ttl: bool,
        },
    }

    /// With no detach slot, a slow request's client only waits or leaves when it answers: one
    /// that gave up mid-handler would have it cancelled 0.1 s in, and the duplicates' timing
    /// would then matter.
    fn redis_op(setup: Setup) -> impl Strategy<Value = RedisOp> {
        let quick = prop_oneof![
            4 => Just(Outcome::Created),
            1 => Just(Outcome::Sized),
            1 => Just(Outcome::Trailers),
            1 => Just(Outcome::TrailersOnly),
            1 => Just(Outcome::Large),
            1 => Just(Outcome::ClientError),
            1 => Just(Outcome::ServerError),
            1 => Just(Outcome::Panic),
            1 => Just(Outcome::Error),
        ];
        let slow = prop_oneof![
            3 => Just(Outcome::Created),
            1 => Just(Outcome::Sized),
            1 => Just(Outcome::Panic),
            1 => Just(Outcome::ServerError),
        ];
        let stays = || prop_oneof![3 => Just(Client::Waits), 1 => Just(Client::Leaves)].boxed();
        let slow_client = match setup.detach {
            Detach::Default => client().boxed(),
            Detach::Zero => stays(),
        };
        prop_oneof![
            8 => (req(), quick, stays(), read())
                .prop_map(|(req, outcome, client, read)| RedisOp::Send { req, outcome, client, read }),
            2 => (req(), slow, slow_client, read())
                .prop_map(|(req, outcome, client, read)| RedisOp::Slow { req, outcome, client, read }),
            1 => req().prop_map(|req| RedisOp::Crash { req }),
            1 => proptest::bool::weighted(0.3).prop_map(|past_ttl| RedisOp::Wait { past_ttl }),
        ]
    }

    /// A program: the detach bound varies; writes take what Redis takes.
    fn redis_program() -> impl Strategy<Value = (Setup, Vec<RedisOp>)> {
        prop_oneof![Just(Detach::Default), Just(Detach::Zero)]
            .prop_map(|detach| Setup { detach, writes: Writes::RoundTrip })
            .prop_flat_map(|setup| (Just(setup), proptest::collection::vec(redis_op(setup), 1..8)))
    }

    /// Sleeps until no record or crashed lock can expire within the next step.
    async fn out_of_expiry_windows(model: &Model) {
        loop {
            let now = Instant::now();
            let near = model
                .slots
                .values()
                .filter_map(|state| match state {
                    State::Done { expires, .. } => Some(*expires),
                    State::InFlight { until: Some(until), .. } => Some(*until),
                    _ => None,
                })
                .filter(|at| *at + SLACK > now && *at < now + STEP + SLACK)
                .min();
            match near {
                Some(at) => tokio::time::sleep_until(at + SLACK).await,
                None => return,
            }
        }
    }

    async fn run_redis_program(setup: Setup, program: &[RedisOp], url: &str, case: usize) -> Result<(), String> {
        let store = RedisStore::builder()
            .with_prefix(format!("{}model-{case}:", run_prefix()))
            .connect(url)
            .await
            .map_err(|e| e.to_string())?;
        let log = Arc::new(Log::default());
        let app = app(setup.layer(store.clone(), LEASE, TTL), log.clone());
        let mut model = Model::new(TTL, LEASE, setup);
        for (step, op) in program.iter().enumerate() {
            out_of_expiry_windows(&model).await;
            let now = Instant::now();
            model.advance_to(now);
            match *op {
                RedisOp::Send { req, outcome, client, read } => {
                    let expect = model.send(req, outcome, Delay::None, client, now);
                    let got = run_request(app.clone(), req, outcome, Delay::None, client, read).await;
                    if !matches!(got, Got::Response { .. }) {
                        tokio::time::sleep(LANDED).await;
                    }
                    check(step, &expect, &got)?;
                }
                RedisOp::Slow { req, outcome, client, read } => {
                    let expect = model.send(req, outcome, Delay::Short, client, now);
                    let (started, finished) = (log.execs.load(Ordering::SeqCst), log.finished.load(Ordering::SeqCst));
                    let first = tokio::spawn(run_request(app.clone(), req, outcome, Delay::Short, client, read));
                    if !matches!(expect, Expect::Replayed { .. } | Expect::Problem { .. }) {
                        while log.execs.load(Ordering::SeqCst) == started {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    for payload in [req.payload, 1 - req.payload] {
                        let dup = Req { payload, ..req };
                        let expect = model.send(dup, Outcome::Created, Delay::None, Client::Waits, now);
                        let got =
                            run_request(app.clone(), dup, Outcome::Created, Delay::None, Client::Waits, read).await;
                        check(step, &expect, &got)?;
                    }
                    let got = first.await.map_err(|e| format!("step {step}: {e}"))?;
                    if matches!(got, Got::Dropped) && client == Client::Abandons && setup.detach == Detach::Default {
                        // The handler goes on without its client: wait for it and its record.
                        while log.finished.load(Ordering::SeqCst) == finished {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    if !matches!(got, Got::Response { .. }) {
                        tokio::time::sleep(LANDED).await;
                    }
                    check(step, &expect, &got)?;
                    model.advance_to(now + Delay::Short.duration() + CHUNK_GAP);
                }
                RedisOp::Crash { req } => {
                    let (key, fingerprint) = store_key(req).await;
                    let begin =
                        store.begin(&key, &fingerprint, LEASE).await.map_err(|e| format!("step {step}: {e}"))?;
                    let expected = model.crash(req, now);
                    if begin_name(&begin) != expected {
                        return Err(format!("step {step}: crash begin: expected {expected}, got {begin:?}"));
                    }
                }
                RedisOp::Wait { past_ttl } => {
                    tokio::time::sleep(if past_ttl { TTL } else { LEASE } + SLACK).await;
                }
            }
        }
        let runs = log.runs.lock().unwrap().clone();
        let expected_runs: HashMap<_, _> = model.runs.iter().map(|(k, v)| (*k, *v)).collect();
        if runs != expected_runs {
            return Err(format!("handler executions per (scope, key): expected {expected_runs:?}, got {runs:?}"));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config(4))]

        #[test]
        fn redis_store_behaves_like_the_model((setup, program) in redis_program()) {
            quiet_deliberate_panics();
            static CASE: AtomicUsize = AtomicUsize::new(0);
            let case = CASE.fetch_add(1, Ordering::SeqCst);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let result = runtime.block_on(async {
                match redis_url().await {
                    Some(url) => run_redis_program(setup, &program, &url, case).await,
                    None => Ok(()), // skipped, and said so once by `redis_url`
                }
            });
            prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        }
    }
}
