#!/usr/bin/env bash
# Instruction counts per request on every path, under valgrind's callgrind: deterministic,
# so a change in the hot path shows even on a noisy machine. Prints instructions per request,
# the ratio to the bare router, and where the miss path's extra instructions go.
#
# Usage: scripts/profile.sh [REQUESTS] [PATH...]   (default 2000 requests, every path)
# Environment: FEATURES (cargo features of the build, e.g. metrics), PROFILE_METRICS=1 (with
# the metrics feature: a Prometheus recorder installed, so the metrics are really recorded).
# Output files: target/profile/callgrind.PATH (open with callgrind_annotate or kcachegrind),
# target/profile/instructions.txt (one line a path: name, instructions per request, of which
# SHA-256; what scripts/instructions.sh compares with the committed baseline).
#
# Caveat: valgrind's CPU has no SHA extensions, so SHA-256 runs in software here
# (sha2::sha256::compress256, ~3 500 instructions per 64-byte block) where the real CPU uses
# SHA-NI; the table also shows each path without it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

requests="${1:-2000}"
shift || true
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(bare_post bare_put noop_layer identity_layer miss replay no_key uncovered_method in_flight_409 miss_join)

target="${CARGO_TARGET_DIR:-target}"
# Line tables make the profile readable; they do not change the code generated.
export CARGO_PROFILE_BENCH_DEBUG=line-tables-only
# FEATURES=metrics builds the layer with its metrics (add PROFILE_METRICS=1 for a recorder).
binary=$(cargo bench -p tests-integration --bench profile_paths ${FEATURES:+--features "$FEATURES"} --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "profile_paths" and m.get("executable"):
        print(m["executable"])')
out="$target/profile"
mkdir -p "$out"

declare -A total sha
for path in "${paths[@]}"; do
  file="$out/callgrind.$path"
  valgrind --tool=callgrind --callgrind-out-file="$file" --collect-atstart=no \
    --toggle-collect='*profile_paths::measured*' "$binary" "$path" "$requests" >/dev/null 2>&1
  annotated=$(callgrind_annotate --auto=no --threshold=100 "$file" 2>/dev/null)
  total[$path]=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }' <<<"$annotated")
  sha[$path]=$(awk '/compress256/ { gsub(",", "", $1); s += $1 } END { print s + 0 }' <<<"$annotated")
done

# Machine-readable: path, instructions per request, of which SHA-256 (read by
# scripts/instructions.sh, the CI guard).
for path in "${paths[@]}"; do
  printf '%s %s %s\n' "$path" "$((total[$path] / requests))" "$((sha[$path] / requests))"
done >"$out/instructions.txt"

base="${total[bare_post]:-}"
base_sha="${sha[bare_post]:-0}"
printf '%-18s %14s %8s %18s %8s\n' path instr/request ratio 'without SHA-256' ratio
for path in "${paths[@]}"; do
  python3 - "$path" "${total[$path]}" "${sha[$path]}" "$requests" "${base:-0}" "$base_sha" <<'PY'
import sys
path, total, sha, n, base, base_sha = sys.argv[1], *map(int, sys.argv[2:])
per, per_nosha = total / n, (total - sha) / n
if base:
    b, b_nosha = base / n, (base - base_sha) / n
    print(f"{path:<18} {per:>14,.0f} {per / b:>7.2f}x {per_nosha:>18,.0f} {per_nosha / b_nosha:>7.2f}x")
else:
    print(f"{path:<18} {per:>14,.0f} {'':>8} {per_nosha:>18,.0f}")
PY
done
