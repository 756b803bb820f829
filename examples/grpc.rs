//! The layer in front of a tonic gRPC service: a unary and a server-streaming call, each
//! replayed to a retry with the same `idempotency-key` metadata, and the layer's own answers
//! as gRPC statuses.
//!
//! Run with: `cargo run -p tests-integration --example grpc` (a target of the `tests-integration`
//! workspace member, so that tonic is built only for it)
//!
//! It serves `orders.v1.Orders` on a free loopback port (HTTP/2), behind
//! `IdempotencyLayer::new()` with no configuration (its default cache predicate records a gRPC
//! call only when its `grpc-status` is `0`), and calls it with a tonic client:
//!
//! 1. `Create` twice with one key: the second answer is the replay (the handler ran once).
//! 2. `Watch` (a server stream) twice with one key: every message replayed.
//! 3. `Create` failing with `FAILED_PRECONDITION`, twice with one key: a failed call is not
//!    recorded, so the retry runs again.
//! 4. The first key with a different order: `ALREADY_EXISTS` from the layer.
//!
//! The service's protobuf messages and its server and client glue are written by hand below
//! (what `tonic-prost-build` would generate from the `.proto` in the comment), so the example
//! builds without `protoc`. In an application, the generated `OrdersServer` goes where
//! `OrdersServer` is here.
//!
//! ```proto
//! syntax = "proto3";
//! package orders.v1;
//! service Orders {
//!   rpc Create(CreateOrder) returns (Order);
//!   rpc Watch(WatchOrder) returns (stream Event);
//! }
//! message CreateOrder { string sku = 1; uint32 quantity = 2; bool fail = 3; uint64 delay_ms = 4; }
//! message Order { string id = 1; string sku = 2; uint32 quantity = 3; }
//! message WatchOrder { string id = 1; uint32 events = 2; uint32 fail_after = 3; }
//! message Event { uint32 seq = 1; string status = 2; }
//! ```

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use http::uri::PathAndQuery;
use tonic::{
    Request, Response, Status, Streaming,
    body::Body,
    server::NamedService,
    transport::{Channel, Server, server::TcpIncoming},
};
use tonic_prost::ProstCodec;
use tower::BoxError;
use tower_idempotency::{IdempotencyLayer, store::IdempotencyStore};

/// `orders.v1.CreateOrder`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateOrder {
    /// What to order.
    #[prost(string, tag = "1")]
    pub sku: String,
    /// How many.
    #[prost(uint32, tag = "2")]
    pub quantity: u32,
    /// Fail with `FAILED_PRECONDITION` (out of stock) instead.
    #[prost(bool, tag = "3")]
    pub fail: bool,
    /// Take this long before answering.
    #[prost(uint64, tag = "4")]
    pub delay_ms: u64,
}

/// `orders.v1.Order`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Order {
    /// `ord_N`, counted per server.
    #[prost(string, tag = "1")]
    pub id: String,
    /// As ordered.
    #[prost(string, tag = "2")]
    pub sku: String,
    /// As ordered.
    #[prost(uint32, tag = "3")]
    pub quantity: u32,
}

/// `orders.v1.WatchOrder`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchOrder {
    /// The order to watch.
    #[prost(string, tag = "1")]
    pub id: String,
    /// How many events to stream.
    #[prost(uint32, tag = "2")]
    pub events: u32,
    /// When not 0: end with `INTERNAL` after this many events (in the trailers).
    #[prost(uint32, tag = "3")]
    pub fail_after: u32,
}

/// `orders.v1.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// 0, 1, 2, ...
    #[prost(uint32, tag = "1")]
    pub seq: u32,
    /// What happened, and which run of the handler sent it.
    #[prost(string, tag = "2")]
    pub status: String,
}

/// The service: counts how often each handler ran.
#[derive(Debug, Default)]
pub struct Orders {
    /// Runs of `Create`.
    pub creates: AtomicU64,
    /// Runs of `Watch`.
    pub watches: AtomicU64,
}

/// A stream of `Watch` events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

impl Orders {
    async fn create(&self, request: Request<CreateOrder>) -> Result<Response<Order>, Status> {
        let n = self.creates.fetch_add(1, Ordering::SeqCst) + 1;
        let order = request.into_inner();
        tokio::time::sleep(Duration::from_millis(order.delay_ms)).await;
        if order.fail {
            return Err(Status::failed_precondition("out of stock"));
        }
        Ok(Response::new(Order { id: format!("ord_{n}"), sku: order.sku, quantity: order.quantity }))
    }

