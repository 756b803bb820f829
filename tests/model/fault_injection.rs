//! Store operations that fail or time out at random, clients that are slow or go away, request
//! bodies that stall or break: nothing is run twice that completed, nothing is left stuck.
//!
//! [`FaultyStore`] wraps `MemoryStore` and, while faults are on, makes each operation (seeded
//! RNG) fail before it reaches the store, fail after it took effect (the answer was lost), or
//! hang past a deadline and then fail, taking effect or not. Each seed runs a load of a few
//! hundred requests over a few dozen keys on paused time.
//!
//! - Fail closed: a handler never runs for a key whose record was written; no request gets
//!   `422`; once faults stop and a lease passes, every key is free or completed, and a retry of
//!   each is a replay or a fresh execution, never a `409` or a `503`.
//! - Fail open: every request still gets an answer, never a `503`.
//!
//! `FAULT_SEEDS=N cargo test --test model fault_injection:: -- --nocapture` runs more seeds and prints
//! the faults injected.

use crate::common;

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use tower::{ServiceExt, util::BoxCloneService};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, Outcome, RequestBody, StoreFailure,
    store::{
        Begin, Fingerprint, Followed, IdempotencyStore, LiveCursor, LiveEvent, LockToken, MemoryStore, Record,
        StoreError, StoreKey,
    },
};

const LEASE: Duration = Duration::from_secs(2);
/// How long a hanging store operation takes before it fails.
const STORE_DEADLINE: Duration = Duration::from_millis(1_500);
const REQUESTS: usize = 300;
const KEYS: usize = 30;
/// Requests start within this window.
const WINDOW_MS: u64 = 20_000;

/// A small seeded RNG (SplitMix64), so a seed replays the same faults.
#[derive(Debug)]
struct Rng(Mutex<u64>);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(Mutex::new(seed))
    }

    fn next(&self) -> u64 {
        let mut state = self.0.lock().unwrap();
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Faults injected, by kind.
#[derive(Debug, Default)]
struct Injected {
    before: AtomicUsize,
    after: AtomicUsize,
    hung: AtomicUsize,
    operations: AtomicUsize,
}

/// `MemoryStore` with faults.
#[derive(Debug)]
struct FaultyStore {
    inner: MemoryStore,
    rng: Rng,
    on: AtomicBool,
    injected: Injected,
    /// Keys whose record the store really wrote.
    completed: Mutex<HashSet<StoreKey>>,
}

enum Fault {
    None,
    /// Fails without reaching the store.
    Before,
    /// Reaches the store, then the answer is lost.
    After,
    /// Hangs until the deadline, then fails; reached the store or not.
    Hang {
        reached: bool,
    },
}

impl FaultyStore {
    fn new(seed: u64) -> Self {
        Self {
            inner: MemoryStore::new(),
            rng: Rng::new(seed ^ 0xFA17),
            on: AtomicBool::new(true),
            injected: Injected::default(),
            completed: Mutex::default(),
        }
    }

    /// Draws this operation's fault: one in four operations goes wrong while faults are on.
    fn draw(&self) -> Fault {
        self.injected.operations.fetch_add(1, Ordering::Relaxed);
        if !self.on.load(Ordering::SeqCst) {
            return Fault::None;
        }
        match self.rng.below(12) {
            0 => {
                self.injected.before.fetch_add(1, Ordering::Relaxed);
                Fault::Before
            }
            1 => {
                self.injected.after.fetch_add(1, Ordering::Relaxed);
                Fault::After
            }
            2 => {
                self.injected.hung.fetch_add(1, Ordering::Relaxed);
                Fault::Hang { reached: self.rng.below(2) == 0 }
            }
            _ => Fault::None,
        }
    }

    /// Runs `op` under a drawn fault.
    async fn faulty<T>(&self, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match self.draw() {
            Fault::None => op.await,
            Fault::Before => Err(StoreError::unavailable("injected: connection refused")),
            Fault::After => {
                op.await?;
                Err(StoreError::unavailable("injected: connection reset before the answer"))
            }
            Fault::Hang { reached } => {
                if reached {
                    op.await?;
                }
                tokio::time::sleep(STORE_DEADLINE).await;
                Err(StoreError::timeout())
            }
        }
    }
}

impl IdempotencyStore for FaultyStore {
    async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        self.faulty(self.inner.begin(key, fingerprint, lease)).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.faulty(async {
            let written = self.inner.complete(key, lock, record, ttl).await?;
            if written {
                self.completed.lock().unwrap().insert(key.clone());
            }
            Ok(written)
        })
        .await
    }

    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        self.faulty(self.inner.renew(key, lock, lease)).await
    }

    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        self.faulty(self.inner.release(key, lock)).await
    }

    async fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        self.inner.publish(key, lock, from, events).await
    }

    async fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        self.inner.follow(key, fingerprint, cursor, timeout).await
    }
}

/// Handler executions, and executions of keys whose record had already been written.
#[derive(Debug, Default)]
struct Runs {
    total: AtomicUsize,
    after_completion: AtomicUsize,
}

