//! The bypass path allocates nothing beyond the inner service's own work: counted with a
//! counting global allocator (`allocation-counter`), layered vs bare, in the same process.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::IdempotencyLayer;

fn handler<B: Send + 'static>()
-> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = impl Send + 'static>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|_req: Request<B>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

/// Allocations made by sending `request` through `service`, after one warm-up call.
fn allocations<S, B>(service: S, request: impl Fn() -> Request<B>) -> u64
where
    S: Service<Request<B>> + Clone,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let run = |req: Request<B>| {
        let svc = service.clone();
        let _ = runtime.block_on(async move { svc.oneshot(req).await.ok() });
    };
    run(request());
    let req = request();
    let svc = service.clone();
    allocation_counter::measure(|| {
        let _ = runtime.block_on(svc.oneshot(req));
    })
    .count_total
}

fn req(method: Method, key: Option<&'static str>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri("/orders");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

#[test]
fn the_bypass_path_allocates_nothing() {
    let layer = IdempotencyLayer::new();
    for (case, method, key) in
        [("no key", Method::POST, None), ("uncovered method", Method::GET, Some("k")), ("PUT", Method::PUT, Some("k"))]
    {
        let bare = allocations(handler(), || req(method.clone(), key));
        let layered = allocations(layer.layer(handler()), || req(method.clone(), key));
        assert_eq!(layered, bare, "{case}: the layer added {} allocations", layered as i64 - bare as i64);
    }
    // And the counter does count: the guarded path allocates.
    let guarded = allocations(layer.layer(handler()), || req(Method::POST, Some("k")));
    assert!(guarded > allocations(handler(), || req(Method::POST, Some("k"))));
}
