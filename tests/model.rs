//! Model-based test: random programs against the real layer, checked against a reference model.
//!
//! A program is a list of operations on a handful of keys in three scopes (two `Authorization`
//! values and the anonymous namespace): requests whose handler succeeds, answers `4xx` / `5xx`,
//! panics, errors, takes a while or hangs past several leases; clients that wait or drop the
//! request mid-handler; duplicates started while the first is still running; a crashed process
//! that took a lock and vanished; and clock advances past leases and TTLs.
//!
//! Every program runs against the real stack — `CatchPanicLayer` outside `IdempotencyLayer` over
//! `MemoryStore`, on paused tokio time — and against [`Model`], a few lines per SPEC rule: a map
//! from (scope, key) to `Free | InFlight | Done`. Every observable outcome must agree: status,
//! `Idempotent-Replayed`, body, problem type, and how often the handler ran for each
//! (scope, key). At the end, past every lease and TTL, the store must be empty: no lock is ever
//! left behind.
//!
//! Determinism by design: every request is spawned at a whole second of paused time and runs
//! until it blocks before the program goes on; handler delays end at half seconds and clients
//! give up at a quarter past, so no two events the model orders can happen at the same instant.
//!
//! `PROPTEST_CASES=N cargo test --test model` runs more cases (default: 256 for `MemoryStore`).
//! With the `redis` feature the same model checks `RedisStore` in real time (see the `redis`
//! module at the end).

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::{BoxError, ServiceBuilder, ServiceExt, util::BoxCloneService};
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyKey, IdempotencyLayer, IdempotencyStore, MemoryStore, RequestBody, ScopeId, StoreKey,
};

/// The layer's lease: renewed every second while a handler runs.
const LEASE: Duration = Duration::from_secs(3);
/// The layer's record TTL.
const TTL: Duration = Duration::from_secs(20);
/// The layer's record limit; [`Outcome::Large`] bodies are over it.
const MAX_RECORD: usize = 256;
/// When an abandoning client drops its request (or the response body), after it was sent.
const ABANDON_AFTER: Duration = Duration::from_millis(100);
/// The pause between the two chunks of a streamed body.
const CHUNK_GAP: Duration = Duration::from_millis(250);
/// Marks the panics the test handler raises on purpose (the panic hook keeps them quiet).
const PANIC_MARK: &str = "model-handler-panic";

const SCOPES: [Option<&str>; 3] = [Some("Bearer tenant-0"), Some("Bearer tenant-1"), None];
const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
const PAYLOADS: [&str; 2] = [r#"{"sku":"A"}"#, r#"{"sku":"B"}"#];

// ---------------------------------------------------------------------------------------------
// Programs

/// What the handler does once it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Created,
    /// `201` streamed in two chunks, the second [`CHUNK_GAP`] after the first.
    Streamed,
    /// `201` with a body over the record limit: only a tombstone is kept.
    Large,
    ClientError,
    ServerError,
    Panic,
    Error,
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
    /// Reads the whole response.
    Waits,
    /// Drops the request future [`ABANDON_AFTER`] after sending it.
    Abandons,
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
    Send { req: Req, outcome: Outcome, delay: Delay, client: Client },
    /// A process took the lock for this request through the store and crashed: nobody renews
    /// or releases it.
    Crash { req: Req },
    /// Moves the clock on by whole seconds; everything due meanwhile happens.
    Advance { secs: u64 },
}

fn req() -> impl Strategy<Value = Req> {
    (0..SCOPES.len(), 0..KEYS.len(), 0..PAYLOADS.len(), proptest::bool::weighted(0.2))
        .prop_map(|(scope, key, payload, quoted)| Req { scope, key, payload, quoted })
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        5 => Just(Outcome::Created),
        1 => Just(Outcome::Streamed),
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
    prop_oneof![4 => Just(Client::Waits), 1 => Just(Client::Abandons)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (req(), outcome(), delay(), client())
            .prop_map(|(req, outcome, delay, client)| Op::Send { req, outcome, delay, client }),
        1 => req().prop_map(|req| Op::Crash { req }),
        4 => prop_oneof![Just(1u64), Just(2), Just(3), Just(5), Just(12), Just(25)]
            .prop_map(|secs| Op::Advance { secs }),
    ]
}

