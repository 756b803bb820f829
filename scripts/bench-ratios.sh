#!/usr/bin/env bash
# Runs the in-process benchmarks (benches/layer.rs) and prints each path's ratio to the bare
# router measured in the same run, fingerprinting against raw SHA-256, and MemoryStore
# throughput on 1 and 2 threads.
#
# Usage: scripts/bench-ratios.sh [CRITERION_FILTER]   e.g. scripts/bench-ratios.sh paths
#        scripts/bench-ratios.sh --no-run              (only print, from the last run's results)
# Ratios use criterion's median estimates (target/criterion/**/new/estimates.json).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" != "--no-run" ]; then
  cargo bench --bench layer -- "$@" >&2
fi

python3 - "${CARGO_TARGET_DIR:-target}/criterion" <<'PY'
import json, os, sys

root = sys.argv[1]

def median(*parts):
    path = os.path.join(root, *parts, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except FileNotFoundError:
        return None

def fmt(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"

# The targets of the "close to the floor" work; replay and 409 only have to stay where they were.
targets = {"miss": "<= 1.30", "replay": "keep (0.58)", "no_key": "<= 1.05", "uncovered_method": "<= 1.05",
           "in_flight_409": "keep (0.48)", "noop_layer": "(reference)",
           "identity_layer": "(reference: any layer)", "miss_join": ""}
bare = {"POST": median("paths", "bare_post"), "PUT": median("paths", "bare_put")}
if bare["POST"]:
    print("in process (paths): each path against the bare router, same run")
    print(f"  {'path':<18} {'median':>10} {'ratio':>7}  target")
    print(f"  {'bare_post':<18} {fmt(bare['POST']):>10} {1:>6.2f}x")
    for name in ["noop_layer", "identity_layer", "miss", "miss_join", "replay", "no_key", "uncovered_method",
                 "in_flight_409"]:
        t = median("paths", name)
        if t is None:
            continue
        base = bare["PUT"] if name == "uncovered_method" and bare["PUT"] else bare["POST"]
        print(f"  {name:<18} {fmt(t):>10} {t / base:>6.2f}x  {targets[name]}")

rows = [(size, median("fingerprint", "sha256", size), median("fingerprint", "fingerprint", size))
        for size in ("200", "65536", "1048576")]
if any(s for _, s, _ in rows):
    print("fingerprint: Fingerprint::compute against SHA-256 of the same body")
    for size, sha, fp in rows:
        if sha and fp:
            print(f"  {int(size):>8} B   sha256 {fmt(sha):>10}   fingerprint {fmt(fp):>10}   {fp / sha:.2f}x")

ops = [("begin_complete_new_key", None), ("begin_completed_key", None), ("begin_in_flight_key", None)]
if median("memory_store", "begin_complete_new_key"):
    print("memory_store, one thread: time per operation")
    for name, _ in ops:
        t = median("memory_store", name)
        if t:
            print(f"  {name:<32} {fmt(t):>10}")
    print("memory_store, several threads: operations/s over all threads (2 threads / 1 thread)")
    for name in ("replay_one_hot_key", "replay_many_keys", "begin_complete_distinct_keys",
                 "begin_complete_distinct_keys_at_bound", "begin_complete_own_store_at_bound"):
        one, two = median("memory_store", name, "1"), median("memory_store", name, "2")
        if one and two:
            # Each iteration is one operation per thread.
            r1, r2 = 1e9 / one, 2e9 / two
            print(f"  {name:<38} 1: {r1 / 1e6:6.2f} M/s   2: {r2 / 1e6:6.2f} M/s   scaling {r2 / r1:.2f}x")
PY
