//! An AWS Lambda function: an axum router behind API Gateway (or a function URL, or an ALB),
//! with the idempotency layer on a DynamoDB table, so a retried `POST /orders` is replayed
//! instead of creating a second order, whichever instance of the function the retry reaches.
//!
//! Build with: `cargo build -p tests-integration --example lambda --features dynamodb` (deploy with cargo-lambda:
//! `cargo lambda build -p tests-integration --release --example lambda --features dynamodb`). Outside Lambda it
//! exits at once, saying so.
//!
//! The function's environment: `IDEMPOTENCY_TABLE` (default `idempotency`), made by the
//! deployment with partition key `pk` (string) and TTL on `ttl` (see `DynamoDbStore`'s docs),
//! and a role allowing `dynamodb:PutItem`, `dynamodb:UpdateItem`, `dynamodb:DeleteItem` and
//! `dynamodb:GetItem` on it:
//!
//! ```text
//! { "Effect": "Allow",
//!   "Action": ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:GetItem"],
//!   "Resource": "arn:aws:dynamodb:REGION:ACCOUNT:table/idempotency" }
//! ```
//!
//! Each first request costs 1 write unit plus one per KB of its recorded response, each replay
//! one per KB of the record, and the renewals of a handler running longer than a third of the
//! lease (30 s by default, so none for most functions) 1 write unit each.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, http::StatusCode, routing::post};
use serde_json::{Value, json};
use tower_idempotency::{
    IdempotencyLayer,
    store::{DynamoDbStore, aws_sdk_dynamodb},
};

/// `POST /orders`: creates an order (here, a number) and answers `201`.
async fn create_order(orders: Arc<AtomicU64>, Json(order): Json<Value>) -> (StatusCode, Json<Value>) {
    let id = orders.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "id": format!("ord_{id}"), "order": order })))
}

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_none() {
        eprintln!("not running on AWS Lambda (AWS_LAMBDA_RUNTIME_API is not set): nothing to do");
        return Ok(());
    }
    // Credentials, region and HTTP client from the function's environment: loaded once, in
    // the init phase, and shared by every invocation of this instance.
    let config = aws_config::load_from_env().await;
    let table = std::env::var("IDEMPOTENCY_TABLE").unwrap_or_else(|_| "idempotency".to_owned());
    let store = DynamoDbStore::builder()
        .with_table(table)
        // Within the function's timeout, with room for the handler.
        .with_operation_timeout(Duration::from_secs(2))
        .build(aws_sdk_dynamodb::Client::new(&config));
    // The deployment secret that keys what the table keeps: the same for every instance
    // (from the function's environment, filled from a secret manager).
    let secret = std::env::var("IDEMPOTENCY_SECRET").map_err(|_| "IDEMPOTENCY_SECRET is not set")?;
    let secret = tower_idempotency::Secret::new(secret)?;
    // A record larger than an item is kept as not retained anyway: do not buffer more.
    let layer = IdempotencyLayer::from_store(store.clone()).with_secret(secret).with_max_record(store.max_record());

    let orders = Arc::new(AtomicU64::new(0));
    let app = Router::new().route("/orders", post(move |body| create_order(orders.clone(), body))).layer(layer);
    lambda_http::run(app).await
}