fn program() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..40)
}

// ---------------------------------------------------------------------------------------------
// The reference model, written from SPEC section 2.5-2.8.

/// (scope, key) in the model.
type Slot = (usize, usize);

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
    /// Completed: the recorded body (`None`: a tombstone, the body was over the record limit),
    /// free from `expires` on.
    Done {
        payload: usize,
        body: Option<String>,
        expires: Instant,
    },
}

/// What a request is expected to get.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// The handler ran and its own response came back.
    Executed { status: StatusCode, body: String },
    /// The handler ran and panicked: `CatchPanicLayer`'s `500`.
    Panicked,
    /// The handler ran and returned a service error.
    Failed,
    /// A replay of the completed record.
    Replayed { body: String },
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
    slots: HashMap<Slot, State>,
    /// Handler executions so far, all keys.
    execs: usize,
    /// Handler executions per (scope, key).
    runs: HashMap<Slot, usize>,
    /// Handlers running: (ends at, slot, exec, outcome), in the order they end.
    running: Vec<(Instant, Slot, usize, Outcome)>,
}

impl Model {
    fn new(ttl: Duration, lease: Duration) -> Self {
        Self { ttl, lease, slots: HashMap::new(), execs: 0, runs: HashMap::new(), running: Vec::new() }
    }

    /// The state of `slot` at `now`: an expired record or abandoned lock is free.
    fn state(&self, slot: Slot, now: Instant) -> State {
        match self.slots.get(&slot).cloned().unwrap_or(State::Free) {
            State::InFlight { until: Some(until), .. } if until <= now => State::Free,
            State::Done { expires, .. } if expires <= now => State::Free,
            state => state,
        }
    }

