#!/usr/bin/env bash
# Runs the in-process benchmarks (benches/layer.rs) and prints each path's ratio to the bare
# router measured in the same run, fingerprinting against raw SHA-256, and MemoryStore
# throughput on 1 and 2 threads.
#
# Usage: scripts/bench-ratios.sh [CRITERION_FILTER]   e.g. scripts/bench-ratios.sh paths
#        ROUNDS=5 scripts/bench-ratios.sh paths       (five runs: each ratio's median and range)
#        scripts/bench-ratios.sh --no-run              (only print, from the last run's results)
#
# Ratios use criterion's median estimates (target/criterion/**/new/estimates.json). Each ratio
# is taken within one run (a path against the bare router of the same run, 2 threads against 1
# of the same run); with ROUNDS > 1 the table shows the median of the runs' ratios and their
# range, which is what to compare on a shared machine whose speed drifts between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-1}"
criterion="${CARGO_TARGET_DIR:-target}/criterion"
rounds_dir=$(mktemp -d)
trap 'rm -rf "$rounds_dir"' EXIT

# Copies the median estimates (ns) under criterion directory $1 into "$rounds_dir/$2.json".
collect() {
  python3 - "$1" "$rounds_dir/$2.json" <<'PY'
import json, os, sys
root, out = sys.argv[1:]
medians = {}
for dirpath, _, files in os.walk(root):
    if os.path.basename(dirpath) == "new" and "estimates.json" in files:
        name = os.path.relpath(os.path.dirname(dirpath), root)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            medians[name] = json.load(f)["median"]["point_estimate"]
json.dump(medians, open(out, "w"))
PY
}

if [ "${1:-}" = "--no-run" ]; then
  collect "$criterion" 1
else
  cargo bench -p tests-integration --bench layer --no-run >&2
  for round in $(seq 1 "$ROUNDS"); do
    echo "run $round of $ROUNDS" >&2
    # Each run into a directory of its own: only its results count, and criterion's own
    # history (target/criterion, baselines) is left alone.
    CRITERION_HOME="$rounds_dir/criterion.$round" cargo bench -p tests-integration --bench layer -- "$@" >&2
    collect "$rounds_dir/criterion.$round" "$round"
  done
fi

python3 - "$rounds_dir" <<'PY'
import json, os, statistics, sys

runs = [json.load(open(os.path.join(sys.argv[1], f))) for f in sorted(os.listdir(sys.argv[1])) if f.endswith(".json")]

def ratios(f):
    """f(run) -> value or None, for every run; their median and range as text."""
    values = [v for v in (f(run) for run in runs) if v is not None]
    if not values:
        return None
    median = statistics.median(values)
    spread = f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""
    return median, spread

def fmt(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"

def med(name):
    values = [run[name] for run in runs if name in run]
    return statistics.median(values) if values else None

# The targets of the "close to the floor" work; replay and 409 only have to stay below the bare router.
targets = {"miss": "<= 1.30", "replay": "keep (< 1)", "no_key": "<= 1.05", "uncovered_method": "<= 1.05",
           "in_flight_409": "keep (< 1)", "noop_layer": "(reference)",
           "identity_layer": "(reference: any layer)", "miss_join": ""}
if med("paths/bare_post"):
    print(f"in process (paths): each path against the bare router of the same run, {len(runs)} run(s)")
    print(f"  {'path':<18} {'median':>10} {'ratio':>7} {'range':>13}  target")
    print(f"  {'bare_post':<18} {fmt(med('paths/bare_post')):>10} {1:>6.2f}x")
    for name in ["noop_layer", "identity_layer", "miss", "miss_join", "replay", "no_key", "uncovered_method",
                 "in_flight_409"]:
        base = "paths/bare_put" if name == "uncovered_method" else "paths/bare_post"
        r = ratios(lambda run: run[f"paths/{name}"] / run[base] if f"paths/{name}" in run and base in run else None)
        if r:
            print(f"  {name:<18} {fmt(med('paths/' + name)):>10} {r[0]:>6.2f}x {r[1]:>13}  {targets[name]}")

rows = [(size, f"fingerprint/sha256/{size}", f"fingerprint/layer_to_store/{size}") for size in ("200", "65536", "1048576")]
if any(med(sha) for _, sha, _ in rows):
    print("fingerprint: the layer up to the store (a 409) against SHA-256 of the same body")
    for size, sha, layer in rows:
        if med(sha) and med(layer):
            r = ratios(lambda run: run[layer] / run[sha] if layer in run and sha in run else None)
            print(f"  {int(size):>8} B   sha256 {fmt(med(sha)):>10}   layer {fmt(med(layer)):>10}   {r[0]:.2f}x{r[1]}")

if med("memory_store/begin_complete_new_key"):
    print("memory_store, one thread: time per operation")
    for name in ("begin_complete_new_key", "begin_completed_key", "begin_in_flight_key"):
        if med(f"memory_store/{name}"):
            print(f"  {name:<38} {fmt(med('memory_store/' + name)):>10}")
multi = ("replay_one_hot_key", "replay_many_keys", "begin_complete_distinct_keys",
         "begin_complete_distinct_keys_at_bound", "begin_complete_own_store_at_bound")
if any(med(f"memory_store/{name}/2") for name in multi):
    print("memory_store, 2 threads against 1 (operations/s over all threads, same run)")
    for name in multi:
        one, two = f"memory_store/{name}/1", f"memory_store/{name}/2"
        # Each iteration is one operation per thread.
        r = ratios(lambda run: (2e9 / run[two]) / (1e9 / run[one]) if one in run and two in run else None)
        if r:
            r1, r2 = 1e9 / med(one), 2e9 / med(two)
            print(f"  {name:<38} 1: {r1 / 1e6:5.2f} M/s   2: {r2 / 1e6:5.2f} M/s   scaling {r[0]:.2f}x{r[1]}")
PY
