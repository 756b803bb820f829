//! `RedisStore` on Redis Cluster: the shared conformance suite, keys spread over the nodes
//! without hash tags, live logs in their lock key's slot, replicas racing, lazy connection,
//! scripts lost by the nodes, keys not starving each other; and, in a test of its own, resume
//! exactly (`Last-Event-ID`) over real hyper, the matrix every store runs
//! (`tests/common/resume.rs`).
//!
//! The cluster: `REDIS_CLUSTER_URLS` (comma-separated node URLs) when set, and then a cluster
//! that does not answer fails the tests. Otherwise the first test that needs one starts a
//! three-node cluster with `redis-server`, shared by the tests running meanwhile and stopped
//! when the last of them ends; the tests are skipped, saying so, when `redis-server` is not
//! installed. The two tests take turns on it (one flushes every node's scripts and measures
//! real-time pace; the other loads the machine and runs thousands of scripts), and each has its
//! own key prefix, so that their layers' secrets never meet (a store refuses a layer whose
//! secret is not the one its prefix was first used with).
#![cfg(feature = "redis-cluster")]

use crate::common;

use std::{
    io::Write,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use common::{
    conformance::{self, LEASE, TTL, fp, fresh_key, live_head, lock, race_begins, record},
    redis::{closed_port, raw_key, run_prefix},
};
use tower_idempotency::{
    IdempotencyKey, ScopeId,
    store::{
        Begin, Followed, IdempotencyStore, LiveLog, Record, RedisStore, StoreKey,
        redis::{self, AsyncCommands, cluster::ClusterClient},
    },
};

/// Three `redis-server` cluster nodes this test started; stopped and removed on drop (also
/// when the test panics).
struct LocalCluster {
    nodes: Vec<Child>,
    dir: PathBuf,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Ports nothing listens on now (bound and released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

async fn query<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> redis::RedisResult<T> {
    let mut connection = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    redis::cmd(args[0]).arg(&args[1..]).query_async(&mut connection).await
}

async fn wait_until<F: AsyncFn() -> bool>(what: &str, check: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "the local Redis Cluster never got {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts three master nodes, gives each a third of the slots, joins them.
async fn start_local_cluster() -> (LocalCluster, Vec<String>) {
    let dir = std::env::temp_dir().join(format!("idem-cluster-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports = free_ports(6);
    let mut cluster = LocalCluster { nodes: Vec::new(), dir: dir.clone() };
    for i in 0..3 {
        let (port, bus) = (ports[i].to_string(), ports[i + 3].to_string());
        let node = Command::new("redis-server")
            .args(["--port", &port, "--cluster-port", &bus, "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf"), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        cluster.nodes.push(node);
    }
    let urls: Vec<String> = ports[..3].iter().map(|p| format!("redis://127.0.0.1:{p}")).collect();
    for url in &urls {
        wait_until("its nodes up", async || query::<String>(url, &["PING"]).await.is_ok()).await;
    }
    for (url, (first, last)) in urls.iter().zip([(0, 5460), (5461, 10922), (10923, 16383)]) {
        let _: () = query(url, &["CLUSTER", "ADDSLOTSRANGE", &first.to_string(), &last.to_string()]).await.unwrap();
    }
    for i in 1..3 {
        let (port, bus) = (ports[i].to_string(), ports[i + 3].to_string());
        let _: () = query(&urls[0], &["CLUSTER", "MEET", "127.0.0.1", &port, &bus]).await.unwrap();
    }
    for url in &urls {
        wait_until("every slot served and every node known", async || {
            let info: String = query(url, &["CLUSTER", "INFO"]).await.unwrap_or_default();
            info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
        })
        .await;
    }
    (cluster, urls)
}

/// The cluster the tests run against: its nodes' URLs, and the nodes themselves when the tests
/// started them (stopped when the last test holding this ends).
struct Cluster {
    urls: Vec<String>,
    _local: Option<LocalCluster>,
}

/// The cluster of the tests running now, if any: the next test to need one shares it.
static SHARED: tokio::sync::Mutex<Weak<Cluster>> = tokio::sync::Mutex::const_new(Weak::new());

/// The tests' turns on the cluster: each holds it throughout. One flushes every node's scripts
/// (a failover's loss: a script of the other test, loaded again between two flushes, would be
/// lost twice and fail) and measures a joined stream's pace in real time (the other one's load
/// would be measured instead).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cluster to test against, or `None` (having said so) when there is none.
async fn cluster() -> Option<Arc<Cluster>> {
    let mut shared = SHARED.lock().await;
    if let Some(cluster) = shared.upgrade() {
        return Some(cluster);
    }
    let cluster = if let Ok(urls) = std::env::var("REDIS_CLUSTER_URLS") {
        let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
        if let Err(error) = ClusterClient::new(urls.clone()).unwrap().get_async_connection().await {
            panic!("REDIS_CLUSTER_URLS is set to {urls:?} but the cluster does not answer: {error}");
        }
        Cluster { urls, _local: None }
    } else {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            let _ = writeln!(
                std::io::stderr(),
                "skipping Redis Cluster tests: redis-server is not installed and REDIS_CLUSTER_URLS is not set"
            );
            return None;
        }
        let (local, urls) = start_local_cluster().await;
        Cluster { urls, _local: Some(local) }
    };
    let cluster = Arc::new(cluster);
    *shared = Arc::downgrade(&cluster);
    Some(cluster)
}

async fn store(urls: &[String]) -> RedisStore {
    RedisStore::builder().with_prefix(run_prefix()).connect_cluster(urls.iter().map(String::as_str)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_on_redis_cluster() {
    let Some(cluster) = cluster().await else { return };
    let _turn = TURN.lock().await;
    let urls = &cluster.urls;

    // The shared suite, unchanged.
    conformance::run(|| store(urls), tokio::time::sleep).await;
    conformance::run_live(|| store(urls), tokio::time::sleep).await;
    conformance::run_expired(|| store(urls), tokio::time::sleep).await;
    conformance::run_inspect(|| store(urls), tokio::time::sleep).await;

    // Keys spread over every node, with no hash tag and no CROSSSLOT error: each operation
    // touches one key.
    let store = store(urls).await;
    let mut spread = Vec::new();
    for i in 0..60 {
        let key = fresh_key(if i % 2 == 0 { None } else { Some(ScopeId::digest("tenant")) });
        let token = lock(&store, &key, fp(1)).await;
        assert!(store.complete(&key, &token, record(b"spread"), TTL).await.unwrap());
        spread.push(key);
    }
    let mut nodes_holding_keys = 0;
    for url in urls {
        let mut node = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let pattern = format!("{}*", run_prefix());
        let keys: Vec<String> = node.keys(pattern).await.unwrap();
        nodes_holding_keys += usize::from(!keys.is_empty());
    }
    assert_eq!(nodes_holding_keys, urls.len(), "keys land on every node");
    for key in &spread {
        assert!(matches!(store.begin(key, &fp(1), LEASE).await.unwrap(), Begin::Completed(_)));
    }

    // Live logs: a lock's stream is in its key's slot (the scripts touching both would fail
    // with CROSSSLOT otherwise), whatever braces the client key has; a follower on another
    // store, blocked on its own connection to the node, is woken by the publish.
    let follower = Arc::new(self::store(urls).await);
    for (i, text) in ["plain", "with{brace}s", "{", "}{", "a{}b", "{x"].into_iter().enumerate() {
        let scope = (i % 2 == 1).then(|| ScopeId::digest("tenant"));
        let key =
            StoreKey::new(scope, IdempotencyKey::parse(format!("{text}-{}", uuid::Uuid::new_v4()).as_bytes()).unwrap());
        let token = lock(&store, &key, fp(1)).await;
        let waiting = tokio::spawn({
            let (follower, key) = (follower.clone(), key.clone());
            async move { follower.follow(&key, &fp(1), None, Duration::from_secs(30)).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
        let followed = tokio::time::timeout(Duration::from_secs(2), waiting).await.expect("woken").unwrap();
        assert!(matches!(&followed, Followed::Live { events, .. } if *events == [live_head()]), "{followed:?}");
        let pattern = format!("{}*live:{:032x}", run_prefix(), token.id());
        let mut streams = Vec::new();
        for url in urls {
            let mut node = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
            streams.extend(node.keys::<_, Vec<String>>(&pattern).await.unwrap());
        }
        let [stream] = <[String; 1]>::try_from(streams).expect("one stream");
        let record_key = String::from_utf8(raw_key(&key)).unwrap();
        let slot_of = async |key: &str| query::<i64>(&urls[0], &["CLUSTER", "KEYSLOT", key]).await.unwrap();
        assert_eq!(slot_of(&stream).await, slot_of(&record_key).await, "{stream} and {record_key}");
        assert!(store.complete(&key, &token, record(b"x"), TTL).await.unwrap());
        let ended = follower.follow(&key, &fp(1), None, Duration::from_secs(1)).await.unwrap();
        assert_eq!(ended, Followed::Ended { completed: true });
    }

    // Two replicas, 200 concurrent begins on one key: one executes.
    let replicas = [Arc::new(store.clone()), Arc::new(self::store(urls).await)];
    race_begins(&replicas, &fresh_key(None), 200, Duration::from_secs(5)).await;

    // Every node forgets its scripts (a restart, a failover): loaded again where needed.
    for url in urls {
        let _: () = query(url, &["SCRIPT", "FLUSH"]).await.unwrap();
    }
    let key = fresh_key(Some(ScopeId::digest("tenant")));
    let token = lock(&store, &key, fp(1)).await;
    for url in urls {
        let _: () = query(url, &["SCRIPT", "FLUSH"]).await.unwrap();
    }
    assert!(store.renew(&key, &token, LEASE).await.unwrap());
    assert!(store.complete(&key, &token, record(b"after a flush"), TTL).await.unwrap());
    match store.begin(&key, &fp(1), LEASE).await.unwrap() {
        Begin::Completed(Record::Response(got)) => assert_eq!(&got.body()[..], b"after a flush"),
        other => panic!("expected the record, got {other:?}"),
    }

    // Built lazily on a client: no connection until the first operation, which works.
    let lazy = RedisStore::builder().with_prefix(run_prefix()).build(ClusterClient::new(urls.clone()).unwrap());
    assert!(format!("{lazy:?}").contains("not yet connected"));
    let key = fresh_key(None);
    lock(&lazy, &key, fp(1)).await;
    assert!(matches!(lazy.begin(&key, &fp(1), LEASE).await.unwrap(), Begin::Locked));

    // A cluster that is not there: a store error, promptly, on every operation.
    let nowhere = format!("redis://{}", closed_port().await);
    let down = RedisStore::builder()
        .with_operation_timeout(Duration::from_millis(500))
        .build(ClusterClient::new(vec![nowhere]).unwrap());
    for _ in 0..2 {
        let started = Instant::now();
        let error = down.begin(&fresh_key(None), &fp(1), LEASE).await.unwrap_err();
        assert!(error.is_unavailable() || error.is_timeout(), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    }

    // Keys do not starve each other: 64 duplicates waiting on a slow key (over two replicas)
    // leave a joined stream on another key its pace.
    let secret = || tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap();
    let layers = vec![
        tower_idempotency::IdempotencyLayer::from_store(self::store(urls).await).with_secret(secret()),
        tower_idempotency::IdempotencyLayer::from_store(self::store(urls).await).with_secret(secret()),
    ];
    common::pace::a_slow_key_does_not_delay_a_joined_stream_on_another(layers).await;
}

/// Resume exactly on Redis Cluster, as on the other stores (`tests/http/resume_exactly.rs`):
/// streams of 1,000 and 5,000 events, LF, CRLF and CR, whole events, arbitrary cuts and single
/// bytes; a client cut after every 50th event (the first and the last) resumes with
/// `Last-Event-ID` on the replica that runs the stream and on another, over HTTP/1.1 and
/// HTTP/2, joining and replaying, and gets exactly the events after it. Its own key prefix:
/// its layers' secret is not the other test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_resumes_exactly() {
    let Some(cluster) = cluster().await else { return };
    let prefix = format!("idem-resume-{}:", uuid::Uuid::new_v4().simple());
    // A replica's store: its own connections (enough blocking readers for every joiner), and an
    // operation timeout a loaded test machine does not reach, as on one Redis node.
    let replica = async || {
        RedisStore::builder()
            .with_prefix(&prefix)
            .with_operation_timeout(Duration::from_secs(30))
            .with_max_blocking_connections(128)
            .connect_cluster(cluster.urls.iter().map(String::as_str))
            .await
            .unwrap()
    };
    let _turn = TURN.lock().await;
    for shape in crate::resume::SHAPES {
        crate::resume::resume_exactly([replica().await, replica().await], shape).await;
    }
}
