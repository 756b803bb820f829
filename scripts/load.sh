#!/usr/bin/env bash
# Loopback load benchmark: requests/s and latency (p50, p99) of examples/server.rs (the layer)
# over each store asked for, side by side in one run with examples/bare_server.rs (the same
# POST /orders handler, no layer), each served both as plain `axum::serve` leaves its sockets
# (Nagle's algorithm on) and with TCP_NODELAY, measured with wrk; for the Redis store, what
# Redis itself saw (INFO).
#
# Usage: scripts/load.sh                            (the memory store, both sockets; about two minutes)
#        STORES="memory redis postgres" scripts/load.sh   (every store side by side)
#        STORE=redis scripts/load.sh                (bare and Redis)
#        SOCKETS=nodelay scripts/load.sh            (TCP_NODELAY servers only)
#
# Environment:
#   STORES       the layer servers, space-separated, from memory, redis, postgres (default
#                memory; each is its own server process, the same binary: it serves Redis when
#                started with REDIS_URL, PostgreSQL with DATABASE_URL, memory with neither)
#   STORE        one store: shorthand for STORES (ignored when STORES is set)
#   SOCKETS      plain (plain `axum::serve`: Nagle on), nodelay (TCP_NODELAY on each accepted
#                socket), or both (default "plain nodelay"); every server runs once per socket
#                kind. Servers are named STORE/plain or STORE/nodelay; each is compared with the
#                bare router (and the memory store) of the same socket kind
#   REDIS_URL    the Redis store's server and redis-cli's (default redis://127.0.0.1:6379)
#   DATABASE_URL the PostgreSQL store's (default postgres://postgres@127.0.0.1:5432/test; its
#                pool has 16 connections)
#   DURATION     seconds per measured run (default 5; each run follows a 1 s warm-up)
#   CONNECTIONS  wrk's connections (default 32)
#   ROUNDS       default 1; each round runs every scenario on every server
#   SERVER_CPU / LOAD_CPU  default 0 / 1: the servers and wrk pinned to separate cores (Redis
#                or PostgreSQL is not this script's and runs where the system puts it)
#
# Scenarios (scripts/load.lua): miss (a fresh Idempotency-Key per request: begin, handler,
# complete), replay (one key per server and round, executed in the warm-up: the measured run
# is replays only; in a run of its own, the other connections' first requests would find the
# key in flight, 409), no_key (no key: the layer lets the request through).
#
# Figures, first table (median over the rounds; the range is the rounds' min to max):
#   req/s          wrk's Requests/sec
#   p50, p99       wrk's latency distribution (--latency), in ms: the median over the rounds
#   vs bare        the server's req/s over the bare router's, same scenario
#   vs memory      over the memory store's (when memory is in STORES)
#   requests       requests wrk completed ("N requests in"), summed over the rounds
#   non-2xx        wrk's "Non-2xx or 3xx responses", summed; errors: its socket errors, summed
# Redis tables (with redis in STORES): deltas of `INFO stats` and `INFO commandstats` taken
# just before and just after each measured run (not the warm-up), summed over the rounds, per
# request wrk completed; this script's own INFO calls are left out. They count every client of
# that Redis: run it on a Redis nothing else is loading.
#   cmds/req       commands per request (commandstats; Redis also counts there, and in
#                  total_commands_processed, the commands the Lua scripts run: redis.call)
#   rt/req         round trips per request: the store runs one Lua script per round trip
#                  (begin is MULTI, EVALSHA, GET, EXEC in one write; complete is one EVALSHA),
#                  so this is the script calls (evalsha, eval, fcall and their _ro forms)
#   cmds/read      total_commands_processed over total_reads_processed: commands per read event
#   rt/read        round trips per read event: above 1, round trips of several requests
#                  arrived in one read, i.e. pipelined on the shared multiplexed connection
#   clients        the most connected_clients seen during the run (sampled every 0.2 s, the
#                  sampler left out): 32 concurrent requests on a handful of connections
#   redis errors   failed_calls + rejected_calls, summed over every command
# and then each command's calls per request.
#
# The servers run one tokio worker thread on SERVER_CPU; wrk runs one thread on LOAD_CPU. The
# Redis and PostgreSQL servers keep their keys 60 s (IDEMPOTENCY_TTL_MS), so the keys of the
# miss runs go away by themselves; the server has no key-prefix setting, so the Redis keys are
# the default `idem:` ones, fresh per run: load.lua puts the time and a random number in every
# key. Only 127.0.0.1 is loaded; every process this script starts is stopped when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-5}"
CONNECTIONS="${CONNECTIONS:-32}"
ROUNDS="${ROUNDS:-1}"
SERVER_CPU="${SERVER_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
SCENARIOS=(miss replay no_key)
read -r -a requested <<<"${STORES:-${STORE:-memory}}"
read -r -a sockets <<<"${SOCKETS:-plain nodelay}"
for socket in "${sockets[@]}"; do
  case "$socket" in
    plain | nodelay) ;;
    *) echo "SOCKETS must list plain or nodelay, got $socket" >&2; exit 1 ;;
  esac
