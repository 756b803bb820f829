//! The application every in-process benchmark drives: one orders endpoint, bare or behind the
//! layer, and the requests of each path through the layer.
#![allow(dead_code, unreachable_pub)]

#[path = "../../tests/common/probe.rs"]
pub mod probe;

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    http::{Method, Request, StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, ScopeId,
    store::{Begin, IdempotencyStore, MemoryStore, StoreKey},
};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    customer: String,
    currency: String,
    items: Vec<Item>,
    shipping: Shipping,
}

#[derive(Debug, Serialize, Deserialize)]
struct Item {
    sku: String,
    quantity: u32,
    unit_price: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Shipping {
    method: String,
    country: String,
}

#[derive(Debug, Serialize)]
struct Created {
    id: String,
    status: &'static str,
    total: u64,
    order: Order,
}

/// A ~200-byte order.
pub const ORDER: &str = r#"{"customer":"cus_8f14e45fceea167a","currency":"eur","items":[{"sku":"A1-RED-42","quantity":2,"unit_price":1999},{"sku":"B7-BLUE-40","quantity":1,"unit_price":4999}],"shipping":{"method":"standard","country":"FR"}}"#;
/// Every request carries it, as an API's requests do, so the default scope hashes it.
pub const AUTHORIZATION: &str = "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc";
/// A key whose request completed before the measurement: every request with it is a replay.
pub const REPLAYED: &str = "replayed-key-0123456789abcdef012345";
/// A key locked by a request that never ends: every request with it gets `409`.
pub const IN_FLIGHT: &str = "in-flight-key-0123456789abcdef01234";

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Parses the order and answers `201` with the created order (~300 bytes) and its `Location`.
async fn create_order(Json(order): Json<Order>) -> impl IntoResponse {
    let id = format!("ord_{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let total = order.items.iter().map(|i| u64::from(i.quantity) * i.unit_price).sum();
    let location = format!("/orders/{id}");
    (StatusCode::CREATED, [(header::LOCATION, location)], Json(Created { id, status: "created", total, order }))
}

/// The router without the layer. `PUT /orders` runs the same handler, for the uncovered method.
pub fn bare_router() -> Router {
    Router::new().route("/orders", post(create_order).put(create_order))
}

/// The same router behind `IdempotencyLayer::new()`, as the README's quick start adds it.
pub fn layered_router(layer: IdempotencyLayer) -> Router {
    bare_router().layer(layer)
}

/// The same router behind a layer that does nothing: what axum's `Router::layer` costs any
/// middleware (a boxed route clone and a boxed future per request), the floor of the layer's
/// bypass path.
pub fn noop_layer_router() -> Router {
    bare_router().layer(tower::util::MapRequestLayer::new(|request: Request<Body>| request))
}

/// The same router behind an identity layer that wraps both bodies in a type of its own, as
/// every body-mapping middleware does (and as this crate does with `RequestBody` and
/// `ResponseBody`): axum then boxes each wrapped body once more. The reference for "any layer".
pub fn identity_layer_router() -> Router {
    fn same(frame: http_body::Frame<Bytes>) -> http_body::Frame<Bytes> {
        frame
    }
    type Wrapped = http_body_util::combinators::MapFrame<Body, fn(http_body::Frame<Bytes>) -> http_body::Frame<Bytes>>;
    let layer = tower::ServiceBuilder::new()
        .map_request(|request: Request<Body>| request.map(|body| -> Wrapped { body.map_frame(same as fn(_) -> _) }))
        .map_response(|response: axum::response::Response| {
            response.map(|body| -> Wrapped { body.map_frame(same as fn(_) -> _) })
        });
    bare_router().layer(layer)
}

/// The request of one path: `POST` or `PUT /orders` with the order, maybe a key.
pub fn request(method: Method, key: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri("/orders")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, AUTHORIZATION);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(Bytes::from_static(ORDER.as_bytes()))).unwrap()
}

/// A fresh key per call: 36 visible ASCII bytes, the length of a UUID.
pub fn fresh_key() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("bench-{:030}", N.fetch_add(1, Ordering::Relaxed))
}

