//! The guide: what the layer does with a request, what it promises, and where the promises
//! stop.
//!
//! This page is the crate's contract in one place. Each setting named here is a method of
//! [`IdempotencyLayer`], with its default and an example on its own page.
//!
//! # The request's path
//!
//! 1. **Is it the layer's?** Only a request whose method is covered ([`with_methods`]; default
//!    `POST` and `PATCH`). Any other method passes through untouched, with or without a key.
//! 2. **The key.** The `Idempotency-Key` header ([`with_header_name`]), or, on a route that says
//!    so, a field of a JSON body or a JSON-RPC request's `params` ([`with_key_source`],
//!    feature `json`). A key is sent bare (`abc-123`, as Stripe writes it) or as a quoted
//!    string (`"abc-123"`, as the IETF draft does); unquoted, it is 1 to 255 visible ASCII
//!    characters. No key: the request passes through, or, with
//!    [`KeyPolicy::Required`], gets `400` `missing-key`. An empty key, one too long, one with a
//!    space, control or non-ASCII byte, a malformed quoted string, or the header sent twice:
//!    `400` `invalid-key`, whose detail names the rule broken.
//! 3. **The body is buffered**, up to [`with_max_request_body`] (default 2 MiB; larger: `413`,
//!    stating the limit), to fingerprint it. The handler then gets it, trailers included, as a
//!    [`RequestBody`].
//! 4. **Scope and fingerprint.** The key is stored with its scope: by default a digest of the
//!    `Authorization` header ([`with_scope`]), so two callers' keys never meet. The fingerprint
//!    is a digest of the method, path, query and body (plus [`with_fingerprint_headers`]): what
//!    makes two requests "the same request". Both are HMAC-SHA-256 under the deployment
//!    [`Secret`] ([`with_secret`]), so a store keeps no credential and nothing of a body.
//! 5. **Begin: one atomic operation in the store** decides, for (scope, key):
//!    - a completed record with the same fingerprint: **replay** it;
//!    - a record or a running request with another fingerprint: `422` `key-reused`;
//!    - a running request with the same fingerprint (a duplicate in flight): per
//!      [`with_duplicates`], `409` `in-flight` with `Retry-After` (the default), **wait** for
//!      it and replay its result ([`Duplicates::Wait`]), or **join** its response as it is
//!      produced ([`Duplicates::join`]);
//!    - nothing: take a lock with a lease and **execute**.
//!
//!    A request that replays, waits, joins or is refused never calls the handler and holds
//!    none of its capacity.
//! 6. **Execute.** The handler runs once. Its response streams to the client as it is
//!    produced while it is recorded. A client that leaves does not cancel it: the handler runs
//!    on, detached ([`with_max_detached`] of them at most), and its result is recorded for the
//!    retry. The lock's lease ([`with_lease`], 30 s) is renewed while the handler runs, polled
//!    or not; a crashed process's keys free themselves within one lease.
//! 7. **Record, or release.** A response the cache predicate accepts ([`with_cache_predicate`];
//!    default any `2xx`, and for gRPC `grpc-status: 0`) whose body ends normally is recorded:
//!    status, headers, body and trailers, kept for the TTL ([`with_ttl`], 24 h) from
//!    completion. A body over [`with_max_record`] (1 MiB) is still sent whole, but only a
//!    not-retained record is kept: its retries get `409` `response-not-retained`, final, and
//!    the handler never runs twice. Anything else (another status, an error, a panic, a body
//!    that fails) releases the key: a retry executes again.
//! 8. **Replay.** The same status, headers, body bytes and trailers, plus
//!    `Idempotent-Replayed: true`. Not replayed: hop-by-hop headers, `Content-Length`
//!    (recomputed), `Date`, and `Set-Cookie` ([`with_unstored_headers`]). The handler is not
//!    called.
//! 9. **Join.** A joining duplicate gets the first request's status and headers as soon as
//!    they exist, every body byte produced so far at once, then each further byte live, with
//!    `Idempotent-Replayed: true`. For `text/event-stream`, a duplicate sending
//!    `Last-Event-ID: X` gets only the events after the one whose `id:` is `X`. Across
//!    replicas this follows the store's live log ([`store::LiveLog`]).
//!
//! # The outcomes
//!
//! | what happened | the client gets | [`Outcome`] | retry? |
//! | --- | --- | --- | --- |
//! | not covered, or no key (optional) | the handler's response | `Bypassed` | |
//! | first request with the key | the handler's response (recorded if `2xx`) | `Executed` | |
//! | the same request again, completed | the recorded response, `Idempotent-Replayed: true` | `Replayed` | |
//! | the same request, still running | `409` `in-flight` | `InFlight` | after `Retry-After` |
//! | the same, in join mode | the running response, `Idempotent-Replayed: true` | `Joined` | |
//! | the same request, its response was over the record limit | `409` `response-not-retained` | `ResponseNotRetained` | no |
//! | another request under the key | `422` `key-reused` | `KeyReused` | no: a new key |
//! | no key where required / an invalid key | `400` `missing-key` / `invalid-key` | `MissingKey` / `InvalidKey` | no |
//! | a body over the limit | `413` `request-body-too-large` | `RequestBodyTooLarge` | no |
//! | the store failed (fail closed, the default) | `503` `store-unavailable` | `StoreUnavailable` | after `Retry-After` |
//! | the store failed (fail open, [`StoreFailure::FailOpen`]) | the handler's response, unrecorded | `Unprotected` | |
//!
//! The layer's own answers are RFC 9457 problem+json by default ([`problem`] lists each type;
//! [`with_problem_renderer`] answers in an envelope of your own), gRPC statuses for gRPC
//! requests ([`grpc`]), and carry retry hints ([`hints`]): `Retry-After` and `retry-after-ms`
//! on the retryable ones, `x-should-retry: false` on the final ones. None echoes the request.
//! Each outcome is in the response's extensions ([`Outcome::of`]) and in a `tracing` event.
//!
//! # The guarantees
//!
//! - **One execution at a time per key.** Begin is atomic in the store, and only the lock's
//!   owner can complete, renew or release it (its token fences every write): two requests
//!   with one key never run the handler at once, on one process or on many replicas sharing
//!   a store.
//! - **A completed request is replayed, not run again**, for the TTL, byte for byte.
//! - **The record exists before the client can see the response end**, however the server
//!   reads the body (hyper stops at `Content-Length` or at the trailers): a client that
//!   received a whole response and retries at once gets the replay, never `409` in flight.
//! - **Once the handler answered, its completion happens**: the record (or the not-retained
//!   record) is written whether the client stays or leaves, retried through store failures
//!   while the lease lasts.
//! - **No one else's response.** The scope keeps callers apart; `Set-Cookie` is never stored.
//! - **Nothing kept reveals a secret.** Scopes and fingerprints are keyed digests; the
//!   layer's answers echo nothing of the request; keys are not logged ([`IdempotencyKey`]'s
//!   `Debug` shows its length).
//! - **Exactly once for a handler's database writes**, in transactional mode (feature
//!   `postgres`, `IdempotencyLayer::transactional`): the handler's writes and the record
//!   commit in one transaction, before the answer leaves.
//!
//! # Where they stop
//!
//! - **A crash, or a store outage longer than the lease,** between the handler's answer and
//!   its record: the key frees itself after the lease, and a retry executes again. For writes
//!   to PostgreSQL, transactional mode closes that window; for anything else the handler does
//!   (a call to a payment provider), pass an idempotency key on to it.
//! - **The TTL.** After it, the key is new: a retry executes again.
//! - **Failures are not recorded.** A `5xx`, an error, a panic releases the key so that the
//!   retry can succeed: whatever the failed attempt did before failing, the retry does again.
//! - **The scope.** A client whose `Authorization` changes between attempts (a refreshed
//!   token) is a new caller: scope by the authenticated identity ([`Scope::from_fn`]) instead.
//!   Requests without `Authorization` share one scope.
//! - **`MemoryStore`** is one process: a restart forgets every key, replicas do not share
//!   them, and when it is full it evicts the oldest completed records (never a running
//!   request's lock), whose retries then execute again.
//! - **Fail open** ([`StoreFailure::FailOpen`]) runs the handler unprotected while the store
//!   is down.
//! - **Records have a size limit** ([`with_max_record`]): a larger response is answered once;
//!   its retries get `409` `response-not-retained`, never the response.
//! - **Waiting and joining are bounded**: [`with_max_waiters`] per key and process (past it,
//!   `409`), and [`Duplicates::Wait`]'s timeout.
//! - **Clocks.** `MemoryStore`, Redis and PostgreSQL judge leases by one clock;
//!   `DynamoDbStore` by each process's clock, so replica clocks may differ by up to half the
//!   lease.
//! - **A request without a key is not protected** (unless the key is required).
//!
//! [`IdempotencyLayer`]: crate::IdempotencyLayer
//! [`with_methods`]: crate::IdempotencyLayer::with_methods
//! [`with_header_name`]: crate::IdempotencyLayer::with_header_name
//! [`with_key_source`]: crate::IdempotencyLayer::with_key_source
//! [`KeyPolicy::Required`]: crate::KeyPolicy::Required
//! [`with_max_request_body`]: crate::IdempotencyLayer::with_max_request_body
//! [`RequestBody`]: crate::RequestBody
//! [`with_scope`]: crate::IdempotencyLayer::with_scope
//! [`with_fingerprint_headers`]: crate::IdempotencyLayer::with_fingerprint_headers
//! [`Secret`]: crate::Secret
//! [`with_secret`]: crate::IdempotencyLayer::with_secret
//! [`with_duplicates`]: crate::IdempotencyLayer::with_duplicates
//! [`Duplicates::Wait`]: crate::Duplicates::Wait
//! [`Duplicates::join`]: crate::Duplicates::join
//! [`with_max_detached`]: crate::IdempotencyLayer::with_max_detached
//! [`with_lease`]: crate::IdempotencyLayer::with_lease
//! [`with_cache_predicate`]: crate::IdempotencyLayer::with_cache_predicate
//! [`with_ttl`]: crate::IdempotencyLayer::with_ttl
//! [`with_max_record`]: crate::IdempotencyLayer::with_max_record
//! [`with_unstored_headers`]: crate::IdempotencyLayer::with_unstored_headers
//! [`store::LiveLog`]: crate::store::LiveLog
//! [`Outcome`]: crate::Outcome
//! [`Outcome::of`]: crate::Outcome::of
//! [`StoreFailure::FailOpen`]: crate::StoreFailure::FailOpen
//! [`problem`]: crate::problem
//! [`with_problem_renderer`]: crate::IdempotencyLayer::with_problem_renderer
//! [`grpc`]: crate::grpc
//! [`hints`]: crate::hints
//! [`IdempotencyKey`]: crate::IdempotencyKey
//! [`Scope::from_fn`]: crate::Scope::from_fn
//! [`with_max_waiters`]: crate::IdempotencyLayer::with_max_waiters