done

stores=() features=()
for store in "${requested[@]}"; do
  case "$store" in
    memory) ;;
    redis | postgres) features+=("$store") ;;
    *) echo "STORES (or STORE) must list memory, redis or postgres, got $store" >&2; exit 1 ;;
  esac
  [[ " ${stores[*]} " == *" $store "* ]] || stores+=("$store")
done
[ "${#stores[@]}" -gt 0 ] || { echo "STORES is empty" >&2; exit 1; }
servers=()
for socket in "${sockets[@]}"; do
  for store in bare "${stores[@]}"; do servers+=("$store/$socket"); done
done
redis_measured=false
[[ " ${stores[*]} " == *" redis "* ]] && redis_measured=true

command -v wrk >/dev/null || { echo "wrk is not installed: apt-get install -y wrk" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset is not installed (util-linux)" >&2; exit 1; }
if $redis_measured; then
  command -v redis-cli >/dev/null || { echo "redis-cli is not installed: apt-get install -y redis-tools" >&2; exit 1; }
  rcli=(redis-cli --no-auth-warning -u "$REDIS_URL")
  [ "$("${rcli[@]}" PING 2>&1)" = PONG ] || { echo "Redis does not answer PING on $REDIS_URL" >&2; exit 1; }
fi

feature_args=()
if [ "${#features[@]}" -gt 0 ]; then feature_args=(--features "$(IFS=,; echo "${features[*]}")"); fi
cargo build --release "${feature_args[@]}" --example server --example bare_server >&2
examples="${CARGO_TARGET_DIR:-target}/release/examples"

workdir=$(mktemp -d)
# The servers, and the one wrk run or Redis sampler under way (cleared once waited for, so a
# reaped pid, maybe reused by another process since, is never killed).
servers_pids=()
running=""
sampler=""
cleanup() {
  for pid in ${servers_pids[@]+"${servers_pids[@]}"} $running $sampler; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts one server (STORE/SOCKET: bare, memory, redis or postgres; plain or nodelay) on a
# free loopback port; sets url.
start() {
  local name=$1 log="$workdir/${1//\//.}.log" binary=server env=()
  local nodelay=1
  [ "${name#*/}" = plain ] && nodelay=0
  env+=("TCP_NODELAY=$nodelay")
  case "${name%/*}" in
    bare) binary=bare_server ;;
    redis) env=("REDIS_URL=$REDIS_URL" IDEMPOTENCY_TTL_MS=60000) ;;
    # A short TTL: the miss runs leave many rows, which the store's reaper then deletes.
    postgres) env=("DATABASE_URL=$DATABASE_URL" IDEMPOTENCY_TTL_MS=60000) ;;
  esac
  env -u REDIS_URL -u DATABASE_URL -u IDEMPOTENCY_TTL_MS "${env[@]}" ADDR=127.0.0.1:0 TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
    taskset -c "$SERVER_CPU" "$examples/$binary" >"$log" 2>&1 &
  servers_pids+=($!)
  for _ in $(seq 1 100); do
    url=$(grep -o 'http://[0-9.:]*' "$log" 2>/dev/null | head -1) || true
    if [ -n "$url" ]; then return; fi
    sleep 0.1
  done
  echo "$name did not start:" >&2; cat "$log" >&2; exit 1
}

