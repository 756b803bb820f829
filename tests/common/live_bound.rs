//! A live log past its store's bound, through the layer in join mode: the store refuses the
//! publish that would pass it (a capacity error), and the layer keeps the response as not
//! retained, as past its record limit. Shared by the test binaries of the stores that bound a
//! log (`tests/layer/join.rs`: `MemoryStore::with_max_live_log`; `tests/dynamodb/store.rs`:
//! `DynamoDbStore::with_live_log_limit`), so that both are held to one check.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use tokio::sync::watch;
use tower::{ServiceExt, util::BoxCloneService};
use tower_idempotency::{Duplicates, IdempotencyLayer, Outcome, RequestBody, ResponseBody, Secret, store::LiveLog};

/// The handler's body.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;
type Svc = BoxCloneService<Request<Full<Bytes>>, Response<ResponseBody<Body>>, Infallible>;

/// How long the handler holds its last event for the joined body to end.
const LAST_EVENT_WAIT: Duration = Duration::from_secs(10);

/// Where the joining client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joiner {
    /// Not joined yet.
    Coming,
    /// Its head came.
    Joined,
    /// Its body ended.
    Ended,
}

/// Event `i` of the stream: `id: i\ndata: i\n\n`.
pub fn event(i: usize) -> String {
    format!("id: {i}\ndata: {i}\n\n")
}

/// Events `0..n`, as the stream's body holds them.
pub fn events(n: usize) -> String {
    (0..n).map(event).collect()
}

/// The handler's answer: a `text/event-stream` of `n` events that sends event 0, the next ones
/// once a client has joined (`joiner` past [`Joiner::Coming`]), and the last once the joined
/// body ended (or after [`LAST_EVENT_WAIT`]): the refusal of a publish reaches the layer a round
/// trip after the bytes it carried went to the first client, and a response already complete by
/// then is kept whole (its joiners read the rest from the record).
pub fn response(n: usize, joiner: &watch::Sender<Joiner>) -> Response<Body> {
    let stream = futures_util::stream::unfold((0, joiner.subscribe()), move |(i, mut joiner)| async move {
        if i == n {
            return None;
        }
        if i == 1 {
            joiner.wait_for(|joiner| *joiner != Joiner::Coming).await.expect("the test holds the sender");
        }
        if i == n - 1 {
            let ended = joiner.wait_for(|joiner| *joiner == Joiner::Ended);
            let _ = tokio::time::timeout(LAST_EVENT_WAIT, ended).await;
        }
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event(i)))), (i + 1, joiner)))
    });
    let body: Body = BodyExt::boxed_unsync(StreamBody::new(stream));
    Response::builder().header("content-type", "text/event-stream").body(body).unwrap()
}

/// A stream of `n` events over `store`, whose live log passes the store's bound on the way
/// (the caller bounds it well under the stream's size): the first client gets every event,
/// a client that joined after the first event (before the bound was reached) gets a prefix of
/// the stream, less than half of it, and then an error, a later duplicate gets `409`
/// `response-not-retained`, and the handler runs once. `each_frame` is called after each frame
/// the first client reads (what the store holds meanwhile, for the caller to watch).
pub async fn a_live_log_past_its_bound_cannot_be_joined<St: LiveLog + Clone>(
    store: St,
    n: usize,
    mut each_frame: impl FnMut(),
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let joiner = Arc::new(watch::channel(Joiner::Coming).0);
    let handler = {
        let (runs, joiner) = (runs.clone(), joiner.clone());
        tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
            runs.fetch_add(1, Ordering::SeqCst);
            let response = response(n, &joiner);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let layer = IdempotencyLayer::from_store(store)
        .with_secret(Secret::new("the live-log bound tests' secret, the same on every replica").unwrap())
        .with_duplicates(Duplicates::join());
    let svc: Svc = BoxCloneService::new(tower::Layer::layer(&layer, handler));
    let request = || {
        Request::post("/complete")
            .header("idempotency-key", "past-the-live-log-bound")
            .body(Full::new(Bytes::from_static(b"{\"prompt\":\"a long answer\"}")))
            .unwrap()
    };
    let call = |svc: &Svc| {
        let svc = svc.clone();
        async move { svc.oneshot(request()).await.unwrap() }
    };

    let first = call(&svc).await;
    assert_eq!((first.status(), Outcome::of(&first)), (StatusCode::OK, Outcome::Executed));
    let mut first = first.into_body();
    // The first body is read all along, beside the joiner: its polls drive the publishes (a
    // store answering over the network, as DynamoDB does, needs more than one poll for the
    // head to reach it, and the joiner waits for that head).
    let reading = async {
        let mut got = Vec::new();
        while let Some(data) = next_data(&mut first).await {
            got.extend_from_slice(&data.expect("the first client's body has no error"));
            each_frame();
        }
        got
    };
    let joining = async {
        let joined = call(&svc).await;
        assert_eq!((joined.status(), Outcome::of(&joined)), (StatusCode::OK, Outcome::Joined));
        joiner.send_replace(Joiner::Joined);
        let read = text_until_error(&mut joined.into_body()).await;
        joiner.send_replace(Joiner::Ended);
        read
    };
    let (got, (text, failed)) = tokio::join!(reading, joining);
    assert!(String::from_utf8(got).unwrap() == events(n), "the first client gets it all");
    assert!(failed, "a joiner of a response past the bound ends with an error");
    assert!(events(n).starts_with(&text) && text.len() < events(n).len() / 2, "joined {} bytes", text.len());
    let late = call(&svc).await;
    assert_eq!(late.status(), StatusCode::CONFLICT);
    let problem = String::from_utf8(late.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(problem.contains("response-not-retained"), "{problem}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler runs once");
}

/// The next data frame of a body (`None` at its end), or its error.
/// The text of `body` up to its end or its first error, and whether it ended with an error.
pub(crate) async fn text_until_error<B: http_body::Body<Data = Bytes> + Unpin>(body: &mut B) -> (String, bool)
where
    B::Error: std::fmt::Display,
{
    let mut text = String::new();
    while let Some(data) = next_data(body).await {
        match data {
            Ok(data) => text.push_str(std::str::from_utf8(&data).unwrap()),
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

pub(crate) async fn next_data<B: http_body::Body<Data = Bytes> + Unpin>(body: &mut B) -> Option<Result<Bytes, String>>
where
    B::Error: std::fmt::Display,
{
    loop {
        match body.frame().await? {
            Ok(frame) => match frame.into_data() {
                Ok(data) => return Some(Ok(data)),
                Err(_) => continue,
            },
            Err(error) => return Some(Err(error.to_string())),
        }
    }
}