/// Bodies with a concrete error type (`dyn Error` in a request type trips rust-lang/rust#64552).
type ReqBody = BoxBody<Bytes, std::io::Error>;
type App = BoxCloneService<Request<ReqBody>, Response<tower_idempotency::ResponseBody<ReqBody>>, Infallible>;

fn store_key(key: &str) -> StoreKey {
    StoreKey::new(None, IdempotencyKey::parse(key.as_bytes()).unwrap())
}

/// The handler: `x-delay-ms` before answering; `x-chunks` streams that many chunks 300 ms apart.
fn app(seed: u64, runs: Arc<Runs>, failure: StoreFailure) -> (Arc<FaultyStore>, App) {
    let layer = IdempotencyLayer::from_store(FaultyStore::new(seed))
        .with_lease(LEASE)
        .with_ttl(Duration::from_secs(3600))
        .with_store_failure(failure);
    let store = layer.store().clone();
    let faulty = store.clone();
    let handler = tower::service_fn(move |request: Request<RequestBody<ReqBody>>| {
        let (store, runs) = (faulty.clone(), runs.clone());
        async move {
            let key = request.headers()["idempotency-key"].to_str().unwrap().to_owned();
            runs.total.fetch_add(1, Ordering::SeqCst);
            if store.completed.lock().unwrap().contains(&store_key(&key)) {
                runs.after_completion.fetch_add(1, Ordering::SeqCst);
            }
            let number = |name: &str| {
                request.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
            };
            let (delay, chunks) = (number("x-delay-ms").unwrap_or(0), number("x-chunks").unwrap_or(1));
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let frames = futures_util::stream::unfold(0, move |i| {
                let key = key.clone();
                async move {
                    if i == chunks {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Some((Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(format!("{key}:{i};")))), i + 1))
                }
            });
            let response =
                Response::builder().status(StatusCode::CREATED).body(StreamBody::new(frames).boxed()).unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    (store, BoxCloneService::new(tower::Layer::layer(&layer, handler)))
}

/// What the client does with its request.
#[derive(Debug, Clone, Copy)]
enum Client {
    Reads,
    /// Reads one frame every 500 ms.
    ReadsSlowly,
    /// Drops the request future after this many ms.
    GivesUpAfter(u64),
    /// Reads the head and the first frame, then drops the body.
    DropsBodyMidway,
    /// Sends a body that never ends, and gives up after 1 s.
    StallsItsBody,
    /// Sends a body that breaks midway.
    BreaksItsBody,
}

fn request(key: &str, delay_ms: u64, chunks: u64, client: Client) -> Request<ReqBody> {
    let body: ReqBody = match client {
        Client::StallsItsBody => {
            let first = futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from("{")))]);
            StreamBody::new(futures_util::StreamExt::chain(first, futures_util::stream::pending())).boxed()
        }
        Client::BreaksItsBody => StreamBody::new(futures_util::stream::iter([
            Ok(http_body::Frame::data(Bytes::from("{"))),
            Err::<http_body::Frame<Bytes>, _>(std::io::Error::other("the connection broke")),
        ]))
        .boxed(),
        _ => Full::new(Bytes::from("{}")).map_err(|never| match never {}).boxed(),
    };
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("x-delay-ms", delay_ms)
        .header("x-chunks", chunks)
        .body(body)
        .unwrap()
}

type Answer = Option<(StatusCode, Outcome)>;

/// What a client saw: a status and outcome, or nothing (it went away). Boxed here, on concrete
/// types, because proving `Send` for it at the `spawn` trips rust-lang/rust#64552.
fn exchange(
    app: App,
    request: Request<ReqBody>,
    client: Client,
) -> std::pin::Pin<Box<dyn Future<Output = Answer> + Send>> {
    Box::pin(exchange_inner(app, request, client))
}

async fn exchange_inner(app: App, request: Request<ReqBody>, client: Client) -> Answer {
    let call = async {
        let response = app.oneshot(request).await.unwrap_or_else(|never| match never {});
        let answer = (response.status(), Outcome::of(&response));
        let mut body = response.into_body();
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
            match client {
                Client::ReadsSlowly => tokio::time::sleep(Duration::from_millis(500)).await,
                Client::DropsBodyMidway => return None,
                _ => {}
            }
        }
        Some(answer)
    };
    match client {
        Client::GivesUpAfter(ms) => tokio::time::timeout(Duration::from_millis(ms), call).await.ok().flatten(),
        Client::StallsItsBody => tokio::time::timeout(Duration::from_secs(1), call).await.ok().flatten(),
        _ => call.await,
    }
}

#[derive(Debug, Default)]
struct Report {
    statuses: std::collections::BTreeMap<u16, usize>,
    answered: usize,
    gone: usize,
}