# Runs `wrk` (in the background, so that an interrupted run stops it too) into file $1; the
# arguments after the seconds go to load.lua.
run_wrk() {
  local out=$1 url=$2 seconds=$3
  shift 3
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency -s scripts/load.lua "$url/orders" -- "$@" >"$out" 2>&1 &
  running=$!
  wait "$running" || { running=""; echo "wrk failed on $url ($scenario):" >&2; cat "$out" >&2; exit 1; }
  running=""
}

redis_info() { "${rcli[@]}" INFO stats commandstats | tr -d '\r' >"$1"; }

if $redis_measured; then
  # Less one: redis-cli's own connection.
  redis_others=$(( $("${rcli[@]}" INFO clients | tr -d '\r' | awk -F: '/^connected_clients:/ { print $2 }') - 1 ))
  redis_version=$("${rcli[@]}" INFO server | tr -d '\r' | awk -F: '/^redis_version:/ { print $2 }')
fi

declare -A urls
summary=""
for server in "${servers[@]}"; do
  start "$server"
  urls[$server]=$url
  summary+="$server: $url   "
done
echo "${summary}(${DURATION}s per run, $CONNECTIONS connections, $ROUNDS round(s), servers on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU)" >&2
if $redis_measured; then
  echo "Redis $redis_version at $REDIS_URL; $redis_others other client(s) connected before the start" >&2
fi

for round in $(seq 1 "$ROUNDS"); do
  for scenario in "${SCENARIOS[@]}"; do
    for server in "${servers[@]}"; do
      url=${urls[$server]}
      base="$workdir/${server//\//.}.$scenario.$round"
      args=("$scenario")
      if [ "$scenario" = replay ]; then args+=("load-replay-${server//\//-}-$round-$(date +%s%N)"); fi
      run_wrk "$base.warmup" "$url" 1 "${args[@]}"
      if [ "${server%/*}" = redis ]; then
        redis_info "$base.before"
        # One connection for every sample: -r repeats INFO on it every 0.2 s.
        "${rcli[@]}" -r $((DURATION * 5)) -i 0.2 INFO clients >"$base.clients" 2>&1 &
        sampler=$!
      fi
      run_wrk "$base.wrk" "$url" "$DURATION" "${args[@]}"
      if [ "${server%/*}" = redis ]; then
        wait "$sampler" || true
        sampler=""
        redis_info "$base.after"
      fi
      echo "  round $round: $scenario on $server: $(awk '/Requests\/sec/ { print $2 }' "$base.wrk") req/s" >&2
    done
  done
done

python3 - "$workdir" "$ROUNDS" "${SCENARIOS[*]}" "${servers[*]}" <<'PY'
import re, statistics, sys
from collections import Counter

workdir, rounds, scenarios, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()

def ms(value, unit):
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

def wrk(server, scenario, round):
    text = open(f"{workdir}/{server.replace('/', '.')}.{scenario}.{round}.wrk").read()
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", text).group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    latency = {p: ms(v, u) for p, v, u in re.findall(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)}
    return (rps, requests, int(non2xx.group(1)) if non2xx else 0, sum(map(int, sock.groups())) if sock else 0,
            latency.get("50", float("nan")), latency.get("99", float("nan")))

def info(path):
    stats, calls, errors = {}, Counter(), 0
    for line in open(path):
        line = line.strip()
        if line.startswith("cmdstat_"):
            name, fields = line[len("cmdstat_"):].split(":", 1)
            fields = dict(f.split("=") for f in fields.split(","))
            calls[name] = int(fields["calls"])
            errors += int(fields.get("failed_calls", 0)) + int(fields.get("rejected_calls", 0))
        elif ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            stats[key] = value
    return stats, calls, errors

results = {(s, c): [wrk(s, c, r) for r in range(1, rounds + 1)] for s in servers for c in scenarios}
median = {k: statistics.median(x[0] for x in v) for k, v in results.items()}

def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"

