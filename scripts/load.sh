#!/usr/bin/env bash
# Loopback load benchmark: requests/s of examples/server.rs (the layer, in-memory store) against
# examples/bare_server.rs (the same POST /orders handler, no layer), measured with wrk.
#
# Usage: scripts/load.sh            (about a minute)
# Environment: STORE (memory, redis or postgres; default memory: the layer server's store, via
#   REDIS_URL / DATABASE_URL with their local defaults; the PostgreSQL store's pool has 16
#   connections), DURATION (seconds per run, default 5), CONNECTIONS (default 32),
#   ROUNDS (default 1; each round runs every scenario on both servers),
#   SERVER_CPU / LOAD_CPU (default 0 / 1: server and wrk pinned to separate cores).
#
# Both servers run one tokio worker thread on SERVER_CPU; wrk runs one thread on LOAD_CPU.
# Only 127.0.0.1 is loaded; every server this script starts is stopped when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-5}"
CONNECTIONS="${CONNECTIONS:-32}"
ROUNDS="${ROUNDS:-1}"
SERVER_CPU="${SERVER_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
SCENARIOS=(miss replay no_key)
STORE="${STORE:-memory}"
case "$STORE" in
  memory) features=(); store_env=() ;;
  redis) features=(--features redis); store_env=("REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}") ;;
  postgres)
    features=(--features postgres)
    # A short TTL: the miss runs leave many rows, which the store's reaper then deletes.
    store_env=("DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}" IDEMPOTENCY_TTL_MS=60000) ;;
  *) echo "STORE must be memory, redis or postgres" >&2; exit 1 ;;
esac

command -v wrk >/dev/null || { echo "wrk is not installed: apt-get install -y wrk" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset is not installed (util-linux)" >&2; exit 1; }

cargo build --release "${features[@]}" --example server --example bare_server >&2
examples="${CARGO_TARGET_DIR:-target}/release/examples"

workdir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$workdir"
}
trap cleanup EXIT

# Starts an example on a free loopback port; prints its base URL.
start() {
  local name=$1 log="$workdir/$1.log" env=()
  if [ "$name" = server ]; then env=("${store_env[@]}"); fi
  env -u REDIS_URL -u DATABASE_URL "${env[@]}" ADDR=127.0.0.1:0 TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c "$SERVER_CPU" "$examples/$name" >"$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    local url
    url=$(grep -o 'http://[0-9.:]*' "$log" 2>/dev/null | head -1) || true
    if [ -n "$url" ]; then echo "$url"; return; fi
    sleep 0.1
  done
  echo "$name did not start:" >&2; cat "$log" >&2; exit 1
}

# Runs one scenario against one server for DURATION seconds; prints requests/s.
load() {
  local url=$1 scenario=$2 seconds=$3 out
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" -s scripts/load.lua "$url/orders" -- "$scenario")
  if grep -q "Non-2xx" <<<"$out"; then
    echo "  ($scenario on $url: $(grep 'Non-2xx' <<<"$out" | tr -s ' '))" >&2
  fi
  awk '/Requests\/sec/ { print $2 }' <<<"$out"
}

bare=$(start bare_server)
layer=$(start server)
echo "bare router: $bare    layer ($STORE store): $layer    ${DURATION}s per run, $CONNECTIONS connections, server on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU" >&2

declare -A rps
for round in $(seq 1 "$ROUNDS"); do
  for scenario in "${SCENARIOS[@]}"; do
    for server in bare layer; do
      url=${!server}
      load "$url" "$scenario" 1 >/dev/null # warm up
      r=$(load "$url" "$scenario" "$DURATION")
      rps[$server,$scenario]="${rps[$server,$scenario]:-} $r"
    done
  done
done

printf '%-8s %16s %16s %8s\n' scenario 'bare req/s' 'layer req/s' ratio
for scenario in "${SCENARIOS[@]}"; do
  python3 - "$scenario" "${rps[bare,$scenario]}" "${rps[layer,$scenario]}" <<'PY'
import statistics, sys
scenario, bare, layer = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
b, l = statistics.median(bare), statistics.median(layer)
print(f"{scenario:<8} {b:>16,.0f} {l:>16,.0f} {l / b:>7.2f}x")
PY
done
