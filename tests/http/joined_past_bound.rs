//! A live log past its store's bound, over real hyper servers and clients on loopback (HTTP/1.1
//! and HTTP/2): the joined body ends with an error on the wire (HTTP/1.1 cuts the connection,
//! HTTP/2 resets the stream) while the first client gets every event, and a later duplicate
//! gets `409` `response-not-retained`. The same stream and the same outcome as the in-process
//! check (`tests/common/live_bound.rs`), which reads bodies as `ServiceExt` does.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use http::StatusCode;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower_idempotency::store::MemoryStore;

use crate::{
    live_bound::{Joiner, events, response, text_until_error},
    resume::{Handler, Proto, join_layer, post, serve},
};

/// A log bound well under the stream's bytes (600 events, about 11 KB).
const BOUND: usize = 4 * 1024;
const EVENTS: usize = 600;

#[tokio::test]
async fn a_joined_body_past_the_live_log_bound_ends_with_an_error_on_the_wire() {
    for proto in [Proto::Http1, Proto::Http2] {
        let store = MemoryStore::builder().with_max_live_log(BOUND).build();
        let runs = Arc::new(AtomicUsize::new(0));
        let joiner = Arc::new(watch::channel(Joiner::Coming).0);
        let handler: Handler = {
            let (runs, joiner) = (runs.clone(), joiner.clone());
            Arc::new(move || {
                runs.fetch_add(1, Ordering::SeqCst);
                response(EVENTS, &joiner)
            })
        };
        let addr = serve(join_layer(store), handler).await;
        let key = format!("past-the-bound-{proto:?}");

        let first = post(proto, addr, &key, None).await;
        assert_eq!((first.status, first.replayed), (StatusCode::OK, false), "{proto:?}");
        let reading = first.read();
        let joining = async {
            let mut joined = post(proto, addr, &key, None).await;
            assert_eq!((joined.status, joined.replayed), (StatusCode::OK, true), "{proto:?}: joined");
            joiner.send_replace(Joiner::Joined);
            let read = text_until_error(&mut joined.body).await;
            joiner.send_replace(Joiner::Ended);
            read
        };
        let (got, (text, failed)) = tokio::join!(reading, joining);
        assert!(got == events(EVENTS).as_bytes(), "{proto:?}: the first client gets it all");
        assert!(failed, "{proto:?}: the joined body ends with an error, not a clean end");
        assert!(
            events(EVENTS).starts_with(&text) && text.len() < events(EVENTS).len() / 2,
            "{proto:?}: joined {} bytes",
            text.len()
        );

        let late = post(proto, addr, &key, None).await;
        assert_eq!(late.status, StatusCode::CONFLICT, "{proto:?}");
        let problem = late.body.collect().await.unwrap().to_bytes();
        let problem = std::str::from_utf8(&problem).unwrap();
        assert!(problem.contains("response-not-retained"), "{proto:?}: {problem}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{proto:?}: the handler runs once");
    }
}