print(f"{'scenario':<8} {'server':<16} {'req/s':>9} {'range (rounds)':>17} {'vs bare':>8} {'vs memory':>9} "
      f"{'p50 ms':>8} {'p99 ms':>8} {'requests':>10} {'non-2xx':>8} {'errors':>7}")
for c in scenarios:
    for s in servers:
        store, socket = s.split("/")
        bare, memory = f"bare/{socket}", f"memory/{socket}"
        runs = results[s, c]
        low, high = min(x[0] for x in runs), max(x[0] for x in runs)
        spread = f"{low:,.0f}-{high:,.0f}" if rounds > 1 else "-"
        vs_bare = ratio(median[s, c], median[bare, c]) if store != "bare" else "-"
        vs_memory = ratio(median[s, c], median[memory, c]) if store not in ("bare", "memory") and memory in servers else "-"
        p50 = statistics.median(x[4] for x in runs)
        p99 = statistics.median(x[5] for x in runs)
        print(f"{c:<8} {s:<16} {median[s, c]:>9,.0f} {spread:>17} {vs_bare:>8} {vs_memory:>9} {p50:>8.2f} {p99:>8.2f} "
              f"{sum(x[1] for x in runs):>10,} {sum(x[2] for x in runs):>8,} {sum(x[3] for x in runs):>7,}")

redis_servers = [s for s in servers if s.startswith("redis/")]
if not redis_servers:
    sys.exit()
# Redis's own figures for the first Redis server measured (the store's commands do not
# depend on the socket kind).
redis = redis_servers[0]

SCRIPTS = {"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"}
print()
print(f"Redis ({redis}), per request wrk completed ({rounds} round(s) summed)")
print(f"{'scenario':<8} {'cmds/req':>9} {'rt/req':>7} {'cmds/read':>10} {'rt/read':>8} {'clients':>8} {'redis errors':>13}")
per_command = {}
for c in scenarios:
    requests = commands = reads = errors = 0
    calls, clients = Counter(), 0
    for r in range(1, rounds + 1):
        base = f"{workdir}/{redis.replace('/', '.')}.{c}.{r}"
        requests += results[redis, c][r - 1][1]
        (s0, c0, e0), (s1, c1, e1) = info(base + ".before"), info(base + ".after")
        delta = c1 - c0  # Counter subtraction keeps the positive counts
        own = delta.pop("info", 0)  # this script's INFO calls (snapshots, sampler)
        calls += delta
        errors += e1 - e0
        commands += int(s1["total_commands_processed"]) - int(s0["total_commands_processed"]) - own
        # Each INFO the script sent was one read event (the sampler keeps one connection).
        reads += int(s1["total_reads_processed"]) - int(s0["total_reads_processed"]) - own
        seen = [int(m) for m in re.findall(r"connected_clients:(\d+)", open(base + ".clients").read())]
        if seen:
            clients = max(clients, max(seen) - 1)  # less the sampler's own connection
    requests = max(requests, 1)
    per_command[c] = {name: n / requests for name, n in calls.items()}
    round_trips = sum(n for name, n in calls.items() if name in SCRIPTS)
    per_read = lambda n: f"{n / reads:.2f}" if reads > 0 and n else "-"
    print(f"{c:<8} {sum(calls.values()) / requests:>9.2f} {round_trips / requests:>7.2f} {per_read(commands):>10} "
          f"{per_read(round_trips):>8} {clients:>8} {errors:>13,}")

top = lambda n: max(v.get(n, 0) for v in per_command.values())
names = sorted({n for v in per_command.values() for n in v}, key=lambda n: (n not in SCRIPTS, -top(n), n))
print()
print("Redis commands per request (commandstats; includes the commands the scripts run)")
print(f"{'command':<16}" + "".join(f"{c:>9}" for c in scenarios))
for n in names:
    if top(n) >= 0.0005:
        print(f"{n:<16}" + "".join(f"{per_command[c].get(n, 0):>9.3f}" for c in scenarios))
# Below 0.001 per request: another client's commands, or a reconnection's.
rare = [n for n in names if top(n) < 0.0005]
if rare:
    print("also seen, under 0.001 per request (not the store's load): " + ", ".join(rare))
PY