    fn watch(&self, request: Request<WatchOrder>) -> Result<Response<EventStream>, Status> {
        let run = self.watches.fetch_add(1, Ordering::SeqCst) + 1;
        let WatchOrder { id, events, fail_after } = request.into_inner();
        let mut items = Vec::new();
        for seq in 0..events {
            if fail_after != 0 && seq == fail_after {
                items.push(Err(Status::internal("lost track of the order")));
                break;
            }
            items.push(Ok(Event { seq, status: format!("{id}: step {seq} (run {run})") }));
        }
        let stream = futures_util::stream::iter(items);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The server glue of `orders.v1.Orders`, as `tonic-prost-build` generates it.
#[derive(Debug, Clone)]
pub struct OrdersServer {
    orders: Arc<Orders>,
}

impl OrdersServer {
    /// Serves `orders`.
    pub fn new(orders: Arc<Orders>) -> Self {
        Self { orders }
    }
}

impl NamedService for OrdersServer {
    const NAME: &'static str = "orders.v1.Orders";
}

impl<B> tower::Service<http::Request<B>> for OrdersServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let orders = self.orders.clone();
        Box::pin(async move {
            let response = match request.uri().path() {
                "/orders.v1.Orders/Create" => {
                    let create = tower::service_fn(move |request| {
                        let orders = orders.clone();
                        async move { orders.create(request).await }
                    });
                    tonic::server::Grpc::new(ProstCodec::default()).unary(create, request).await
                }
                "/orders.v1.Orders/Watch" => {
                    let watch = tower::service_fn(move |request| std::future::ready(orders.watch(request)));
                    tonic::server::Grpc::new(ProstCodec::default()).server_streaming(watch, request).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(response)
        })
    }
}

/// The client glue of `orders.v1.Orders`, as `tonic-prost-build` generates it.
#[derive(Debug, Clone)]
pub struct OrdersClient {
    inner: tonic::client::Grpc<Channel>,
}

impl OrdersClient {
    /// A client over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self { inner: tonic::client::Grpc::new(channel) }
    }

    /// Connects to `http://addr` (HTTP/2 without TLS).
    pub async fn connect(addr: SocketAddr) -> Result<Self, tonic::transport::Error> {
        Ok(Self::new(Channel::from_shared(format!("http://{addr}")).expect("a valid URI").connect().await?))
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.inner.ready().await.map_err(|error| Status::unknown(format!("service was not ready: {error}")))
    }

    /// `Create`.
    pub async fn create(&mut self, request: Request<CreateOrder>) -> Result<Response<Order>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/orders.v1.Orders/Create");
        self.inner.unary(request, path, ProstCodec::default()).await
    }

    /// `Watch`.
    pub async fn watch(&mut self, request: Request<WatchOrder>) -> Result<Response<Streaming<Event>>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/orders.v1.Orders/Watch");
        self.inner.server_streaming(request, path, ProstCodec::default()).await
    }
}

/// A running server: the address it listens on and its service's counters.
#[derive(Debug)]
pub struct Running {
    /// `127.0.0.1:<free port>`.
    pub addr: SocketAddr,
    /// The counters of the service.
    pub orders: Arc<Orders>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `orders.v1.Orders` behind `layer` on a free loopback port.
pub async fn serve<St: IdempotencyStore>(layer: IdempotencyLayer<St>) -> std::io::Result<Running> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let orders = Arc::new(Orders::default());
    let router = Server::builder().layer(layer).add_service(OrdersServer::new(orders.clone()));
    let task = tokio::spawn(async move {
        router.serve_with_incoming(TcpIncoming::from(listener)).await.expect("the gRPC server runs");
    });
    Ok(Running { addr, orders, task })
}

/// `request` with `idempotency-key: key` in its metadata.
pub fn keyed<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("idempotency-key", key.parse().expect("a key is valid metadata"));
    request
}

/// Whether a response is a replay: `idempotent-replayed: true` in its metadata.
pub fn replayed(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata.get("idempotent-replayed").is_some_and(|value| value == "true")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = serve(IdempotencyLayer::new()).await?;
    println!("serving orders.v1.Orders on http://{} (HTTP/2)", server.addr);
    let mut client = OrdersClient::connect(server.addr).await?;
    let book = || CreateOrder { sku: "book".into(), quantity: 1, ..CreateOrder::default() };

    println!("\n1. Create twice with idempotency-key: order-1");
    for attempt in ["first", "retry"] {
        let response = client.create(keyed(book(), "order-1")).await?;
        let replayed = replayed(response.metadata());
        println!("   {attempt}: {:?} (replayed: {replayed})", response.into_inner());
    }

    println!("\n2. Watch twice with idempotency-key: watch-1");
    for attempt in ["first", "retry"] {
        let response =
            client.watch(keyed(WatchOrder { id: "ord_1".into(), events: 3, fail_after: 0 }, "watch-1")).await?;
        let replayed = replayed(response.metadata());
        let mut stream = response.into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await? {
            events.push(event.status);
        }
        println!("   {attempt} (replayed: {replayed}): {events:?}");
    }

    println!("\n3. A failing Create twice with idempotency-key: fail-1");
    for attempt in ["first", "retry"] {
        let status = client.create(keyed(CreateOrder { fail: true, ..book() }, "fail-1")).await.unwrap_err();
        println!("   {attempt}: {:?} {:?}", status.code(), status.message());
    }

    println!("\n4. order-1 again, for another order");
    let status = client.create(keyed(CreateOrder { quantity: 2, ..book() }, "order-1")).await.unwrap_err();
    println!("   {:?}: {}", status.code(), status.message());

    let (creates, watches) =
        (server.orders.creates.load(Ordering::SeqCst), server.orders.watches.load(Ordering::SeqCst));
    println!("\nhandler runs: Create {creates} (1 for order-1, 2 for the failing fail-1), Watch {watches}");
    assert_eq!((creates, watches), (3, 1));
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
    Ok(())
}