/// Runs the load for `seed` with faults on, then stops them and waits out every lease.
async fn load(seed: u64, failure: StoreFailure) -> (Arc<FaultyStore>, Arc<Runs>, App, Report) {
    let runs = Arc::new(Runs::default());
    let (store, app) = app(seed, runs.clone(), failure);
    let plan = Rng::new(seed);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..REQUESTS {
        let at = start + Duration::from_millis(plan.below(WINDOW_MS / 100) * 100 + 50);
        let key = format!("key-{}", plan.below(KEYS as u64));
        let (delay, chunks) = (plan.below(2_500), 1 + plan.below(3));
        let client = match plan.below(10) {
            0 => Client::ReadsSlowly,
            1 => Client::GivesUpAfter(plan.below(2_000)),
            2 => Client::DropsBodyMidway,
            3 => Client::StallsItsBody,
            4 => Client::BreaksItsBody,
            _ => Client::Reads,
        };
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            (client, exchange(app, request(&key, delay, chunks, client), client).await)
        }));
    }
    let mut report = Report::default();
    for task in tasks {
        // Every request gets an answer (or its client left): nothing hangs.
        let (client, answer) = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a request never got an answer"))
            .expect("no panic");
        match answer {
            Some((status, _)) => {
                *report.statuses.entry(status.as_u16()).or_default() += 1;
                report.answered += 1;
            }
            None => {
                assert!(
                    matches!(client, Client::GivesUpAfter(_) | Client::DropsBodyMidway | Client::StallsItsBody),
                    "seed {seed}: a {client:?} client got no answer"
                );
                report.gone += 1;
            }
        }
    }
    // Faults stop; every detached handler, hung operation and lease runs out.
    store.on.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10) + LEASE * 2).await;
    (store, runs, app, report)
}

fn seeds() -> u64 {
    std::env::var("FAULT_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(20)
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

#[test]
fn fail_closed_never_runs_a_completed_key_again_and_leaves_no_lock() {
    let mut injected = [0; 4];
    for seed in 0..seeds() {
        paused_runtime().block_on(async {
            let (store, runs, app, report) = load(seed, StoreFailure::default()).await;
            assert_eq!(runs.after_completion.load(Ordering::SeqCst), 0, "seed {seed}: a completed key ran again");
            for status in report.statuses.keys() {
                assert!([201, 400, 409, 503].contains(status), "seed {seed}: unexpected {status}: {report:?}");
            }
            assert!(report.statuses.contains_key(&503), "seed {seed}: no fault reached a client: {report:?}");
            // No lock left behind: every key is free or completed.
            let fingerprint = common::probe::fingerprint_of(http::Method::POST, "/orders", b"{}").await;
            for k in 0..KEYS {
                let key = store_key(&format!("key-{k}"));
                match store.inner.begin(&key, &fingerprint, LEASE).await.unwrap() {
                    Begin::Completed(_) => assert!(store.completed.lock().unwrap().contains(&key)),
                    Begin::Execute(token) => assert!(store.inner.release(&key, &token).await.unwrap()),
                    other => panic!("seed {seed}: key-{k} is stuck: {other:?}"),
                }
            }
            // And a retry of each key now is a replay or an execution, never 409 or 503.
            for k in 0..KEYS {
                let key = format!("key-{k}");
                let completed = store.completed.lock().unwrap().contains(&store_key(&key));
                let answer = exchange(app.clone(), request(&key, 0, 1, Client::Reads), Client::Reads).await;
                let (status, outcome) = answer.expect("an answer");
                assert_eq!(status, StatusCode::CREATED, "seed {seed}: {key}: {outcome:?}");
                let expected = if completed { Outcome::Replayed } else { Outcome::Executed };
                assert_eq!(outcome, expected, "seed {seed}: {key}");
            }
            assert_eq!(runs.after_completion.load(Ordering::SeqCst), 0, "seed {seed}: a completed key ran again");
            let i = &store.injected;
            for (n, count) in [&i.before, &i.after, &i.hung, &i.operations].into_iter().enumerate() {
                injected[n] += count.load(Ordering::Relaxed);
            }
            println!("seed {seed}: {report:?}, {} handler runs", runs.total.load(Ordering::SeqCst));
        });
    }
    println!(
        "fail closed, {} seeds: {} store operations, faults injected: {} failed before, {} failed after, {} hung",
        seeds(),
        injected[3],
        injected[0],
        injected[1],
        injected[2]
    );
    assert!(injected[0] > 0 && injected[1] > 0 && injected[2] > 0);
}

#[test]
fn fail_open_answers_every_request() {
    for seed in 0..seeds() {
        paused_runtime().block_on(async {
            let (store, _runs, _app, report) = load(seed, StoreFailure::FailOpen).await;
            for status in report.statuses.keys() {
                assert!([201, 400, 409].contains(status), "seed {seed}: unexpected {status}: {report:?}");
            }
            assert_eq!(report.answered + report.gone, REQUESTS);
            assert!(store.injected.before.load(Ordering::Relaxed) > 0);
            println!("seed {seed} (fail open): {report:?}");
        });
    }
}