/// Sends `request` through `router` and reads the response to its end.
pub async fn send(router: &Router, request: Request<Body>) -> (StatusCode, Bytes) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

/// A current-thread runtime, as the measurements use.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// One path of a request through the layer, or the bare router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    BarePost,
    BarePut,
    NoopLayer,
    IdentityLayer,
    Miss,
    Replay,
    NoKey,
    UncoveredMethod,
    InFlight409,
    /// A miss through a layer in join mode (`InFlight::join()`): what the feature costs a
    /// request no one joins.
    MissJoin,
}

impl Path {
    pub const ALL: [Self; 10] = [
        Self::BarePost,
        Self::BarePut,
        Self::NoopLayer,
        Self::IdentityLayer,
        Self::Miss,
        Self::Replay,
        Self::NoKey,
        Self::UncoveredMethod,
        Self::InFlight409,
        Self::MissJoin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::BarePost => "bare_post",
            Self::BarePut => "bare_put",
            Self::NoopLayer => "noop_layer",
            Self::IdentityLayer => "identity_layer",
            Self::Miss => "miss",
            Self::Replay => "replay",
            Self::NoKey => "no_key",
            Self::UncoveredMethod => "uncovered_method",
            Self::InFlight409 => "in_flight_409",
            Self::MissJoin => "miss_join",
        }
    }

    /// The router this path goes through.
    pub fn router(self, routers: &Routers) -> &Router {
        match self {
            Self::BarePost | Self::BarePut => &routers.bare,
            Self::NoopLayer => &routers.noop,
            Self::IdentityLayer => &routers.identity,
            Self::MissJoin => &routers.joining,
            _ => &routers.layered,
        }
    }

    /// A new request for this path (a fresh key for a miss).
    pub fn request(self) -> Request<Body> {
        match self {
            Self::BarePost | Self::NoopLayer | Self::IdentityLayer | Self::NoKey => request(Method::POST, None),
            Self::BarePut => request(Method::PUT, None),
            Self::Miss | Self::MissJoin => request(Method::POST, Some(&fresh_key())),
            Self::Replay => request(Method::POST, Some(REPLAYED)),
            Self::UncoveredMethod => request(Method::PUT, Some(&fresh_key())),
            Self::InFlight409 => request(Method::POST, Some(IN_FLIGHT)),
        }
    }

    /// The status every request of this path gets.
    pub fn status(self) -> StatusCode {
        if self == Self::InFlight409 { StatusCode::CONFLICT } else { StatusCode::CREATED }
    }
}

/// The routers the paths go through.
#[derive(Debug)]
pub struct Routers {
    pub bare: Router,
    pub noop: Router,
    pub identity: Router,
    pub layered: Router,
    /// The layered router in join mode, over the same store.
    pub joining: Router,
}

/// The routers, the layered one over `store`, with the replayed key completed and the
/// in-flight key locked.
pub fn routers(rt: &tokio::runtime::Runtime, store: MemoryStore) -> Routers {
    let layer = IdempotencyLayer::from_store(store);
    let store = layer.store().clone();
    let joining = layered_router(layer.clone().with_duplicates(tower_idempotency::Duplicates::join()));
    let layered = layered_router(layer);
    rt.block_on(async {
        let (status, _) = send(&layered, request(Method::POST, Some(REPLAYED))).await;
        assert_eq!(status, StatusCode::CREATED);
        let fingerprint = probe::fingerprint_of(Method::POST, "/orders", ORDER.as_bytes()).await;
        let key = StoreKey::new(Some(ScopeId::digest(AUTHORIZATION)), IN_FLIGHT.parse().unwrap());
        let begin = store.begin(&key, &fingerprint, Duration::from_secs(24 * 3600)).await.unwrap();
        assert!(matches!(begin, Begin::Execute(_)));
    });
    let routers =
        Routers { bare: bare_router(), noop: noop_layer_router(), identity: identity_layer_router(), layered, joining };
    for path in Path::ALL {
        let (status, _) = rt.block_on(send(path.router(&routers), path.request()));
        assert_eq!(status, path.status(), "{}", path.name());
    }
    routers
}
