//! The server half: the layer and the path a request takes through it. Its files are the
//! stages of that path, in the order a request meets them:
//!
//! 1. [`builder`]: [`IdempotencyLayer`], every setting with its default; `config` holds what
//!    the services share.
//! 2. [`service`]: [`Idempotency::call`](tower::Service::call) admits a request: an uncovered
//!    method or a missing optional key passes through untouched, an invalid or missing
//!    required key is answered at once, anything else is guarded. [`future`] is the response
//!    future of all three.
//! 3. [`guarded`], the same for every [`mode`] (the plain layer over any store, or
//!    transactional mode): the body is buffered ([`body`]), the layer's secret checked once,
//!    the request fingerprinted and its scope resolved, and the mode's `begin` decides:
//!    replay ([`replay`]), refuse, wait for or join a duplicate in flight ([`duplicates`]), or
//!    execute.
//! 4. The mode executes. The plain one, [`execute`]: the handler runs under its lock
//!    ([`lock`]: lease renewal, the owned final write), detached if its client leaves.
//!    Transactional mode (`crate::transactional`): the handler runs with the transaction that
//!    holds the key, which commits with the record before the answer.
//! 5. [`recording`] (plain mode): the response body streams to the client while it is
//!    recorded (with the event ends of a `text/event-stream`, [`sse`]); the frame that ends it
//!    waits for the record.
//!
//! Answers the layer makes itself are rendered by the crate's `problem`, `hints` and `grpc`
//! vocabulary; stores are reached through `crate::store` only.

pub(crate) mod answer;
pub(crate) mod body;
pub(crate) mod builder;
pub(crate) mod config;
pub(crate) mod duplicates;
pub(crate) mod execute;
pub(crate) mod future;
pub(crate) mod guarded;
#[cfg(feature = "json")]
pub(crate) mod json;
pub(crate) mod lock;
pub(crate) mod mode;
pub(crate) mod recording;
pub(crate) mod replay;
pub(crate) mod service;
pub(crate) mod sse;

pub use body::{RequestBody, ResponseBody};
pub use builder::IdempotencyLayer;
pub use config::{
    DEFAULT_LEASE, DEFAULT_MAX_DETACHED, DEFAULT_MAX_RECORD, DEFAULT_MAX_REQUEST_BODY, DEFAULT_MAX_WAITERS,
    DEFAULT_TTL, Duplicates, KeyPolicy, StoreFailure,
};
pub use future::ResponseFuture;
pub use service::Idempotency;