    /// SPEC 2.5: replay, 422, 409, or lock and execute.
    fn send(&mut self, r: Req, outcome: Outcome, delay: Delay, client: Client, now: Instant) -> Expect {
        let slot = (r.scope, r.key);
        match self.state(slot, now) {
            State::Done { payload, body: Some(body), .. } if payload == r.payload => Expect::Replayed { body },
            State::Done { payload, body: None, .. } if payload == r.payload => {
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
                let ends =
                    now + delay.duration() + if outcome == Outcome::Streamed { CHUNK_GAP } else { Duration::ZERO };
                self.running.push((ends, slot, exec, outcome));
                self.running.sort_by_key(|(at, ..)| *at);
                // SPEC 2.6: the handler runs to the end even when the client goes away; only
                // the client's view changes.
                if client == Client::Abandons && ends > now + ABANDON_AFTER {
                    return Expect::Dropped;
                }
                let body = response_body(exec, slot, r.payload, outcome);
                match outcome {
                    Outcome::Created | Outcome::Streamed | Outcome::Large => {
                        Expect::Executed { status: StatusCode::CREATED, body }
                    }
                    Outcome::ClientError => Expect::Executed { status: StatusCode::NOT_FOUND, body },
                    Outcome::ServerError => Expect::Executed { status: StatusCode::BAD_GATEWAY, body },
                    Outcome::Panic => Expect::Panicked,
                    Outcome::Error => Expect::Failed,
                }
            }
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

    /// SPEC 2.7: handlers that end by `now` record a `2xx` (TTL from completion; a tombstone
    /// past the record limit) or free the key.
    fn advance_to(&mut self, now: Instant) {
        while self.running.first().is_some_and(|(at, ..)| *at <= now) {
            let (at, slot, exec, outcome) = self.running.remove(0);
            let held = self.slots.get(&slot).cloned();
            let Some(State::InFlight { payload, exec: Some(owner), .. }) = held else {
                panic!("model: slot {slot:?} not held by exec {exec} when it ended: {held:?}");
            };
            assert_eq!(owner, exec, "model: a live lock was taken over");
            let body = response_body(exec, slot, payload, outcome);
            let next = match outcome {
                Outcome::Created | Outcome::Streamed => {
                    State::Done { payload, body: Some(body), expires: at + self.ttl }
                }
                Outcome::Large => State::Done { payload, body: None, expires: at + self.ttl },
                _ => State::Free,
            };
            self.slots.insert(slot, next);
        }
    }
}

/// The handler's body: which execution, for which (scope, key), of which payload.
fn response_body(exec: usize, (scope, key): Slot, payload: usize, outcome: Outcome) -> String {
    let text = format!("exec {exec} {}/{}: {}", SCOPES[scope].unwrap_or("-"), KEYS[key], PAYLOADS[payload]);
    match outcome {
        Outcome::Streamed => format!("{text};end"),
        Outcome::Large => format!("{text}{}", ".".repeat(MAX_RECORD)),
        _ => text,
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
            let text = response_body(exec, slot, payload, outcome);
            let body: Body = if outcome == Outcome::Streamed {
                let (first, second) = text.split_at(text.len() - "end".len());
                let (first, second) = (Bytes::from(first.to_owned()), Bytes::from(second.to_owned()));
                let frames = futures_util::stream::iter([(first, Duration::ZERO), (second, CHUNK_GAP)]).then(
                    |(chunk, gap)| async move {
                        tokio::time::sleep(gap).await;
                        Ok::<_, BoxError>(http_body::Frame::data(chunk))
                    },
                );
                BodyExt::boxed(http_body_util::StreamBody::new(frames))
            } else {
                Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
            };
            let response = Response::builder()
                .status(status)
                .header("content-type", "text/plain")
                .header("set-cookie", format!("session=exec-{exec}"))
                .body(body)?;
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
    Response { status: StatusCode, headers: http::HeaderMap, body: Bytes },
    Error,
    Dropped,
}

async fn run_request(app: App, request: Request<Full<Bytes>>, client: Client) -> Got {
    let exchange = async move {
        match app.oneshot(request).await {
            Ok(response) => {
                let (head, body) = response.into_parts();
                let body = body.collect().await.expect("the body reads to its end").to_bytes();
                Got::Response { status: head.status, headers: head.headers, body }
            }
            Err(_) => Got::Error,
        }
    };
    match client {
        Client::Waits => exchange.await,
        Client::Abandons => tokio::time::timeout(ABANDON_AFTER, exchange).await.unwrap_or(Got::Dropped),
    }
}

/// The store key and fingerprint the layer computes for `r`.
fn store_key(r: Req) -> (StoreKey, Fingerprint) {
    let (head, ()) = Request::post("/orders").body(()).unwrap().into_parts();
    let fingerprint = Fingerprint::compute(&head, &[], PAYLOADS[r.payload].as_bytes());
    let scope = SCOPES[r.scope].map(ScopeId::digest);
    (StoreKey::new(scope, IdempotencyKey::parse(KEYS[r.key].as_bytes()).unwrap()), fingerprint)
}

fn begin_name(begin: &Begin) -> &'static str {
    match begin {
        Begin::Execute(_) => "execute",
        Begin::Completed(_) => "completed",
        Begin::InFlight => "in-flight",
        Begin::Mismatch => "mismatch",
    }
}

/// Checks one reply against the model's expectation.
fn check(step: usize, expect: &Expect, got: &Got) -> Result<(), String> {
    let fail = |why: &str| Err(format!("step {step}: {why}\n  expected {expect:?}\n  got {got:?}"));
    let replayed =
        |headers: &http::HeaderMap| headers.get("idempotent-replayed") == Some(&HeaderValue::from_static("true"));
    match (expect, got) {
        (Expect::Dropped, Got::Dropped) | (Expect::Failed, Got::Error) => Ok(()),
        (Expect::Executed { status, body, .. }, Got::Response { status: s, headers, body: b }) => {
            if s != status || b != body.as_bytes() || replayed(headers) || !headers.contains_key("set-cookie") {
                return fail("not the handler's own response");
            }
            Ok(())
        }
        (Expect::Panicked, Got::Response { status, headers, body }) => {
            if *status != StatusCode::INTERNAL_SERVER_ERROR || replayed(headers) || body.starts_with(b"exec") {
                return fail("not CatchPanicLayer's 500");
            }
            Ok(())
        }
        (Expect::Replayed { body }, Got::Response { status, headers, body: b }) => {
            if *status != StatusCode::CREATED || b != body.as_bytes() || !replayed(headers) {
                return fail("not a faithful replay");
            }
            if headers.contains_key("set-cookie") {
                return fail("a replay carries the first caller's cookie");
            }
            Ok(())
        }
        (Expect::Problem { status, slug }, Got::Response { status: s, headers, body }) => {
            let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let type_ok = json["type"].as_str().is_some_and(|t| t.ends_with(&format!("#{slug}")));
            let retry_after = headers.contains_key("retry-after") == (*slug == "in-flight");
            if s.as_u16() != *status
                || headers.get("content-type").is_none_or(|v| v != "application/problem+json")
                || !type_ok
                || !retry_after
                || replayed(headers)
            {
                return fail("not the expected problem");
            }
            Ok(())
        }
        _ => fail("wrong kind of answer"),
    }
}

/// Runs `program` on paused time against `MemoryStore` and the model.
async fn run_program(program: &[Op]) -> Result<(), String> {
    let store = MemoryStore::new();
    let log = Arc::new(Log::default());
    let layer = IdempotencyLayer::with_store(store.clone()).with_lease(LEASE).with_ttl(TTL).with_max_record(MAX_RECORD);
    let app = app(layer, log.clone());
    let mut model = Model::new(TTL, LEASE);
    let mut pending = Vec::new();
    for (step, op) in program.iter().enumerate() {
        let now = Instant::now();
        match *op {
            Op::Send { req, outcome, delay, client } => {
                let expect = model.send(req, outcome, delay, client, now);
                let task = tokio::spawn(run_request(app.clone(), request(req, outcome, delay), client));
                pending.push((step, expect, task));
            }
            Op::Crash { req } => {
                let (key, fingerprint) = store_key(req);
                let begin = store.begin(&key, &fingerprint, LEASE).await.map_err(|e| format!("step {step}: {e}"))?;
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
    if !store.is_empty() || store.bytes() != 0 {
        return Err(format!("after every lease and TTL the store still holds {} entries", store.len()));
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

/// `default` cases, or `PROPTEST_CASES`; failures are kept in `tests/proptest-regressions/`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(default);
    let persistence = proptest::test_runner::FileFailurePersistence::Direct("tests/proptest-regressions/model.txt");
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

fn run_named(program: Vec<Op>) {
    quiet_deliberate_panics();
    if let Err(failure) = paused_runtime().block_on(run_program(&program)) {
        panic!("{failure}");
    }
}

fn send(scope: usize, key: usize, payload: usize, outcome: Outcome, delay: Delay, client: Client) -> Op {
    Op::Send { req: Req { scope, key, payload, quoted: false }, outcome, delay, client }
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
        },
        send(2, 3, 1, Outcome::Error, Delay::None, Client::Waits),
    ]);
}

/// A tombstone answers `409 response-not-retained` until its TTL, then the key is free.
#[test]
fn regression_a_tombstone_lives_for_the_ttl() {
    run_named(vec![
        send(0, 2, 0, Outcome::Large, Delay::Short, Client::Waits),
        Op::Advance { secs: 2 },
        send(0, 2, 0, Outcome::Created, Delay::None, Client::Waits),
        send(0, 2, 1, Outcome::Created, Delay::None, Client::Waits),
        Op::Advance { secs: 25 },
        send(0, 2, 1, Outcome::Created, Delay::None, Client::Waits),
    ]);
}

// ---------------------------------------------------------------------------------------------
// The same property against `RedisStore`.
//
// Redis keeps its own clock, so time is real and the program is sequential: every request is
// awaited, except that a slow request (longer than a lease, so renewal must keep it) can have
// duplicates sent while it runs, and its client can drop it mid-handler. Before each step the
// runner waits out any record or crashed lock that could expire during that step, so the model
// never has to guess which side of an expiry a request falls on.

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

    #[derive(Debug, Clone)]
    enum RedisOp {
        /// A request whose handler answers at once, awaited.
        Send {
            req: Req,
            outcome: Outcome,
        },
        /// A slow request, duplicates of it (same and other payload) while it runs, then its end.
        Slow {
            req: Req,
            outcome: Outcome,
            client: Client,
        },
        Crash {
            req: Req,
        },
        /// Waits past a crashed lock's lease, or past the TTL.
        Wait {
            past_ttl: bool,
        },
    }

    fn redis_op() -> impl Strategy<Value = RedisOp> {
        let quick = prop_oneof![
            4 => Just(Outcome::Created),
            1 => Just(Outcome::Large),
            1 => Just(Outcome::ClientError),
            1 => Just(Outcome::ServerError),
            1 => Just(Outcome::Panic),
            1 => Just(Outcome::Error),
        ];
        let slow = prop_oneof![3 => Just(Outcome::Created), 1 => Just(Outcome::Panic), 1 => Just(Outcome::ServerError)];
        prop_oneof![
            8 => (req(), quick).prop_map(|(req, outcome)| RedisOp::Send { req, outcome }),
            2 => (req(), slow, client()).prop_map(|(req, outcome, client)| RedisOp::Slow { req, outcome, client }),
            1 => req().prop_map(|req| RedisOp::Crash { req }),
            1 => proptest::bool::weighted(0.3).prop_map(|past_ttl| RedisOp::Wait { past_ttl }),
        ]
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

    async fn send_now(app: &App, r: Req, outcome: Outcome, delay: Delay, client: Client) -> Got {
        run_request(app.clone(), request(r, outcome, delay), client).await
    }

    async fn run_redis_program(program: &[RedisOp], url: &str, case: usize) -> Result<(), String> {
        let store = RedisStore::builder()
            .with_prefix(format!("{}model-{case}:", run_prefix()))
            .connect(url)
            .await
            .map_err(|e| e.to_string())?;
        let log = Arc::new(Log::default());
        let layer =
            IdempotencyLayer::with_store(store.clone()).with_lease(LEASE).with_ttl(TTL).with_max_record(MAX_RECORD);
        let app = app(layer, log.clone());
        let mut model = Model::new(TTL, LEASE);
        for (step, op) in program.iter().enumerate() {
            out_of_expiry_windows(&model).await;
            let now = Instant::now();
            model.advance_to(now);
            match *op {
                RedisOp::Send { req, outcome } => {
                    let expect = model.send(req, outcome, Delay::None, Client::Waits, now);
                    let got = send_now(&app, req, outcome, Delay::None, Client::Waits).await;
                    check(step, &expect, &got)?;
                }
                RedisOp::Slow { req, outcome, client } => {
                    let expect = model.send(req, outcome, Delay::Short, client, now);
                    let (started, finished) = (log.execs.load(Ordering::SeqCst), log.finished.load(Ordering::SeqCst));
                    let first = tokio::spawn(run_request(app.clone(), request(req, outcome, Delay::Short), client));
                    if !matches!(expect, Expect::Replayed { .. } | Expect::Problem { .. }) {
                        while log.execs.load(Ordering::SeqCst) == started {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    for payload in [req.payload, 1 - req.payload] {
                        let dup = Req { payload, ..req };
                        let expect = model.send(dup, Outcome::Created, Delay::None, Client::Waits, now);
                        check(step, &expect, &send_now(&app, dup, Outcome::Created, Delay::None, Client::Waits).await)?;
                    }
                    let got = first.await.map_err(|e| format!("step {step}: {e}"))?;
                    if matches!(got, Got::Dropped) {
                        // The handler goes on without its client: wait for it and its record.
                        while log.finished.load(Ordering::SeqCst) == finished {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    check(step, &expect, &got)?;
                    model.advance_to(now + Delay::Short.duration());
                }
                RedisOp::Crash { req } => {
                    let (key, fingerprint) = store_key(req);
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
        fn redis_store_behaves_like_the_model(program in proptest::collection::vec(redis_op(), 1..8)) {
            quiet_deliberate_panics();
            static CASE: AtomicUsize = AtomicUsize::new(0);
            let case = CASE.fetch_add(1, Ordering::SeqCst);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let result = runtime.block_on(async {
                match redis_url().await {
                    Some(url) => run_redis_program(&program, &url, case).await,
                    None => Ok(()), // skipped, and said so once by `redis_url`
                }
            });
            prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        }
    }
}
