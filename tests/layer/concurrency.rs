//! Exactly once under real concurrency: many tasks on a multi-thread runtime race one key.

use crate::common;

use std::{collections::HashSet, sync::Arc, time::Duration};

use common::{Runs, assert_executed_once, post, race, send, service};
use http::StatusCode;
use tokio::sync::Barrier;
use tower_idempotency::{IdempotencyLayer, Duplicates, Outcome};

const TASKS: usize = 200;
const ROUNDS: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_mode_runs_the_handler_exactly_once() {
    for round in 0..ROUNDS {
        let runs = Runs::default();
        let svc = service(IdempotencyLayer::new(), runs.clone());
        let replies = race(&[svc], &format!("reject-{round}"), TASKS, 20).await;
        assert_eq!(runs.get(), 1, "round {round}: the handler ran {} times", runs.get());
        assert_executed_once(&replies, round);
        assert!(replies.iter().filter(|r| r.outcome == Outcome::InFlight).count() > TASKS / 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_mode_gives_every_duplicate_the_same_response() {
    for round in 0..ROUNDS {
        let runs = Runs::default();
        let layer = IdempotencyLayer::new()
            .with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(10) })
            .with_max_waiters(TASKS);
        let svc = service(layer, runs.clone());
        let replies = race(&[svc], &format!("wait-{round}"), TASKS, 20).await;
        assert_eq!(runs.get(), 1, "round {round}");
        let bodies: HashSet<_> = replies.iter().map(|r| r.body.clone()).collect();
        assert_eq!(bodies.len(), 1, "round {round}: every caller sees the one execution");
        assert!(replies.iter().all(|r| r.status == StatusCode::CREATED));
        assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_keys_all_run() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let barrier = barrier.clone();
            let sent = send(&svc, post("/orders", format!("distinct-{i}").leak(), "{}"));
            tokio::spawn(async move {
                barrier.wait().await;
                sent.await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().outcome, Outcome::Executed);
    }
    assert_eq!(runs.get(), TASKS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_first_run_lets_exactly_one_retry_run() {
    // The first execution fails (500) while duplicates race; afterwards, of a new wave of
    // retries, exactly one runs again.
    for round in 0..ROUNDS {
        let runs = Runs::default();
        let svc = service(IdempotencyLayer::new(), runs.clone());
        let key: &'static str = format!("fail-{round}").leak();
        let mut failing = post("/orders", key, r#"{"sku":"A1"}"#);
        failing.headers_mut().insert("x-status", "500".parse().unwrap());
        assert_eq!(send(&svc, failing).await.status, StatusCode::INTERNAL_SERVER_ERROR);
        let replies = race(std::slice::from_ref(&svc), key, TASKS, 20).await;
        assert_eq!(runs.get(), 2, "round {round}");
        assert_eq!(replies.iter().filter(|r| r.outcome == Outcome::Executed).count(), 1);
    }
}
