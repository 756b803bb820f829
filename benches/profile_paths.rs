//! One path through the layer, N times, for an instruction-count profile under callgrind.
//!
//! Run with: `scripts/profile.sh` (it builds this and runs it under `valgrind --tool=callgrind`),
//! or by hand: `cargo bench --bench profile_paths -- miss 2000`.
//!
//! The arguments are a path name (`bare_post`, `bare_put`, `noop_layer`, `miss`, `replay`, `no_key`,
//! `uncovered_method`, `in_flight_409`) and a number of requests. The routers are built and
//! every path is warmed up first; the requests are sent from `measured`, the only function
//! the profile counts (`--toggle-collect`).

#![allow(missing_docs)]

mod common;

use common::{Path, routers, runtime, send};
use tower_idempotency::store::MemoryStore;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (Some(name), Some(n)) = (args.first(), args.get(1).and_then(|n| n.parse::<u64>().ok())) else {
        eprintln!("usage: profile_paths PATH REQUESTS [STORE_MAX_ENTRIES]");
        std::process::exit(2);
    };
    let Some(path) = Path::ALL.into_iter().find(|p| p.name() == name) else {
        eprintln!("unknown path {name}");
        std::process::exit(2);
    };
    // Built with the `metrics` feature and PROFILE_METRICS=1: what the layer's metrics cost
    // with a real recorder installed (Prometheus', as examples/server.rs installs it).
    if std::env::var_os("PROFILE_METRICS").is_some() {
        metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().expect("one recorder");
    }
    let rt = runtime();
    // A small bound by default, so the measured misses evict the oldest records as a full
    // store does.
    let max_entries = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000);
    let routers = routers(&rt, MemoryStore::builder().with_max_entries(max_entries).build());
    let router = path.router(&routers);
    let requests: Vec<_> = (0..n).map(|_| path.request()).collect();
    measured(&rt, router, path, requests);
}

/// The requests, and nothing else: `scripts/profile.sh` counts instructions inside this only.
#[inline(never)]
fn measured(
    rt: &tokio::runtime::Runtime,
    router: &axum::Router,
    path: Path,
    requests: Vec<axum::http::Request<axum::body::Body>>,
) {
    rt.block_on(async {
        for request in requests {
            let (status, body) = send(router, request).await;
            assert_eq!(status, path.status());
            std::hint::black_box(body);
        }
    });
}
